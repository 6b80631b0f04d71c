"""DreamBooth + DINO reward (Wei et al., ECCV 2024, Table 1's baseline row).

DreamBooth's losses plus the DINO reward of the look-forward sample,
maximised directly: x0_hat is decoded by the frozen VAE, embedded by the
frozen DINO ViT-S/16 and scored ``-(1 - cos)`` against the subject's photos;
the gradient flows back through decoder and ViT into the U-Net. No Q-network.
The rest is Look Forward's DreamBooth setting (SD 1.4, lr 1e-6, 1,000 steps,
batch 1, 8 class images, text encoder trained).

  python -m personalize_jax.main --config=configs/dino_reward_dreambooth_tpu.py \
      --workdir=/tmp/dino-reward --config.data.instance_dir=photos/ \
      --config.data.class_name=backpack
  python -m personalize_jax.main --config=configs/dino_reward_dreambooth_tpu.py:tiny \
      --workdir=/tmp/dino-reward-tiny
"""

from pathlib import Path

from personalize_jax.engine import config as config_lib


def get_config(arg: str | None = None):
  """The recipe; ``arg``: ``tiny`` (tiny random models on the drawn demo
  subject), ``lora`` (rank-4 adapters at lr 1e-4), or ``tiny,lora``."""
  c = config_lib.load_recipe(
      Path(__file__).with_name("lookforward_dreambooth_tpu.py")).get_config(arg)
  c.lookforward.reward = "dino"
  c.lookforward.critic = False
  return c
