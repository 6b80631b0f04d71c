"""What the benchmarks share: model shapes, trainers built for a shape, the
matmul peak, XLA's cost and memory analysis, and JSON-lines/markdown output.

Shapes (``SHAPES``):

  tiny      the ``tiny`` preset (U-Net 32/64 channels), 64 px (8x8 latents).
  small     a 12.9M-parameter SD-like U-Net (``SMALL_UNET``), 256 px
            (32x32 latents), 256-wide text.
  sd14-256  Stable Diffusion 1.4's U-Net, text encoder and VAE (random
  sd14-512  weights, no download) at 256 px and at 512 px.
  sdxl-1024 SDXL base 1.0's U-Net, both text encoders and VAE at 1024 px.

Data preparation (class images, RPO's generated images, VAE latents, text
embeddings) always runs with small *stand-in* models of the shape's latent
geometry (8x VAE, 4 channels) and text width: it fixes the shapes of the
batches, not their values, and must not cost real-model time. For the
``sd14`` shapes the modules a method trains or keeps frozen are then swapped
for abstract SD 1.4-sized ones (``abstract_trainer``), so the step is lowered
and compiled without materialising anything of model size.
"""

import contextlib
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from personalize_jax import diffusion, methods
from personalize_jax.engine import config as config_lib
from personalize_jax.engine import sharding, state as state_lib, train
from personalize_jax.engine.method import Method, state_of
from personalize_jax.models import checkpoint, presets
from personalize_jax.models.clip import (CLIPTextConfig, CLIPTextModel,
                                         CLIPTextModelWithProjection)
from personalize_jax.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from personalize_jax.models.vae import AutoencoderKL, AutoencoderKLConfig
from personalize_jax import pipeline as pipeline_lib
from personalize_jax.pipeline import StableDiffusion, load_stable_diffusion

REPO = Path(__file__).resolve().parents[1]
METHODS = methods.NAMES
# The recipe each method is benchmarked with (its ``tiny`` variant prepares
# the data; the shape, batch and precision are then set by the benchmark).
RECIPES = {"dreambooth": "dreambooth_tpu.py",
           "custom_diffusion": "custom_diffusion_tpu.py",
           "rpo": "rpo_tpu.py",
           "lookforward": "lookforward_dreambooth_tpu.py"}

# SD-like, 12.9M parameters: three resolutions (64/128/192 channels), two
# resnets per block, cross-attention in the two upper ones, 8 heads.
SMALL_UNET = {
    "sample_size": 32, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "block_out_channels": [64, 128, 192], "layers_per_block": 2,
    "attention_head_dim": 8, "cross_attention_dim": 256, "norm_num_groups": 32,
}
# The published SD 1.4 configs (models/presets.py).
SD14_UNET, SD14_TEXT, SD14_VAE = (presets.SD14_UNET, presets.SD14_TEXT,
                                  presets.SD_VAE)


@dataclasses.dataclass(frozen=True)
class Shape:
  """A model shape: the U-Net's config and the training resolution."""
  name: str
  unet: dict  # U-Net config.json values.
  resolution: int  # image side in pixels (latents are 1/8 of it).
  full_size: bool  # published modules: built abstractly, never materialised.
  text: dict = dataclasses.field(default_factory=lambda: SD14_TEXT)
  vae: dict = dataclasses.field(default_factory=lambda: SD14_VAE)
  text_2: dict | None = None  # SDXL's second text encoder.

  @property
  def sdxl(self) -> bool:
    return self.text_2 is not None


SHAPES = {
    "tiny": Shape("tiny", presets.UNET, 64, False),
    "small": Shape("small", SMALL_UNET, 256, False),
    "sd14-256": Shape("sd14-256", SD14_UNET, 256, True),
    "sd14-512": Shape("sd14-512", SD14_UNET, 512, True),
    "tiny-sdxl": Shape("tiny-sdxl", presets.TINY_SDXL_UNET, 64, False,
                       presets.TINY_SDXL_TEXT, presets.TINY_SDXL_VAE,
                       presets.TINY_SDXL_TEXT_2),
    "sdxl-1024": Shape("sdxl-1024", presets.SDXL_UNET, 1024, True,
                       presets.SDXL_TEXT, presets.SDXL_VAE,
                       presets.SDXL_TEXT_2),
}


