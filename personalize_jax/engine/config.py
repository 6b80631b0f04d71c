"""The keys every run has, and their validation before any work starts.

Recipe files in ``configs/`` start from ``base_config()`` and change what their
method needs; ``validate`` checks the resolved config and raises ``UserError``
with one line naming the key, the value and what would be valid.
"""

import importlib.util
import os
import re
import types
from pathlib import Path
from typing import Callable

import ml_collections

from personalize_jax.engine import ema, optim
from personalize_jax.errors import UserError
from personalize_jax.models import lora

MIXED_PRECISION = ("bf16", "fp32")
TIME_IDS = ("photo", "square")  # data.time_ids: SDXL's micro-conditioning.
NAN_POLICIES = ("stop", "skip")
SCHEDULES = tuple(optim.SCHEDULES)
OPTIMIZERS = tuple(optim.OPTIMIZERS)
ATTENTION = ("xla", "cudnn", "pallas", "chunked", "auto")
# Training options a method's loss must implement, with their "off" values:
# a method module lists those it does in ``TRAINING_OPTIONS``.
METHOD_OPTIONS = {"gradient_accumulation_steps": 1, "loss.snr_gamma": 0.0,
                  "loss.noise_offset": 0.0}


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every method; recipes override what they need."""
  c = ml_collections.ConfigDict()
  c.method = "dreambooth"  # a name of personalize_jax.methods.NAMES: the loss and its data.
  c.seed = 0  # seeds initialisation, noise, timesteps and data order.
  c.num_steps = 1000  # optimizer steps.
  c.batch_size = 1  # global batch (instance images per step, all devices).
  c.gradient_accumulation_steps = 1  # micro-batches batch_size is split into.
  c.learning_rate = 5e-6  # peak learning rate.
  c.mixed_precision = "bf16"  # compute dtype: "bf16" or "fp32"; masters stay fp32.
  c.trainable = (r"^unet\.",)  # regexes over "component.torch.key" names that train.
  c.overwrite = False  # allow a workdir that holds a run of another config.
  c.nan_policy = "stop"  # on NaN/Inf: "stop" at that step or "skip" the update.
  c.debug_nan_at_step = 0  # tests nan_policy: this step's loss becomes NaN (0 = off).

  c.model = ml_collections.ConfigDict()
  c.model.pretrained = "CompVis/stable-diffusion-v1-4"  # Hub id, folder or "tiny".
  c.model.attention_impl = "auto"  # attention kernel: xla, cudnn, pallas, chunked, auto.
  c.model.remat = False  # rematerialise U-Net blocks to save activation memory.

  c.data = ml_collections.ConfigDict()
  c.data.instance_dir = ""  # folder of 3-10 photos of the subject; "" = demo subject.
  c.data.unique_token = "sks"  # the rare token that names the subject.
  c.data.class_name = "dog"  # the subject's class noun ("backpack", "cat", ...).
  c.data.instance_prompt = "a photo of {token} {class_name}"  # training prompt template.
  c.data.resolution = 512  # training side in pixels (images are resized to it).
  c.data.center_crop = True  # center-crop to square before resizing (else resize).
  c.data.random_flip = True  # also train on horizontal flips of the photos.
  # SDXL's time ids of a photo's rows: "photo" = its size and crop (diffusers'
  # train_dreambooth_lora_sdxl.py); "square" = the target square for every
  # row (the RPO authors' train_sdxl.py).
  c.data.time_ids = "photo"  # SDXL micro-conditioning: "photo" or "square".
  c.data.min_image_side = 64  # reject photos smaller than this on either side.
  c.data.skip_bad_images = False  # warn and skip unreadable photos instead of failing.

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1  # data-parallel axis size; -1 fills with remaining devices.
  c.mesh.fsdp = 1  # parameter-sharding axis size; -1 fills with remaining devices.

  # LoRA (Hu et al. 2021): low-rank adapters on linear layers instead of
  # training the weights themselves; off at rank 0.
  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0  # adapter rank; 0 = fine-tune the weights config.trainable names.
  c.lora.alpha = ml_collections.config_dict.placeholder(float)  # scale alpha/rank; None = rank.
  c.lora.unet_targets = (r"\.(to_q|to_k|to_v|to_out\.0)$",)  # U-Net linear layers adapted.
  c.lora.text_encoder_targets = (r"\.(q_proj|k_proj|v_proj|out_proj)$",)  # when it trains.
  c.lora.text_encoder_2_targets = (r"\.(q_proj|k_proj|v_proj|out_proj)$",)  # SDXL's second, when it trains.
  c.lora.init = "gaussian"  # A's init: "gaussian" N(0, 1/rank) or "kaiming"; B starts at 0.
  c.lora.export_fused = False  # also export the full pipeline with the adapters merged.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # adamw, adafactor, lion or sgd (optax's).
  c.optimizer.b1 = 0.9  # AdamW and Lion beta1.
  c.optimizer.b2 = 0.999  # AdamW and Lion beta2 (Lion's paper: 0.99).
  c.optimizer.eps = 1e-8  # AdamW epsilon.
  c.optimizer.weight_decay = 1e-2  # decoupled weight decay (SGD: L2, torch's).
  c.optimizer.momentum = 0.9  # SGD momentum (0 = plain SGD).
  c.optimizer.clip_grad_norm = 1.0  # global-norm clip of trainable grads (0 = off).
  c.optimizer.schedule = "constant"  # or a linear/cosine/polynomial decay to 0.
  c.optimizer.power = 1.0  # the polynomial schedule's power (1 = linear).
  c.optimizer.warmup_steps = 0  # linear warmup from 0 to learning_rate.

  # The loss options of diffusers' training scripts (off at 0).
  c.loss = ml_collections.ConfigDict()
  c.loss.snr_gamma = 0.0  # Min-SNR-gamma loss weights (--snr_gamma; 5 is usual).
  c.loss.noise_offset = 0.0  # noise shift per row, channel (--noise_offset; 0.1 usual).

  # A moving average of the trained weights (diffusers' --use_ema), which
  # samples, validation and the export use.
  c.ema = ml_collections.ConfigDict()
  c.ema.decay = 0.0  # its largest decay (diffusers: 0.9999); 0 = off.
  c.ema.warmup = "diffusers"  # how the decay grows: diffusers, power or none.
  c.ema.power = 2 / 3  # warmup "power": decay 1 - (1 + step) ** -power.

  c.log = ml_collections.ConfigDict()
  c.log.wandb = False  # also log to W&B, offline, in <workdir>/wandb.
  c.log.wandb_project = "personalize_jax"  # the W&B project of the run.

  c.log_every_steps = 10  # metrics.jsonl / TensorBoard cadence.
  c.checkpoint_every_steps = 200  # orbax checkpoint cadence (also at the end).
  c.eval_every_steps = 200  # sample grids (and validation where the method has it).
  c.keep_checkpoints = 2  # how many step folders to keep in checkpoints/.
  c.early_stopping_patience = 0  # stop after N evals without a better best metric (0 = off).

  c.eval = ml_collections.ConfigDict()
  c.eval.prompts = [  # validation prompts ({token}, {class_name} filled in).
      "a {token} {class_name} in the jungle",
      "a {token} {class_name} on the beach",
      "a {token} {class_name} on top of a purple rug in a forest",
      "a red {token} {class_name}",
  ]
  c.eval.num_inference_steps = 50  # DDIM steps for samples.
  c.eval.guidance_scale = 7.5  # classifier-free guidance for samples.
  c.eval.seed = 1234  # fixed seed so sample grids are comparable across steps.

  # After training: DreamBench scores of export/ and of the base model.
  c.final_eval = ml_collections.ConfigDict()
  c.final_eval.enabled = True  # run it (writes <workdir>/final_eval/).
  c.final_eval.prompts = [  # held-out prompts, none of them trained on.
      "a {token} {class_name} in the snow",
      "a {token} {class_name} on a cobblestone street",
      "a {token} {class_name} with a city in the background",
      "a {token} {class_name} on top of a wooden floor",
      "a {token} {class_name} with the Eiffel Tower in the background",
      "a purple {token} {class_name}",
  ]
  c.final_eval.num_images_per_prompt = 4  # images per prompt and model (DreamBench: 4).
  c.final_eval.num_inference_steps = 50  # DDIM steps.
  c.final_eval.guidance_scale = 7.5  # classifier-free guidance.
  c.final_eval.seed = 2024  # the same noise for the base and the fine-tuned model.
  c.final_eval.batch_size = 8  # images per generation and embedding call.
  c.final_eval.protocol = "dreambooth"  # or "rpo_code": the RPO code's CLIP and CLIP-T.
  c.final_eval.dino_model = ""  # DINO score: folder, Hub id or "tiny"; "" = the protocol's.
  c.final_eval.clip_model = ""  # CLIP-I/T and H(lambda): the same; "" = the protocol's.
  c.final_eval.harmonic_lams = (0.3, 0.5)  # lambda values of the harmonic scores.
  c.final_eval.grid_thumbnail = 128  # side of each image in comparison.png.
  return c


def tiny_variant(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ``:tiny`` variant the recipes share: tiny random models, the drawn
  demo subject, about a minute on 2 CPU cores. Changes ``c`` in place."""
  c.model.pretrained = "tiny"
  c.model.attention_impl = "xla"
  c.mixed_precision = "fp32"
  c.data.class_name = "mug"
  c.data.resolution = 64
  c.learning_rate = 1e-4
  c.num_steps = 20
  c.log_every_steps = 5
  c.checkpoint_every_steps = 10
  c.eval_every_steps = 10
  c.eval.prompts = c.eval.prompts[:2]
  c.eval.num_inference_steps = 4
  # Off: the tiny recipes run in many tests (configs/demo_cpu.py turns it on).
  c.final_eval.enabled = False
  c.final_eval.prompts = c.final_eval.prompts[:2]
  c.final_eval.num_images_per_prompt = 2
  c.final_eval.num_inference_steps = 4
  c.final_eval.batch_size = 4
  c.final_eval.dino_model = "tiny"
  c.final_eval.clip_model = "tiny"
  c.final_eval.grid_thumbnail = 64
  if "dreambooth" in c:
    c.dreambooth.num_class_images = 4
    c.dreambooth.class_inference_steps = 4
  return c


