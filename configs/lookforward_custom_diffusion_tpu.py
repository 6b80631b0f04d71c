"""Look Forward on Custom Diffusion (Wei et al., ECCV 2024) on Stable Diffusion 1.4.

Custom Diffusion's recipe (``configs/custom_diffusion_tpu.py``: cross-attention
K/V and the ``<new1>`` token train, lr 1e-5, 250 steps, 200 class images)
with Look Forward's actor and critic on top: the latent look-forward reward,
a 0.26M ``QNetwork`` fitted to the one-step reward with SGD at lr 0.01, gamma
0.9986, instance loss weight 1.0. The public code has not released this
variant; these are the two recipes combined.

  python -m personalize_jax.main \
      --config=configs/lookforward_custom_diffusion_tpu.py \
      --workdir=/tmp/lookforward-cd --config.data.instance_dir=photos/ \
      --config.data.class_name=cat
  python -m personalize_jax.main \
      --config=configs/lookforward_custom_diffusion_tpu.py:tiny \
      --workdir=/tmp/lookforward-cd-tiny
"""

from pathlib import Path

from personalize_jax.engine import config as config_lib
from personalize_jax.methods import lookforward


def get_config(arg: str | None = None):
  """The recipe; ``arg="tiny"``: tiny random models on the drawn demo subject."""
  c = lookforward.add_config(config_lib.load_recipe(
      Path(__file__).with_name("custom_diffusion_tpu.py")).get_config(arg))
  c.method = "lookforward"
  c.lookforward.base = "custom_diffusion"
  c.lookforward.reward = "latent"
  c.lookforward.critic = True
  c.lookforward.critic_target = "one_step"
  if "tiny" in config_lib.variants(arg):
    c.lookforward.dino_model = "tiny"
  return c