def shape_of(config) -> Shape:
  """The shape a recipe trains: its model's published (or local) configs.

  ``tiny`` is the tiny preset; a Hub id of ``presets.PUBLISHED`` or a local
  diffusers folder (its ``config.json`` files are read, never its weights)
  gives full-size abstract modules at ``config.data.resolution``.
  """
  name = config.model.pretrained
  resolution = config.data.resolution
  if name in (presets.TINY, presets.TINY_SDXL):
    return dataclasses.replace(SHAPES[name], resolution=resolution)
  if name in presets.PUBLISHED:
    published = presets.PUBLISHED[name]
    return Shape(f"{name.split('/')[-1]}@{resolution}", published["unet"],
                 resolution, True, published["text_encoder"],
                 published["vae"], published.get("text_encoder_2"))
  folder = Path(name)
  if (folder / "unet" / "config.json").is_file():
    read = lambda part: json.loads((folder / part / "config.json").read_text())
    second = folder / "text_encoder_2" / "config.json"
    return Shape(f"{folder.name}@{resolution}", read("unet"), resolution, True,
                 read("text_encoder"), read("vae"),
                 read("text_encoder_2") if second.is_file() else None)
  raise SystemExit(
      f"config.model.pretrained={name!r}: no published config is known for it "
      f"and it is not a local diffusers folder; use one of "
      f"{', '.join(presets.PUBLISHED)}, a folder, or tiny")


def parse_list(text: str, valid: Iterable[str] | None = None) -> list[str]:
  """``"a,b"`` -> ``["a", "b"]``, each checked against ``valid``."""
  items = [s.strip() for s in text.split(",") if s.strip()]
  if valid is not None:
    bad = [s for s in items if s not in valid]
    if bad:
      raise SystemExit(f"unknown {bad}; choose from {', '.join(valid)}")
  return items


def method_available(method: str) -> str | None:
  """None if ``method`` imports, else why not (methods are added over time)."""
  try:
    methods.get(method)
  except Exception as e:  # pylint: disable=broad-except
    return f"{type(e).__name__}: {e}"
  return None


# ----------------------------------------------------------------- configs


def recipe_config(method: str, shape: Shape, *, batch_size: int,
                  precision: str, lora_rank: int = 0
                  ) -> ml_collections.ConfigDict:
  """The method's recipe (tiny data settings) at a shape, batch and precision.

  ``lora_rank > 0`` trains adapters of that rank instead of the weights.
  """
  config = config_lib.load_recipe(
      REPO / "configs" / RECIPES[method]).get_config("tiny")
  config.lora.rank = lora_rank
  if shape.sdxl:  # what the config says of the model: SDXL (the stand-ins)
    config.model.pretrained = presets.TINY_SDXL
  config.data.resolution = shape.resolution
  config.batch_size = batch_size
  config.mixed_precision = precision
  config.model.attention_impl = "auto"
  config.mesh.data, config.mesh.fsdp = -1, 1
  # Only the shapes of the prepared data matter here: make it cheaply.
  if "dreambooth" in config:
    config.dreambooth.class_inference_steps = 1
  if "rpo" in config:
    config.rpo.gen_inference_steps = 1
  return config


def compute_dtype(precision: str):
  return jnp.bfloat16 if precision == "bf16" else jnp.float32


# ------------------------------------------------------------------ models


def stand_in_pipeline(shape: Shape, precision: str, seed: int = 0,
                      attention_impl: str = "auto") -> StableDiffusion:
  """Materialised models with the shape's latent geometry and text width.

  ``tiny`` (``tiny-sdxl``) is exactly ``load_stable_diffusion("tiny")``
  (``"tiny-sdxl"``). Otherwise: the tiny VAE (8x, 4 channels, like SD's), a
  2-layer CLIP text encoder as wide as the U-Net's cross-attention, and the
  shape's U-Net, or, for the full-size shapes, the tiny U-Net made as wide in
  its cross-attention (SDXL: ``sdxl_configs``).
  """
  kw = dict(dtype=compute_dtype(precision), attention_impl=attention_impl,
            seed=seed)
  if shape.name in ("tiny", "tiny-sdxl"):
    return load_stable_diffusion(shape.name, **kw)
  if shape.sdxl:
    configs = sdxl_configs(shape)
  else:
    width = shape.unet["cross_attention_dim"]
    configs = {
        "unet": (dict(presets.UNET, cross_attention_dim=width)
                 if shape.full_size else shape.unet),
        "vae": presets.VAE,
        "text_encoder": dict(presets.CLIP_TEXT, hidden_size=width,
                             projection_dim=width, intermediate_size=2 * width),
    }
  return pipeline_lib.random_pipeline(configs, source=f"stand-in:{shape.name}",
                                      **kw)


