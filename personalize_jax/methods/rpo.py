"""RPO (Miao et al. 2024): reward preference optimisation for one subject.

Before training, the frozen base model draws a few images for each of 8
training prompts ("a sks dog on the Moon", ...). A CLIP reward scores them and
the subject's reference photos; each training pair is a reference photo and a
generated image, conditioned on that image's training prompt, with a
Bradley-Terry preference label ``y ~ Bernoulli(sigmoid(r_ref - r_gen))`` drawn
afresh each time the pair is used (from a generator seeded by the step, so a
resumed run draws the same labels). The U-Net minimises

  L = L_sim + L_pre
  L_sim = E ||eps - eps_theta(ref_t, t, instance prompt)||^2
  L_pre = BCE(sigmoid(beta * l), y),
  l = (e_base(ref) - e_theta(ref)) - (e_base(gen) - e_theta(gen)),

where ``e`` is a U-Net's per-sample denoising error at a random timestep and
``e_base`` comes from a frozen copy of the starting U-Net (the implicit
reward of Diffusion-DPO). Validation images of held-out prompts are scored by
the lambda-Harmonic reward; the engine exports the best-scoring step.

Details, and where the public code (github.com/andrew-miao/RPO) differs:

  * Training rewards use ``lambda_train = 0`` (the paper's): text alignment
    only, against the prompt without its unique token (CLIP does not know
    "sks"; the public code keeps a literal "[V]" in it).
  * The reference half of ``L_pre`` is conditioned on the generated image's
    training prompt (``rpo.ref_prompt="training"``), the prompt its reward
    and label were computed with; ``L_sim`` then needs its own U-Net pass.
    The public code conditions it on the instance prompt and reuses that
    pass for ``L_sim``: ``rpo.ref_prompt="instance"``.
  * Every (reference, generated) pair carries the rewards of its own two
    images; every training prompt is used (the public code pairs rewards of
    other images and, with fewer GPUs than prompts, drops prompts).
  * The public code validates on the training prompts; here
    ``rpo.val_prompts`` are held out.
"""

import functools
import hashlib
import io
import json
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from PIL import Image

from personalize_jax import diffusion, rewards
from personalize_jax.data import images as images_lib
from personalize_jax.data import prompts as prompts_lib
from personalize_jax.engine import distributed, rundir
from personalize_jax.errors import UserError
from personalize_jax.methods import base
from personalize_jax.models import tokenizer as tokenizer_lib

# Classes whose training prompts are the live-subject set (animals can wear an
# outfit or swim; a backpack cannot).
LIVE_CLASSES = ("dog", "cat", "puppy", "kitten", "bird", "horse", "rabbit")

# The paper's training prompts for objects and for live subjects.
OBJECT_PROMPTS = (
    "a {token} {class_name} in Vincent Van Gogh rendition",
    "a {token} {class_name} on the Moon",
    "a green {token} {class_name}",
    "a {token} {class_name} with the Great Wall of China in the background",
    "a {token} {class_name} on top of a wooden roof",
    "a {token} {class_name} with the Statue of Liberty in the background",
    "a {token} {class_name} with a volcano in the background",
    "a {token} {class_name} on a subway platform",
)
LIVE_PROMPTS = (
    "a {token} {class_name} wearing a green outfit",
    "a {token} {class_name} in Vincent Van Gogh rendition",
    "a {token} {class_name} with the Great Wall of China in the background",
    "a {token} {class_name} swimming in a pool",
    "a {token} {class_name} on a subway platform",
    "a {token} {class_name} with the Statue of Liberty in the background",
    "a {token} {class_name} on the Moon",
    "a green {token} {class_name}",
)
# The public code's validation prompts (it defines them but validates on the
# training prompts).
VAL_PROMPTS = (
    "a {token} {class_name} in a beautiful garden",
    "a {token} {class_name} at the beach during sunset",
)
REF_PROMPTS = ("training", "instance")


