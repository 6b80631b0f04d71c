r"""Text to image from a trained model (or any Stable Diffusion 1.x/2.x).

  python -m personalize_jax.generate --model=/tmp/dog/export \
      --prompt="a photo of sks dog on the beach" --num_images=4 --out=/tmp/dogs
  python -m personalize_jax.generate --model=tiny --prompt="a mug" --out=/tmp/t

Writes ``<prompt index>_<image index>.png`` (the layout ``evaluate`` reads),
``grid.png`` (each prompt beside its images) and ``generate.json`` (every
setting, the package version and the model the images came from) into
``--out``. The files are written into a hidden folder beside ``--out`` that is
renamed into place at the end, so a killed run leaves no half output. The same
command gives the same PNGs; images are spread over all devices. Mistakes in
the arguments, the model or a LoRA file end in one line and exit code 2
before anything is written.
"""

import dataclasses
import json
import math
import os
import shutil
import time
from pathlib import Path

from absl import app, flags, logging
import jax.numpy as jnp
import numpy as np
from PIL import Image

import personalize_jax
from personalize_jax import diffusion, eval_dreambench, grids
from personalize_jax import pipeline as pipeline_lib
from personalize_jax.engine import sharding
from personalize_jax.errors import UserError, fail
from personalize_jax.models import checkpoint, lora_files
from personalize_jax.models import tokenizer as tokenizer_lib

GRID, SETTINGS = "grid.png", "generate.json"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

flags.DEFINE_string("model", None, "A run's export/ folder, a diffusers "
                    "folder (SD 1.x/2.x or XL), a Hub id, or tiny / tiny-sdxl "
                    "(random tiny models).")
flags.DEFINE_string("base_model", "", "The pipeline a LoRA-only export adapts "
                    "(default: the one its train_config.json names).")
flags.DEFINE_multi_string("lora", [], "A LoRA .safetensors file (or folder) "
                          "to fuse into the model; repeatable.")
flags.DEFINE_multi_float("lora_scale", [], "Strength of each --lora, or one "
                         "for all (default 1).")
flags.DEFINE_multi_string("prompt", [], "A prompt; repeatable.")
flags.DEFINE_string("negative_prompt", "", "The unconditional prompt.")
flags.DEFINE_integer("num_images", 4, "Images per prompt.")
flags.DEFINE_integer("seed", 0, "Sampling seed: image i starts from noise "
                     "fold_in(key(seed), i).")
flags.DEFINE_integer("steps", 50, "DDIM steps.")
flags.DEFINE_float("guidance", 7.5, "Classifier-free guidance scale (1: off).")
flags.DEFINE_integer("resolution", None, "Image side in pixels (default: "
                     "the model's own).")
flags.DEFINE_float("eta", 0.0, "DDIM stochasticity, 0 (deterministic) to 1.")
flags.DEFINE_integer("batch_size", 8, "Images per jitted call (rounded up "
                     "to a multiple of the device count).")
flags.DEFINE_enum("dtype", "float32", list(DTYPES), "Compute dtype.")
flags.DEFINE_string("out", None, "Output folder (created; must be new or "
                    "empty unless --overwrite).")
flags.DEFINE_bool("overwrite", False, "Replace a non-empty --out.")


