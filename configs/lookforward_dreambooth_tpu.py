"""Look Forward on DreamBooth (Wei et al., ECCV 2024) on Stable Diffusion 1.4.

The setting of the public code's ``train_dpg.sh``: 512 px, batch 1, lr 1e-6
constant with no warmup, 1,000 steps, prior preservation with 8 class images
and weight 1.0, the text encoder trained with the U-Net. The reward is the
look-forward reconstruction error in latent space, its critic a 0.26M
``QNetwork`` fitted to the one-step reward with SGD at lr 0.01, gamma 0.9986.
The instance epsilon-loss keeps weight 1.0 as the paper writes the objective,
and the critic's gradient is clipped at global norm 1.0 (unclipped, one noisy
timestep can throw the critic off). The ``released`` variant is the public
code's setting: instance loss weight 0 and the critic's gradient unclipped
(``--config.lookforward.instance_loss_weight=0
--config.lookforward.critic_clip_grad_norm=0``); it combines with the others.

  python -m personalize_jax.main --config=configs/lookforward_dreambooth_tpu.py \
      --workdir=/tmp/lookforward --config.data.instance_dir=photos/ \
      --config.data.class_name=backpack
  python -m personalize_jax.main --config=configs/lookforward_dreambooth_tpu.py:tiny \
      --workdir=/tmp/lookforward-tiny
  python -m personalize_jax.main \
      --config=configs/lookforward_dreambooth_tpu.py:tiny,released \
      --workdir=/tmp/lookforward-tiny-released

Differences from the paper and from the public code, and the switch for
each:

| What | Here | Paper / public code | Switch |
|------|------|---------------------|--------|
| Instance epsilon-loss | weight 1 (the paper's objective) | the code: weight 0 | ``--config.lookforward.instance_loss_weight=0`` (``released``) |
| Critic's gradient | clipped at global norm 1 | the code: unclipped | ``--config.lookforward.critic_clip_grad_norm=0`` (``released``) |
| Critic's target | the one-step reward (the code's) | the paper: cumulative Q with a lagging target network | ``--config.lookforward.critic_target=td`` |
| Reward | the latent reconstruction reward | the paper also reports DINO and both | ``--config.lookforward.reward=dino`` (or ``both``; ``configs/dino_reward_dreambooth_tpu.py``) |
"""

from personalize_jax.engine import config as config_lib
from personalize_jax.methods import dreambooth, lookforward


def get_config(arg: str | None = None):
  """The recipe; ``arg`` lists variants by comma: ``tiny`` (tiny random models
  on the drawn demo subject), ``lora`` (rank-4 adapters at lr 1e-4),
  ``released`` (the public code's loss and critic), e.g. ``tiny,released``."""
  c = lookforward.add_config(dreambooth.add_config(config_lib.base_config()))
  c.method = "lookforward"
  c.model.pretrained = "CompVis/stable-diffusion-v1-4"
  c.learning_rate = 1e-6
  c.num_steps = 1000
  c.batch_size = 1
  c.optimizer.weight_decay = 1e-2
  c.optimizer.clip_grad_norm = 1.0
  c.trainable = (r"^unet\.", r"^text_encoder\.")
  c.data.resolution = 512
  c.dreambooth.prior_preservation = True
  c.dreambooth.num_class_images = 8
  c.dreambooth.prior_loss_weight = 1.0
  c.dreambooth.train_text_encoder = True
  c.lookforward.base = "dreambooth"
  c.lookforward.reward = "latent"
  c.lookforward.critic = True
  c.lookforward.critic_target = "one_step"
  c.checkpoint_every_steps = 250
  c.eval_every_steps = 250
  # with_variant knows tiny and lora; released is this recipe's own.
  names = config_lib.variants(arg)
  if "released" in names:
    released(c)
  return config_lib.with_variant(
      c, ",".join(n for n in names if n != "released"), tiny)


def released(c):
  """The public code's setting: no instance epsilon-loss, an unclipped critic."""
  c.lookforward.instance_loss_weight = 0.0
  c.lookforward.critic_clip_grad_norm = 0.0
  return c


def tiny(c):
  """The shared tiny variant plus the tiny DINO ViT."""
  config_lib.tiny_variant(c)
  c.lookforward.dino_model = "tiny"
  return c