def sdxl_configs(shape: Shape) -> dict[str, dict]:
  """Small SDXL models with a full-size SDXL's widths: the tiny SDXL U-Net
  with its cross-attention and added-conditioning widths, two 2-layer text
  encoders as wide as the shape's (their states side by side fill the
  cross-attention; the second's projection is the pooled width), the tiny
  VAE with SDXL's latent scale."""
  width = shape.unet["cross_attention_dim"]
  pooled = shape.text_2["projection_dim"]
  unet = dict(presets.TINY_SDXL_UNET, cross_attention_dim=width,
              projection_class_embeddings_input_dim=(
                  pooled + 6 * presets.TINY_SDXL_UNET[
                      "addition_time_embed_dim"]))
  texts = [dict(base, hidden_size=part["hidden_size"],
                intermediate_size=2 * part["hidden_size"],
                projection_dim=part.get("projection_dim", 512))
           for base, part in ((presets.TINY_SDXL_TEXT, shape.text),
                              (presets.TINY_SDXL_TEXT_2, shape.text_2))]
  if sum(t["hidden_size"] for t in texts) != width:
    raise SystemExit(f"{shape.name}: the text encoders' widths do not add up "
                     f"to the U-Net's cross-attention ({width})")
  return {"unet": unet, "vae": presets.TINY_SDXL_VAE,
          "text_encoder": texts[0], "text_encoder_2": texts[1]}


def full_size(module: nnx.Module, shape: Shape, config) -> nnx.Module:
  """An abstract full-size twin of a stand-in U-Net/VAE/text encoder.

  Other modules (a critic, DINO) are returned as they are. A text encoder
  keeps its vocabulary size (Custom Diffusion adds a token); SDXL's second
  (``CLIPTextModelWithProjection``) gets the shape's ``text_2``.
  """
  kw = dict(dtype=compute_dtype(config.mixed_precision),
            attention_impl=config.model.attention_impl,
            remat=config.model.remat)
  if isinstance(module, UNet2DConditionModel):
    cls, cfg = UNet2DConditionModel, UNet2DConditionConfig.from_dict(shape.unet)
  elif isinstance(module, CLIPTextModelWithProjection):
    cls, cfg = CLIPTextModelWithProjection, CLIPTextConfig.from_dict(
        dict(shape.text_2, vocab_size=module.config.vocab_size))
  elif isinstance(module, CLIPTextModel):
    cls, cfg = CLIPTextModel, CLIPTextConfig.from_dict(
        dict(shape.text, vocab_size=module.config.vocab_size))
  elif isinstance(module, AutoencoderKL):
    cls, cfg = AutoencoderKL, AutoencoderKLConfig.from_dict(shape.vae)
  else:
    return module
  return nnx.eval_shape(
      lambda: cls(cfg, rngs=checkpoint.shape_only_rngs(), **kw))


def set_attention(module: nnx.Module, impl: str) -> None:
  """Sets the attention implementation of every attention layer of a module."""
  for _, sub in nnx.iter_modules(module):
    if hasattr(sub, "attention_impl"):
      sub.attention_impl = impl


def count_params(modules: dict[str, nnx.Module], names: Iterable[str]) -> int:
  return sum(checkpoint.count_params(modules[n]) for n in names
             if n in modules)


# ---------------------------------------------------------------- trainers


@dataclasses.dataclass
class Built:
  """A method's jitted step with its inputs (arrays, or abstract ones)."""
  config: ml_collections.ConfigDict
  shape: Shape
  method: Method
  pipeline: Any
  unet_def: Any  # the graph of the trained U-Net the step runs
  mesh: Any
  state: Any
  frozen: Any
  train_step: Any
  abstract: bool
  unet_params: int


