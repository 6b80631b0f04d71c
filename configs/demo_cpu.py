"""The README's first command: RPO end to end on the CPU, nothing downloaded.

  python -m personalize_jax.main --config=configs/demo_cpu.py \
      --workdir=/tmp/personalize-demo

Tiny random models (the pictures are noise: only the plumbing is real) and a
subject the code draws itself (a striped mug, written to
``<workdir>/instance_images/``). It runs every stage of a real RPO run:
negatives from the base model, CLIP rewards, preference training, validation
with early stopping, export of the best step, and a final evaluation of the
export against the base model (DINO, CLIP-I, CLIP-T, lambda-Harmonic). A couple of minutes on 2 cores.
The same run on Stable Diffusion: ``configs/rpo_tpu.py`` (see the summary).
"""

from pathlib import Path

from personalize_jax.engine import config as config_lib


def get_config(arg: str | None = None):
  """RPO's tiny variant with early stopping; no variants of its own."""
  if arg:
    raise ValueError(f"demo_cpu has no variant {arg!r}")
  c = config_lib.load_recipe(
      Path(__file__).with_name("rpo_tpu.py")).get_config("tiny")
  c.num_steps = 30
  c.eval_every_steps = 5
  c.early_stopping_patience = 3  # validations without a better val/harmonic
  c.final_eval.enabled = True  # DreamBench scores of export/ vs the base model
  return c
