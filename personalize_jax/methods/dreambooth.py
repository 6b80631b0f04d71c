"""DreamBooth (Ruiz et al. 2023): fine-tune on the subject with prior preservation.

Loss = MSE(instance) + prior_loss_weight * MSE(class), where the class half
uses images of the plain class ("a photo of dog") that the base model
generated before training, so the model keeps its prior over the class. As in
diffusers' ``train_dreambooth.py``: epsilon (or v) targets, timesteps uniform
over the training schedule, VAE latents sampled from the posterior each step.
"""

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from personalize_jax import diffusion, sdxl
from personalize_jax import pipeline as pipeline_lib
from personalize_jax.data import images as images_lib
from personalize_jax.engine import distributed, optim
from personalize_jax.engine import state as state_lib
from personalize_jax.engine.method import Context, Graphs, Method
from personalize_jax.errors import UserError
from personalize_jax.methods import common

# The pipeline components config.trainable may name (text_encoder_2: SDXL's).
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")

# The regexes train_text_encoder adds: SDXL's second encoder trains with the
# first, as in diffusers' train_dreambooth_lora_sdxl.py.
TEXT_ENCODER = r"^text_encoder\."
TEXT_ENCODER_2 = r"^text_encoder_2\."

# The engine's training options this loss implements (the engine refuses
# them for a method that does not list them): its randomness is keyed by the
# step's row index, so micro-batches add up to the whole batch.
TRAINING_OPTIONS = ("gradient_accumulation_steps", "loss.snr_gamma",
                    "loss.noise_offset")


