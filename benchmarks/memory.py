"""Does the real SD 1.4 RPO step fit a 16 GiB TPU v5e chip (FSDP over 4) and
one 80 GiB GPU? Per-device bytes from XLA, with no accelerator.

The RPO step at 512 px in bf16 (trainable fp32 U-Net + AdamW, frozen bf16
base U-Net, cached text states) is built abstractly
(``common.abstract_trainer``: ``ShapeDtypeStruct``s with the engine's
shardings, nothing of model size materialised), lowered and compiled on the
host's CPU devices, and ``compiled.memory_analysis()`` gives per-device
arguments, outputs, donated (aliased) bytes and temporaries. Four CPU devices
(``--xla_force_host_platform_device_count=4``) stand in for the four chips.

To that step the engine adds what stays on the devices around it, listed
separately (``residents``): the pipeline's fp32 VAE and text encoder and
RPO's fp32 CLIP reward model, all on device 0 (they are put there unsharded
by ``load_stable_diffusion`` and ``from_pretrained``). The pipeline's own
U-Net is not among them: the engine points it at the sharded state (the
``engine_residents`` record checks this on the tiny models). The validation
programs (the 50-step DDIM scan with guidance and the VAE decode at 512 px)
are compiled the same way.

Caveats: the CPU compiler's buffer assignment, fusion and bf16 handling
differ from TPU's and GPU's, and attention compiles here as ``auto`` does on
a CPU (``chunked``: one block of queries' logits at a time) where a TPU runs
Pallas flash attention and a GPU cuDNN's (no logit matrix at all), so these
are estimates, not guarantees.

  python benchmarks/memory.py                      # both scenarios
  python benchmarks/memory.py --scenarios=gpu-80g --method=dreambooth
  python benchmarks/memory.py --scenarios=tiny-fsdp4   # smoke test
  python benchmarks/memory.py --scenarios=sdxl-v5e-fsdp4 --lora-rank=32 \
      --remat                                      # SDXL RPO-LoRA, 1024 px

Prints JSON lines, then a markdown table.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Scenario:
  """Where the step must fit."""
  devices: int  # CPU devices standing in for the accelerators.
  fsdp: int  # mesh.fsdp (mesh.data fills the rest).
  batch_size: int  # global batch (RPO: pairs per step).
  budget_gib: float  # memory of one device.
  shape: str  # common.SHAPES key.
  what: str


SCENARIOS = {
    "v5e-fsdp4": Scenario(4, 4, 4, 16.0, "sd14-512",
                          "TPU v5e x4, 16 GiB/chip, FSDP over 4, batch 4"),
    "gpu-80g": Scenario(1, 1, 1, 80.0, "sd14-512",
                        "one 80 GiB GPU, batch 1"),
    "tiny-fsdp4": Scenario(4, 4, 4, 16.0, "tiny", "smoke test"),
    # SDXL base 1.0 at 1024 px (run with --lora-rank=32 for RPO's SDXL LoRA).
    "sdxl-v5e-fsdp4": Scenario(4, 4, 4, 16.0, "sdxl-1024",
                               "SDXL: TPU v5e x4, 16 GiB/chip, FSDP over 4, "
                               "batch 4"),
    "sdxl-gpu-80g": Scenario(1, 1, 1, 80.0, "sdxl-1024",
                             "SDXL: one 80 GiB GPU, batch 1"),
}
# Parameters of the fp32 reward models that stay on device 0 (README counts;
# ALIGN: align-base, tests/models/test_align.py).
CLIP_B32_PARAMS = 151_277_313
ALIGN_BASE_PARAMS = 172_117_841


def reward_model_params(name: str, full_size: bool) -> int:
  """Parameters of RPO's reward model ``name`` (``rpo.reward_model``)."""
  # pylint: disable=g-import-not-at-top
  from personalize_jax import rewards
  from personalize_jax.models import AlignModel, checkpoint
  family, model = rewards.image_text_model(name)
  if full_size:
    return ALIGN_BASE_PARAMS if family == "align" else CLIP_B32_PARAMS
  module = (AlignModel.from_pretrained(model) if family == "align"
            else rewards.HarmonicReward.from_pretrained(model).clip)
  return checkpoint.count_params(module)


