"""Custom Diffusion with a modifier token on Stable Diffusion 1.4.

Hyper-parameters of the paper (Kumari et al. 2023) and diffusers'
``train_custom_diffusion.py``: 512 px, 250 steps, batch 1, 200 class images
with prior_loss_weight 1.0, AdamW with weight decay 1e-2 and gradient
clipping at 1.0. The learning rate is diffusers' default 1e-5 per image in
the batch (its ``--scale_lr`` multiplies it by the global batch; the paper's
8e-5 is the same rule at 2 GPUs x batch 4): raise it with ``batch_size``.
Only cross-attention K/V and the ``<new1>`` row of the token table train;
prior-preservation options live in ``config.dreambooth``.

  python -m personalize_jax.main --config=configs/custom_diffusion_tpu.py \
      --workdir=/tmp/custom_diffusion --config.data.instance_dir=photos/ \
      --config.data.class_name=cat
  python -m personalize_jax.main --config=configs/custom_diffusion_tpu.py:tiny \
      --workdir=/tmp/custom_diffusion-tiny
"""

from personalize_jax.engine import config as config_lib
from personalize_jax.methods import custom_diffusion


def get_config(arg: str | None = None):
  """The recipe; ``arg="tiny"``: tiny random models on the drawn demo subject."""
  c = custom_diffusion.add_config(config_lib.base_config())
  c.method = "custom_diffusion"
  c.model.pretrained = "CompVis/stable-diffusion-v1-4"
  c.learning_rate = 1e-5
  c.num_steps = 250
  c.batch_size = 1
  c.optimizer.weight_decay = 1e-2
  c.optimizer.clip_grad_norm = 1.0
  c.trainable = custom_diffusion.TRAINABLE
  c.data.resolution = 512
  c.data.unique_token = "<new1>"
  c.data.instance_prompt = "photo of a {token} {class_name}"
  c.dreambooth.class_prompt = "photo of a {class_name}"
  c.dreambooth.num_class_images = 200
  c.dreambooth.prior_loss_weight = 1.0
  c.custom_diffusion.modifier_token = "<new1>"
  c.custom_diffusion.initializer_token = "ktn"
  c.checkpoint_every_steps = 250
  c.eval_every_steps = 250
  # No LoRA variant: Custom Diffusion already trains a small subset.
  return config_lib.with_variant(c, arg, lora=None)
