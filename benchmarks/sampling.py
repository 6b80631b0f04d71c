"""Sampling throughput, and where an RPO run spends its time.

1. ``diffusion.generate`` (prompts -> text states -> DDIM with classifier-free
   guidance as one ``lax.scan`` -> VAE decode -> uint8 images) at batch sizes
   ``--batch-sizes``, ``--steps`` DDIM steps (50 by default): compile time
   (first call minus a timed call), images/s and U-Net evaluations/s (each
   DDIM step evaluates the U-Net on 2 x batch rows: unconditional and
   conditional). Models: the stand-in pipeline of ``--shape`` (``tiny``,
   ``small``), or SD 1.4's U-Net, VAE and text encoder with random weights
   made on the device (``sd14-256``, ``sd14-512``).

2. ``--rpo-split``: a whole tiny RPO run (``configs/rpo_tpu.py:tiny``:
   generation of the negatives, 20 training steps, a validation every 5)
   through ``train.train_and_evaluate``, instrumented by wrapping the
   engine's functions, so the time in generation, training and validation is
   visible. Beside it, the split of U-Net work of the real recipe
   (``configs/rpo_tpu.py``), counted from its config. ``--rpo-online=N``
   runs it as online RPO (``rpo.online_every_steps=N``) and reports what a
   refresh of the negatives costs against a training step, measured and
   counted for the real recipe.

  python benchmarks/sampling.py --shape=small --batch-sizes=1,2,4,8,16,32
  python benchmarks/sampling.py --shape=tiny --batch-sizes=1,2 --steps=2 --rpo-split
  python benchmarks/sampling.py --no-sampling --rpo-split --rpo-online=5

Prints JSON lines, then markdown tables.
"""

import argparse
import collections
import contextlib
import functools
import shutil
import tempfile
import time
from pathlib import Path

import jax
from flax import nnx

import common
from personalize_jax import diffusion, methods
from personalize_jax.engine import checkpoints, config as config_lib
from personalize_jax.engine import state as state_lib, train
from personalize_jax.pipeline import StableDiffusion


def sampling_pipeline(shape: common.Shape, precision: str) -> StableDiffusion:
  """The stand-in pipeline, with SD 1.4's modules for the full-size shapes."""
  pipeline = common.stand_in_pipeline(shape, precision)
  if not shape.full_size:
    return pipeline
  config = common.recipe_config("dreambooth", shape, batch_size=1,
                                precision=precision)
  replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  modules = {}
  for i, name in enumerate(("unet", "vae", "text_encoder")):
    graphdef, state = nnx.split(common.full_size(getattr(pipeline, name),
                                                 shape, config))
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=replicated), state)
    modules[name] = nnx.merge(graphdef, common.materialise(state, seed=i))
  return StableDiffusion(tokenizer=pipeline.tokenizer,
                         schedule=pipeline.schedule, source=shape.name,
                         **modules)


def bench_sampling(args) -> list[dict]:
  shape = common.SHAPES[args.shape]
  pipeline = sampling_pipeline(shape, args.precision)
  rows = []
  for batch in args.batch_sizes:
    prompts = [f"a photo of a mug, variant {i}" for i in range(batch)]
    call = functools.partial(
        diffusion.generate, pipeline, prompts, num_inference_steps=args.steps,
        guidance_scale=7.5, resolution=shape.resolution, batch_size=batch)
    start = time.perf_counter()
    call(seed=0)
    first = time.perf_counter() - start
    times = []
    for repeat in range(args.repeats):
      start = time.perf_counter()
      call(seed=1 + repeat)
      times.append(time.perf_counter() - start)
    stats = common.summary(times)
    seconds = stats["median_s"]
    record = {
        "benchmark": "sampling", "shape": shape.name,
        "resolution": shape.resolution, "precision": args.precision,
        "batch_size": batch, "ddim_steps": args.steps, "guidance_scale": 7.5,
        "device": common.device_name(), "first_call_s": first,
        "compile_s": max(first - seconds, 0.0), "time": stats,
        "images_per_s": batch / seconds,
        "unet_evals_per_s": 2 * batch * args.steps / seconds,
        "load_average": common.load_average(),
    }
    common.emit(record)
    rows.append(record)
  return rows


