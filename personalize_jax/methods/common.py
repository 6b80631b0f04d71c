"""Data helpers the methods share: the subject's photos, latents, caches.

Functions of the method's ``engine.method.Context``; a method's ``build``
calls them, then hands the engine a ``Method`` value.
"""

import io
import shutil
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from personalize_jax import diffusion, sdxl
from personalize_jax.data import demo_subject, images as images_lib
from personalize_jax.data import prompts as prompts_lib
from personalize_jax.engine import distributed, rundir
from personalize_jax.engine.method import Context
from personalize_jax.models import tokenizer as tokenizer_lib


def format_prompts(config: ml_collections.ConfigDict,
                   templates: Sequence[str]) -> list[str]:
  """Templates with the subject's token and class filled in."""
  data = config.data
  return [prompts_lib.format_prompt(t, token=data.unique_token,
                                    class_name=data.class_name)
          for t in templates]


def instance_prompt(config: ml_collections.ConfigDict) -> str:
  """The prompt of the subject's photos ("a photo of sks dog")."""
  return format_prompts(config, [config.data.instance_prompt])[0]


def check_prompts(ctx: Context, prompts: list[str]) -> None:
  """One-line errors for prompts the tokenizer would cut or that lack the token."""
  prompts_lib.check_prompts(prompts, token=ctx.config.data.unique_token,
                            tokenizer=ctx.pipeline.tokenizer,
                            warn=logging.warning,
                            class_name=ctx.config.data.class_name)


def instance_images(ctx: Context) -> list[np.ndarray]:
  """The subject's photos (or the drawn demo subject, written to the workdir)."""
  data = ctx.config.data
  folder = data.instance_dir
  if not folder:
    folder = ctx.workdir / "instance_images"
    if distributed.is_chief() and not folder.is_dir():
      # Drawn beside it and renamed: a killed run leaves no partial folder.
      drawing = folder.with_name(f".{folder.name}.tmp")
      shutil.rmtree(drawing, ignore_errors=True)
      demo_subject.write_demo_subject(drawing, seed=ctx.config.seed)
      drawing.rename(folder)
    distributed.barrier("demo_subject")
  images, _ = images_lib.load_instance_images(
      folder, min_side=data.min_image_side,
      skip_bad_images=data.skip_bad_images, warn=logging.warning)
  return images


def pixels(config: ml_collections.ConfigDict, images: list[np.ndarray], *,
           flips: bool) -> np.ndarray:
  """Training pixels ``(n, res, res, 3)`` in [-1, 1]; flipped copies appended."""
  data = config.data
  out = [images_lib.preprocess(im, data.resolution,
                               center_crop=data.center_crop) for im in images]
  if flips:
    out += [images_lib.flip(p) for p in out]
  return np.stack(out)


def encode_latents(ctx: Context, pixels_bhwc: np.ndarray, name: str) -> dict:
  """VAE posterior ``mean``/``std`` of pixels, cached as ``cache/<name>.npz``."""
  vae = ctx.pipeline.vae

  def compute():
    mean, logvar = _encode(*nnx.split(vae), jnp.asarray(pixels_bhwc))
    return {"mean": np.asarray(mean, np.float32),
            "std": np.asarray(jnp.exp(0.5 * logvar), np.float32)}

  return cached(ctx.cache_dir / f"{name}.npz", compute)


def time_ids(config: ml_collections.ConfigDict, images: list[np.ndarray], *,
             flips: bool) -> np.ndarray:
  """SDXL's ``(n, 6)`` time ids of ``pixels(config, images, flips=flips)``'s rows.

  Each row's original size and crop (``images.crop_geometry``), the flipped
  copies' crops mirrored, and the training resolution as the target size;
  with ``data.time_ids="square"`` the whole target square for every row.
  """
  data = config.data
  if data.time_ids == "square":
    rows = len(images) * (2 if flips else 1)
    return np.repeat(sdxl.time_ids(data.resolution), rows, axis=0)
  geometry = [images_lib.crop_geometry(im, data.resolution,
                                       center_crop=data.center_crop,
                                       flipped=flipped)
              for flipped in ((False, True) if flips else (False,))
              for im in images]
  return sdxl.row_time_ids(geometry, data.resolution)