@dataclasses.dataclass(frozen=True)
class Settings:
  """Everything a generation depends on; fields are the flags' names."""

  model: str
  prompt: tuple[str, ...]
  out: str
  base_model: str = ""
  lora: tuple[str, ...] = ()
  lora_scale: tuple[float, ...] = ()
  negative_prompt: str = ""
  num_images: int = 4
  seed: int = 0
  steps: int = 50
  guidance: float = 7.5
  resolution: int | None = None
  eta: float = 0.0
  batch_size: int = 8
  dtype: str = "float32"
  overwrite: bool = False

  @classmethod
  def from_dict(cls, values: dict) -> "Settings":
    """Settings from ``generate.json``'s ``settings`` (lists become tuples)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v
                  for k, v in values.items()})


def settings_from_flags() -> Settings:
  """The parsed command-line flags as ``Settings``."""
  return Settings.from_dict({f.name: flags.FLAGS[f.name].value
                             for f in dataclasses.fields(Settings)})


def _is_within(path: Path, folder: Path) -> bool:
  return path == folder or folder in path.parents


def check(s: Settings) -> list[tuple[str, float]]:
  """Checks every setting that needs no model; returns the LoRA pairs.

  Raises:
    UserError: a value out of range, or an ``--out`` that would be refused.
  """
  if not s.model:
    raise UserError("--model is required: a run's export/ folder, a diffusers "
                    "folder, a Hub id, or tiny")
  if not s.prompt:
    raise UserError('pass at least one --prompt="..."')
  for name, low in (("num_images", 1), ("steps", 1), ("batch_size", 1)):
    if getattr(s, name) < low:
      raise UserError(f"--{name}={getattr(s, name)} must be at least {low}")
  if s.resolution is not None and s.resolution < 8:
    raise UserError(f"--resolution={s.resolution} must be a positive image "
                    "side in pixels, e.g. 512 (or leave it out)")
  if not 0.0 <= s.eta <= 1.0:
    raise UserError(f"--eta={s.eta} must be between 0 and 1")
  if not math.isfinite(s.guidance):
    raise UserError(f"--guidance={s.guidance} must be a finite number")
  if s.dtype not in DTYPES:
    raise UserError(f"--dtype={s.dtype} must be one of {', '.join(DTYPES)}")
  if s.lora_scale and not s.lora:
    raise UserError("--lora_scale without --lora; pass the LoRA file too")
  if s.lora_scale and len(s.lora_scale) not in (1, len(s.lora)):
    raise UserError(f"{len(s.lora_scale)} --lora_scale values for "
                    f"{len(s.lora)} --lora files; give one per file or one "
                    "for all")
  scales = s.lora_scale if len(s.lora_scale) > 1 else (
      (s.lora_scale or (1.0,)) * len(s.lora))
  if not s.out:
    raise UserError("--out is required: the folder the images go to")
  out = Path(s.out).expanduser().resolve()
  if out.exists() and not out.is_dir():
    raise UserError(f"--out={s.out} is a file; pass a folder")
  if out.is_dir() and any(out.iterdir()):
    if not s.overwrite:
      raise UserError(f"--out={s.out} is not empty; choose a new folder or "
                      "pass --overwrite to replace it")
    kept = [Path(p).expanduser().resolve() for p in (s.model, *s.lora)
            if p not in pipeline_lib.TINY_PIPELINES
            and Path(p).expanduser().exists()]
    if any(_is_within(p, out) for p in [*kept, Path.cwd()]):
      raise UserError(f"--out={s.out} holds the model, a LoRA file or the "
                      "current folder; --overwrite would delete it: choose "
                      "another folder")
  parent = next(p for p in out.parents if p.exists())
  if not os.access(parent, os.W_OK):
    raise UserError(f"--out={s.out}: {parent} is not writable; choose "
                    "another folder")
  return list(zip(s.lora, scales))


def load(s: Settings, loras: list[tuple[str, float]]
         ) -> tuple[pipeline_lib.StableDiffusion, dict]:
  """The pipeline with ``--lora`` fused, and where it came from.

  LoRA files are read (and checked) before the model, which is slower.

  Raises:
    CheckpointError: a model or LoRA file that cannot be loaded.
  """
  files = lora_files.read_loras(loras) if loras else []
  tiny = s.model in pipeline_lib.TINY_PIPELINES
  model = s.model if tiny else str(
      checkpoint.resolve_pretrained(s.model).resolve())
  pipe = pipeline_lib.load_export(model, base=s.base_model,
                                  dtype=DTYPES[s.dtype])
  lora_files.fuse_loras({"unet": pipe.unet, "text_encoder": pipe.text_encoder},
                        files)
  source = {"model": model}
  if not tiny and pipeline_lib.is_lora_folder(model):
    source["base_model"] = s.base_model or checkpoint.read_json(
        Path(model) / "train_config.json")["model"]["pretrained"]
  elif s.base_model:
    logging.warning("--base_model is ignored: %s is a whole pipeline, not a "
                    "LoRA-only export", s.model)
  return pipe, source


def _warn_long_prompts(tokenizer, prompts) -> None:
  """Warns once per prompt the text encoder will see only part of."""
  limit = tokenizer_lib.MAX_LENGTH
  for prompt, count in zip(prompts,
                           tokenizer_lib.count_tokens(tokenizer, prompts)):
    if count > limit:
      logging.warning("prompt %r has %d tokens, more than CLIP's %d; it is "
                      "truncated to its first %d (shorten it)", prompt, count,
                      limit, limit)


def _grid(title: str, prompts, rows, resolution: int) -> np.ndarray:
  """Each prompt beside its images, under one heading."""
  column = grids.Column(title=title, scores={}, rows=rows)
  picture, _ = grids.labeled_grid([], prompts, [column],
                                  thumb=min(resolution, 256))
  return picture


def _write(folder: Path, s: Settings, rows, prompts, record: dict) -> None:
  """Writes the PNGs, the grid and ``generate.json`` into ``folder``."""
  for i, images in enumerate(rows):
    eval_dreambench.write_generated(folder.parent, folder.name, i,
                                    np.stack(images))
  title = f"{'/'.join(Path(s.model).parts[-2:])}, seed {s.seed}"
  Image.fromarray(_grid(title, prompts, rows, rows[0][0].shape[0])).save(
      folder / GRID)
  (folder / SETTINGS).write_text(json.dumps(record, indent=1) + "\n")


def _move_into_place(tmp: Path, out: Path) -> None:
  """Renames ``tmp`` to ``out``; an existing ``out`` is removed after."""
  old = None
  if out.exists():
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
  os.replace(tmp, out)
  if old is not None:
    shutil.rmtree(old)


def run(s: Settings, progress: bool = True) -> Path:
  """Generates ``s.num_images`` images per prompt into ``s.out``.

  Args:
    s: the settings (see the flags).
    progress: show a progress bar on stderr.

  Returns:
    The output folder.

  Raises:
    UserError: a bad setting, model or LoRA file; nothing is written then.
  """
  loras = check(s)
  pipe, source = load(s, loras)
  if s.steps > pipe.schedule.num_train_timesteps:
    raise UserError(f"--steps={s.steps} is more than the model's "
                    f"{pipe.schedule.num_train_timesteps} training timesteps; "
                    "use fewer")
  prompts = list(s.prompt)
  _warn_long_prompts(pipe.tokenizer, prompts)
  mesh = sharding.create_mesh(-1, 1)
  images = diffusion.generate(
      pipe, [p for p in prompts for _ in range(s.num_images)], seed=s.seed,
      num_inference_steps=s.steps, guidance_scale=s.guidance,
      negative_prompt=s.negative_prompt, resolution=s.resolution, eta=s.eta,
      batch_size=s.batch_size, progress=progress,
      batch_sharding=sharding.batch_sharding(mesh))
  rows = [list(images[i * s.num_images:(i + 1) * s.num_images])
          for i in range(len(prompts))]
  record = {"version": personalize_jax.__version__, "settings":
            dataclasses.asdict(s), "source": source,
            "resolution": int(images.shape[1]),
            "devices": len(mesh.devices.flat)}
  out = Path(s.out).expanduser().resolve()
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    _write(tmp, s, rows, prompts, record)
    _move_into_place(tmp, out)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out


def _parse(argv):
  """absl parsing whose errors are one line and exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e).strip().splitlines()[0])


def main(argv) -> None:
  if len(argv) > 1:
    fail(f"unexpected argument {argv[1]!r}; every setting is a --flag=value "
          "(quote prompts with spaces: --prompt=\"a photo of a dog\")")
  s = settings_from_flags()
  start = time.time()
  try:
    out = run(s)
  except UserError as e:
    fail(str(e))
  n = s.num_images * len(s.prompt)
  print(f"generated {n} image{'s' * (n > 1)} ({len(s.prompt)} prompt"
        f"{'s' * (len(s.prompt) > 1)} x {s.num_images}) in "
        f"{time.time() - start:.1f} s")
  print(f"  images: {out}/<prompt>_<image>.png  (grid: {out / GRID}; "
        f"settings: {out / SETTINGS})")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse)