def run_scenario(name: str, args) -> list[dict]:
  """One scenario in this process (jax already sees its devices)."""
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np
  import common
  from personalize_jax.engine import sharding
  from personalize_jax.models import attention, checkpoint
  # pylint: enable=g-import-not-at-top
  scenario = SCENARIOS[name]
  shape = common.SHAPES[scenario.shape]
  assert jax.device_count() == scenario.devices, jax.devices()
  config = common.recipe_config(args.method, shape,
                                batch_size=scenario.batch_size,
                                precision=args.precision,
                                lora_rank=args.lora_rank)
  config.mesh.data, config.mesh.fsdp = -1, scenario.fsdp
  config.model.remat = args.remat
  out = []
  if shape.name == "tiny" or args.check_residents:
    # First, while the engine's models are the only ones in this process.
    out.append(engine_residents(name, args))
  with tempfile.TemporaryDirectory() as workdir:
    built = common.abstract_trainer(config, Path(workdir), shape)
    batch = common.abstract_batch(built.method, built.mesh)
    compiled = built.train_step.lower(built.state, built.frozen,
                                      batch).compile()
  step = common.memory_report(compiled)
  mesh = built.mesh
  state_bytes = _per_device_bytes(built.state)
  frozen_bytes = _per_device_bytes(built.frozen)

  # What the engine keeps on device 0 besides the step's arguments.
  def sized(module):  # the module the real shape has (abstract if full size)
    return (common.full_size(module, shape, config) if shape.full_size
            else module)

  pipe = built.pipeline
  residents = {
      "vae_fp32": 4 * checkpoint.count_params(sized(pipe.vae)),
      "text_encoder_fp32": 4 * checkpoint.count_params(
          sized(pipe.text_encoder)),
  }
  if pipe.is_sdxl:
    residents["text_encoder_2_fp32"] = 4 * checkpoint.count_params(
        sized(pipe.text_encoder_2))
  if args.method == "rpo":
    residents["reward_model_fp32"] = 4 * reward_model_params(
        config.rpo.reward_model, shape.full_size)
  resident = sum(residents.values())

  # Validation: DDIM with guidance, then the VAE decode, as engine.evaluate.
  batch_eval = max(scenario.devices, len(config.eval.prompts))
  lowered = common.lower_validation(built, batch_eval)
  ddim, decode = lowered["ddim"].compile(), lowered["decode"].compile()
  ddim_mem, decode_mem = (common.memory_report(ddim),
                          common.memory_report(decode))
  train_peak = step["peak"] + resident
  # During validation the state and frozen models stay put; the sampler's and
  # the decoder's temporaries come on top, one program at a time.
  eval_peak = (state_bytes + frozen_bytes + resident
               + max(ddim_mem["temp"] + ddim_mem["output"],
                     decode_mem["temp"] + decode_mem["output"]))
  record = {
      "benchmark": "memory", "scenario": name, "what": scenario.what,
      "method": args.method, "lora_rank": args.lora_rank,
      "shape": shape.name,
      "resolution": shape.resolution, "precision": config.mixed_precision,
      "remat": config.model.remat, "attention": "%s (CPU compile)" % attention.resolve_impl(
          config.model.attention_impl, jnp.bfloat16
          if config.mixed_precision == "bf16" else jnp.float32),
      "devices": scenario.devices, "mesh": dict(mesh.shape),
      "batch_size": scenario.batch_size, "unet_params": built.unet_params,
      "sharded_fraction_of_params": sharding.sharded_fraction(
          built.state.params, jax.tree.map(lambda x: x.sharding,
                                           built.state.params)),
      "step_bytes_per_device": step,
      "train_state_bytes_per_device": state_bytes,
      "train_state_bytes_total": _total_bytes(built.state),
      "frozen_bytes_per_device": frozen_bytes,
      "resident_bytes_device0": residents,
      "validation_ddim_bytes": ddim_mem, "validation_decode_bytes": decode_mem,
      "validation_batch": batch_eval,
      "train_peak_gib_device0": train_peak / GIB,
      "eval_peak_gib_device0": eval_peak / GIB,
      "budget_gib": scenario.budget_gib,
      "fits": max(train_peak, eval_peak) <= scenario.budget_gib * GIB,
      "step_peak_gib": step["peak"] / GIB,
  }
  out.append(record)
  del np
  return out