def encode_text(ctx: Context, prompts: list[str], name: str
                ) -> dict[str, np.ndarray]:
  """Text conditioning of fixed prompts, cached as ``cache/<name>.npz``.

  ``{"emb": (p, 77, d)}`` text states; an SDXL pipeline adds the pooled
  text, ``"pooled": (p, d)``. ``text_cond`` makes a conditioning of them.
  """

  def compute():
    encoded = diffusion.encode_prompts(ctx.pipeline, prompts)
    if ctx.pipeline.is_sdxl:
      return {"emb": np.asarray(encoded[0], np.float32),
              "pooled": np.asarray(encoded[1], np.float32)}
    return {"emb": np.asarray(encoded, np.float32)}

  return cached(ctx.cache_dir / f"{name}.npz", compute)


def text_cond(encoded: dict) -> Any:
  """The prompts' conditioning (``diffusion.unet_predict``) from ``encode_text``'s arrays."""
  if "pooled" in encoded:
    return sdxl.prompt_cond(encoded["emb"], encoded["pooled"])
  return encoded["emb"]


def text_ids(ctx: Context, prompts: list[str]) -> dict[str, np.ndarray]:
  """Token ids of prompts for a loss that runs the text encoders.

  ``{"ids": (p, 77)}``; an SDXL pipeline adds its second tokenizer's,
  ``"ids_2"``.
  """
  if ctx.pipeline.is_sdxl:
    ids, ids_2 = sdxl.tokenize(ctx.pipeline, prompts)
    return {"ids": ids, "ids_2": ids_2}
  return {"ids": np.asarray(tokenizer_lib.tokenize(ctx.pipeline.tokenizer,
                                                   prompts))}


def encode_ids(text_encoder: nnx.Module, text_encoder_2: nnx.Module | None,
               ids: dict) -> Any:
  """The conditioning of ``text_ids``' ids, traced through the encoders."""
  if "ids_2" in ids:
    return sdxl.prompt_cond(*sdxl.encode_ids(text_encoder, text_encoder_2,
                                             ids["ids"], ids["ids_2"]))
  return text_encoder(ids["ids"])


def save_png(path: Path, image: np.ndarray) -> None:
  """Writes a uint8 image atomically: a killed run leaves no cut-off file."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  rundir.atomic_write_bytes(path, buffer.getvalue())


@jax.jit
def _encode_impl(graphdef, state, pixels):
  return nnx.merge(graphdef, state).encode(pixels)


def _encode(graphdef, state, pixels):
  # Chunks of 8 bound memory on real-size images.
  outs = [_encode_impl(graphdef, state, pixels[i:i + 8])
          for i in range(0, len(pixels), 8)]
  return (jnp.concatenate([o[0] for o in outs]),
          jnp.concatenate([o[1] for o in outs]))


def cached(path: Path, compute: Callable[[], dict]) -> dict:
  """Loads ``path`` (.npz) if present, else computes, saves atomically, returns.

  On several processes each one that finds no file computes the values itself
  (they are the same everywhere) and only process 0 writes them; ``compute``
  must therefore not run anything over the devices of other processes.
  """
  if path.is_file():
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  values = compute()
  if not distributed.is_chief():
    return values
  buffer = io.BytesIO()
  np.savez(buffer, **values)
  path.parent.mkdir(parents=True, exist_ok=True)
  rundir.atomic_write_bytes(path, buffer.getvalue())
  return values


def epoch_indices(seed: int, step: int, batch_size: int, n: int) -> np.ndarray:
  """Indices of a step's batch: each epoch a fresh permutation of ``n`` items.

  A pure function of ``(seed, step)``: resuming at any step reproduces the
  data order of an uninterrupted run.
  """
  first, out = step * batch_size, []
  for position in range(first, first + batch_size):
    epoch, offset = divmod(position, n)
    out.append(np.random.default_rng([seed, epoch]).permutation(n)[offset])
  return np.asarray(out, np.int32)


def sample_latents(mean, std, rng, scaling_factor: float, *,
                   rows: tuple[jax.Array, int] | None = None) -> jax.Array:
  """A draw from the cached VAE posterior, scaled as the U-Net expects.

  ``rows`` is ``(index, total)``: the rows of ``mean`` are rows ``index`` of
  a step of ``total`` rows, and draw what those rows draw there (see
  ``diffusion.draw_noise``); None: ``mean`` holds the whole step.
  """
  if rows is None:
    eps = jax.random.normal(rng, mean.shape, mean.dtype)
  else:
    index, total = rows
    eps = jax.random.normal(rng, (total,) + mean.shape[1:], mean.dtype)[index]
  return (mean + std * eps) * scaling_factor
