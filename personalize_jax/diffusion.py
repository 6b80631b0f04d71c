"""Diffusion math: noise schedule, noising, x0 prediction, DDIM sampling.

Everything follows diffusers' ``DDIMScheduler`` to the step, so a model trained
here samples the same in diffusers and vice versa:

  x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps          (``a_t = alphas_cumprod[t]``)
  v   = sqrt(a_t) eps - sqrt(1 - a_t) x0          (``v_prediction`` target)

A ``NoiseSchedule`` is a pytree: ``alphas_cumprod`` is its one array leaf and
its config is static, so it can be passed into ``jax.jit`` functions and its
methods (``add_noise``, ``predict_x0``, ``training_target``, ``ddim_step``)
traced there. ``ddim_sample`` runs the whole DDIM loop as one ``lax.scan``.
"""

import contextlib
import dataclasses
import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from personalize_jax import sdxl
from personalize_jax.errors import UserError
from personalize_jax.models import checkpoint, layers, presets

SCHEDULER_CONFIG = "scheduler_config.json"
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def _tuple(value):
  return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
  """diffusers' ``DDIMScheduler`` config (``scheduler_config.json``).

  Defaults are ``DDIMScheduler``'s, so a PNDM/DDPM config from an SD checkpoint
  reads as diffusers' ``DDIMScheduler.from_config`` would read it.
  """
  num_train_timesteps: int = 1000
  beta_start: float = 0.0001
  beta_end: float = 0.02
  beta_schedule: str = "linear"
  trained_betas: tuple[float, ...] | None = None
  clip_sample: bool = True
  clip_sample_range: float = 1.0
  set_alpha_to_one: bool = True
  steps_offset: int = 0
  prediction_type: str = "epsilon"
  timestep_spacing: str = "leading"
  rescale_betas_zero_snr: bool = False
  thresholding: bool = False

  @classmethod
  def from_dict(cls, config: dict) -> "SchedulerConfig":
    """Reads a scheduler config dict (unknown keys ignored, defaults filled).

    Raises:
      UserError: a schedule, prediction type or spacing this port lacks.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    out = cls(**{k: _tuple(v) for k, v in config.items()
                 if k in names and v is not None})
    for field, allowed in (("beta_schedule", BETA_SCHEDULES),
                           ("prediction_type", PREDICTION_TYPES),
                           ("timestep_spacing", TIMESTEP_SPACINGS)):
      if getattr(out, field) not in allowed:
        raise UserError(f"scheduler {field}={getattr(out, field)!r} is not "
                        f"supported; use one of {allowed}")
    if out.thresholding:
      raise UserError("scheduler thresholding=True (dynamic thresholding) is "
                      "not supported; set it to false (SD does not use it)")
    return out

  def to_dict(self) -> dict:
    """The ``scheduler_config.json`` dict diffusers' ``DDIMScheduler`` loads."""
    out = {k: list(v) if isinstance(v, tuple) else v
           for k, v in dataclasses.asdict(self).items()}
    return {"_class_name": "DDIMScheduler", "_diffusers_version": "0.42.1",
            **out}


def _betas(config: SchedulerConfig) -> np.ndarray:
  """The per-step betas in float64 (diffusers computes them in float32)."""
  n = config.num_train_timesteps
  if config.trained_betas is not None:
    betas = np.asarray(config.trained_betas, np.float64)
  elif config.beta_schedule == "linear":
    betas = np.linspace(config.beta_start, config.beta_end, n)
  elif config.beta_schedule == "scaled_linear":
    betas = np.linspace(config.beta_start**0.5, config.beta_end**0.5, n)**2
  else:  # squaredcos_cap_v2: the cosine schedule, betas capped at 0.999.
    alpha_bar = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2)**2
    betas = np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999)
                      for i in range(n)])
  if config.rescale_betas_zero_snr:
    # Shift and scale sqrt(alphas_cumprod) so the last step has zero SNR.
    root = np.sqrt(np.cumprod(1 - betas))
    root = (root - root[-1]) * root[0] / (root[0] - root[-1])
    alphas_cumprod = root**2
    betas = 1 - np.concatenate([alphas_cumprod[:1],
                                alphas_cumprod[1:] / alphas_cumprod[:-1]])
  return betas


