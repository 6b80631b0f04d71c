"""DreamBooth with prior preservation on Stable Diffusion 1.4.

Hyper-parameters of diffusers' DreamBooth recipe (examples/dreambooth README,
"Training with prior-preservation loss"): 512 px, batch 1, lr 5e-6 constant,
no warmup, 200 class images, prior_loss_weight 1.0, 800 steps; the U-Net
trains, the text encoder does not (``dreambooth.train_text_encoder=True`` for
the variant that trains it too).

  python -m personalize_jax.main --config=configs/dreambooth_tpu.py \
      --workdir=/tmp/dreambooth --config.data.instance_dir=photos/ \
      --config.data.class_name=dog
  python -m personalize_jax.main --config=configs/dreambooth_tpu.py:tiny \
      --workdir=/tmp/dreambooth-tiny
"""

from personalize_jax.engine import config as config_lib
from personalize_jax.methods import dreambooth


def get_config(arg: str | None = None):
  """The recipe; ``arg="tiny"``: tiny random models on the drawn demo subject."""
  c = dreambooth.add_config(config_lib.base_config())
  c.method = "dreambooth"
  c.model.pretrained = "CompVis/stable-diffusion-v1-4"
  c.learning_rate = 5e-6
  c.num_steps = 800
  c.batch_size = 1
  c.optimizer.weight_decay = 1e-2
  c.optimizer.clip_grad_norm = 1.0
  c.trainable = [r"^unet\."]
  c.data.resolution = 512
  c.checkpoint_every_steps = 200
  c.eval_every_steps = 200
  if arg == "tiny":
    tiny(c)
  elif arg:
    raise ValueError(f"unknown variant {arg!r}; use 'tiny'")
  return c


def tiny(c):
  """Tiny random models, the drawn demo subject, ~a minute on 2 CPU cores."""
  c.model.pretrained = "tiny"
  c.model.attention_impl = "xla"
  c.mixed_precision = "fp32"
  c.data.class_name = "mug"
  c.data.resolution = 64
  c.learning_rate = 1e-4
  c.num_steps = 20
  c.log_every_steps = 5
  c.checkpoint_every_steps = 10
  c.eval_every_steps = 10
  c.eval.prompts = c.eval.prompts[:2]
  c.eval.num_inference_steps = 4
  # Off: the tiny recipes run in many tests (configs/demo_cpu.py turns it on).
  c.final_eval.enabled = False
  c.final_eval.prompts = c.final_eval.prompts[:2]
  c.final_eval.num_images_per_prompt = 2
  c.final_eval.num_inference_steps = 4
  c.final_eval.batch_size = 4
  c.final_eval.dino_model = "tiny"
  c.final_eval.clip_model = "tiny"
  c.final_eval.grid_thumbnail = 64
  if "dreambooth" in c:
    c.dreambooth.num_class_images = 4
    c.dreambooth.class_inference_steps = 4
  return c