def lora_variant(c: ml_collections.ConfigDict, rank: int = 4,
                 learning_rate: float = 1e-4) -> ml_collections.ConfigDict:
  """The ``:lora`` variant: adapters of ``rank`` instead of full weights, at
  the learning rate LoRA recipes use (diffusers' LoRA DreamBooth: 1e-4)."""
  c.lora.rank = rank
  c.learning_rate = learning_rate
  return c


SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"


def sdxl_variant(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The ``:sdxl`` variant: Stable Diffusion XL base 1.0 at 1024 px.

  The method's own settings stay (RPO's LoRA variant is rank 32, as the RPO
  authors' SDXL script); the U-Net is rematerialised (``model.remat``:
  SDXL's activations at 1024 px are four times SD's at 512 px). With
  ``tiny`` the tiny SDXL pipeline (``tiny-sdxl``) replaces the published
  one.
  """
  c.model.pretrained = SDXL_BASE
  c.model.remat = True
  c.data.resolution = 1024
  return c


def with_variant(c: ml_collections.ConfigDict, arg: str | None,
                 tiny: Callable = tiny_variant,
                 lora: Callable | None = lora_variant,
                 sdxl: Callable | None = sdxl_variant
                 ) -> ml_collections.ConfigDict:
  """A recipe's ``get_config(arg)`` tail: ``arg`` lists variants by comma.

  ``sdxl`` applies ``sdxl`` (None: the recipe has no SDXL variant), ``tiny``
  applies ``tiny``; ``lora`` applies ``lora`` (None: the recipe has no LoRA
  variant). They combine (``"sdxl,tiny,lora"``) and apply in that order;
  ``sdxl`` with ``tiny`` trains the tiny SDXL pipeline.
  """
  available = {}
  if sdxl is not None:
    available["sdxl"] = sdxl
  available["tiny"] = tiny
  if lora is not None:
    available["lora"] = lora
  names = variants(arg)
  for name in names:
    if name not in available:
      raise ValueError(f"unknown variant {name!r}; use "
                       f"{' or '.join(repr(v) for v in available)}")
  for name in available:
    if name in names:
      c = available[name](c)
  if "sdxl" in names and "tiny" in names:
    from personalize_jax.models import presets  # pylint: disable=g-import-not-at-top
    c.model.pretrained = presets.TINY_SDXL
    c.model.remat = False
  return c


def variants(arg: str | None) -> list[str]:
  """The variant names in a recipe argument: ``"tiny,lora"`` -> both."""
  return [a.strip() for a in (arg or "").split(",") if a.strip()]


LORA_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def _lora_pattern(component: str) -> str:
  return rf"^{component}\..*{lora.LEAF_PATTERN}"


def resolve_lora(config: ml_collections.ConfigDict) -> None:
  r"""With ``lora.rank > 0``, ``config.trainable`` becomes the adapters' leaves.

  Each regex then names whole components (``^unet\.``, ``^text_encoder\.``):
  those get adapters on the layers ``lora.<component>_targets`` match, and
  only the adapters train. Already-resolved adapter regexes are kept, so
  resolving twice changes nothing.

  Raises:
    UserError: a regex that selects part of a component (LoRA narrows with
      its targets instead) or a component LoRA cannot adapt.
  """
  if not isinstance(config.lora.rank, int) or config.lora.rank <= 0:
    return
  adapted = []
  # SDXL's second text encoder is adapted only where there is one.
  from personalize_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  present = LORA_COMPONENTS if pipeline_lib.is_sdxl_source(
      config.model.pretrained) else LORA_COMPONENTS[:2]
  for pattern in config.trainable:
    try:
      regex = re.compile(pattern)
    except re.error:
      return  # validate() names the bad regex.
    if "lora_" in pattern:
      names = [c for c in LORA_COMPONENTS if pattern == _lora_pattern(c)]
    else:
      names = [c for c in LORA_COMPONENTS if regex.search(f"{c}.")]
    if not names:
      raise UserError(
          f"config.trainable regex '{pattern}' selects part of a component, "
          f"but with lora.rank={config.lora.rank} each regex names whole "
          "components to adapt ('^unet\\.', '^text_encoder\\.'); choose the "
          "adapted layers with config.lora.unet_targets / "
          "text_encoder_targets, or set lora.rank=0")
    adapted += [c for c in names if c not in adapted and c in present]
  config.trainable = tuple(_lora_pattern(c) for c in LORA_COMPONENTS
                           if c in adapted)


def lora_targets(config: ml_collections.ConfigDict) -> dict[str, tuple]:
  """``{component: target regexes}`` of the components a resolved config adapts."""
  if not isinstance(config.lora.rank, int) or config.lora.rank <= 0:
    return {}
  return {c: tuple(config.lora[f"{c}_targets"]) for c in LORA_COMPONENTS
          if _lora_pattern(c) in config.trainable}


def lora_alpha(config: ml_collections.ConfigDict) -> float:
  """``lora.alpha``, or the rank when unset (scale 1)."""
  alpha = config.lora.alpha
  return float(config.lora.rank if alpha is None else alpha)


def load_recipe(path: str | os.PathLike) -> types.ModuleType:
  """Loads a recipe file (``configs/`` is a folder of files, not a package).

  Recipes that build on another one load their sibling by path,
  ``load_recipe(Path(__file__).with_name("rpo_tpu.py"))``, so that they work
  from any working directory.
  """
  path = Path(path).resolve()
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _fail(key: str, value, valid: str):
  raise UserError(f"config.{key}={value!r} is invalid: {valid}")


def resolve(config: ml_collections.ConfigDict, method: types.ModuleType
            ) -> None:
  """Applies the method's convenience switches to ``config`` (in place).

  ``config.trainable`` becomes a tuple holding what the switches add, so the
  trained set is what ``config.json`` shows.
  """
  config.trainable = tuple(config.trainable)
  resolve_switches = getattr(method, "resolve", None)  # optional
  if resolve_switches is not None:
    resolve_switches(config)
  resolve_lora(config)


def validate(config: ml_collections.ConfigDict, num_devices: int,
             method: types.ModuleType | None = None) -> None:
  """Checks values a user sets; raises ``UserError`` on the first bad one.

  Args:
    config: the resolved config.
    num_devices: the devices the run will use.
    method: the method's module; its ``validate`` checks its own keys.
  """
  for key in ("num_steps", "batch_size", "log_every_steps",
              "checkpoint_every_steps", "eval_every_steps", "keep_checkpoints",
              "data.resolution"):
    value = config
    for part in key.split("."):
      value = value[part]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
      _fail(key, value, "it must be a positive integer")
  if (not isinstance(config.early_stopping_patience, int)
      or config.early_stopping_patience < 0):
    _fail("early_stopping_patience", config.early_stopping_patience,
          "it must be 0 (off) or a positive number of evaluations")
  if not config.learning_rate > 0:
    _fail("learning_rate", config.learning_rate, "it must be a positive number")
  if config.data.time_ids not in TIME_IDS:
    _fail("data.time_ids", config.data.time_ids,
          f"use one of {', '.join(TIME_IDS)}")
  if config.mixed_precision not in MIXED_PRECISION:
    _fail("mixed_precision", config.mixed_precision,
          f"use one of {', '.join(MIXED_PRECISION)}")
  if config.nan_policy not in NAN_POLICIES:
    _fail("nan_policy", config.nan_policy, f"use one of {', '.join(NAN_POLICIES)}")
  if (not isinstance(config.debug_nan_at_step, int)
      or isinstance(config.debug_nan_at_step, bool)
      or config.debug_nan_at_step < 0):
    _fail("debug_nan_at_step", config.debug_nan_at_step,
          "it must be 0 (off) or the step whose loss is made NaN")
  if config.final_eval.enabled:
    for key in ("num_images_per_prompt", "num_inference_steps", "batch_size",
                "grid_thumbnail"):
      value = config.final_eval[key]
      if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        _fail(f"final_eval.{key}", value, "it must be a positive integer")
    if not config.final_eval.prompts:
      _fail("final_eval.prompts", list(config.final_eval.prompts),
            "list at least one prompt, or set final_eval.enabled=false")
  for key in ("warmup_steps", "b1", "b2", "eps", "weight_decay",
              "clip_grad_norm"):
    if not config.optimizer[key] >= 0:
      _fail(f"optimizer.{key}", config.optimizer[key], "it must be >= 0")
  for key in ("b1", "b2"):
    if not config.optimizer[key] < 1:
      _fail(f"optimizer.{key}", config.optimizer[key],
            "it must lie in [0, 1)")
  if config.optimizer.warmup_steps >= config.num_steps:
    _fail("optimizer.warmup_steps", config.optimizer.warmup_steps,
          f"it must be below num_steps={config.num_steps}")
  for key in ("num_inference_steps", "seed"):
    value = config.eval[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < (
        1 if key == "num_inference_steps" else 0):
      _fail(f"eval.{key}", value, "it must be a positive integer"
            if key == "num_inference_steps" else "it must be an integer >= 0")
  if not config.eval.guidance_scale >= 0:
    _fail("eval.guidance_scale", config.eval.guidance_scale,
          "it must be >= 0 (1 or less turns guidance off)")
  if not config.eval.prompts:
    _fail("eval.prompts", list(config.eval.prompts),
          "list at least one prompt for the sample grids")
  if (not isinstance(config.data.min_image_side, int)
      or config.data.min_image_side < 1):
    _fail("data.min_image_side", config.data.min_image_side,
          "it must be a positive number of pixels")
  _validate_training_options(config, num_devices, method)
  if config.model.attention_impl not in ATTENTION:
    _fail("model.attention_impl", config.model.attention_impl,
          f"use one of {', '.join(ATTENTION)}")
  for pattern in config.trainable:
    try:
      re.compile(pattern)
    except re.error as e:
      _fail("trainable", pattern, f"not a regular expression ({e})")
  if not config.trainable:
    _fail("trainable", list(config.trainable),
          r"list at least one regex, e.g. ['^unet\.']")
  if not config.data.unique_token.strip():
    _fail("data.unique_token", config.data.unique_token,
          "it must be a non-empty word such as 'sks'")
  if not config.data.class_name.strip():
    _fail("data.class_name", config.data.class_name,
          "it must name the subject's class, e.g. 'dog' or 'backpack'")
  if config.data.instance_dir and not os.path.isdir(config.data.instance_dir):
    _fail("data.instance_dir", config.data.instance_dir,
          "the folder does not exist; point it at a folder of subject photos")
  data, fsdp = config.mesh.data, config.mesh.fsdp
  for key, size in (("mesh.data", data), ("mesh.fsdp", fsdp)):
    if size == 0 or size < -1:
      _fail(key, size, "use a positive axis size or -1 to fill")
  if data == -1 and fsdp == -1:
    _fail("mesh.fsdp", fsdp, "mesh.data and mesh.fsdp cannot both be -1")
  fixed = (data if data != -1 else 1) * (fsdp if fsdp != -1 else 1)
  if num_devices % fixed or (-1 not in (data, fsdp) and fixed != num_devices):
    _fail("mesh", f"data={data}, fsdp={fsdp}",
          f"the axis sizes must multiply to the {num_devices} devices present")
  if config.batch_size % num_devices:
    _fail("batch_size", config.batch_size,
          f"it must be a multiple of the {num_devices} devices (the batch is "
          "split across all of them)")
  _validate_lora(config.lora)
  if method is not None:
    method.validate(config)


def _validate_training_options(config: ml_collections.ConfigDict,
                               num_devices: int,
                               method: types.ModuleType | None) -> None:
  """The optimizer, schedule, loss, EMA, accumulation and logging options."""
  opt = config.optimizer
  for key, value, valid in (("name", opt.name, OPTIMIZERS),
                            ("schedule", opt.schedule, SCHEDULES)):
    if value not in valid:
      _fail(f"optimizer.{key}", value, f"use one of {', '.join(valid)}")
  if not opt.power > 0:
    _fail("optimizer.power", opt.power, "it must be a positive number")
  if not 0 <= opt.momentum < 1:
    _fail("optimizer.momentum", opt.momentum, "it must lie in [0, 1)")
  for key in ("snr_gamma", "noise_offset"):
    if not config.loss[key] >= 0:
      _fail(f"loss.{key}", config.loss[key], "it must be 0 (off) or positive")
  e = config.ema
  if not 0 <= e.decay < 1:
    _fail("ema.decay", e.decay, "it must be 0 (off) or lie in (0, 1), e.g. "
          "0.9999")
  if e.warmup not in ema.WARMUPS:
    _fail("ema.warmup", e.warmup, f"use one of {', '.join(ema.WARMUPS)}")
  if not e.power > 0:
    _fail("ema.power", e.power, "it must be a positive number")
  k = config.gradient_accumulation_steps
  if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
    _fail("gradient_accumulation_steps", k, "it must be a positive integer")
  if k > 1 and config.batch_size % (k * num_devices):
    _fail("gradient_accumulation_steps", k,
          f"batch_size={config.batch_size} (the rows of one update) must "
          f"split into {k} micro-batches of a multiple of the {num_devices} "
          f"devices: use a batch_size that {k * num_devices} divides")
  if method is not None:
    implemented = getattr(method, "TRAINING_OPTIONS", ())
    for key, off in METHOD_OPTIONS.items():
      value = config
      for part in key.split("."):
        value = value[part]
      if value != off and key not in implemented:
        _fail(key, value, f"method {config.method} does not implement it "
              f"(its randomness and loss are its own); leave it at {off}")
  if config.log.wandb and not _importable("wandb"):
    _fail("log.wandb", config.log.wandb, "the wandb package is not "
          'installed: pip install -e ".[wandb]", or set log.wandb=false')


def _importable(name: str) -> bool:
  try:
    importlib.import_module(name)
  except ImportError:
    return False
  return True


def _validate_lora(lora_config: ml_collections.ConfigDict) -> None:
  rank, alpha = lora_config.rank, lora_config.alpha
  if not isinstance(rank, int) or isinstance(rank, bool) or rank < 0:
    _fail("lora.rank", rank, "it must be 0 (off) or a positive rank")
  if alpha is not None and not alpha > 0:
    _fail("lora.alpha", alpha, "it must be a positive number (or unset: the "
          "rank)")
  if lora_config.init not in ("gaussian", "kaiming"):
    _fail("lora.init", lora_config.init, "use one of gaussian, kaiming")
  for key in ("unet_targets", "text_encoder_targets",
              "text_encoder_2_targets"):
    patterns = tuple(lora_config[key])
    if rank and key == "unet_targets" and not patterns:
      _fail(f"lora.{key}", list(patterns), "list at least one regex over "
            "linear layer names, e.g. '\\.to_q$'")
    for pattern in patterns:
      try:
        re.compile(pattern)
      except re.error as e:
        _fail(f"lora.{key}", pattern, f"not a regular expression ({e})")
