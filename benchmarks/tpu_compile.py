"""Compiles a recipe's real-size train step and validation sampler for a TPU
topology, with the TPU compiler, on a host without a TPU.

  pip install -e ".[tpu]"       # libtpu: the TPU compiler
  python benchmarks/tpu_compile.py --config=configs/rpo_tpu.py \
      --topology=v5e:2x2 [--topology=v4:2x2x1 ...] [--config.key=value ...]

``jax.experimental.topologies.get_topology_desc`` gives compile-only devices
of a slice (v4:2x2x1 is a v4-8, v5e:2x2 a v5e-4, v5e:2x4 a v5e-8,
v5p:2x2x1 a v5p-8, v6e:2x2 a v6e-4); nothing can be placed on them, so
everything the compiled programs take is abstract (``ShapeDtypeStruct``s
with the recipe's shardings over the slice's chips): the trainable and
frozen models at their published sizes (``config.model.pretrained``: a Hub id
of ``models.presets.PUBLISHED`` or a local diffusers folder, whose
``config.json`` files are read, never its weights), the optimizer state and
the method's batch. The method's data (class images, RPO's negatives and
labels, cached embeddings) is prepared on the host's CPU with small stand-in
models of the same latent and text geometry (``common.abstract_trainer``):
it fixes the batch's shapes, not its values, so the recipe's data counts are
cut (``_cheap_data``) without changing what the step computes.

Per topology and compiled function (``train_step``; ``ddim`` and ``decode``,
the validation sampler of ``engine.evaluate``) one JSON line: recipe,
topology, chips, mesh, batch, the attention implementation ``auto`` resolved
to for the target and the number of Mosaic (Pallas) kernels in the program,
per-chip argument / temporary / peak bytes, the chip's HBM, whether the
program fits, XLA's FLOPs per chip (for ``ddim``: per DDIM step, the scan's
body), the step time at 40% and 60% of the chip's published bf16 peak, and
compile seconds. Then a markdown table. Exit 0 when everything compiled; a
compile error is one line naming the function and the topology (exit 1).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host runs the data prep.
# Compile-only use: no chip is opened, so several processes may load libtpu.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import copy  # pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses  # pylint: disable=g-import-not-at-top,wrong-import-position
import sys  # pylint: disable=g-import-not-at-top,wrong-import-position
import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position
import time  # pylint: disable=g-import-not-at-top,wrong-import-position
from pathlib import Path  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

sys.path.insert(0, str(Path(__file__).resolve().parent))

@dataclasses.dataclass(frozen=True)
class Chip:
  """A TPU generation's per-chip figures (Cloud TPU documentation)."""
  name: str
  hbm_gib: float
  bf16_tflops: float


CHIPS = {
    "v4": Chip("TPU v4", 32.0, 275.0),
    "v5e": Chip("TPU v5e", 16.0, 197.0),
    "v5p": Chip("TPU v5p", 95.0, 459.0),
    "v6e": Chip("TPU v6e", 32.0, 918.0),
}
MFUS = (0.4, 0.6)
FUNCTIONS = ("train_step", "ddim", "decode")
GIB = 2**30


def chip_of(topology: str) -> Chip:
  family = topology.split(":")[0]
  if family not in CHIPS:
    raise ValueError(f"--topology={topology}: unknown TPU family {family!r}; "
                     f"use one of {', '.join(CHIPS)} (e.g. v5e:2x2)")
  return CHIPS[family]


def topology_devices(topology: str) -> list:
  """The compile-only devices of a TPU slice (needs libtpu)."""
  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies
  chip_of(topology)
  try:
    return list(topologies.get_topology_desc(topology, "tpu").devices)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"--topology={topology}: no TPU compiler for it ({_one_line(e)}); "
        "install the TPU extra (pip install -e \".[tpu]\") and use a "
        "topology such as v5e:2x2") from e


def _one_line(error: Exception) -> str:
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[0][:300] if lines else type(error).__name__


def _cheap_data(config):
  """The recipe with its data-preparation counts cut to the minimum.

  What the step computes depends on the batch's shapes (batch size,
  resolution, prior rows), never on how many class images or negatives were
  generated, with how many DDIM steps, or on the reward model that labelled
  them; those only cost host time here. Models the step itself runs (Look
  Forward's DINO) keep their config.
  """
  config = copy.deepcopy(config)
  with config.unlocked():
    config.final_eval.enabled = False
    if "dreambooth" in config:
      config.dreambooth.num_class_images = min(
          config.dreambooth.num_class_images, 2)
      config.dreambooth.class_inference_steps = 1
    if "rpo" in config:
      config.rpo.gen_inference_steps = 1
      config.rpo.num_images_per_prompt = 1
      # One prompt of each kind: a generation batch of several 512 px images
      # with the stand-in's whole-matrix attention would take the host's RAM.
      config.rpo.object_prompts = config.rpo.object_prompts[:1]
      config.rpo.live_prompts = config.rpo.live_prompts[:1]
      config.rpo.reward_model = "tiny"
    if "lookforward" in config:
      config.lookforward.dino_model = "tiny"
  return config


