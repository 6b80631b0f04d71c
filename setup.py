"""Install: ``pip install -e .`` (runtime), ``pip install -e .[tpu]`` (Cloud
TPU VMs), ``pip install -e .[wandb]`` (W&B logging) or ``pip install -e
.[test]`` (tests)."""

from setuptools import find_namespace_packages, setup

TPU = "libtpu==0.0.42.1"

setup(
    name="personalize_jax",
    version="0.1.0",
    description=("JAX/Flax training for personalized text-to-image generation "
                 "(RPO, Look Forward, DreamBooth, Custom Diffusion)"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # Namespace discovery so the data-only folder models/assets/clip_tokenizer
    # (the shipped CLIP vocabulary) is a package and its files ship.
    packages=find_namespace_packages(include=["personalize_jax", "personalize_jax.*"],
                                     exclude=["*.__pycache__"]),
    package_data={"personalize_jax.models.assets.clip_tokenizer": ["*"]},
    include_package_data=True,
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "chex==0.1.92",
        "ml-collections==1.1.0",
        "transformers==5.23.0",  # tokenizers only; no model classes at run time
        "safetensors==0.8.0",
        "tensorboardX==2.6.5",
        "huggingface-hub",
        "tensorflow-datasets==4.9.10",  # without TensorFlow: array_record + data_source
        "numpy",
        "pillow",
        "absl-py",
        "tqdm",
    ],
    extras_require={
        # The TPU runtime and compiler: the libtpu that jax 0.10.2 declares
        # for its `tpu` extra. On a Cloud TPU VM it runs the chips; on any
        # host it compiles for TPU topologies (benchmarks/tpu_compile.py).
        "tpu": [TPU],
        # config.log.wandb: Weights & Biases logging (offline) besides
        # TensorBoard; never needed otherwise.
        "wandb": ["wandb"],
        "test": [
            "pytest",
            "pytest-xdist",
            "torch==2.13.0",  # the CPU build; a bare `torch` pulls CUDA wheels
            "diffusers==0.42.1",
            "peft==0.21.2",  # diffusers' load_lora_weights; LoRA references
            "tensorboard",  # reads our event files back in tests; no TensorFlow
            TPU,  # tests/test_tpu_compile.py compiles for a TPU topology
        ],
    },
)
