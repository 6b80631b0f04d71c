"""DreamBooth (Ruiz et al. 2023): fine-tune on the subject with prior preservation.

Loss = MSE(instance) + prior_loss_weight * MSE(class), where the class half
uses images of the plain class ("a photo of dog") that the base model
generated before training, so the model keeps its prior over the class. As in
diffusers' ``train_dreambooth.py``: epsilon (or v) targets, timesteps uniform
over the training schedule, VAE latents sampled from the posterior each step.
"""

import io
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from PIL import Image

from personalize_jax import diffusion
from personalize_jax.data import images as images_lib
from personalize_jax.data import prompts as prompts_lib
from personalize_jax.engine import distributed, rundir
from personalize_jax.methods import base
from personalize_jax.models import tokenizer as tokenizer_lib


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
  d.train_text_encoder = False  # also fine-tune the CLIP text encoder.
  c.dreambooth = d
  return c


class DreamBooth(base.Method):
  """Instance + prior-preservation denoising loss."""

  def prepare(self) -> None:
    cfg, pipe = self.config, self.ctx.pipeline
    self.scaling = pipe.vae.scaling_factor
    self.schedule = pipe.schedule
    prompt = self.instance_prompt()
    self.check_prompts([prompt] + self.eval_prompts())
    self.instance = self.encode_latents(
        self.pixels(self.instance_images(), flips=cfg.data.random_flip),
        "instance_latents")
    self.num_instance = len(self.instance["mean"])
    self.num_flips = 2 if cfg.data.random_flip else 1
    prompts = [prompt]
    if cfg.dreambooth.prior_preservation:
      class_prompt = prompts_lib.format_prompt(
          cfg.dreambooth.class_prompt, token=cfg.data.unique_token,
          class_name=cfg.data.class_name)
      prompts.append(class_prompt)
      self.klass = self.encode_latents(
          self.pixels(self.class_images(class_prompt), flips=False),
          "class_latents")
    if self.trains_text_encoder():
      # The text encoder trains, so prompts are encoded at every step.
      self.ids = tokenizer_lib.tokenize(pipe.tokenizer, prompts)
    else:
      self.emb = self.encode_text(prompts, "prompt_embeddings")

  def trains_text_encoder(self) -> bool:
    """Whether (part of) the text encoder trains with the U-Net."""
    return self.config.dreambooth.train_text_encoder

  def class_images(self, class_prompt: str) -> list[np.ndarray]:
    """Class images from disk, generating the missing ones with the base model."""
    cfg = self.config.dreambooth
    folder = Path(cfg.class_images_dir or self.ctx.workdir / "class_images")
    have = sorted(folder.glob("class_*.png"))
    missing = cfg.num_class_images - len(have)
    # Every process has counted before process 0 writes: they all take part
    # in generating, or none does.
    distributed.barrier("class_images_counted")
    if missing > 0:
      logging.info("generating %d class images for %r", missing, class_prompt)
      images = diffusion.generate(
          self.ctx.pipeline, [class_prompt] * missing,
          rng=jax.random.fold_in(jax.random.key(self.config.seed), len(have)),
          num_inference_steps=cfg.class_inference_steps,
          guidance_scale=cfg.class_guidance_scale,
          resolution=self.config.data.resolution,
          batch_size=max(len(self.ctx.mesh.devices.flat), 4), progress=True,
          batch_sharding=self.ctx.batch_sharding)
      if distributed.is_chief():
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(images):
          buffer = io.BytesIO()
          Image.fromarray(image).save(buffer, format="PNG")
          # Atomic: a killed run leaves no cut-off image to count as done.
          rundir.atomic_write_bytes(folder / f"class_{len(have) + i:05d}.png",
                                    buffer.getvalue())
      distributed.barrier("class_images_written")
      have = sorted(folder.glob("class_*.png"))
    return [images_lib.load_image(p, min_side=1)
            for p in have[:cfg.num_class_images]]

  def trainable_modules(self) -> dict[str, nnx.Module]:
    pipe = self.ctx.pipeline
    modules = {"unet": pipe.unet}
    if self.trains_text_encoder():
      modules["text_encoder"] = pipe.text_encoder
    return modules

  def constants(self) -> dict[str, np.ndarray]:
    if self.trains_text_encoder():
      return {"ids": self.ids}
    return {"emb": self.emb}

  def batch(self, step: int) -> dict[str, np.ndarray]:
    cfg, bs = self.config, self.config.batch_size
    images = self.num_instance // self.num_flips
    idx = base.epoch_indices(cfg.seed, step, bs, images)
    flip = np.random.default_rng([cfg.seed, step, 1]).integers(
        0, self.num_flips, bs)
    idx = idx + flip * images
    out = {"instance_mean": self.instance["mean"][idx],
           "instance_std": self.instance["std"][idx]}
    if cfg.dreambooth.prior_preservation:
      cidx = base.epoch_indices(cfg.seed + 1, step, bs, len(self.klass["mean"]))
      out.update(class_mean=self.klass["mean"][cidx],
                 class_std=self.klass["std"][cidx])
    return out

  def prompt_embeddings(self, params, frozen) -> jax.Array:
    """``(num_prompts, 77, d)``: instance prompt first, then the class prompt."""
    if "text_encoder" in params:
      encoder = self.module("text_encoder", params["text_encoder"])
      return encoder(frozen["constants"]["ids"])
    return frozen["constants"]["emb"]

  def training_rows(self, params, frozen, batch, rng):
    """Latents and text states of the step's rows: instances, then class.

    Returns ``(latents, embs)`` with ``batch`` instance rows first and, with
    prior preservation, as many class rows after them.
    """
    emb = self.prompt_embeddings(params, frozen)
    bs = batch["instance_mean"].shape[0]
    means, stds = [batch["instance_mean"]], [batch["instance_std"]]
    embs = [jnp.broadcast_to(emb[:1], (bs,) + emb.shape[1:])]
    if self.config.dreambooth.prior_preservation:
      means.append(batch["class_mean"])
      stds.append(batch["class_std"])
      embs.append(jnp.broadcast_to(emb[1:2], (bs,) + emb.shape[1:]))
    latents = base.sample_latents(jnp.concatenate(means),
                                  jnp.concatenate(stds), rng, self.scaling)
    return latents, jnp.concatenate(embs)

  def loss_fn(self, params, frozen, batch, rng):
    unet = self.module("unet", params["unet"])
    latent_rng, noise_rng = jax.random.split(rng)
    latents, embs = self.training_rows(params, frozen, batch, latent_rng)
    bs = batch["instance_mean"].shape[0]
    prior = self.config.dreambooth.prior_preservation
    err = base.noise_prediction_error(unet, self.schedule, latents, embs,
                                      noise_rng)
    instance_loss = jnp.mean(err[:bs])
    metrics = {"loss/instance": instance_loss}
    loss = instance_loss
    if prior:
      prior_loss = jnp.mean(err[bs:])
      loss = loss + self.config.dreambooth.prior_loss_weight * prior_loss
      metrics["loss/prior"] = prior_loss
    return loss, metrics