def abstract_trainer(config, workdir: Path, shape: Shape,
                     pipeline: StableDiffusion | None = None,
                     devices=None) -> Built:
  """The engine's trainer with SD-sized abstract modules: nothing materialised.

  ``train.build_trainer(..., abstract=True)``: the method prepares its data on
  the stand-in pipeline, and its step runs ``full_size`` twins of the
  stand-ins (with the recipe's attention when ``devices`` are given).

  Args:
    config: the recipe.
    workdir: where the method caches its prepared data.
    shape: the models' shape.
    pipeline: the stand-in models; made from ``shape`` if None.
    devices: the devices of the step's mesh; ``jax.devices()`` if None.
      Compile-only devices (a TPU topology on a CPU host) work: the method's
      data is then prepared on the host's devices and only the step's
      (abstract) inputs are laid out on these.
  """
  # The data is prepared on the host: with an attention it can run there
  # (the step's modules get the recipe's below).
  pipeline = pipeline or stand_in_pipeline(
      shape, config.mixed_precision, config.seed,
      config.model.attention_impl if devices is None else "auto")
  sized = {}

  def step_module(name, module):
    # The step's twin of a prepared module: full size, the recipe's attention.
    if name not in sized:
      sized[name] = (full_size(module, shape, config) if shape.full_size
                     else module)
      if devices is not None:
        set_attention(sized[name], config.model.attention_impl)
    return sized[name]

  method = methods.get(config.method)
  config_lib.resolve(config, method)
  trainer = train.build_trainer(config, workdir, method, pipeline=pipeline,
                                devices=devices, step_module=step_module,
                                abstract=True)
  return Built(config=config, shape=shape, method=trainer.method,
               pipeline=pipeline,
               unet_def=nnx.graphdef(step_module("unet", pipeline.unet)),
               mesh=trainer.mesh, state=trainer.state, frozen=trainer.frozen,
               train_step=trainer.train_step, abstract=True,
               unet_params=count_params(sized, ("unet",)))


def engine_trainer(config, workdir: Path, shape: Shape) -> Built:
  """``train.build_trainer`` on the stand-in pipeline: real arrays."""
  pipeline = stand_in_pipeline(shape, config.mixed_precision, config.seed,
                               config.model.attention_impl)
  unet_params = checkpoint.count_params(pipeline.unet)
  config_lib.resolve(config, methods.get(config.method))
  trainer = train.build_trainer(config, workdir, methods.get(config.method),
                                pipeline=pipeline)
  return Built(config=config, shape=shape, method=trainer.method,
               pipeline=trainer.pipeline,
               unet_def=nnx.graphdef(trainer.pipeline.unet),
               mesh=trainer.mesh, state=trainer.state, frozen=trainer.frozen,
               train_step=trainer.train_step, abstract=False,
               unet_params=unet_params)


def lower_validation(built: Built, batch: int) -> dict:
  """The validation programs of ``engine.evaluate``, lowered abstractly.

  ``{"ddim": ..., "decode": ...}``: the DDIM scan with classifier-free
  guidance on the trained U-Net's parameters (laid out as the train state
  holds them) and the VAE decode, both on ``batch`` images split over the
  mesh as ``diffusion.generate(batch_sharding=...)`` splits them.
  """
  config, shape, mesh = built.config, built.shape, built.mesh
  pipe = built.pipeline
  side = shape.resolution // 8
  width = shape.unet["cross_attention_dim"]
  replicated = sharding.replicated(mesh)
  spread = sharding.batch_sharding(mesh)
  sds = lambda s, dt=jnp.float32, where=replicated: jax.ShapeDtypeStruct(
      s, dt, sharding=where)
  steps = config.eval.num_inference_steps
  added = {}
  if shape.sdxl:  # the pooled text and time ids of both guidance halves
    added = {f"{half}added_cond": {
        "text_embeds": sds((batch, shape.text_2["projection_dim"]),
                           where=spread),
        "time_ids": sds((batch, 6), where=spread)}
             for half in ("", "uncond_")}
  # The U-Net's whole state: with LoRA (or Custom Diffusion's K/V) its
  # trained leaves are in the train state and the rest is frozen.
  unet_state = state_of("unet", built.state.params, built.frozen)
  ddim = diffusion._ddim_loop.lower(  # pylint: disable=protected-access
      built.unet_def, unet_state,
      pipe.schedule, sds((batch, side, side, 4), where=spread),
      sds((batch, 77, width), where=spread), sds((batch, 77, width)),
      sds((steps,), jnp.int32), config.eval.guidance_scale, 0.0, None,
      num_inference_steps=steps, split=diffusion.batch_split(spread),
      **added)
  vae = full_size(pipe.vae, shape, config) if shape.full_size else pipe.vae
  vae_def, vae_state = nnx.split(vae)
  vae_state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
      x.shape, jnp.float32, sharding=replicated), vae_state)
  decode = diffusion._decode_to_uint8.lower(  # pylint: disable=protected-access
      vae_def, vae_state, sds((batch, side, side, 4), where=spread),
      pipe.vae.scaling_factor, split=diffusion.batch_split(spread))
  return {"ddim": ddim, "decode": decode}


def abstract_batch(method: Method, mesh) -> dict:
  return state_lib.abstract_host(method.batch(0), sharding.batch_sharding(mesh))