def add_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds ``config.dreambooth`` (diffusers' train_dreambooth.py options)."""
  d = ml_collections.ConfigDict()
  d.prior_preservation = True  # add the class-prior loss on generated class images.
  d.num_class_images = 200  # class images to generate (reused if already there).
  d.prior_loss_weight = 1.0  # weight of the class-prior loss.
  d.class_prompt = "a photo of {class_name}"  # prompt of the class images.
  d.class_images_dir = ""  # where class images live; "" = <workdir>/class_images.
  d.class_inference_steps = 50  # DDIM steps when generating class images.
  d.class_guidance_scale = 7.5  # guidance when generating class images.
  # Also fine-tune the CLIP text encoder (SDXL: both): True adds
  # "^text_encoder\\." (and "^text_encoder_2\\.") to config.trainable, False
  # removes them, None leaves config.trainable as set.
  d.train_text_encoder = ml_collections.config_dict.placeholder(bool)
  c.dreambooth = d
  return c


def resolve(config: ml_collections.ConfigDict) -> None:
  """Applies ``dreambooth.train_text_encoder`` to ``config.trainable``."""
  switch = config.dreambooth.get("train_text_encoder")
  if switch is None:
    return
  encoders = (TEXT_ENCODER, TEXT_ENCODER_2)
  patterns = [p for p in config.trainable if p not in encoders]
  if switch:
    patterns.append(TEXT_ENCODER)
    if pipeline_lib.is_sdxl_source(config.model.pretrained):
      patterns.append(TEXT_ENCODER_2)
  config.trainable = tuple(patterns)


def validate(config: ml_collections.ConfigDict) -> None:
  """One-line errors for ``config.dreambooth`` values a user can get wrong."""
  d = config.dreambooth

  def fail(key, valid):
    raise UserError(f"config.dreambooth.{key}={d[key]!r} is invalid: {valid}")

  if d.prior_preservation:
    for key in ("num_class_images", "class_inference_steps"):
      if not isinstance(d[key], int) or isinstance(d[key], bool) or d[key] < 1:
        fail(key, "it must be a positive integer (or set "
             "dreambooth.prior_preservation=false)")
    if not d.prior_loss_weight >= 0:
      fail("prior_loss_weight", "it must be a number >= 0")
    if not d.class_prompt.strip():
      fail("class_prompt", "write a prompt of the plain class, e.g. "
           "'a photo of {class_name}'")
    if d.class_images_dir and not Path(d.class_images_dir).is_dir():
      parent = Path(d.class_images_dir).expanduser().parent
      if not parent.is_dir():
        fail("class_images_dir", f"its parent folder {parent} does not exist")


@dataclasses.dataclass(frozen=True)
class Data:
  """What DreamBooth trains on, prepared once and cached in the workdir.

  Attributes:
    instance: posterior ``mean``/``std`` ``(n * flips, h, w, c)`` of the
      photos; flipped copies follow the originals.
    klass: the same for the class images, or None without prior preservation.
    num_flips: 2 when flipped copies are in ``instance``, else 1.
    text: ``common.text_ids``' ids when a text encoder trains (prompts are
      encoded every step), else ``common.encode_text``'s arrays; prompt 0 is
      the instance prompt, prompt 1 the class prompt.
    scaling: the VAE's latent scaling factor.
    schedule: the training noise schedule.
    time_ids: SDXL only: ``{"instance": (n * flips, 6), "class": (m, 6)}``,
      each training image's micro-conditioning (``common.time_ids``); None
      for SD 1.x/2.x.
  """
  instance: dict
  klass: dict | None
  num_flips: int
  text: dict
  scaling: float
  schedule: diffusion.NoiseSchedule
  time_ids: dict | None = None


def trains(config: ml_collections.ConfigDict, component: str,
           module) -> bool:
  """Whether ``config.trainable`` names a parameter of ``module``."""
  labels = optim.trainable_labels({component: nnx.state(module, nnx.Param)},
                                  config.trainable)
  return optim.TRAIN in jax.tree.leaves(labels)


def prepare(ctx: Context, *, text_trains: bool) -> Data:
  """Latents of the photos and class images, and the prompts' text inputs."""
  cfg, pipe = ctx.config, ctx.pipeline
  prompt = common.instance_prompt(cfg)
  common.check_prompts(ctx, [prompt] + eval_prompts(cfg))
  num_flips = 2 if cfg.data.random_flip else 1
  photos = common.instance_images(ctx)
  instance = common.encode_latents(
      ctx, common.pixels(cfg, photos, flips=cfg.data.random_flip),
      "instance_latents")
  time_ids = None
  if pipe.is_sdxl:
    time_ids = {"instance": common.time_ids(cfg, photos,
                                            flips=cfg.data.random_flip)}
  prompts, klass = [prompt], None
  if cfg.dreambooth.prior_preservation:
    class_prompt = common.format_prompts(cfg, [cfg.dreambooth.class_prompt])[0]
    prompts.append(class_prompt)
    generated = class_images(ctx, class_prompt)
    klass = common.encode_latents(
        ctx, common.pixels(cfg, generated, flips=False), "class_latents")
    if pipe.is_sdxl:
      time_ids["class"] = common.time_ids(cfg, generated, flips=False)
  if text_trains:
    text = common.text_ids(ctx, prompts)
  else:
    text = common.encode_text(ctx, prompts, "prompt_embeddings")
  return Data(instance=instance, klass=klass, num_flips=num_flips, text=text,
              scaling=pipe.vae.scaling_factor, schedule=pipe.schedule,
              time_ids=time_ids)


def eval_prompts(config: ml_collections.ConfigDict) -> list[str]:
  return common.format_prompts(config, config.eval.prompts)


def class_images(ctx: Context, class_prompt: str) -> list[np.ndarray]:
  """Class images from disk, generating the missing ones with the base model."""
  cfg = ctx.config.dreambooth
  folder = Path(cfg.class_images_dir or ctx.workdir / "class_images")
  have = sorted(folder.glob("class_*.png"))
  missing = cfg.num_class_images - len(have)
  # Every process has counted before process 0 writes: they all take part
  # in generating, or none does.
  distributed.barrier("class_images_counted")
  if missing > 0:
    logging.info("generating %d class images for %r", missing, class_prompt)
    images = diffusion.generate(
        ctx.pipeline, [class_prompt] * missing,
        rng=jax.random.fold_in(jax.random.key(ctx.config.seed), len(have)),
        num_inference_steps=cfg.class_inference_steps,
        guidance_scale=cfg.class_guidance_scale,
        resolution=ctx.config.data.resolution,
        batch_size=max(len(ctx.mesh.devices.flat), 4), progress=True,
        batch_sharding=ctx.batch_sharding)
    if distributed.is_chief():
      folder.mkdir(parents=True, exist_ok=True)
      for i, image in enumerate(images):
        common.save_png(folder / f"class_{len(have) + i:05d}.png", image)
    distributed.barrier("class_images_written")
    have = sorted(folder.glob("class_*.png"))
  return [images_lib.load_image(p, min_side=1)
          for p in have[:cfg.num_class_images]]


def make_batch(config: ml_collections.ConfigDict, data: Data,
               step: int) -> dict[str, np.ndarray]:
  """Step ``step``'s instance rows (and class rows): a pure function of it."""
  bs = config.batch_size
  images = len(data.instance["mean"]) // data.num_flips
  idx = common.epoch_indices(config.seed, step, bs, images)
  flip = np.random.default_rng([config.seed, step, 1]).integers(
      0, data.num_flips, bs)
  idx = idx + flip * images
  out = {"instance_mean": data.instance["mean"][idx],
         "instance_std": data.instance["std"][idx]}
  if data.time_ids is not None:
    out["instance_time_ids"] = data.time_ids["instance"][idx]
  if data.klass is not None:
    cidx = common.epoch_indices(config.seed + 1, step, bs,
                                len(data.klass["mean"]))
    out.update(class_mean=data.klass["mean"][cidx],
               class_std=data.klass["std"][cidx])
    if data.time_ids is not None:
      out["class_time_ids"] = data.time_ids["class"][cidx]
  return out


def constants(data: Data) -> dict[str, np.ndarray]:
  return dict(data.text)


def prompt_embeddings(graphs: Graphs, params, frozen) -> Any:
  """The prompts' conditioning: instance prompt first, then the class prompt.

  ``(num_prompts, 77, d)`` text states, or SDXL's dict of states and pooled
  text (``common.text_cond``), without time ids.
  """
  constants_ = frozen["constants"]
  if "ids" in constants_:
    second = (graphs("text_encoder_2", params, frozen)
              if "ids_2" in constants_ else None)
    return common.encode_ids(graphs("text_encoder", params, frozen), second,
                             constants_)
  return common.text_cond(constants_)


def step_rows(config: ml_collections.ConfigDict,
              batch) -> tuple[jax.Array, int] | None:
  """Where a micro-batch's rows sit among the step's: ``(index, total)``.

  The step's rows are its instance rows, then (with prior preservation) as
  many class rows; None when ``batch`` is the whole step (no row index).
  """
  if state_lib.ROW not in batch:
    return None
  row, total = batch[state_lib.ROW], config.batch_size
  if "class_mean" in batch:
    return jnp.concatenate([row, total + row]), 2 * total
  return row, total


def training_rows(graphs: Graphs, scaling: float, params, frozen, batch, rng,
                  *, rows: tuple[jax.Array, int] | None = None):
  """Latents and conditioning of the step's rows: instances, then class.

  Returns ``(latents, embs)`` with the batch's instance rows first and, with
  prior preservation (class rows in ``batch``), as many class rows after them.
  ``embs`` is text states, or for SDXL the conditioning dict with each row's
  time ids (``diffusion.unet_predict``). ``rows`` places them in the step
  (``step_rows``).
  """
  emb = prompt_embeddings(graphs, params, frozen)
  bs = batch["instance_mean"].shape[0]
  means, stds = [batch["instance_mean"]], [batch["instance_std"]]
  embs = [sdxl.with_time_ids(
      diffusion.cond_repeat(diffusion.cond_rows(emb, slice(0, 1)), bs),
      batch.get("instance_time_ids"))]
  if "class_mean" in batch:
    means.append(batch["class_mean"])
    stds.append(batch["class_std"])
    embs.append(sdxl.with_time_ids(
        diffusion.cond_repeat(diffusion.cond_rows(emb, slice(1, 2)), bs),
        batch.get("class_time_ids")))
  latents = common.sample_latents(jnp.concatenate(means),
                                  jnp.concatenate(stds), rng, scaling,
                                  rows=rows)
  return latents, diffusion.cond_concat(*embs)


def loss_from_errors(err: jax.Array, batch_size: int, *,
                     prior_loss_weight: float | None,
                     instance_loss_weight: float = 1.0
                     ) -> tuple[jax.Array, dict]:
  """DreamBooth's loss from per-sample denoising errors.

  Args:
    err: ``(batch_size,)`` instance errors, then (with prior preservation)
      ``(batch_size,)`` class errors.
    batch_size: the number of instance rows.
    prior_loss_weight: weight of the class-prior term; None: no prior rows.
    instance_loss_weight: weight of the instance term.

  Returns:
    ``(loss, metrics)`` with ``loss/instance`` (and ``loss/prior``).
  """
  instance_loss = jnp.mean(err[:batch_size])
  metrics = {"loss/instance": instance_loss}
  loss = instance_loss_weight * instance_loss
  if prior_loss_weight is not None:
    prior_loss = jnp.mean(err[batch_size:])
    loss = loss + prior_loss_weight * prior_loss
    metrics["loss/prior"] = prior_loss
  return loss, metrics


def prior_weight(config: ml_collections.ConfigDict) -> float | None:
  d = config.dreambooth
  return d.prior_loss_weight if d.prior_preservation else None


def denoising_loss(config, graphs: Graphs, data: Data, params, frozen, batch,
                   rng) -> tuple[jax.Array, dict]:
  """DreamBooth's loss: instance (and class-prior) denoising errors.

  ``config.loss`` adds diffusers' offset noise and Min-SNR-gamma weights
  (of every row, the class rows too, as kohya's scripts weigh them).
  """
  schedule = data.schedule
  unet = graphs("unet", params, frozen)
  latent_rng, noise_rng = jax.random.split(rng)
  rows = step_rows(config, batch)
  latents, embs = training_rows(graphs, data.scaling, params, frozen, batch,
                                latent_rng, rows=rows)
  noise, t = diffusion.draw_noise(schedule, noise_rng, latents.shape,
                                  rows=rows,
                                  noise_offset=config.loss.noise_offset)
  gamma = config.loss.snr_gamma
  err = diffusion.denoising_error(unet, schedule, latents, noise, t, embs,
                                  snr_gamma=gamma)
  loss, metrics = loss_from_errors(err, batch["instance_mean"].shape[0],
                                   prior_loss_weight=prior_weight(config))
  if gamma:
    metrics["loss/snr_weight"] = jnp.mean(
        diffusion.min_snr_weight(schedule, t, gamma))
  return loss, metrics


def text_modules(ctx: Context) -> dict:
  """The text encoders when ``config.trainable`` names one of them, else {}.

  ``{"text_encoder": ...}``, and SDXL's ``text_encoder_2`` beside it (the
  loss then runs both; the engine freezes the one with nothing to train).
  """
  pipe = ctx.pipeline
  encoders = {"text_encoder": pipe.text_encoder}
  if pipe.is_sdxl:
    encoders["text_encoder_2"] = pipe.text_encoder_2
  if any(trains(ctx.config, name, module)
         for name, module in encoders.items()):
    return encoders
  return {}


def build(ctx: Context) -> Method:
  """DreamBooth on ``ctx.pipeline``: the U-Net (and text encoder) train."""
  config = ctx.config
  trainable = {"unet": ctx.pipeline.unet, **text_modules(ctx)}
  data = prepare(ctx, text_trains="text_encoder" in trainable)
  graphs = ctx.graphs(trainable)
  return Method(
      trainable=trainable,
      loss_fn=lambda params, frozen, batch, rng: denoising_loss(
          config, graphs, data, params, frozen, batch, rng),
      batch=lambda step: make_batch(config, data, step),
      constants=constants(data))
