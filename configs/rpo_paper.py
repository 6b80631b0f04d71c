"""RPO as the paper (Miao et al. 2024) and the authors' code run it.

The public code's README command (github.com/andrew-miao/RPO): Stable
Diffusion 2.1 (v-prediction, 768 px native) trained at 512 px, ALIGN
(``kakaobrain/align-base``) rewards, batch 1, lr 5e-6, 400 steps, beta 1,
``reward_lambda=0.5`` (the README's DreamBench row for it: DINO 0.652,
CLIP-I 0.833, CLIP-T 0.314), a validation every 40 steps with 4 images per
prompt, all 400 steps run and the best-validated step kept. Like the
authors' code it validates on the subject's training prompts (the live set
for dogs and cats, ``rpo.val_on_training_prompts``) and conditions the
reference half of L_pre on the instance prompt (``rpo.ref_prompt=instance``,
its pass reused for L_sim; ``configs/rpo_tpu.py`` uses the generated image's
training prompt); everything else is ``configs/rpo_tpu.py``'s recipe (AdamW,
weight decay 1e-2, gradient norm clipped at 1.0, constant lr, no flips, only
the U-Net trains).

Batch 1 runs on one device (the engine splits the batch over every device);
on a v4-8 use ``--config.batch_size=4``, one pair per chip.

Remaining differences, and the switch that changes each:

| What | Here | Paper / authors' code | Switch |
|------|------|-----------------------|--------|
| Batch on several devices | batch 1 needs one device | the code: one pair per step on one GPU | ``--config.batch_size=4`` (one pair per chip) |

Differences no switch changes (see ``personalize_jax/methods/rpo.py``):
training rewards score the prompt without its unique token (the code keeps a
literal "[V]"); every (reference, generated) pair carries its own two
images' rewards and every training prompt is used (the code pairs rewards of
other images and, with fewer GPUs than prompts, drops prompts); the code's
prompt lists word a few prompts differently ("a China Great Wall").

  python -m personalize_jax.main --config=configs/rpo_paper.py \
      --workdir=/tmp/rpo-paper --config.data.instance_dir=photos/ \
      --config.data.class_name=dog
  python -m personalize_jax.main --config=configs/rpo_paper.py:tiny \
      --workdir=/tmp/rpo-paper-tiny
"""

from pathlib import Path

from personalize_jax.engine import config as config_lib

_RPO_TPU = config_lib.load_recipe(Path(__file__).with_name("rpo_tpu.py"))


def get_config(arg: str | None = None):
  """The recipe; ``arg``: ``tiny`` (tiny random models, a tiny ALIGN, the
  drawn demo subject), ``lora`` (rank-32 adapters at lr 1e-4), or
  ``tiny,lora``."""
  c = _RPO_TPU.get_config()
  c.model.pretrained = "stabilityai/stable-diffusion-2-1"
  c.data.resolution = 512  # the code trains SD 2.1 at 512 px, not its 768.
  c.batch_size = 1
  c.learning_rate = 5e-6
  c.num_steps = 400
  c.eval_every_steps = 40
  c.rpo.reward_model = "align"  # kakaobrain/align-base, the paper's.
  c.rpo.lambda_val = 0.5  # the README command's (its DreamBench row).
  c.rpo.ref_prompt = "instance"  # the code's L_pre reference prompt.
  # The code validates on the subject's training prompts (live or object).
  c.rpo.val_on_training_prompts = True
  return config_lib.with_variant(c, arg, tiny, _RPO_TPU.lora)


def tiny(c):
  """rpo_tpu.py's tiny variant, keeping the paper's reward family (ALIGN)."""
  c = _RPO_TPU.tiny(c)
  c.rpo.reward_model = "align-tiny"
  return c