def materialise(tree, seed: int = 0):
  """Random arrays for an abstract tree, made on the devices in its layout.

  Floating leaves are ``N(0, 0.02)``, integers 0, PRNG keys from ``seed``:
  values for timing, not for training.
  """
  leaves, treedef = jax.tree.flatten(tree)

  def make():
    out = []
    for i, x in enumerate(leaves):
      if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        out.append(jax.random.key(seed))
      elif jnp.issubdtype(x.dtype, jnp.floating):
        out.append((0.02 * jax.random.normal(
            jax.random.fold_in(jax.random.key(seed), i), x.shape,
            jnp.float32)).astype(x.dtype))
      else:
        out.append(jnp.zeros(x.shape, x.dtype))
    return treedef.unflatten(out)

  shardings = treedef.unflatten([x.sharding for x in leaves])
  return jax.jit(make, out_shardings=shardings)()


# --------------------------------------------------------------- measuring


@contextlib.contextmanager
def count_unet_calls():
  """Counts U-Net calls and the rows they evaluate while a step is traced.

  Yields a dict ``{"calls": n, "rows": n}`` filled as tracing runs (one
  trace of the step: forward calls only, the backward pass is not counted).
  """
  counts = {"calls": 0, "rows": 0}
  original = UNet2DConditionModel.__call__

  def counted(self, sample, *args, **kwargs):
    counts["calls"] += 1
    counts["rows"] += int(sample.shape[0])
    return original(self, sample, *args, **kwargs)

  UNet2DConditionModel.__call__ = counted
  try:
    yield counts
  finally:
    UNet2DConditionModel.__call__ = original


def cost_flops(compiled) -> float | None:
  """FLOPs of one call of a compiled program, from XLA's cost analysis."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def memory_report(compiled) -> dict:
  """Bytes per device of a compiled program (XLA's memory analysis).

  ``peak_bytes`` = arguments + outputs - donated (aliased) + temporaries:
  what the program needs on a device while it runs.
  """
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
         for k in ("argument", "output", "alias", "temp", "generated_code")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def device_peak_bytes() -> int | None:
  """The device allocator's peak so far (GPU/TPU); None where unknown (CPU)."""
  stats = jax.devices()[0].memory_stats()
  return int(stats["peak_bytes_in_use"]) if stats and (
      "peak_bytes_in_use" in stats) else None


def device_name() -> str:
  d = jax.devices()[0]
  if d.platform == "cpu":
    return f"cpu ({cpu_model()}, {os.cpu_count()} cores)"
  return f"{d.platform} ({d.device_kind})"


def cpu_model() -> str:
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown CPU"


def load_average() -> list[float]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return []


def matmul_peak(dtype, size: int | None = None, repeats: int = 5) -> float:
  """Measured FLOP/s of a square matmul on device 0: the MFU denominator.

  The best of ``repeats`` timed calls (after a warm-up) of ``a @ b`` with
  ``size x size`` operands: 2 * size^3 FLOPs each.
  """
  device = jax.devices()[0]
  if size is None:
    size = 2048 if device.platform == "cpu" else 8192
  keys = jax.random.split(jax.random.key(0))
  a, b = (jax.device_put(jax.random.normal(k, (size, size), dtype), device)
          for k in keys)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def mfu(flops_per_step: float | None, seconds_per_step: float | None,
        peak_flops_per_s: float | None) -> float | None:
  """Model FLOPs utilisation: achieved FLOP/s over the measured peak."""
  if not flops_per_step or not seconds_per_step or not peak_flops_per_s:
    return None
  return flops_per_step / seconds_per_step / peak_flops_per_s


def summary(times: list[float]) -> dict:
  return {"median_s": statistics.median(times), "mean_s": statistics.fmean(times),
          "min_s": min(times), "n": len(times)}


# ------------------------------------------------------------------ output


def emit(record: dict, stream=None) -> None:
  """One JSON line on stdout (the machine-readable result)."""
  print(json.dumps(record, sort_keys=True, default=_json_default),
        file=stream or sys.stdout, flush=True)


def _json_default(value):
  if isinstance(value, (np.integer,)):
    return int(value)
  if isinstance(value, (np.floating,)):
    return float(value)
  return str(value)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
  """A markdown table of ``rows`` with ``(key, header)`` columns."""

  def cell(value):
    if value is None:
      return "-"
    if isinstance(value, float):
      if value == 0:
        return "0"
      if abs(value) >= 100:
        return f"{value:,.0f}"
      return f"{value:.3g}"
    return str(value)

  lines = ["| " + " | ".join(h for _, h in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for row in rows:
    lines.append("| " + " | ".join(cell(row.get(k)) for k, _ in columns)
                 + " |")
  return "\n".join(lines)


def gib(n: float | None) -> float | None:
  return None if n is None else n / 2**30
