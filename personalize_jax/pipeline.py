"""A whole Stable Diffusion pipeline: load from a diffusers folder, export to one.

The folder layout is diffusers' (``model_index.json``, ``unet/``, ``vae/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``), so the same code loads the
real weights from a local copy or the Hub and writes fine-tuned models that
``diffusers.StableDiffusionPipeline.from_pretrained`` loads. An SDXL folder
(``_class_name`` ``StableDiffusionXLPipeline``) adds ``text_encoder_2/`` and
``tokenizer_2/`` and round-trips with ``StableDiffusionXLPipeline``.

It lives above ``models`` because it pairs them with ``diffusion``'s noise
schedule; modules under ``models`` never import ``diffusion``.
"""

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
from flax import nnx

from personalize_jax import diffusion
from personalize_jax.errors import CheckpointError
from personalize_jax.models import checkpoint, lora_files, presets
from personalize_jax.models.clip import (CLIPTextConfig, CLIPTextModel,
                                         CLIPTextModelWithProjection)
from personalize_jax.models.tokenizer import load_tokenizer
from personalize_jax.models.unet import UNet2DConditionConfig, UNet2DConditionModel
from personalize_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_SDXL_COMPONENTS = _COMPONENTS + ("text_encoder_2", "tokenizer_2")
SDXL_CLASS_NAME = "StableDiffusionXLPipeline"

# What diffusers' StableDiffusionPipeline expects in model_index.json. The
# safety checker and feature extractor are not part of fine-tuning; exported
# pipelines declare them absent, which diffusers accepts.
_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.42.1",
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
# StableDiffusionXLPipeline's; ``force_zeros_for_empty_prompt`` is added from
# the pipeline when it is written.
_SDXL_MODEL_INDEX = {
    **{k: v for k, v in _MODEL_INDEX.items()
       if k not in ("requires_safety_checker", "safety_checker")},
    "_class_name": SDXL_CLASS_NAME,
    "image_encoder": [None, None],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
}

# The model classes of each component, and their configs.
_CLASSES = {
    "unet": (UNet2DConditionModel, UNet2DConditionConfig),
    "vae": (AutoencoderKL, AutoencoderKLConfig),
    "text_encoder": (CLIPTextModel, CLIPTextConfig),
    "text_encoder_2": (CLIPTextModelWithProjection, CLIPTextConfig),
}
# The random pipelines: component -> config.json values. The seed of each
# component is the pipeline's seed plus its place here. ``TINY_PIPELINES``
# names them (``tiny``, ``tiny-sdxl``).
_TINY = {
    presets.TINY: {"unet": presets.UNET, "vae": presets.VAE,
                   "text_encoder": presets.CLIP_TEXT},
    presets.TINY_SDXL: {"unet": presets.TINY_SDXL_UNET,
                        "vae": presets.TINY_SDXL_VAE,
                        "text_encoder": presets.TINY_SDXL_TEXT,
                        "text_encoder_2": presets.TINY_SDXL_TEXT_2},
}
TINY_PIPELINES = tuple(_TINY)


