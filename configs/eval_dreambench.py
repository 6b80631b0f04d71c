"""DreamBench evaluation: DINO, CLIP-I, CLIP-T, H(lambda).

By the DreamBooth paper's protocol (``protocol="dreambooth"``, the default)
or the RPO authors' code's (``--config.protocol=rpo_code``).

  python -m personalize_jax.evaluate --config=configs/eval_dreambench.py \
      --config.images_dir=/path/to/generated --workdir=/tmp/eval
  python -m personalize_jax.evaluate --config=configs/eval_dreambench.py \
      --config.model=/path/to/finetuned --workdir=/tmp/eval

Variants: ``--config=configs/eval_dreambench.py:tiny`` (random tiny models,
2 subjects x 2 prompts x 2 images; for tests and smoke runs).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the evaluation config; ``arg="tiny"`` for the tiny variant."""
  config = ml_collections.ConfigDict()
  config.dataset_dir = "../shared/dreambench/dataset"  # google/dreambooth dataset/
  config.tfds_data_dir = ""  # prepared tfds records; "" = <workdir>/tfds
  config.images_dir = ""  # generated images, <subject>/<prompt_idx>_<k>.png
  config.model = ""  # or a pipeline or LoRA export (or a folder of one per subject) to sample
  config.base_model = ""  # what LoRA-only folders adapt; "" = their train_config.json
  config.subjects = "all"  # "all" or comma-separated names: "dog,cat"
  config.num_prompts = 25  # the first N prompts of each subject's list
  config.num_images_per_prompt = 4  # images per prompt (the paper: 4)
  config.unique_token = "sks"  # the rare token standing for the subject
  config.protocol = "dreambooth"  # or "rpo_code": the RPO code's CLIP and CLIP-T
  config.dino_model = ""  # DINO ViT: folder, Hub id, tiny; "" = the protocol's
  config.clip_model = ""  # CLIP-I/T, H(lam): folder, Hub id, tiny; "" = the protocol's
  config.harmonic_lams = (0.3, 0.5, 0.7)  # lambda values of the harmonic score
  config.batch_size = 16  # images per embedding call
  config.grid_thumbnail = 128  # side of each image in grids/<subject>.png
  config.resolution = 0  # image side when generating; 0 = the model's own (SDXL: 1024)
  config.num_inference_steps = 50  # DDIM steps when generating (config.model)
  config.guidance_scale = 7.5  # classifier-free guidance when generating
  config.seed = 0  # generation seed (per subject and prompt via fold_in)

  if arg == "tiny":
    config.subjects = "backpack,dog"
    config.num_prompts = 2
    config.num_images_per_prompt = 2
    config.dino_model = "tiny"
    config.clip_model = "tiny"
    config.batch_size = 4
    config.grid_thumbnail = 32
    config.num_inference_steps = 2
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of eval_dreambench; use tiny")
  return config
