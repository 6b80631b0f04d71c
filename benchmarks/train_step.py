"""Train-step throughput of every method at every shape, on the devices present.

For each method (``--methods``) and model shape (``--shapes``, see
``common.SHAPES``): the engine's jitted step is lowered (counting the U-Net
evaluations it makes), compiled (compile time, XLA's FLOPs and per-device
memory), then run ``--steps`` times the way the engine's loop runs it (the
method's batch, host-to-device transfer, the step, the per-step finite check).
Reported: steps/s and images/s (instance images: ``batch_size`` per step) from
the median step, achieved TFLOP/s from the cost analysis, MFU against a
matmul peak measured in the same run on the same device, peak memory.

Shapes ``tiny`` and ``small`` go through ``train.build_trainer``; the SD 1.4
shapes are built abstractly (``common.abstract_trainer``) and run (on random
weights made on the device) only where the compiled step's per-device memory
fits: the device's limit, or on a CPU 70% of the host's free memory.
Compile time, FLOPs and memory are reported either way.

  python benchmarks/train_step.py --methods=dreambooth,rpo --shapes=tiny,small
  python benchmarks/train_step.py --shapes=tiny --steps=2   # smoke test
  python benchmarks/train_step.py --methods=dreambooth,rpo,lookforward \
      --shapes=small --lora-ranks=0,4,32   # full vs LoRA in one run

Prints one JSON line per (method, shape), then a markdown table.
"""

import argparse
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import jax
import psutil

import common
from personalize_jax.engine import state as state_lib

COLUMNS = [("method", "method"), ("shape", "shape"), ("lora_rank", "LoRA rank"),
           ("unet_params_m", "U-Net M params"), ("batch_size", "batch"),
           ("precision", "dtype"), ("unet_evals_per_step", "U-Net evals/step"),
           ("compile_s", "compile s"), ("steps_per_s", "steps/s"),
           ("images_per_s", "images/s"), ("tflops_per_step", "TFLOP/step"),
           ("achieved_tflops", "TFLOP/s"), ("mfu", "MFU"),
           ("step_peak_gib", "step peak GiB/dev"), ("note", "note")]


def fits(peak_bytes: int) -> tuple[bool, str]:
  """Whether a step needing ``peak_bytes`` per device can run here."""
  device = jax.devices()[0]
  stats = device.memory_stats() or {}
  if "bytes_limit" in stats:
    limit = int(stats["bytes_limit"])
  else:  # CPU: the host's free memory, with room for the rest of the process.
    limit = int(0.7 * psutil.virtual_memory().available)
  ok = peak_bytes <= limit
  return ok, ("" if ok else f"not run: step needs {common.gib(peak_bytes):.1f} "
              f"GiB/device, {common.gib(limit):.1f} GiB usable here")


