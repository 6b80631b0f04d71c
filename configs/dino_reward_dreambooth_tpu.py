"""DreamBooth + DINO reward (Wei et al., ECCV 2024, Table 1's "DINO reward" row).

The paper's form: DreamBooth's epsilon-losses plus lambda Q, where the
Q-network (the same 0.26M ``QNetwork`` as the latent reward's) learns the
DINO reward of the look-forward sample x0_hat at each timestep: x0_hat is
decoded by the frozen VAE, embedded by the frozen DINO ViT-S/16 and scored
``-(1 - cos)`` against the subject's photos; the critic regresses that
reward and the U-Net follows the critic's gradient. The rest is Look
Forward's DreamBooth setting (SD 1.4, lr 1e-6, 1,000 steps, batch 1, 8 class
images, text encoder trained).

The ``direct`` variant is an ablation, not the paper's row: no critic, the
DINO reward maximised directly, its gradient flowing back through the
decoder and the ViT into the U-Net.

Differences from the paper and from the public code are Look Forward's
(``configs/lookforward_dreambooth_tpu.py``), and the switch for each:

| What | Here | Paper / public code | Switch |
|------|------|---------------------|--------|
| Instance epsilon-loss | weight 1 (the paper's objective) | the code: weight 0 | ``--config.lookforward.instance_loss_weight=0`` (``released``) |
| Critic's gradient | clipped at global norm 1 | the code: unclipped | ``--config.lookforward.critic_clip_grad_norm=0`` (``released``) |
| Critic's target | the one-step reward (the code's) | the paper: cumulative Q with a lagging target network | ``--config.lookforward.critic_target=td`` |

  python -m personalize_jax.main --config=configs/dino_reward_dreambooth_tpu.py \
      --workdir=/tmp/dino-reward --config.data.instance_dir=photos/ \
      --config.data.class_name=backpack
  python -m personalize_jax.main --config=configs/dino_reward_dreambooth_tpu.py:tiny \
      --workdir=/tmp/dino-reward-tiny
  python -m personalize_jax.main \
      --config=configs/dino_reward_dreambooth_tpu.py:tiny,direct \
      --workdir=/tmp/dino-reward-direct-tiny
"""

from pathlib import Path

from personalize_jax.engine import config as config_lib


def get_config(arg: str | None = None):
  """The recipe; ``arg`` lists variants by comma: ``tiny`` (tiny random
  models on the drawn demo subject), ``lora`` (rank-4 adapters at lr 1e-4),
  ``released`` (Look Forward's public-code loss and critic), ``direct`` (no
  critic: the reward maximised through the VAE and ViT), e.g.
  ``tiny,direct``."""
  names = config_lib.variants(arg)
  c = config_lib.load_recipe(
      Path(__file__).with_name("lookforward_dreambooth_tpu.py")).get_config(
          ",".join(n for n in names if n != "direct") or None)
  c.lookforward.reward = "dino"
  c.lookforward.critic = "direct" not in names
  return c
