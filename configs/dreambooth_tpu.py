r"""DreamBooth with prior preservation on Stable Diffusion 1.4.

Hyper-parameters of diffusers' DreamBooth recipe (examples/dreambooth README,
"Training with prior-preservation loss"): 512 px, batch 1, lr 5e-6 constant,
no warmup, 200 class images, prior_loss_weight 1.0, 800 steps; the U-Net
trains, the text encoder does not (``--config.dreambooth.train_text_encoder=true``
for the variant that trains it too: it adds ``^text_encoder\.`` to
``config.trainable``, so ``config.json`` shows what trains).

  python -m personalize_jax.main --config=configs/dreambooth_tpu.py \
      --workdir=/tmp/dreambooth --config.data.instance_dir=photos/ \
      --config.data.class_name=dog
  python -m personalize_jax.main --config=configs/dreambooth_tpu.py:tiny \
      --workdir=/tmp/dreambooth-tiny
"""

from personalize_jax.engine import config as config_lib
from personalize_jax.methods import dreambooth


def get_config(arg: str | None = None):
  """The recipe; ``arg``: ``tiny`` (tiny random models on the drawn demo
  subject), ``lora`` (rank-4 adapters at lr 1e-4), or ``tiny,lora``."""
  c = dreambooth.add_config(config_lib.base_config())
  c.method = "dreambooth"
  c.model.pretrained = "CompVis/stable-diffusion-v1-4"
  c.learning_rate = 5e-6
  c.num_steps = 800
  c.batch_size = 1
  c.optimizer.weight_decay = 1e-2
  c.optimizer.clip_grad_norm = 1.0
  c.trainable = (r"^unet\.",)
  c.data.resolution = 512
  c.checkpoint_every_steps = 200
  c.eval_every_steps = 200
  return config_lib.with_variant(c, arg)
