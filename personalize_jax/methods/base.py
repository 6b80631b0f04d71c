"""What a method gives the engine, and the pieces methods share.

A method is a loss, the data it needs and a config. The engine calls, in order:

  prepare()             precompute and cache data in the workdir (latents,
                        embeddings, generated images)
  trainable_modules()   {name: nnx.Module} whose parameters the optimizer sees
  frozen_modules()      {name: nnx.Module} used by the loss but never trained
  constants()           {name: array} replicated inputs (cached embeddings)
  batch(step)           the global batch of a step: a pure function of the
                        step, so a resumed run sees the same data
  loss_fn(params, frozen, batch, rng) -> (loss, metrics), pure and jitted
  evaluate(step, pipeline) -> scalars, at every eval step (optional)

Optional hooks: ``extra_optimizers()`` (leaves trained by an optimizer of
their own), ``row_masks()`` (only some rows of a parameter train),
``post_update(params, step)`` (non-gradient updates inside the jitted step),
and ``best_metric`` (a scalar of ``evaluate`` whose best value selects the
exported model; ``config.early_stopping_patience`` stops after that many
evaluations without improvement).

``frozen`` is ``{"modules": {name: state}, "constants": {name: array}}``.
"""

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from personalize_jax import diffusion
from personalize_jax.data import demo_subject, images as images_lib
from personalize_jax.data import prompts as prompts_lib
from personalize_jax.engine import distributed, rundir, sharding


@dataclasses.dataclass
class Context:
  """What a method may use: the config, the run directory, models, devices."""
  config: ml_collections.ConfigDict
  workdir: Path
  pipeline: Any  # models.pipeline.StableDiffusion
  mesh: Mesh

  @property
  def cache_dir(self) -> Path:
    return self.workdir / "cache"

  @property
  def batch_sharding(self):
    """Splits a batch axis over every device: pass it to ``diffusion.generate``."""
    return sharding.batch_sharding(self.mesh)


class Method:
  """Base class: DreamBooth-style data helpers and default hooks."""

  def __init__(self, ctx: Context):
    self.ctx = ctx
    self.config = ctx.config
    self.graphdefs: dict[str, Any] = {}

  def prepare(self) -> None:
    raise NotImplementedError

  def trainable_modules(self) -> dict[str, nnx.Module]:
    raise NotImplementedError

  def frozen_modules(self) -> dict[str, nnx.Module]:
    return {}

  def constants(self) -> dict[str, np.ndarray]:
    return {}

  def batch(self, step: int) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def loss_fn(self, params, frozen, batch, rng) -> tuple[jax.Array, dict]:
    raise NotImplementedError

  def evaluate(self, step: int, pipeline: Any) -> dict[str, float]:
    del step, pipeline
    return {}

  # (name, "max" | "min") of an ``evaluate`` scalar that selects the export.
  best_metric: tuple[str, str] | None = None

  def extra_optimizers(self) -> dict:
    """``{label: (regexes, optax transform)}``; see ``optim.make_optimizer``."""
    return {}

  def row_masks(self) -> dict:
    """``{"component.torch.key": bool rows}``; see ``optim.mask_rows``."""
    return {}

  post_update = None  # or a method ``(params, step) -> params``

  def module(self, name: str, state) -> nnx.Module:
    """A module rebuilt from its graph and a (traced) parameter state."""
    return nnx.merge(self.graphdefs[name], state)

  # ------------------------------------------------------------ data helpers

  def instance_prompt(self) -> str:
    data = self.config.data
    return prompts_lib.format_prompt(data.instance_prompt,
                                     token=data.unique_token,
                                     class_name=data.class_name)

  def eval_prompts(self) -> list[str]:
    data = self.config.data
    return [prompts_lib.format_prompt(p, token=data.unique_token,
                                      class_name=data.class_name)
            for p in self.config.eval.prompts]

  def check_prompts(self, prompts: list[str]) -> None:
    prompts_lib.check_prompts(prompts, token=self.config.data.unique_token,
                              tokenizer=self.ctx.pipeline.tokenizer,
                              warn=logging.warning,
                              class_name=self.config.data.class_name)

  def instance_images(self) -> list[np.ndarray]:
    """The subject's photos (or the drawn demo subject, written to the workdir)."""
    data = self.config.data
    folder = data.instance_dir
    if not folder:
      folder = self.ctx.workdir / "instance_images"
      if distributed.is_chief() and not folder.is_dir():
        # Drawn beside it and renamed: a killed run leaves no partial folder.
        drawing = folder.with_name(f".{folder.name}.tmp")
        shutil.rmtree(drawing, ignore_errors=True)
        demo_subject.write_demo_subject(drawing, seed=self.config.seed)
        drawing.rename(folder)
      distributed.barrier("demo_subject")
    images, _ = images_lib.load_instance_images(
        folder, min_side=data.min_image_side,
        skip_bad_images=data.skip_bad_images, warn=logging.warning)
    return images

  def pixels(self, images: list[np.ndarray], *, flips: bool) -> np.ndarray:
    """Training pixels ``(n, res, res, 3)`` in [-1, 1]; flipped copies appended."""
    data = self.config.data
    out = [images_lib.preprocess(im, data.resolution,
                                 center_crop=data.center_crop) for im in images]
    if flips:
      out += [images_lib.flip(p) for p in out]
    return np.stack(out)

  def encode_latents(self, pixels_bhwc: np.ndarray, name: str) -> dict:
    """VAE posterior ``mean``/``std`` of pixels, cached as ``cache/<name>.npz``."""
    vae = self.ctx.pipeline.vae

    def compute():
      mean, logvar = _encode(*nnx.split(vae), jnp.asarray(pixels_bhwc))
      return {"mean": np.asarray(mean, np.float32),
              "std": np.asarray(jnp.exp(0.5 * logvar), np.float32)}

    return cached(self.ctx.cache_dir / f"{name}.npz", compute)

  def encode_text(self, prompts: list[str], name: str) -> np.ndarray:
    """Text-encoder states of fixed prompts, cached as ``cache/<name>.npz``."""
    return cached(
        self.ctx.cache_dir / f"{name}.npz",
        lambda: {"emb": np.asarray(diffusion.encode_prompts(
            self.ctx.pipeline, prompts), np.float32)})["emb"]


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
  import io  # pylint: disable=g-import-not-at-top
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


def sample_latents(mean, std, rng, scaling_factor: float) -> jax.Array:
  """A draw from the cached VAE posterior, scaled as the U-Net expects."""
  return (mean + std * jax.random.normal(rng, mean.shape, mean.dtype)
          ) * scaling_factor


def noise_prediction_error(unet, schedule: diffusion.NoiseSchedule, latents,
                           emb, rng) -> jax.Array:
  """Per-sample mean squared error of the denoising target, shape ``(b,)``.

  Noise and timesteps are drawn from ``rng``; the target is epsilon or v as
  the schedule's ``prediction_type`` says.
  """
  noise_rng, t_rng = jax.random.split(rng)
  noise = jax.random.normal(noise_rng, latents.shape, jnp.float32)
  t = schedule.sample_timesteps(t_rng, latents.shape[0])
  noisy = schedule.add_noise(latents, noise, t)
  pred = unet(noisy, t, emb).astype(jnp.float32)
  target = schedule.training_target(latents, noise, t)
  return jnp.mean((pred - target) ** 2, axis=tuple(range(1, pred.ndim)))


def workdir_path(workdir: str | os.PathLike) -> Path:
  return Path(workdir).expanduser().resolve()