# --------------------------------------------------------------- RPO split


class PhaseTimer:
  """Wall time per phase, with the phase stack for nested calls."""

  def __init__(self):
    self.seconds = collections.defaultdict(float)
    self.counts = collections.defaultdict(int)
    self.stack = []

  def wrap(self, name: str, fn, block=False):
    @functools.wraps(fn)
    def timed(*args, **kwargs):
      label = name
      if name == "generate" and self.stack:
        label = f"{self.stack[-1]} > generate"
      self.stack.append(name)
      start = time.perf_counter()
      try:
        out = fn(*args, **kwargs)
        if block:
          jax.block_until_ready(out)
        return out
      finally:
        self.stack.pop()
        elapsed = time.perf_counter() - start
        if name == "train step" and self.counts[name] == 0:
          label = "train step (first: compile)"
        self.seconds[label] += elapsed
        self.counts[name] += 1
    return timed


@contextlib.contextmanager
def patched(obj, attr: str, value):
  old = getattr(obj, attr)
  setattr(obj, attr, value)
  try:
    yield
  finally:
    setattr(obj, attr, old)


def rpo_split(args) -> dict:
  """Times a whole tiny RPO run by phase (the engine's functions wrapped)."""
  config = config_lib.load_recipe(
      common.REPO / "configs" / "rpo_tpu.py").get_config("tiny")
  if args.rpo_steps:
    config.num_steps = args.rpo_steps
    config.eval_every_steps = min(config.eval_every_steps, args.rpo_steps)
  config.rpo.online_every_steps = args.rpo_online
  rpo = methods.get("rpo")
  timer = PhaseTimer()
  make_step = state_lib.make_train_step

  def timed_make_step(*a, **k):
    return timer.wrap("train step", make_step(*a, **k), block=True)

  workdir = Path(tempfile.mkdtemp(prefix="bench-rpo-split-"))
  try:
    with contextlib.ExitStack() as stack:
      for obj, attr, name in (
          (rpo, "prepare", "prepare"), (train, "evaluate", "validation"),
          (rpo.Online, "refresh", "online refresh"),
          (train, "export", "export"), (diffusion, "generate", "generate"),
          (checkpoints.CheckpointManager, "save", "checkpoint")):
        stack.enter_context(patched(obj, attr,
                                    timer.wrap(name, getattr(obj, attr))))
      stack.enter_context(patched(state_lib, "make_train_step",
                                  timed_make_step))
      start = time.perf_counter()
      train.train_and_evaluate(config, str(workdir), rpo)
      total = time.perf_counter() - start
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  seconds = dict(timer.seconds)
  # Nested phases are reported inside their parent; the rest is set-up
  # (models, state, compilation of what is not timed above) and the loop.
  top = ("prepare", "train step (first: compile)", "train step",
         "validation", "online refresh", "checkpoint", "export")
  seconds["other"] = total - sum(seconds.get(k, 0.0) for k in top)
  record = {
      "benchmark": "rpo_split", "config": "configs/rpo_tpu.py:tiny",
      "num_steps": config.num_steps, "eval_every_steps": config.eval_every_steps,
      "device": common.device_name(), "total_s": total, "seconds": seconds,
      "share": {k: v / total for k, v in seconds.items()},
      "train_steps_timed": timer.counts["train step"],
      "online_every_steps": args.rpo_online,
      "load_average": common.load_average(),
  }
  if args.rpo_online:
    # Mean over the refreshes and the train steps after the first (which
    # compiles the step).
    refreshes = timer.counts["online refresh"]
    step_s = seconds["train step"] / (timer.counts["train step"] - 1)
    refresh_s = seconds["online refresh"] / refreshes
    record.update(refreshes=refreshes, refresh_s=refresh_s, step_s=step_s,
                  refresh_over_step=refresh_s / step_s)
  common.emit(record)
  return record


