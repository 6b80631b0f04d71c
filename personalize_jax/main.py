"""Train a personalized text-to-image model.

  python -m personalize_jax.main --config=configs/rpo_tpu.py --workdir=/tmp/run
  python -m personalize_jax.main --config=configs/dreambooth_tpu.py:tiny \
      --workdir=/tmp/db --config.num_steps=20

Re-running the same command on the same workdir resumes from its last
checkpoint. Errors in what you passed end in one line and exit code 2.

Several hosts (a TPU pod slice) run the same command with --distributed on a
workdir they all see; where JAX cannot find the others itself, each also gets
--coordinator_address=HOST:PORT --num_processes=N --process_id=I.
"""

import logging as std_logging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from personalize_jax.errors import UserError, fail

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file, optionally with a variant: path.py:tiny.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False,
    "Join a multi-process run first (jax.distributed.initialize): one process "
    "per host of a TPU pod slice or GPU cluster.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "With --distributed: process 0's HOST:PORT (default: detected by JAX).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None,
    "With --distributed: how many processes the run has (default: detected).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None,
    "With --distributed: this process's index, 0 to num_processes - 1 "
    "(default: detected).")


def _parse(argv):
  """absl parsing whose errors are one line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    # A recipe that raises arrives with its traceback: keep the flag and the
    # exception's own line.
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    fail(lines[0] if len(lines) == 1
          else f"{lines[0].split(': ')[0]}: {lines[-1]}")
  except (KeyError, AttributeError) as e:
    # config_flags reports an unknown key as a bare "'key'": name the flag.
    key = str(e).strip("\"' ")
    flag = next((a.split("=")[0] for a in argv[1:]
                 if a.startswith("--config.") and key in a.split("=")[0]
                 .split(".")), f"--config.{key}")
    fail(f"{flag}: the config has no key {key!r}; check its spelling against "
          "the recipe file and personalize_jax/engine/config.py")
  except (ValueError, TypeError) as e:
    # config_flags reports bad override types and recipe errors this way.
    fail(str(e).strip().splitlines()[-1] if str(e).strip() else repr(e))


def _quiet_orbax(record) -> bool:
  """Drops orbax's per-save INFO chatter; its warnings and errors still show."""
  return record.levelno >= std_logging.WARNING or "orbax" not in record.pathname


def main(argv) -> None:
  del argv
  logging.get_absl_logger().addFilter(_quiet_orbax)
  if _CONFIG.value is None or not _WORKDIR.value:
    fail("pass --config=configs/<recipe>.py[:variant] and --workdir=DIR")
  try:
    _CONFIG.value.get("method")
  except OSError as e:
    # config_flags defers a config file that failed to load to first use.
    fail(f"--config: {str(e).strip().splitlines()[-1].strip()}")
  from personalize_jax.engine import distributed  # pylint: disable=g-import-not-at-top
  try:
    distributed.check_flags(_DISTRIBUTED.value, _COORDINATOR.value,
                            _NUM_PROCESSES.value, _PROCESS_ID.value)
    if _DISTRIBUTED.value:
      distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value,
                             _PROCESS_ID.value)
  except UserError as e:
    fail(str(e))
  # Imported after joining: no device may be touched before that.
  from personalize_jax import methods  # pylint: disable=g-import-not-at-top
  from personalize_jax.engine import train  # pylint: disable=g-import-not-at-top
  try:
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                                       methods.get(_CONFIG.value.method))
  except UserError as e:
    fail(str(e))
  except train.TrainingStopped as e:
    fail(str(e), code=1)
  if summary.stopped_by:
    print(f"stopped by {summary.stopped_by} at step {summary.steps}; the "
          "checkpoint is saved: run the same command again to resume")
    return
  logging.info("done: %d steps in %s", summary.steps, summary.workdir)
  if not distributed.is_chief():
    return  # the summary reads files process 0 writes.
  print(summary_text(summary, _CONFIG.value,
                     config_flags.get_config_filename(flags.FLAGS["config"])))


def real_recipe(config_arg: str) -> str:
  """The recipe that runs the same method on Stable Diffusion."""
  path = config_arg.split(":")[0] or "configs/<recipe>.py"
  return path.replace("demo_cpu.py", "rpo_tpu.py")


def summary_text(summary, config, config_arg: str) -> str:
  """What a finished run prints: numbers, where things are, what to run next."""
  import json  # pylint: disable=g-import-not-at-top
  from personalize_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  work = summary.workdir
  m = summary.last_metrics
  losses = ", ".join(f"{k} {v:.4f}" for k, v in sorted(m.items())
                     if k == "loss" or k.startswith("loss/"))
  lines = [f"trained {summary.steps} steps ({losses})"]
  best_file = work / "best.json"
  if best_file.is_file():
    best = json.loads(best_file.read_text())
    step = best.pop("step")
    scores = ", ".join(f"{k} {v:.4f}" for k, v in best.items())
    lines.append(f"best step {step}: {scores} (exported)")
  if summary.final_eval:
    from personalize_jax.engine import final_eval  # pylint: disable=g-import-not-at-top
    folder = work / "final_eval"
    lines.append(f"final evaluation (scores: {folder / 'metrics.md'}; "
                 f"side by side: {folder / 'comparison.png'}):")
    lines += final_eval.summary_lines(summary.final_eval)
  if config.lora.rank:
    lines.append(
        f"  LoRA (diffusers format, load_lora_weights): "
        f"{work / 'export' / 'pytorch_lora_weights.safetensors'}"
        + ("  (fused pipeline beside it)" if config.lora.export_fused else ""))
  else:
    lines.append(f"  fine-tuned pipeline (diffusers layout): {work / 'export'}")
  lines += [
      f"  metrics: {work / 'metrics.jsonl'}  (TensorBoard: {work / 'tensorboard'})",
      f"  sample grids: {work / 'samples'}",
      f"  checkpoints: {work / 'checkpoints'}",
  ]
  if config.model.pretrained in pipeline_lib.TINY_PIPELINES:
    recipe = real_recipe(config_arg or "configs/demo_cpu.py")
    # The recipe's SDXL variant, or SD 1.4.
    if pipeline_lib.is_sdxl_source(config.model.pretrained):
      recipe, model = recipe + ":sdxl", ""
    else:
      model = " --config.model.pretrained=CompVis/stable-diffusion-v1-4"
    lines += [
        "These models were tiny and random: the images are noise. With Stable "
        "Diffusion weights on a TPU or GPU:",
        f"  python -m personalize_jax.main --config={recipe} "
        "--workdir=/tmp/run --config.data.instance_dir=YOUR_PHOTOS "
        f"--config.data.class_name=dog{model}",
    ]
  return "\n".join(lines)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