def compile_recipe(config, topology: str, functions=FUNCTIONS,
                   recipe: str = "") -> list[dict]:
  """Compiles ``functions`` of a recipe for a topology: one record each.

  Raises:
    CompileError: a function did not compile (names it and the topology).
  """
  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  import common
  from personalize_jax.engine import config as config_lib
  from personalize_jax.models import attention
  # pylint: enable=g-import-not-at-top
  chip = chip_of(topology)
  devices = topology_devices(topology)
  config = _cheap_data(config)
  recipe_batch = config.batch_size
  if config.batch_size % len(devices):
    # The engine splits the batch over every chip: a batch-1 recipe (one GPU
    # in the paper) takes one row per chip on a slice.
    with config.unlocked():
      config.batch_size = -(-config.batch_size // len(devices)) * len(devices)
  config_lib.validate(config, len(devices))
  shape = common.shape_of(config)
  dtype = jnp.bfloat16 if config.mixed_precision == "bf16" else jnp.float32
  impl = attention.resolve_impl(config.model.attention_impl, dtype, "tpu")
  with tempfile.TemporaryDirectory() as workdir:
    built = common.abstract_trainer(config, Path(workdir), shape,
                                    devices=devices)
  head = {
      "benchmark": "tpu_compile", "recipe": recipe, "method": config.method,
      "model": config.model.pretrained, "resolution": shape.resolution,
      "precision": config.mixed_precision, "remat": config.model.remat,
      "topology": topology, "chip": chip.name, "chips": len(devices),
      "mesh": dict(built.mesh.shape), "attention": impl,
      "unet_params": built.unet_params, "recipe_batch": recipe_batch,
      "hbm_gib": chip.hbm_gib,
  }
  lowerings = {}
  if "train_step" in functions:
    lowerings["train_step"] = (config.batch_size, lambda: built.train_step.lower(
        built.state, built.frozen,
        common.abstract_batch(built.method, built.mesh)))
  batch_eval = -(-max(len(devices), len(config.eval.prompts)) // len(devices)
                 ) * len(devices)
  validation = {}
  for name in ("ddim", "decode"):
    if name in functions:
      def lower(name=name):
        if not validation:
          validation.update(common.lower_validation(built, batch_eval))
        return validation[name]
      lowerings[name] = (batch_eval, lower)
  records = []
  for name, (batch, lower) in lowerings.items():
    start = time.perf_counter()
    try:
      lowered = lower()
      compiled = lowered.compile()
    except Exception as e:  # pylint: disable=broad-except
      raise CompileError(f"{name} of {recipe or config.method} did not "
                         f"compile for {topology}: {_one_line(e)}") from e
    seconds = time.perf_counter() - start
    memory = common.memory_report(compiled)
    flops = common.cost_flops(compiled)
    record = dict(head, function=name, batch=batch,
                  mosaic_kernels=lowered.as_text().count("tpu_custom_call"),
                  argument_bytes=memory.get("argument"),
                  temp_bytes=memory.get("temp"), peak_bytes=memory.get("peak"),
                  peak_gib=common.gib(memory.get("peak")),
                  fits=(memory.get("peak") or 0) <= chip.hbm_gib * GIB,
                  flops_per_chip=flops, compile_s=seconds)
    for mfu in MFUS:
      record[f"ms_at_{round(mfu * 100)}pct_mfu"] = (
          None if flops is None
          else 1e3 * flops / (chip.bf16_tflops * 1e12 * mfu))
    records.append(record)
  return records


def rpo_run(config, records: list[dict]) -> dict | None:
  """A whole RPO run per subject from the compiled programs' FLOPs.

  Negatives (``rpo`` prompts x images per prompt, ``gen_inference_steps``
  DDIM steps with guidance, then the decode), ``num_steps`` train steps, and
  every ``eval_every_steps`` an evaluation (the sample grid of
  ``eval.prompts`` and RPO's validation images, ``eval.num_inference_steps``
  steps each), at 40% and 60% of the chips' bf16 peak. The DDIM program's
  FLOPs are one step of its scan (XLA counts a loop body once) for its batch;
  sampling is costed per image. Reward-model scoring is left out (CLIP
  B/32 on a few dozen images). None unless the step and both validation
  programs were compiled.
  """
  from personalize_jax.methods import rpo as rpo_lib  # pylint: disable=g-import-not-at-top
  by_name = {r["function"]: r for r in records}
  if config.method != "rpo" or not {"train_step", "ddim", "decode"} <= set(
      by_name):
    return None
  step, ddim, decode = (by_name[k] for k in ("train_step", "ddim", "decode"))
  chips = step["chips"]
  per_image_step = ddim["flops_per_chip"] * chips / ddim["batch"]
  per_image_decode = decode["flops_per_chip"] * chips / decode["batch"]
  rpo = config.rpo
  negatives = len(rpo.live_prompts if rpo_lib.is_live_subject(config)
                  else rpo.object_prompts) * rpo.num_images_per_prompt
  evaluations = config.num_steps // config.eval_every_steps
  eval_images = evaluations * (len(config.eval.prompts) + len(
      rpo.val_prompts) * rpo.num_val_images)
  phases = {
      "negatives": negatives * (rpo.gen_inference_steps * per_image_step
                                + per_image_decode),
      "training": config.num_steps * step["flops_per_chip"] * chips,
      "validation": eval_images * (config.eval.num_inference_steps
                                   * per_image_step + per_image_decode),
  }
  chip = chip_of(step["topology"])
  record = {k: step[k] for k in ("benchmark", "recipe", "method", "model",
                                 "resolution", "topology", "chip", "chips")}
  record.update(function="rpo_run", negatives=negatives,
                train_steps=config.num_steps, evaluations=evaluations,
                eval_images=eval_images,
                tflops={k: v / 1e12 for k, v in phases.items()})
  for mfu in MFUS:
    seconds = {k: v / (chips * chip.bf16_tflops * 1e12 * mfu)
               for k, v in phases.items()}
    record[f"minutes_at_{round(mfu * 100)}pct_mfu"] = sum(
        seconds.values()) / 60
  return record


class CompileError(Exception):
  """A function did not compile for a topology (one line says which)."""


COLUMNS = [("recipe", "recipe"), ("topology", "topology"),
           ("function", "function"), ("batch", "batch"),
           ("attention", "attention"), ("mosaic_kernels", "Pallas kernels"),
           ("peak_gib", "peak GiB/chip"), ("hbm_gib", "HBM GiB"),
           ("fits", "fits"), ("tflops_per_chip", "TFLOP/chip"),
           ("ms_at_40pct_mfu", "ms @40% MFU"),
           ("ms_at_60pct_mfu", "ms @60% MFU"), ("compile_s", "compile s")]


def _define_flags():
  """The command line (defined only when run as a script, so that tests can
  import this module beside others that define ``--config``)."""
  config_flags.DEFINE_config_file(
      "config", None, "Recipe file, optionally with a variant: path.py:tiny.",
      lock_config=True)
  flags.DEFINE_multi_string(
      "topology", ["v5e:2x2"],
      "TPU topology to compile for (repeat the flag for several), e.g. "
      "v4:2x2x1 (v4-8), v5e:2x2 (v5e-4), v5e:2x4 (v5e-8), v5p:2x2x1 (v5p-8), "
      "v6e:2x2 (v6e-4).")
  flags.DEFINE_list(
      "functions", list(FUNCTIONS),
      "What to compile: train_step, ddim (the validation sampler's DDIM "
      "scan), decode (its VAE decode).")


def main(argv) -> None:
  del argv
  import common  # pylint: disable=g-import-not-at-top
  from personalize_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  config, functions = flags.FLAGS.config, flags.FLAGS.functions
  if config is None:
    sys.exit("error: pass --config=configs/<recipe>.py[:variant]")
  bad = [f for f in functions if f not in FUNCTIONS]
  if bad:
    sys.exit(f"error: --functions: unknown {bad}; choose from "
             f"{', '.join(FUNCTIONS)}")
  recipe = config_flags.get_config_filename(flags.FLAGS["config"])
  rows, runs = [], []
  for topology in flags.FLAGS.topology:
    try:
      records = compile_recipe(config, topology, functions,
                               recipe=Path(recipe).name)
    except (CompileError, ValueError, UserError) as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(1)
    run = rpo_run(config, records)
    if run is not None:
      common.emit(run)
      runs.append(run)
    for record in records:
      common.emit(record)
      flops = record["flops_per_chip"]
      rows.append(dict(record, tflops_per_chip=None if flops is None
                       else flops / 1e12))
  print()
  print(common.markdown_table(rows, COLUMNS))
  for run in runs:
    print(f"\nRPO run per subject on {run['topology']} ({run['negatives']} "
          f"negatives, {run['train_steps']} steps, {run['evaluations']} "
          f"evaluations of {run['eval_images']} images in all): "
          f"{run['minutes_at_40pct_mfu']:.1f} min at 40% MFU, "
          f"{run['minutes_at_60pct_mfu']:.1f} min at 60%")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