def rpo_unet_work(config) -> dict:
  """U-Net forward-evaluation equivalents of an RPO run, from its config.

  Generation: prompts x images x DDIM steps x 2 (guidance). Training: each
  pair makes 2 frozen-base rows (forward only) and 3 trained rows (forward
  and backward, counted as 3 forwards). Validation: every eval, the sample
  grid (``eval.prompts``) and RPO's validation images, each DDIM steps x 2.
  """
  r = config.rpo
  prompts = len(r.live_prompts if r.live_subject else r.object_prompts)
  generation = prompts * r.num_images_per_prompt * r.gen_inference_steps * 2
  per_pair = 2 + 3 * 3 if r.ref_prompt == "training" else 2 + 2 * 3
  per_step = config.batch_size * per_pair
  training = config.num_steps * per_step
  evals = config.num_steps // config.eval_every_steps
  images = len(config.eval.prompts) + len(r.val_prompts) * r.num_val_images
  validation = evals * images * config.eval.num_inference_steps * 2
  total = generation + training + validation
  return {"benchmark": "rpo_unet_work", "config": "configs/rpo_tpu.py",
          "unet_forward_equivalents": {"generation": generation,
                                       "training": training,
                                       "validation": validation},
          "share": {"generation": generation / total,
                    "training": training / total,
                    "validation": validation / total},
          # Online RPO redraws every negative at each refresh.
          "refresh_over_step": generation / per_step}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="small", choices=list(common.SHAPES))
  parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
  parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
  parser.add_argument("--repeats", type=int, default=1,
                      help="timed calls per batch size (after the first)")
  parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                      help="default: fp32 on CPU, bf16 on accelerators")
  parser.add_argument("--rpo-split", action="store_true",
                      help="also time a whole tiny RPO run by phase")
  parser.add_argument("--rpo-steps", type=int, default=0,
                      help="training steps of the timed RPO run (default: "
                      "the tiny recipe's)")
  parser.add_argument("--rpo-online", type=int, default=0,
                      help="run the timed RPO run as online RPO, refreshing "
                      "the negatives every N steps")
  parser.add_argument("--no-sampling", action="store_true",
                      help="skip the batch-size sweep")
  args = parser.parse_args(argv)
  args.batch_sizes = [int(b) for b in common.parse_list(args.batch_sizes)]
  cpu = jax.devices()[0].platform == "cpu"
  args.precision = args.precision or ("fp32" if cpu else "bf16")
  out = {"sampling": [], "rpo_split": None}
  if not args.no_sampling:
    out["sampling"] = bench_sampling(args)
  if args.rpo_split:
    out["rpo_split"] = rpo_split(args)
    recipe = config_lib.load_recipe(common.REPO / "configs" / "rpo_tpu.py")
    out["rpo_unet_work"] = rpo_unet_work(recipe.get_config())
    common.emit(out["rpo_unet_work"])
  if out["sampling"]:
    print()
    print(common.markdown_table(out["sampling"], [
        ("shape", "shape"), ("batch_size", "batch"), ("ddim_steps", "steps"),
        ("compile_s", "compile s"), ("images_per_s", "images/s"),
        ("unet_evals_per_s", "U-Net evals/s")]))
  if out["rpo_split"]:
    split = out["rpo_split"]
    rows = [{"phase": k, "s": v, "share": split["share"][k]}
            for k, v in sorted(split["seconds"].items(), key=lambda kv: -kv[1])]
    print()
    print(common.markdown_table(rows, [("phase", "phase (tiny RPO run)"),
                                       ("s", "seconds"), ("share", "share")]))
    if split["online_every_steps"]:
      work = out["rpo_unet_work"]
      print()
      print(common.markdown_table([
          {"what": f"tiny RPO run, measured ({split['device']})",
           "ratio": split["refresh_over_step"]},
          {"what": "configs/rpo_tpu.py, counted in U-Net forward passes",
           "ratio": work["refresh_over_step"]}],
          [("what", "online refresh"), ("ratio", "refresh / train step")]))
  return out


if __name__ == "__main__":
  main()