def bench_one(method: str, shape: common.Shape, args, peaks: dict,
              root: Path, lora_rank: int = 0) -> dict:
  config = common.recipe_config(method, shape, batch_size=args.batch_size,
                                precision=args.precision, lora_rank=lora_rank)
  workdir = root / f"{method}-{shape.name}"
  start = time.perf_counter()
  built = (common.abstract_trainer(config, workdir, shape) if shape.full_size
           else common.engine_trainer(config, workdir, shape))
  build_s = time.perf_counter() - start
  method_obj, mesh = built.method, built.mesh
  batch = (common.abstract_batch(method_obj, mesh) if built.abstract
           else state_lib.shard_batch(method_obj.batch(0), mesh))
  start = time.perf_counter()
  with common.count_unet_calls() as unet:
    lowered = built.train_step.lower(built.state, built.frozen, batch)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  flops = common.cost_flops(compiled)
  memory = common.memory_report(compiled)
  record = {
      "benchmark": "train_step", "method": method, "shape": shape.name,
      "lora_rank": lora_rank, "resolution": shape.resolution,
      "latent_side": shape.resolution // 8,
      "unet_params_m": built.unet_params / 1e6,
      "batch_size": config.batch_size, "precision": config.mixed_precision,
      "devices": jax.device_count(), "device": common.device_name(),
      "unet_calls_per_step": unet["calls"], "unet_evals_per_step": unet["rows"],
      "build_s": build_s, "lower_s": lower_s, "compile_s": compile_s,
      "flops_per_step": flops,
      "tflops_per_step": None if flops is None else flops / 1e12,
      "memory_bytes": memory,
      "step_peak_gib": common.gib(memory.get("peak")),
      "peak_matmul_tflops": peaks[config.mixed_precision] / 1e12,
      "load_average": common.load_average(), "note": "",
  }
  state, frozen = built.state, built.frozen
  if built.abstract:
    ok, why = fits(memory.get("peak", 0))
    if not ok or args.no_full_size_runs:
      record["note"] = why or "not run (--no-full-size-runs)"
      return record
    state, frozen = common.materialise(state), common.materialise(frozen, 1)
  times = []
  for step in range(args.warmup + args.steps):
    begin = time.perf_counter()
    batch = state_lib.shard_batch(method_obj.batch(step), mesh)
    state, metrics = compiled(state, frozen, batch)
    bool(metrics["finite"])  # the engine's loop syncs here every step
    if step >= args.warmup:
      times.append(time.perf_counter() - begin)
  stats = common.summary(times)
  seconds = stats["median_s"]
  record.update(
      step_time=stats, steps_per_s=1 / seconds,
      images_per_s=config.batch_size / seconds,
      unet_evals_per_s=unet["rows"] / seconds,
      achieved_tflops=None if flops is None else flops / seconds / 1e12,
      mfu=common.mfu(flops, seconds, peaks[config.mixed_precision]),
      device_peak_bytes=common.device_peak_bytes(),
      load_average=common.load_average())
  return record


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", default=",".join(common.METHODS))
  parser.add_argument("--shapes", default="tiny,small,sd14-256,sd14-512",
                      help="comma-separated, of: " + ",".join(common.SHAPES))
  parser.add_argument("--steps", type=int, default=10,
                      help="timed steps (after --warmup)")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--batch-size", type=int, default=None,
                      help="global batch; default: one per device")
  parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                      help="default: fp32 on CPU, bf16 on accelerators")
  parser.add_argument("--no-full-size-runs", action="store_true",
                      help="compile the SD 1.4 shapes but never run them")
  parser.add_argument("--lora-ranks", default="0",
                      help="comma-separated LoRA ranks, 0 = full fine-tuning "
                      "(Custom Diffusion runs at 0 only)")
  parser.add_argument("--workdir", default=None,
                      help="where methods cache their data (default: a "
                      "temporary folder, removed at the end)")
  args = parser.parse_args(argv)
  methods = common.parse_list(args.methods, common.METHODS)
  shapes = [common.SHAPES[s] for s in common.parse_list(args.shapes,
                                                        common.SHAPES)]
  ranks = [int(r) for r in args.lora_ranks.split(",") if r.strip()]
  cpu = jax.devices()[0].platform == "cpu"
  args.precision = args.precision or ("fp32" if cpu else "bf16")
  args.batch_size = args.batch_size or jax.device_count()
  peaks = {args.precision: common.matmul_peak(
      common.compute_dtype(args.precision))}
  common.emit({"benchmark": "matmul_peak", "device": common.device_name(),
               "precision": args.precision,
               "peak_tflops": peaks[args.precision] / 1e12,
               "load_average": common.load_average()})
  root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-train-step-"))
  rows = []
  try:
    for method in methods:
      missing = common.method_available(method)
      if missing:
        print(f"skipping {method}: {missing}", file=sys.stderr)
        continue
      for shape in shapes:
        for rank in ranks:
          if rank and method == "custom_diffusion":
            continue  # it refuses LoRA: it trains a small subset already
          try:
            record = bench_one(method, shape, args, peaks, root, rank)
          except Exception as e:  # pylint: disable=broad-except
            # Methods are written while this runs: report, go on.
            traceback.print_exc()
            record = {"benchmark": "train_step", "method": method,
                      "shape": shape.name, "lora_rank": rank,
                      "error": f"{type(e).__name__}: {e}",
                      "note": f"failed: {type(e).__name__}"}
          common.emit(record)
          rows.append(record)
  finally:
    if args.workdir is None:
      shutil.rmtree(root, ignore_errors=True)
  print()
  print(common.markdown_table(rows, COLUMNS))
  return rows


if __name__ == "__main__":
  main()