@dataclasses.dataclass
class StableDiffusion:
  """The parts of a Stable Diffusion pipeline, as nnx modules plus tokenizers.

  Attributes:
    unet: the denoiser.
    vae: the latent autoencoder.
    text_encoder: the CLIP text tower.
    tokenizer: transformers' ``CLIPTokenizer``.
    schedule: the noise schedule from ``scheduler/scheduler_config.json``.
    source: where it was loaded from (a folder, a Hub id, ``tiny`` or
      ``tiny-sdxl``).
    text_encoder_2: SDXL's second text tower (None for SD 1.x/2.x).
    tokenizer_2: its tokenizer, padding with "!" (None for SD 1.x/2.x).
    force_zeros_for_empty_prompt: SDXL only: classifier-free guidance with
      an empty negative prompt conditions on zeros, not on the encoded "".
  """
  unet: UNet2DConditionModel
  vae: AutoencoderKL
  text_encoder: CLIPTextModel
  tokenizer: Any
  schedule: diffusion.NoiseSchedule
  source: str = ""
  text_encoder_2: CLIPTextModelWithProjection | None = None
  tokenizer_2: Any = None
  force_zeros_for_empty_prompt: bool = True

  @property
  def is_sdxl(self) -> bool:
    """Stable Diffusion XL: two text encoders, pooled text and time ids."""
    return self.text_encoder_2 is not None

  @property
  def resolution(self) -> int:
    """The image side the U-Net was trained at (latent side x VAE factor)."""
    return self.unet.config.sample_size * self.vae_scale_factor

  @property
  def vae_scale_factor(self) -> int:
    return 2 ** (len(self.vae.config.block_out_channels) - 1)

  def save_pretrained(self, folder: str | os.PathLike) -> Path:
    """Writes the pipeline in diffusers' layout (loadable by diffusers too)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    self.unet.save_pretrained(folder / "unet")
    self.vae.save_pretrained(folder / "vae")
    self.text_encoder.save_pretrained(folder / "text_encoder")
    self.tokenizer.save_pretrained(str(folder / "tokenizer"))
    self.schedule.save_pretrained(folder / "scheduler")
    index = _MODEL_INDEX
    if self.is_sdxl:
      self.text_encoder_2.save_pretrained(folder / "text_encoder_2")
      self.tokenizer_2.save_pretrained(str(folder / "tokenizer_2"))
      index = dict(_SDXL_MODEL_INDEX, force_zeros_for_empty_prompt=(
          self.force_zeros_for_empty_prompt))
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def load_stable_diffusion(path_or_hub_id: str | os.PathLike, *,
                          dtype=jnp.float32, param_dtype=jnp.float32,
                          attention_impl: str = "xla", remat: bool = False,
                          seed: int = 0,
                          lora: str | os.PathLike | Sequence[
                              tuple[str | os.PathLike, float]] | None = None,
                          lora_scale: float = 1.0) -> StableDiffusion:
  """Loads a Stable Diffusion 1.x/2.x or XL folder, Hub id, or tiny preset.

  Args:
    path_or_hub_id: a local diffusers folder, a Hub id such as
      ``CompVis/stable-diffusion-v1-4`` or
      ``stabilityai/stable-diffusion-xl-base-1.0``, ``tiny`` or ``tiny-sdxl``
      (random tiny models).
    dtype: the compute dtype of the models (an SDXL VAE whose config sets
      ``force_upcast`` computes in float32, as diffusers runs it).
    param_dtype: the dtype their parameters are stored in.
    attention_impl: see ``personalize_jax.models.attention``.
    remat: rematerialise U-Net blocks in the backward pass.
    seed: the random seed of the tiny models.
    lora: LoRA weights to fuse into the U-Net and text encoder as they load:
      a ``.safetensors`` file or a folder holding one (diffusers/PEFT,
      older diffusers, or kohya-ss keys; see ``models.lora_files``), or a
      list of ``(file_or_dir, scale)`` pairs to fuse several.
    lora_scale: the strength of ``lora`` (it multiplies each pair's scale):
      each weight becomes ``W + lora_scale * scale * alpha / rank * up @ down``.

  Raises:
    CheckpointError: the folder is not a Stable Diffusion pipeline, or a LoRA
      file cannot be read or does not fit the models.
    UserError: ``lora`` is neither a path nor a list of pairs.
  """
  source = str(path_or_hub_id)
  # Read (and check) the LoRA files before the model weights, which are slower.
  loras = [] if lora is None else lora_files.read_loras(lora, lora_scale)
  kwargs = dict(dtype=dtype, param_dtype=param_dtype,
                attention_impl=attention_impl)
  if source in _TINY:
    return _with_loras(random_pipeline(_TINY[source], seed=seed, source=source,
                                       remat=remat, **kwargs), loras)
  root = checkpoint.resolve_pretrained(source)
  index = root / "model_index.json"
  if not index.is_file():
    raise CheckpointError(
        f"{root} has no model_index.json, so it is not a diffusers pipeline "
        "folder; pass the folder that holds unet/, vae/, text_encoder/, "
        "tokenizer/ and scheduler/")
  values = checkpoint.read_json(index)
  sdxl = values.get("_class_name") == SDXL_CLASS_NAME
  needed = _SDXL_COMPONENTS if sdxl else _COMPONENTS
  missing = [c for c in needed if not (root / c).is_dir()]
  if missing:
    folders = [c + "/" for c in needed]
    raise CheckpointError(
        f"{root} lacks {', '.join(m + '/' for m in missing)}; a Stable "
        f"Diffusion{' XL' if sdxl else ''} folder needs "
        f"{', '.join(folders[:-1])} and {folders[-1]} (download the whole "
        "model)")
  configs = {name: checkpoint.read_json(root / name / "config.json")
             for name in ("unet", "vae", "text_encoder", "text_encoder_2")
             if name in needed}
  pipe = StableDiffusion(
      **_models(configs, root, sdxl, remat, seed, kwargs),
      **{name: load_tokenizer(root, subfolder=name)
         for name in ("tokenizer", "tokenizer_2") if name in needed},
      schedule=_schedule(root / "scheduler", legacy_fixes=not sdxl),
      source=source,
      force_zeros_for_empty_prompt=values.get("force_zeros_for_empty_prompt",
                                              True))
  return _with_loras(pipe, loras)


def tiny_tokenizers(sdxl: bool) -> dict[str, Any]:
  """The tokenizers of the tiny pipelines (the shipped CLIP vocabulary):
  ``tokenizer``, and for SDXL ``tokenizer_2``, which pads with "!" as SDXL's
  second tokenizer does."""
  tokenizers = {"tokenizer": load_tokenizer(presets.TINY)}
  if sdxl:
    tokenizers["tokenizer_2"] = load_tokenizer(presets.TINY)
    tokenizers["tokenizer_2"].pad_token = "!"
  return tokenizers


def random_pipeline(configs: dict[str, dict], *, seed: int = 0,
                    source: str = "", dtype=jnp.float32,
                    param_dtype=jnp.float32, attention_impl: str = "xla",
                    remat: bool = False) -> StableDiffusion:
  """A pipeline of random models from their ``config.json`` values (the tiny
  pipelines, and the benchmarks' stand-ins): component ``i`` of ``configs``
  (``unet``, ``vae``, ``text_encoder``[, ``text_encoder_2``]) from
  ``seed + i``, with the tiny tokenizers and the tiny noise schedule."""
  sdxl = "text_encoder_2" in configs
  kwargs = dict(dtype=dtype, param_dtype=param_dtype,
                attention_impl=attention_impl)
  return StableDiffusion(
      **_models(configs, None, sdxl, remat, seed, kwargs),
      **tiny_tokenizers(sdxl),
      schedule=diffusion.NoiseSchedule.from_pretrained(presets.TINY),
      source=source)


def is_sdxl_source(path_or_hub_id: str | os.PathLike) -> bool:
  """Whether a model source is an SDXL pipeline (``tiny-sdxl``, or its
  ``model_index.json`` names ``StableDiffusionXLPipeline``).

  Reads no weights; a source that cannot be read counts as not SDXL (the
  checks that load it say what is wrong with it).
  """
  source = str(path_or_hub_id)
  if source in _TINY:
    return source == presets.TINY_SDXL
  try:
    return (checkpoint.read_model_index(source).get("_class_name")
            == SDXL_CLASS_NAME)
  except (CheckpointError, OSError, ValueError, AttributeError):
    return False


def model_components(path_or_hub_id: str | os.PathLike) -> tuple[str, ...]:
  """The model components of a source: ``unet``, ``vae``, ``text_encoder``
  (and ``text_encoder_2`` for SDXL)."""
  names = ("unet", "vae", "text_encoder")
  return names + ("text_encoder_2",) if is_sdxl_source(path_or_hub_id) \
      else names


def _models(configs: dict[str, dict], root: Path | None, sdxl: bool,
            remat: bool, seed: int, kwargs: dict) -> dict[str, nnx.Module]:
  """The pipeline's models from their ``config.json`` values.

  Loaded from ``root/<component>/`` or, with ``root`` None, random: component
  ``i`` of ``configs`` from ``seed + i``.
  """
  models = {}
  for offset, (name, values) in enumerate(configs.items()):
    cls, config_cls = _CLASSES[name]
    config = config_cls.from_dict(values)
    options = dict(kwargs, remat=remat) if name == "unet" else dict(kwargs)
    if name == "vae" and sdxl and config.force_upcast:
      # SDXL's VAE overflows in float16; diffusers decodes in float32.
      options["dtype"] = jnp.float32
    models[name] = (_random(cls, config, seed + offset, options)
                    if root is None else
                    cls.from_pretrained(root, name, **options))
  return models


def _random(cls: type, config: Any, seed: int, options: dict) -> nnx.Module:
  """``cls(config, **options)`` with random weights from ``seed``."""
  return checkpoint.build_random(
      lambda: cls(config, rngs=checkpoint.shape_only_rngs(), **options), seed,
      options["param_dtype"])


def is_lora_folder(folder: str | os.PathLike) -> bool:
  """A folder of LoRA weights alone (a LoRA run's export), not a pipeline."""
  folder = Path(folder)
  return ((folder / lora_files.LORA_WEIGHTS_NAME).is_file()
          and not (folder / "model_index.json").is_file())


def load_export(folder: str | os.PathLike, base: str | os.PathLike = "",
                **kwargs) -> StableDiffusion:
  """A fine-tuned model as a run exports it: a pipeline, or base + LoRA.

  Args:
    folder: a pipeline folder (full fine-tuning, or a LoRA run with
      ``lora.export_fused``), or a folder holding only
      ``pytorch_lora_weights.safetensors``.
    base: the pipeline a LoRA-only folder adapts; "" reads it from the
      folder's ``train_config.json`` (``model.pretrained``, and ``seed`` for
      the ``tiny`` models), as this package's runs write it.
    **kwargs: passed to ``load_stable_diffusion``.

  Raises:
    CheckpointError: a LoRA-only folder whose base is unknown, or any loading
      error of ``load_stable_diffusion``.
  """
  if not is_lora_folder(folder):
    return load_stable_diffusion(folder, **kwargs)
  folder = Path(folder)
  base = str(base)
  if not base:
    train_config = folder / "train_config.json"
    if not train_config.is_file():
      raise CheckpointError(
          f"{folder} holds LoRA weights but no train_config.json naming the "
          "model they adapt; pass the base pipeline (e.g. "
          "--config.base_model=CompVis/stable-diffusion-v1-4)")
    values = checkpoint.read_json(train_config)
    base = str(values["model"]["pretrained"])
    if base in _TINY:
      kwargs.setdefault("seed", values.get("seed", 0))
  pipe = load_stable_diffusion(base, lora=folder, **kwargs)
  return dataclasses.replace(pipe, source=str(folder))


def _with_loras(pipe: StableDiffusion,
                loras: list[tuple[lora_files.LoraFile, float]]
                ) -> StableDiffusion:
  """``pipe`` with each ``(LoraFile, strength)`` fused into its weights."""
  models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
  if pipe.is_sdxl:
    models["text_encoder_2"] = pipe.text_encoder_2
  lora_files.fuse_loras(models, loras)
  return pipe


def _schedule(folder: Path, legacy_fixes: bool) -> diffusion.NoiseSchedule:
  """The pipeline's schedule, with the fixes diffusers applies to old configs.

  ``StableDiffusionPipeline`` forces ``steps_offset=1`` and
  ``clip_sample=False`` on outdated scheduler configs (SD 1.4's among them);
  doing the same keeps our samples equal to diffusers'.
  ``StableDiffusionXLPipeline`` does not (``legacy_fixes=False``).
  """
  config = checkpoint.read_json(folder / diffusion.SCHEDULER_CONFIG)
  if legacy_fixes:
    config.update(steps_offset=1, clip_sample=False)
  return diffusion.NoiseSchedule.from_config(config)


def abstract_component(path_or_hub_id: str | os.PathLike,
                       name: str) -> nnx.Module:
  """Component ``name`` (``unet``, ``vae``, ``text_encoder``,
  ``text_encoder_2``), shapes only.

  Reads the component's ``config.json`` (tiny pipelines: the preset), never
  its weights: for checks of a config against the model before anything
  loads.
  """
  cls, config_cls = _CLASSES[name]
  if str(path_or_hub_id) in _TINY:
    values = _TINY[str(path_or_hub_id)][name]
  else:
    folder = checkpoint.resolve_pretrained(path_or_hub_id, name)
    values = checkpoint.read_json(folder / "config.json")
  config = config_cls.from_dict(values)
  return nnx.eval_shape(
      lambda: cls(config, rngs=checkpoint.shape_only_rngs()))