def _per_device_bytes(tree) -> int:
  """Bytes one device holds of an abstract tree with shardings."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  total = 0
  for x in jax.tree.leaves(tree):
    shard = x.sharding.shard_shape(x.shape)
    total += int(np.prod(shard)) * x.dtype.itemsize  # PRNG keys too
  return total


def _total_bytes(tree) -> int:
  """Bytes of an abstract tree over all devices (one copy of each leaf)."""
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def engine_residents(name: str, args) -> dict:
  """Measured on the tiny models: bytes per device after ``build_trainer``.

  ``jax.live_arrays()`` after the engine has built its state and frozen
  inputs, against what those hold: the difference is what stays resident
  outside the train step (the pipeline's modules on device 0).
  """
  # pylint: disable=g-import-not-at-top
  import jax
  from flax import nnx
  import common
  from personalize_jax import methods
  from personalize_jax.engine import config as config_lib, train
  # pylint: enable=g-import-not-at-top
  scenario = SCENARIOS[name]
  shape = common.SHAPES["tiny"]
  config = common.recipe_config(args.method, shape,
                                batch_size=scenario.batch_size,
                                precision=args.precision,
                                lora_rank=args.lora_rank)
  config.mesh.data, config.mesh.fsdp = -1, scenario.fsdp
  with tempfile.TemporaryDirectory() as workdir:
    pipeline = common.stand_in_pipeline(shape, config.mixed_precision)
    method = methods.get(config.method)
    config_lib.resolve(config, method)
    trainer = train.build_trainer(config, Path(workdir), method,
                                  pipeline=pipeline)
    # Buffers, not array objects: on one device the state aliases the
    # pipeline's arrays, and one buffer must count once.
    per_device = _buffer_bytes(jax.live_arrays())
    accounted = _buffer_bytes(jax.tree.leaves((trainer.state, trainer.frozen)))
    # The pipeline's U-Net now holds the state's (sharded) arrays: its
    # unsharded originals must be gone, not left whole on device 0.
    unet_arrays = jax.tree.leaves(nnx.state(pipeline.unet))
    unet_bytes = sum(x.nbytes for x in unet_arrays)
    state_ids = {id(x) for x in jax.tree.leaves(trainer.state.params["unet"])}
    unet_is_state = all(id(x) in state_ids for x in unet_arrays)
    others = {name: sum(x.nbytes for x in jax.tree.leaves(
        nnx.state(getattr(pipeline, name)))) for name in ("vae", "text_encoder")}
  return {
      "benchmark": "engine_residents", "scenario": name, "shape": "tiny",
      "method": args.method, "devices": scenario.devices,
      "live_bytes_per_device": per_device,
      "state_and_frozen_bytes_per_device": accounted,
      "outside_step_bytes_per_device": {
          k: per_device[k] - accounted.get(k, 0) for k in per_device},
      "pipeline_unet_fp32_bytes": unet_bytes,
      "pipeline_unet_holds_the_state": unet_is_state,
      "pipeline_vae_and_text_encoder_bytes": others,
  }


def _buffer_bytes(arrays) -> dict[str, int]:
  """Bytes per device id of the distinct buffers behind ``arrays``."""
  seen, out = set(), {}
  for array in arrays:
    for shard in array.addressable_shards:
      key = (shard.device.id, shard.data.unsafe_buffer_pointer())
      if key not in seen:
        seen.add(key)
        out[str(shard.device.id)] = (out.get(str(shard.device.id), 0)
                                     + shard.data.nbytes)
  return out


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--scenarios", default="v5e-fsdp4,gpu-80g",
                      help=f"comma-separated, of {', '.join(SCENARIOS)}")
  parser.add_argument("--method", default="rpo",
                      choices=("dreambooth", "custom_diffusion", "rpo",
                               "lookforward"))
  parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
  parser.add_argument("--lora-rank", type=int, default=0,
                      help="train LoRA adapters of this rank (0: the weights)")
  parser.add_argument("--remat", action="store_true",
                      help="rematerialise U-Net blocks (config.model.remat)")
  parser.add_argument("--check-residents", action="store_true",
                      help="also measure engine residents on tiny models")
  parser.add_argument("--in-process", action="store_true",
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
  bad = [n for n in names if n not in SCENARIOS]
  if bad:
    raise SystemExit(f"unknown scenarios {bad}; choose from {list(SCENARIOS)}")
  if args.in_process:
    # One scenario, this process: the device count was set before jax loaded.
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common  # pylint: disable=g-import-not-at-top
    records = run_scenario(names[0], args)
    for record in records:
      common.emit(record)
    return records
  records = []
  for name in names:
    # A fresh process per scenario: the CPU device count is fixed at import.
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if "xla_force_host_platform_device_count" not in f]
    flags.append("--xla_force_host_platform_device_count="
                 f"{SCENARIOS[name].devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--in-process",
           f"--scenarios={name}", f"--method={args.method}",
           f"--precision={args.precision}", f"--lora-rank={args.lora_rank}"]
    cmd += ["--remat"] * args.remat + ["--check-residents"] * args.check_residents
    result = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True,
                            check=True)
    for line in result.stdout.splitlines():
      if line.startswith("{"):
        print(line, flush=True)
        records.append(json.loads(line))
  sys.path.insert(0, str(Path(__file__).resolve().parent))
  import common  # pylint: disable=g-import-not-at-top
  rows = []
  for r in records:
    if r["benchmark"] != "memory":
      continue
    step = r["step_bytes_per_device"]
    res = r["resident_bytes_device0"]
    rows.append({
        "scenario": r["scenario"],
        "method": r["method"] + (f" LoRA {r['lora_rank']}"
                                 if r.get("lora_rank") else ""),
        "batch": r["batch_size"], "remat": r["remat"],
        "state": r["train_state_bytes_per_device"] / GIB,
        "frozen": r["frozen_bytes_per_device"] / GIB,
        "temp": step["temp"] / GIB, "step": step["peak"] / GIB,
        "resident": sum(res.values()) / GIB,
        "train": r["train_peak_gib_device0"],
        "eval": r["eval_peak_gib_device0"],
        "budget": r["budget_gib"], "fits": "yes" if r["fits"] else "NO"})
  print()
  print(common.markdown_table(rows, [
      ("scenario", "scenario"), ("method", "method"), ("batch", "batch"),
      ("remat", "remat"), ("state", "train state GiB/dev"),
      ("frozen", "frozen GiB/dev"), ("temp", "step temp GiB/dev"),
      ("step", "step peak GiB/dev"), ("resident", "+ on device 0 GiB"),
      ("train", "training peak GiB (dev 0)"),
      ("eval", "validation peak GiB (dev 0)"), ("budget", "budget GiB"),
      ("fits", "fits")]))
  return records


if __name__ == "__main__":
  main()