def _expand(coef: jax.Array, like: jax.Array) -> jax.Array:
  """Broadcasts per-example ``(B,)`` (or scalar) coefficients over ``like``."""
  coef = jnp.asarray(coef)
  return coef.reshape(coef.shape + (1,) * (like.ndim - coef.ndim))


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """The DDPM noise schedule, usable inside ``jax.jit`` (a pytree).

  Timesteps ``t`` are integers in ``[0, num_train_timesteps)``, a scalar or one
  per example ``(B,)``; arrays are broadcast over the trailing axes of ``x``.
  Coefficients are float32; results have the dtype of the input samples.

  Attributes:
    config: the static scheduler config.
    alphas_cumprod: ``(num_train_timesteps,)`` float32, ``a_t`` above.
  """
  config: SchedulerConfig
  alphas_cumprod: jax.Array

  @classmethod
  def from_config(cls, config: dict | SchedulerConfig) -> "NoiseSchedule":
    """Builds the schedule from a ``scheduler_config.json`` dict or a config."""
    if isinstance(config, dict):
      config = SchedulerConfig.from_dict(config)
    alphas_cumprod = np.cumprod(1.0 - _betas(config))
    return cls(config, jnp.asarray(alphas_cumprod, jnp.float32))

  @classmethod
  def from_pretrained(cls, path_or_hub_id: str | os.PathLike,
                      subfolder: str | None = "scheduler") -> "NoiseSchedule":
    """Reads ``<path>/<subfolder>/scheduler_config.json`` (or ``tiny``).

    Raises:
      CheckpointError: the folder or file is missing or malformed.
      UserError: the config asks for something this port lacks.
    """
    if str(path_or_hub_id) == presets.TINY:
      return cls.from_config(presets.SCHEDULER)
    folder = checkpoint.resolve_pretrained(path_or_hub_id, subfolder)
    return cls.from_config(checkpoint.read_json(folder / SCHEDULER_CONFIG))

  def save_pretrained(self, folder: str | os.PathLike) -> Path:
    """Writes ``scheduler_config.json`` (a diffusers ``DDIMScheduler``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SCHEDULER_CONFIG).write_text(
        json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")
    return folder

  @property
  def num_train_timesteps(self) -> int:
    return self.config.num_train_timesteps

  @property
  def prediction_type(self) -> str:
    return self.config.prediction_type

  def alpha_bar(self, t: jax.Array) -> jax.Array:
    """``alphas_cumprod[t]``; negative ``t`` reads ``final_alpha_cumprod``.

    ``final_alpha_cumprod`` (the "step" after ``t = 0``) is 1 if
    ``set_alpha_to_one`` else ``alphas_cumprod[0]``, as in diffusers.
    """
    t = jnp.asarray(t)
    final = 1.0 if self.config.set_alpha_to_one else self.alphas_cumprod[0]
    return jnp.where(t >= 0, self.alphas_cumprod[jnp.maximum(t, 0)], final)

  def sample_timesteps(self, rng: jax.Array, batch_size: int) -> jax.Array:
    """Training timesteps, uniform over ``[0, num_train_timesteps)``, int32."""
    return jax.random.randint(rng, (batch_size,), 0, self.num_train_timesteps)

  def add_noise(self, x0: jax.Array, noise: jax.Array,
                t: jax.Array) -> jax.Array:
    """The forward process: ``sqrt(a_t) x0 + sqrt(1 - a_t) noise``."""
    a = _expand(self.alpha_bar(t), x0)
    return (jnp.sqrt(a) * x0 + jnp.sqrt(1 - a) * noise).astype(x0.dtype)

  def training_target(self, x0: jax.Array, noise: jax.Array,
                      t: jax.Array) -> jax.Array:
    """The regression target: ``noise``, ``v`` or ``x0`` per prediction_type."""
    if self.prediction_type == "epsilon":
      return noise
    if self.prediction_type == "sample":
      return x0
    a = _expand(self.alpha_bar(t), x0)
    return (jnp.sqrt(a) * noise - jnp.sqrt(1 - a) * x0).astype(x0.dtype)

  def predict_x0(self, x_t: jax.Array, model_output: jax.Array,
                 t: jax.Array) -> jax.Array:
    """The clean sample implied by one model call (the "look forward" x0).

    Equals diffusers' ``pred_original_sample`` without ``clip_sample``.
    """
    if self.prediction_type == "sample":
      return model_output
    a = _expand(self.alpha_bar(t), x_t)
    if self.prediction_type == "epsilon":
      x0 = (x_t - jnp.sqrt(1 - a) * model_output) / jnp.sqrt(a)
    else:
      x0 = jnp.sqrt(a) * x_t - jnp.sqrt(1 - a) * model_output
    return x0.astype(x_t.dtype)

  def predict_eps(self, x_t: jax.Array, model_output: jax.Array,
                  t: jax.Array) -> jax.Array:
    """The noise implied by one model call (``pred_epsilon`` in diffusers)."""
    if self.prediction_type == "epsilon":
      return model_output
    a = _expand(self.alpha_bar(t), x_t)
    if self.prediction_type == "sample":
      eps = (x_t - jnp.sqrt(a) * model_output) / jnp.sqrt(1 - a)
    else:
      eps = jnp.sqrt(a) * model_output + jnp.sqrt(1 - a) * x_t
    return eps.astype(x_t.dtype)

  def ddim_timesteps(self, num_inference_steps: int) -> np.ndarray:
    """The descending DDIM timesteps (``DDIMScheduler.set_timesteps``).

    Raises:
      UserError: ``num_inference_steps`` is not in ``[1, num_train_timesteps]``.
    """
    n, total = num_inference_steps, self.num_train_timesteps
    if not 1 <= n <= total:
      raise UserError(f"num_inference_steps={n} must be between 1 and the "
                      f"scheduler's num_train_timesteps={total}")
    spacing = self.config.timestep_spacing
    if spacing == "linspace":
      timesteps = np.linspace(0, total - 1, n).round()[::-1]
    elif spacing == "leading":
      timesteps = np.arange(n)[::-1] * (total // n) + self.config.steps_offset
    else:
      timesteps = np.round(np.arange(total, 0, -total / n)) - 1
    return timesteps.astype(np.int32)

  def ddim_step(self, x_t: jax.Array, model_output: jax.Array, t: jax.Array,
                num_inference_steps: int, *, eta: float | jax.Array = 0.0,
                noise: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """One DDIM update from ``t`` (diffusers' ``DDIMScheduler.step``).

    As in diffusers, the previous timestep is ``t - num_train_timesteps //
    num_inference_steps`` for every spacing (for ``linspace``/``trailing`` it
    is not exactly the next timestep of ``ddim_timesteps``).

    Args:
      x_t: the current sample.
      model_output: the model's prediction at ``t``.
      t: the current timestep (scalar or ``(B,)``).
      num_inference_steps: the length of the DDIM chain.
      eta: 0 for deterministic DDIM, 1 for DDPM-like noise.
      noise: standard normal noise shaped like ``x_t``, required when
        ``eta != 0`` (diffusers' ``variance_noise``).

    Returns:
      ``(x_prev, x0)``: the sample at the previous timestep and the predicted
      clean sample (clipped if the config sets ``clip_sample``).
    """
    prev_t = jnp.asarray(t) - self.num_train_timesteps // num_inference_steps
    a, a_prev = (_expand(self.alpha_bar(s), x_t) for s in (t, prev_t))
    x0 = self.predict_x0(x_t, model_output, t)
    eps = self.predict_eps(x_t, model_output, t)
    if self.config.clip_sample:
      limit = self.config.clip_sample_range
      x0 = jnp.clip(x0, -limit, limit)
    variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    std = eta * jnp.sqrt(variance)
    x_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev - std**2) * eps
    if noise is not None:
      x_prev = x_prev + std * noise
    return x_prev.astype(x_t.dtype), x0


jax.tree_util.register_dataclass(NoiseSchedule, data_fields=["alphas_cumprod"],
                                 meta_fields=["config"])

Denoiser = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]

# The fold_in data of the noise-offset draw: a stream of its own, so that a
# step's noise and timesteps are the same with and without an offset.
NOISE_OFFSET_STREAM = 0x0FF5E7


def draw_noise(schedule: NoiseSchedule, rng: jax.Array,
               shape: tuple[int, ...], *,
               rows: tuple[jax.Array, int] | None = None,
               noise_offset: float = 0.0) -> tuple[jax.Array, jax.Array]:
  """Training noise (float32, ``shape``) and a timestep per row, from ``rng``.

  Args:
    schedule: the noise schedule (its number of training timesteps).
    rng: the key of the step's draw.
    shape: the noise's shape, rows first (NHWC latents).
    rows: ``(index, total)``: the rows are rows ``index`` of the draw for
      ``total`` rows, so that a row's noise and timestep depend on its index
      in the step's batch, not on the micro-batch it is computed in; None:
      the draw is for ``shape[0]`` rows.
    noise_offset: diffusers' ``--noise_offset``: adds ``noise_offset`` times
      a normal draw per row and channel (``(b, 1, 1, c)``); 0 is off.
  """
  index, total = rows if rows is not None else (None, shape[0])
  noise_rng, t_rng = jax.random.split(rng)
  noise = jax.random.normal(noise_rng, (total,) + tuple(shape[1:]),
                            jnp.float32)
  if noise_offset:
    per_channel = (total,) + (1,) * (len(shape) - 2) + (shape[-1],)
    noise = noise + noise_offset * jax.random.normal(
        jax.random.fold_in(rng, NOISE_OFFSET_STREAM), per_channel,
        jnp.float32)
  t = schedule.sample_timesteps(t_rng, total)
  if index is not None:
    noise, t = noise[index], t[index]
  return noise, t


def snr(schedule: NoiseSchedule, t: jax.Array) -> jax.Array:
  """``(sqrt(a_t) / sqrt(1 - a_t)) ** 2`` at ``t``, as diffusers' ``compute_snr``."""
  a = schedule.alphas_cumprod[t]
  return (jnp.sqrt(a) / jnp.sqrt(1.0 - a)) ** 2


def min_snr_weight(schedule: NoiseSchedule, t: jax.Array,
                   gamma: float) -> jax.Array:
  """Min-SNR-gamma loss weights of rows noised at ``t`` (Hang et al. 2023).

  ``min(snr, gamma) / snr`` for epsilon targets and ``min(snr, gamma) /
  (snr + 1)`` for v_prediction (the paper's Sec. 4.2, as diffusers'
  ``--snr_gamma``), ``min(snr, gamma)`` for sample (x0) targets.
  """
  ratio = snr(schedule, t)
  clipped = jnp.minimum(ratio, gamma)
  if schedule.prediction_type == "epsilon":
    return clipped / ratio
  if schedule.prediction_type == "v_prediction":
    return clipped / (ratio + 1)
  return clipped


def per_sample_error(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Mean squared error over every axis but the first, ``(b,)`` float32."""
  err = (pred.astype(jnp.float32) - target) ** 2
  return jnp.mean(err, axis=tuple(range(1, err.ndim)))


# ----------------------------------------------------------- conditioning
# What the U-Net is conditioned on, row by row: for SD 1.x/2.x the text
# states ``(b, t, d)``; for SDXL a dict of ``states``, ``text_embeds`` (the
# pooled text, ``(b, d)``) and ``time_ids`` (``(b, 6)``, see
# ``sdxl.row_time_ids``). Both are pytrees whose leaves have the rows first,
# so the methods take, repeat and join rows with the functions below whatever
# the model.


def unet_predict(unet: Denoiser | nnx.Module, noisy: jax.Array, t: jax.Array,
                 cond: Any) -> jax.Array:
  """The U-Net's prediction for ``noisy`` at ``t`` under a conditioning."""
  if isinstance(cond, dict):
    return unet(noisy, t, cond["states"], text_embeds=cond["text_embeds"],
                time_ids=cond["time_ids"])
  return unet(noisy, t, cond)


def cond_rows(cond: Any, index: Any) -> Any:
  """Rows ``index`` (an index array or a slice) of every leaf."""
  return jax.tree.map(lambda a: a[index], cond)


def cond_repeat(cond: Any, n: int) -> Any:
  """A one-row conditioning broadcast to ``n`` rows."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (n,) + a.shape[1:]), cond)


def cond_concat(*conds: Any) -> Any:
  """The rows of several conditionings, one after the other."""
  return jax.tree.map(lambda *a: jnp.concatenate(a), *conds)


def denoising_error(unet: Denoiser | nnx.Module, schedule: NoiseSchedule,
                    latents: jax.Array, noise: jax.Array, t: jax.Array,
                    emb: Any, *, snr_gamma: float = 0.0) -> jax.Array:
  """Per-sample error ``(b,)`` of the U-Net's epsilon (or v) prediction.

  The training losses of every method are functions of these errors: the
  U-Net sees ``latents`` noised with ``noise`` at ``t``, conditioned on
  ``emb`` (text states, or SDXL's conditioning dict: see ``unet_predict``),
  and its output is compared with the schedule's target. With
  ``snr_gamma > 0`` each row's error is weighted by ``min_snr_weight``.
  """
  pred = unet_predict(unet, schedule.add_noise(latents, noise, t), t, emb)
  err = per_sample_error(pred, schedule.training_target(latents, noise, t))
  if snr_gamma:
    err = err * min_snr_weight(schedule, t, snr_gamma)
  return err


def ddim_sample(unet: Denoiser | nnx.Module, schedule: NoiseSchedule,
                latents: jax.Array, cond_emb: jax.Array,
                uncond_emb: jax.Array | None = None,
                num_inference_steps: int = 50,
                guidance_scale: float | jax.Array = 7.5,
                eta: float | jax.Array = 0.0,
                rng: jax.Array | None = None,
                batch_sharding: jax.sharding.Sharding | None = None, *,
                time_ids: jax.Array | None = None) -> jax.Array:
  """Runs DDIM from pure-noise latents to clean latents (one jitted scan).

  Matches diffusers' ``StableDiffusionPipeline`` (and
  ``StableDiffusionXLPipeline``) with a ``DDIMScheduler`` step for step
  (``init_noise_sigma`` is 1 for DDIM, so ``latents`` are used as given).
  With ``uncond_emb``, classifier-free guidance runs the unconditional and
  conditional halves in one U-Net call on the concatenated batch.

  Args:
    unet: ``unet(latents_bhwc, t_b, emb_btd) -> prediction``. An
      ``nnx.Module`` is split once here and merged inside the jitted loop, so
      its weights are traced arguments (not constants) and the compiled loop
      is reused across calls with same-shaped models. Any other callable is a
      static argument of ``jax.jit``: pass the same function object to reuse
      its compilation; weights it closes over are baked in as constants.
    schedule: the noise schedule.
    latents: ``(B, h, w, c)`` starting noise (scale by ``init_noise_sigma``
      = 1 is implicit).
    cond_emb: ``(B, T, D)`` text embeddings; for an SDXL U-Net the pair
      ``(states_btd, pooled_bd)`` that ``encode_prompts`` returns.
    uncond_emb: the same for the empty prompt, ``B`` or 1 rows; None
      disables guidance (one U-Net call on ``cond_emb`` per step).
    num_inference_steps: the number of DDIM steps.
    guidance_scale: ``uncond + guidance_scale * (cond - uncond)``.
    eta: DDIM stochasticity; nonzero needs ``rng``.
    rng: a PRNG key; step ``i`` draws its noise from
      ``jax.random.fold_in(rng, i)``.
    batch_sharding: the ``NamedSharding`` the batch is split with, if any: the
      U-Net's activations follow it and kernels XLA cannot partition (Pallas
      attention) run per device over its mesh.
    time_ids: SDXL only: ``(6,)`` or ``(B, 6)`` micro-conditioning
      (``sdxl.time_ids``), for both halves of the guidance.

  Returns:
    The final latents, shaped and typed like ``latents``.
  """
  if rng is None and not (isinstance(eta, (int, float)) and eta == 0):
    raise ValueError("ddim_sample with eta != 0 needs an rng key")
  if isinstance(unet, nnx.Module):
    model_def, model_state = nnx.split(unet)
  else:
    model_def, model_state = unet, None
  cond_emb, added = sdxl.unet_inputs(cond_emb, time_ids)
  uncond_emb, uncond_added = sdxl.unet_inputs(uncond_emb, time_ids)
  rows = lambda x: jnp.broadcast_to(x, cond_emb.shape[:1] + x.shape[1:])
  uncond_emb, added, uncond_added = jax.tree.map(
      rows, (uncond_emb, added, uncond_added))
  timesteps = jnp.asarray(schedule.ddim_timesteps(num_inference_steps))
  return _ddim_loop(model_def, model_state, schedule, latents, cond_emb,
                    uncond_emb, timesteps, guidance_scale, eta, rng,
                    num_inference_steps=num_inference_steps,
                    split=batch_split(batch_sharding), added_cond=added,
                    uncond_added_cond=uncond_added)


def batch_split(batch_sharding) -> tuple | None:
  """``(mesh, axes)`` a ``NamedSharding`` splits the batch over; None if not one.

  A static argument of the jitted samplers, so that a program traced for one
  mesh (or none) is never reused for another.
  """
  if not isinstance(batch_sharding, jax.sharding.NamedSharding):
    return None
  axes = batch_sharding.spec[0] if batch_sharding.spec else None
  if axes is None:
    return None
  return batch_sharding.mesh, (axes,) if isinstance(axes, str) else tuple(axes)


def _activations_split(split):
  return (contextlib.nullcontext() if split is None
          else layers.batch_sharded_activations(*split))


@functools.partial(jax.jit,
                   static_argnames=("model_def", "num_inference_steps",
                                    "split"))
def _ddim_loop(model_def: Any, model_state: Any, schedule: NoiseSchedule,
               latents: jax.Array, cond_emb: jax.Array,
               uncond_emb: jax.Array | None, timesteps: jax.Array,
               guidance_scale: jax.Array, eta: jax.Array,
               rng: jax.Array | None, *, num_inference_steps: int,
               split: tuple | None = None, added_cond: dict | None = None,
               uncond_added_cond: dict | None = None) -> jax.Array:
  with _activations_split(split):
    return _ddim_scan(model_def, model_state, schedule, latents, cond_emb,
                      uncond_emb, timesteps, guidance_scale, eta, rng,
                      num_inference_steps, added_cond, uncond_added_cond)


def _ddim_scan(model_def, model_state, schedule, latents, cond_emb,
               uncond_emb, timesteps, guidance_scale, eta, rng,
               num_inference_steps, added_cond=None, uncond_added_cond=None):
  unet = model_def if model_state is None else nnx.merge(model_def, model_state)
  guided = uncond_emb is not None
  emb = jnp.concatenate([uncond_emb, cond_emb]) if guided else cond_emb
  # SDXL's U-Net keywords (text_embeds, time_ids), batched like ``emb``.
  added = added_cond or {}
  if guided and added:
    added = jax.tree.map(lambda u, c: jnp.concatenate([u, c]),
                         uncond_added_cond, added)

  def step(x, inputs):
    i, t = inputs
    x_in = jnp.concatenate([x, x]) if guided else x
    out = unet(x_in, jnp.full((x_in.shape[0],), t, jnp.int32), emb, **added)
    out = out.astype(jnp.float32)
    if guided:
      uncond, cond = jnp.split(out, 2)
      out = uncond + guidance_scale * (cond - uncond)
    noise = None
    if rng is not None:
      noise = jax.random.normal(jax.random.fold_in(rng, i), x.shape,
                                jnp.float32)
    x, _ = schedule.ddim_step(x, out, t, num_inference_steps, eta=eta,
                              noise=noise)
    return x, None

  steps = jnp.arange(timesteps.shape[0])
  x, _ = jax.lax.scan(step, latents.astype(jnp.float32), (steps, timesteps))
  return x.astype(latents.dtype)


@functools.partial(jax.jit, static_argnames=("model_def",))
def _encode_text(model_def: Any, model_state: Any, ids_bt: jax.Array):
  return nnx.merge(model_def, model_state)(ids_bt)


def decode_to_uint8(model_def: Any, model_state: Any, latents: jax.Array,
                    scaling_factor: float, batch_sharding=None) -> jax.Array:
  """VAE-decoded ``uint8`` images of latents (one jitted call)."""
  return _decode_to_uint8(model_def, model_state, latents, scaling_factor,
                          split=batch_split(batch_sharding))


@functools.partial(jax.jit, static_argnames=("model_def", "split"))
def _decode_to_uint8(model_def: Any, model_state: Any, latents: jax.Array,
                     scaling_factor: float, split=None) -> jax.Array:
  with _activations_split(split):
    images = nnx.merge(model_def, model_state).decode(latents / scaling_factor)
  images = (images.astype(jnp.float32) + 1.0) * 127.5
  return jnp.clip(jnp.round(images), 0, 255).astype(jnp.uint8)


def encode_prompts(pipeline: Any, prompts: str | list[str]
                   ) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Text-encoder hidden states ``(b, 77, d)`` for prompts, as SD conditions on.

  An SDXL pipeline returns the pair ``(states_btd, pooled_bd)`` of
  ``sdxl.encode_prompts``.
  """
  if pipeline.is_sdxl:
    return sdxl.encode_prompts(pipeline, prompts)
  from personalize_jax.models import tokenizer as tok  # pylint: disable=g-import-not-at-top
  ids = jnp.asarray(tok.tokenize(pipeline.tokenizer, prompts))
  return _encode_text(*nnx.split(pipeline.text_encoder), ids)


def initial_latents(rng: jax.Array, indices, latent_shape_hwc) -> jax.Array:
  """The starting noise of images ``indices``: image ``i`` uses ``fold_in(rng, i)``."""
  index = jnp.asarray(list(indices), jnp.int32)
  return jax.vmap(lambda i: jax.random.normal(
      jax.random.fold_in(rng, i), tuple(latent_shape_hwc), jnp.float32))(index)


def generate(pipeline: Any, prompts: str | list[str], *,
             rng: jax.Array | None = None, seed: int = 0,
             num_inference_steps: int = 50, guidance_scale: float = 7.5,
             negative_prompt: str = "", resolution: int | None = None,
             eta: float = 0.0, batch_size: int = 8,
             progress: bool = False,
             batch_sharding: jax.sharding.Sharding | None = None) -> np.ndarray:
  """Text to image with DDIM and classifier-free guidance.

  Image ``i`` starts from noise drawn with ``fold_in(rng, i)``, so an image
  depends on the seed and its index only, not on ``batch_size``. The last
  chunk is padded to ``batch_size`` so every chunk reuses one compilation.

  Args:
    pipeline: a ``StableDiffusion`` (``unet``, ``vae``, ``text_encoder``,
      ``tokenizer``, ``schedule``; for SDXL the second encoder and tokenizer,
      conditioned on the time ids of ``resolution``).
    prompts: one prompt or a list.
    rng: a PRNG key; ``jax.random.key(seed)`` if None.
    seed: used when ``rng`` is None.
    num_inference_steps: DDIM steps.
    guidance_scale: classifier-free guidance (1 disables the unconditional pass).
    negative_prompt: the unconditional prompt (SDXL: "" means zeros when
      the pipeline's ``force_zeros_for_empty_prompt`` is set).
    resolution: image side in pixels; the U-Net's native size if None.
    eta: DDIM stochasticity.
    batch_size: images per jitted call.
    progress: show a progress bar over chunks.
    batch_sharding: lays each chunk's batch axis over devices (e.g. the
      engine's ``batch_sharding(mesh)``), so sampling runs on all of them;
      ``batch_size`` is then rounded up to a multiple of the device count.

  Returns:
    ``(n, resolution, resolution, 3)`` uint8 images.
  """
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  rng = jax.random.key(seed) if rng is None else rng
  batch_size = min(batch_size, len(prompts))
  if batch_sharding is not None:
    devices = len(batch_sharding.device_set)
    batch_size = -(-batch_size // devices) * devices
  resolution = resolution or pipeline.resolution
  factor = pipeline.vae_scale_factor
  multiple = factor * 2 ** (len(pipeline.unet.config.block_out_channels) - 1)
  if resolution % multiple:
    raise UserError(f"resolution {resolution} is not a multiple of {multiple}, "
                    "which this model's VAE and U-Net need; pick another size")
  latent_shape = (resolution // factor, resolution // factor,
                  pipeline.unet.config.in_channels)
  guided = guidance_scale != 1.0
  uncond = None
  if guided:
    uncond = (sdxl.negative_conditioning(pipeline, negative_prompt)
              if pipeline.is_sdxl else encode_prompts(pipeline,
                                                      [negative_prompt]))
  time_ids = sdxl.time_ids(resolution) if pipeline.is_sdxl else None
  vae_def, vae_state = nnx.split(pipeline.vae)
  chunks = range(0, len(prompts), batch_size)
  if progress:
    from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
    chunks = tqdm.tqdm(chunks, desc="generate", unit="batch")
  out = []
  for start in chunks:
    batch = prompts[start:start + batch_size]
    padded = batch + [batch[-1]] * (batch_size - len(batch))
    latents = initial_latents(rng, range(start, start + batch_size),
                              latent_shape)
    cond = encode_prompts(pipeline, padded)
    if batch_sharding is not None:
      latents, cond = jax.device_put((latents, cond), batch_sharding)
    # With eta > 0 each chunk draws its DDIM noise from its own key.
    step_rng = jax.random.fold_in(rng, 2**30 + start) if eta else None
    latents = ddim_sample(pipeline.unet, pipeline.schedule, latents, cond,
                          uncond, num_inference_steps, guidance_scale, eta,
                          step_rng, batch_sharding=batch_sharding,
                          time_ids=time_ids)
    images = decode_to_uint8(vae_def, vae_state, latents,
                             pipeline.vae.scaling_factor, batch_sharding)
    if not images.is_fully_addressable:
      # On several processes (a pod) each holds only its devices' rows.
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      images = multihost_utils.process_allgather(images, tiled=True)
    out.append(np.asarray(images)[:len(batch)])
  return np.concatenate(out)