def add_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds ``config.rpo`` (the paper's settings)."""
  r = ml_collections.ConfigDict()
  r.beta = 1.0  # scale of the implicit reward margin l in the sigmoid.
  # Live-subject prompts (True) or object prompts (False); None: live when
  # data.class_name is in LIVE_CLASSES.
  r.live_subject = ml_collections.config_dict.placeholder(bool)
  r.object_prompts = list(OBJECT_PROMPTS)  # training prompts of objects.
  r.live_prompts = list(LIVE_PROMPTS)  # training prompts of live subjects.
  r.num_images_per_prompt = 4  # generated negatives per training prompt.
  r.gen_inference_steps = 50  # DDIM steps for the generated images.
  r.gen_guidance_scale = 7.5  # guidance for the generated images.
  r.reward_model = "b32"  # reward CLIP: b32, b16, l14, a folder, or tiny.
  r.lambda_train = 0.0  # lambda of training rewards (0: text alignment).
  r.lambda_val = 0.3  # lambda of validation (paper table; DreamBench: 0.5).
  r.val_prompts = list(VAL_PROMPTS)  # held-out validation prompts.
  r.num_val_images = 4  # validation images per validation prompt.
  r.shared_noise = False  # one noise and timestep per pair (Diffusion-DPO).
  r.ref_prompt = "training"  # prompt of L_pre's ref half: training, instance.
  c.rpo = r
  return c


def is_live_subject(config: ml_collections.ConfigDict) -> bool:
  """``rpo.live_subject``, else whether ``data.class_name`` is a live class."""
  if config.rpo.live_subject is not None:
    return bool(config.rpo.live_subject)
  return config.data.class_name.strip().lower() in LIVE_CLASSES


def without_token(prompt: str, token: str) -> str:
  """The prompt with the unique token removed, as the reward model reads it."""
  pattern = rf"(?<!\w){re.escape(token.strip())}(?!\w)"
  return " ".join(re.sub(pattern, " ", prompt, flags=re.IGNORECASE).split())


def implicit_margin(err_theta_ref: jax.Array, err_base_ref: jax.Array,
                    err_theta_gen: jax.Array, err_base_gen: jax.Array
                    ) -> jax.Array:
  """``l = (e_base(ref) - e_theta(ref)) - (e_base(gen) - e_theta(gen))``.

  Positive when the fine-tuned U-Net improved on the reference image more than
  on the generated one, relative to the base U-Net.
  """
  return (err_base_ref - err_theta_ref) - (err_base_gen - err_theta_gen)


def preference_loss(err_theta_ref: jax.Array, err_base_ref: jax.Array,
                    err_theta_gen: jax.Array, err_base_gen: jax.Array,
                    labels: jax.Array, beta: float) -> jax.Array:
  """Binary cross-entropy of ``sigmoid(beta * l)`` against preference labels.

  Args:
    err_theta_ref: ``(b,)`` fine-tuned U-Net errors on the reference images.
    err_base_ref: ``(b,)`` frozen base U-Net errors on the same noisy inputs.
    err_theta_gen: ``(b,)`` fine-tuned U-Net errors on the generated images.
    err_base_gen: ``(b,)`` base U-Net errors on the same noisy inputs.
    labels: ``(b,)`` in [0, 1]; 1 where the reference image is preferred.
    beta: scale of the margin.

  Returns:
    The loss averaged over the batch, a float32 scalar. ``log_sigmoid`` keeps
    it finite for margins of any size.
  """
  z = beta * implicit_margin(*(jnp.asarray(e, jnp.float32) for e in (
      err_theta_ref, err_base_ref, err_theta_gen, err_base_gen)))
  y = jnp.asarray(labels, jnp.float32)
  return -jnp.mean(y * jax.nn.log_sigmoid(z)
                   + (1.0 - y) * jax.nn.log_sigmoid(-z))


def preference_labels(rng: np.random.Generator, reward_ref: np.ndarray,
                      reward_gen: np.ndarray) -> np.ndarray:
  """Bradley-Terry labels: 1 with probability ``sigmoid(r_ref - r_gen)``.

  Args:
    rng: a NumPy generator (``batch`` seeds one per step).
    reward_ref: rewards of the reference images of the pairs.
    reward_gen: rewards of their generated images.

  Returns:
    float32 labels, 1.0 where the reference image is preferred.
  """
  diff = np.asarray(reward_ref, np.float64) - np.asarray(reward_gen, np.float64)
  prob = 0.5 * (1.0 + np.tanh(0.5 * diff))  # sigmoid, without overflow.
  return (rng.random(diff.shape) < prob).astype(np.float32)


def denoising_error(unet, schedule: diffusion.NoiseSchedule, latents, noise,
                    t, emb) -> jax.Array:
  """Per-sample mean squared error ``(b,)`` of the epsilon (or v) target."""
  pred = unet(schedule.add_noise(latents, noise, t), t, emb).astype(jnp.float32)
  target = schedule.training_target(latents, noise, t)
  return jnp.mean((pred - target) ** 2, axis=tuple(range(1, pred.ndim)))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _clip_forward(graphdef, state, inputs, method: str):
  return getattr(nnx.merge(graphdef, state), method)(inputs)


def _fingerprint(value) -> str:
  text = json.dumps(value, sort_keys=True)
  return hashlib.sha1(text.encode()).hexdigest()[:10]


class RPO(base.Method):
  """Similarity loss plus a preference loss against a frozen base U-Net."""

  best_metric = ("val/harmonic", "max")

  def __init__(self, ctx: base.Context):
    super().__init__(ctx)
    self.schedule = ctx.pipeline.schedule
    self.scaling = ctx.pipeline.vae.scaling_factor

  # ------------------------------------------------------------------ data

  def prepare(self) -> None:
    cfg = self.config
    _check(cfg)
    self.prompts = self.training_prompts()
    self.val_prompts = self.format_prompts(cfg.rpo.val_prompts)
    self.check_prompts([self.instance_prompt()] + self.prompts
                       + self.val_prompts + self.eval_prompts())
    references = self.instance_images()
    self.num_references = len(references)
    self.num_flips = 2 if cfg.data.random_flip else 1
    self.reference = self.encode_latents(
        self.pixels(references, flips=cfg.data.random_flip),
        "instance_latents")
    generated, fingerprint = self.generated_images()
    self.generated = self.encode_latents(
        self.pixels(generated, flips=False),
        f"generated_latents_{fingerprint}")
    self.emb = self.encode_text([self.instance_prompt()] + self.prompts,
                                f"rpo_prompt_embeddings_{fingerprint}")
    self._load_reward_model()
    self.ref_clip = self.clip_images(references)
    scores = base.cached(
        self.ctx.cache_dir / "rpo_rewards_{}.npz".format(_fingerprint(
            [fingerprint, cfg.rpo.reward_model, cfg.rpo.lambda_train,
             self.num_references])),
        lambda: self._training_rewards(references, generated))
    self.reward_ref, self.reward_gen = scores["ref"], scores["gen"]
    self.val_text = self.clip_texts(self.val_prompts)

  def format_prompts(self, templates) -> list[str]:
    data = self.config.data
    return [prompts_lib.format_prompt(t, token=data.unique_token,
                                      class_name=data.class_name)
            for t in templates]

  def training_prompts(self) -> list[str]:
    """The 8 training prompts of the subject's kind (object or live)."""
    r = self.config.rpo
    return self.format_prompts(r.live_prompts if is_live_subject(self.config)
                        else r.object_prompts)

  def generated_images(self) -> tuple[list[np.ndarray], str]:
    """The base model's images of every training prompt, and their fingerprint.

    Image ``j`` of prompt ``k`` is ``generated_images/{k:02d}_{j:02d}.png``. A
    manifest records what made them; when the prompts or settings change they
    are all drawn again, in one ``generate`` call batched over the devices.
    """
    cfg = self.config
    n = cfg.rpo.num_images_per_prompt
    manifest = {"prompts": self.prompts, "images_per_prompt": n,
                "steps": cfg.rpo.gen_inference_steps,
                "guidance": cfg.rpo.gen_guidance_scale,
                "resolution": cfg.data.resolution,
                "model": str(cfg.model.pretrained), "seed": cfg.seed}
    folder = self.ctx.workdir / "generated_images"
    paths = [folder / f"{k:02d}_{j:02d}.png"
             for k in range(len(self.prompts)) for j in range(n)]
    manifest_path = folder / "manifest.json"
    have = (manifest_path.is_file()
            and json.loads(manifest_path.read_text()) == manifest
            and all(p.is_file() for p in paths))
    # Every process has looked before process 0 writes: they all take part
    # in generating, or none does.
    distributed.barrier("generated_images_checked")
    if not have:
      logging.info("generating %d images for %d training prompts",
                   len(paths), len(self.prompts))
      images = diffusion.generate(
          self.ctx.pipeline, [p for p in self.prompts for _ in range(n)],
          rng=jax.random.fold_in(jax.random.key(cfg.seed), 1),
          num_inference_steps=cfg.rpo.gen_inference_steps,
          guidance_scale=cfg.rpo.gen_guidance_scale,
          resolution=cfg.data.resolution,
          batch_size=max(len(self.ctx.mesh.devices.flat), 8), progress=True,
          batch_sharding=self.ctx.batch_sharding)
      if distributed.is_chief():
        folder.mkdir(parents=True, exist_ok=True)
        for path, image in zip(paths, images):
          buffer = io.BytesIO()
          Image.fromarray(image).save(buffer, format="PNG")
          rundir.atomic_write_bytes(path, buffer.getvalue())
        rundir.atomic_write_text(manifest_path, json.dumps(manifest) + "\n")
      distributed.barrier("generated_images_written")
    return ([images_lib.load_image(p, min_side=1) for p in paths],
            _fingerprint(manifest))

  # --------------------------------------------------------------- rewards

  def _load_reward_model(self) -> None:
    variant = self.config.rpo.reward_model
    self.reward = rewards.HarmonicReward.from_pretrained(
        variant, lam=self.config.rpo.lambda_val)
    self.clip_tokenizer = tokenizer_lib.load_tokenizer(
        rewards.clip_model_id(variant), subfolder=None)
    self._clip = nnx.split(self.reward.clip)

  def _clip_batched(self, inputs, method: str, chunk: int = 8) -> np.ndarray:
    # Whole padded chunks: one compilation serves every call.
    n = inputs.shape[0]
    pad = -n % chunk
    inputs = jnp.pad(inputs, [(0, pad)] + [(0, 0)] * (inputs.ndim - 1))
    outs = [_clip_forward(*self._clip, inputs[i:i + chunk], method)
            for i in range(0, n + pad, chunk)]
    return np.asarray(jnp.concatenate(outs)[:n], np.float32)

  def clip_images(self, images) -> np.ndarray:
    """CLIP embeddings ``(n, e)`` of uint8 images (a list or a batch)."""
    return self._clip_batched(self.reward.processor(images),
                              "get_image_features")

  def clip_texts(self, prompts: list[str]) -> np.ndarray:
    """CLIP embeddings ``(n, e)`` of prompts, read without the unique token."""
    token = self.config.data.unique_token
    ids = tokenizer_lib.tokenize(self.clip_tokenizer,
                                 [without_token(p, token) for p in prompts])
    return self._clip_batched(jnp.asarray(ids), "get_text_features")

  def _training_rewards(self, references, generated) -> dict:
    """``ref (num_references, num_prompts)``: each photo against each prompt;
    ``gen (num_generated,)``: each image against its own prompt."""
    lam = self.config.rpo.lambda_train
    n = self.config.rpo.num_images_per_prompt
    text = self.clip_texts(self.prompts)
    gen_ai, gen_at = rewards.alignment_scores(
        self.clip_images(np.stack(generated)), self.ref_clip,
        np.repeat(text, n, axis=0))
    # A photo's ALIGN-I includes itself; it only counts when lambda_train > 0.
    ref_ai = rewards.to_unit(np.mean(
        rewards.pairwise_cosine(self.ref_clip, self.ref_clip), axis=-1))
    ref_at = rewards.to_unit(rewards.pairwise_cosine(self.ref_clip, text))
    return {"ref": np.asarray(rewards.harmonic(ref_ai[:, None], ref_at, lam),
                              np.float32),
            "gen": np.asarray(rewards.harmonic(gen_ai, gen_at, lam),
                              np.float32)}

  # ----------------------------------------------------------------- model

  def trainable_modules(self) -> dict[str, nnx.Module]:
    return {"unet": self.ctx.pipeline.unet}

  def frozen_modules(self) -> dict[str, nnx.Module]:
    # A host copy: the trained U-Net's buffers are donated every step, so the
    # frozen base must not share them.
    graphdef, state = nnx.split(self.ctx.pipeline.unet)
    return {"base_unet": nnx.merge(graphdef, jax.tree.map(np.array, state))}

  def constants(self) -> dict[str, np.ndarray]:
    return {"emb": self.emb}

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """Pairs: every generated image once per epoch, each with a reference."""
    cfg, bs = self.config, self.config.batch_size
    gen = base.epoch_indices(cfg.seed, step, bs, len(self.reward_gen))
    ref = base.epoch_indices(cfg.seed + 1, step, bs, self.num_references)
    flip = np.random.default_rng([cfg.seed, step, 1]).integers(
        0, self.num_flips, bs)
    row = ref + flip * self.num_references
    prompt = gen // cfg.rpo.num_images_per_prompt
    reward_ref, reward_gen = self.reward_ref[ref, prompt], self.reward_gen[gen]
    # Labels are drawn on the host from a generator seeded by the step: fresh
    # for every use of a pair, the same again when a run resumes.
    labels = preference_labels(np.random.default_rng([cfg.seed, step, 2]),
                               reward_ref, reward_gen)
    return {"ref_mean": self.reference["mean"][row],
            "ref_std": self.reference["std"][row],
            "gen_mean": self.generated["mean"][gen],
            "gen_std": self.generated["std"][gen],
            "prompt": prompt.astype(np.int32),
            "labels": labels}

  def _noise(self, rng, shape, shared: bool):
    """Noise and timesteps for ``[ref; gen]``, shared across a pair or not."""
    noise_rng, t_rng = jax.random.split(rng)
    rows = shape[0] // 2 if shared else shape[0]
    noise = jax.random.normal(noise_rng, (rows,) + shape[1:], jnp.float32)
    t = self.schedule.sample_timesteps(t_rng, rows)
    if shared:
      noise, t = jnp.concatenate([noise, noise]), jnp.concatenate([t, t])
    return noise, t

  def loss_fn(self, params, frozen, batch, rng):
    r = self.config.rpo
    unet = self.module("unet", params["unet"])
    base_unet = self.module("base_unet", frozen["modules"]["base_unet"])
    emb = frozen["constants"]["emb"]
    bs = batch["ref_mean"].shape[0]
    latent_rng, pair_rng, sim_rng = jax.random.split(rng, 3)
    latents = base.sample_latents(
        jnp.concatenate([batch["ref_mean"], batch["gen_mean"]]),
        jnp.concatenate([batch["ref_std"], batch["gen_std"]]), latent_rng,
        self.scaling)
    instance = jnp.broadcast_to(emb[:1], (bs,) + emb.shape[1:])
    prompt = emb[1 + batch["prompt"]]
    ref_emb = instance if r.ref_prompt == "instance" else prompt
    pair_emb = jnp.concatenate([ref_emb, prompt])
    noise, t = self._noise(pair_rng, latents.shape, r.shared_noise)
    err_base = jax.lax.stop_gradient(denoising_error(
        base_unet, self.schedule, latents, noise, t, pair_emb))
    if r.ref_prompt == "instance":
      err_theta = denoising_error(unet, self.schedule, latents, noise, t,
                                  pair_emb)
      err_sim = err_theta[:bs]
    else:
      # L_sim's instance-prompt pass rides in the same U-Net call.
      sim_noise, sim_t = self._noise(sim_rng, latents[:bs].shape, False)
      err = denoising_error(
          unet, self.schedule, jnp.concatenate([latents, latents[:bs]]),
          jnp.concatenate([noise, sim_noise]), jnp.concatenate([t, sim_t]),
          jnp.concatenate([pair_emb, instance]))
      err_theta, err_sim = err[:2 * bs], err[2 * bs:]
    labels = batch["labels"]
    errors = (err_theta[:bs], err_base[:bs], err_theta[bs:], err_base[bs:])
    margin = r.beta * implicit_margin(*errors)
    pref_loss = preference_loss(*errors, labels, r.beta)
    sim_loss = jnp.mean(err_sim)
    metrics = {
        "loss/sim": sim_loss,
        "loss/pref": pref_loss,
        "pref/implicit_acc": jnp.mean(
            ((margin > 0) == (labels == 1)).astype(jnp.float32)),
        # The implicit reward margin beta * l (the data's r_ref - r_gen is
        # fixed, so it says nothing about training).
        "pref/reward_margin": jnp.mean(margin),
    }
    return sim_loss + pref_loss, metrics

  # ------------------------------------------------------------ validation

  def evaluate(self, step: int, pipeline) -> dict[str, float]:
    """lambda_val-Harmonic of validation images from fixed seeds."""
    del step
    cfg = self.config
    n = len(self.val_prompts)
    images = diffusion.generate(
        pipeline, self.val_prompts * cfg.rpo.num_val_images,
        seed=cfg.eval.seed, num_inference_steps=cfg.eval.num_inference_steps,
        guidance_scale=cfg.eval.guidance_scale,
        resolution=cfg.data.resolution,
        batch_size=max(len(self.ctx.mesh.devices.flat), n),
        batch_sharding=self.ctx.batch_sharding)
    align_i, align_t = rewards.alignment_scores(
        self.clip_images(images), self.ref_clip,
        np.tile(self.val_text, (cfg.rpo.num_val_images, 1)))
    score = rewards.harmonic(align_i, align_t, cfg.rpo.lambda_val)
    return {"val/harmonic": float(jnp.mean(score)),
            "val/align_i": float(jnp.mean(align_i)),
            "val/align_t": float(jnp.mean(align_t))}


def _check(config: ml_collections.ConfigDict) -> None:
  """One-line errors for ``config.rpo`` values a user can get wrong."""
  r = config.rpo

  def fail(key, valid):
    raise UserError(f"config.rpo.{key}={r[key]!r} is invalid: {valid}")

  for key in ("num_images_per_prompt", "num_val_images", "gen_inference_steps"):
    if not isinstance(r[key], int) or isinstance(r[key], bool) or r[key] < 1:
      fail(key, "it must be a positive integer")
  for key in ("lambda_train", "lambda_val"):
    if not 0.0 <= r[key] <= 1.0:
      fail(key, "it must lie in [0, 1]")
  if r.ref_prompt not in REF_PROMPTS:
    fail("ref_prompt", f"use one of {', '.join(REF_PROMPTS)}")
  key = "live_prompts" if is_live_subject(config) else "object_prompts"
  if not r[key]:
    fail(key, "list at least one prompt template with {token} {class_name}")
  if not r.val_prompts:
    fail("val_prompts", "list at least one validation prompt template")
