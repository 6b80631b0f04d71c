"""RPO (Miao et al. 2024): reward preference optimisation for one subject.

Before training, the frozen base model draws a few images for each of 8
training prompts ("a sks dog on the Moon", ...). A reward (ALIGN, as in the
paper, or a CLIP: ``rpo.reward_model``) scores them and the subject's
reference photos; each training pair is a reference photo and a
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
reward of Diffusion-DPO); with LoRA it is the trained U-Net with its adapters
switched off, and no copy exists. Validation images of held-out prompts are scored by
the lambda-Harmonic reward; the engine exports the best-scoring step.

Online RPO (``rpo.online_every_steps=N``, the paper's stated future work):
every N steps the U-Net being trained (not its EMA) draws the negatives anew
(``generated_images/online_<step>/``, noise keyed by the step), the reward
rescores them and the labels are drawn from the new rewards; the base U-Net
of ``L_pre`` stays the starting one. Everything else is unchanged.

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
  * The public code validates on the training prompts
    (``rpo.val_on_training_prompts=True``, as ``configs/rpo_paper.py``
    does); by default ``rpo.val_prompts`` are held out.
"""

import dataclasses
import hashlib
import json
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from personalize_jax import diffusion, rewards, sdxl
from personalize_jax.data import images as images_lib
from personalize_jax.engine import distributed, rundir, state as state_lib
from personalize_jax.engine.method import Context, Graphs, Method, state_of
from personalize_jax.errors import CheckpointError, UserError
from personalize_jax.methods import common
from personalize_jax.models import lora

# The pipeline components config.trainable may name.
COMPONENTS = ("unet",)

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
# The engine's training options RPO implements (engine/config.py): its draws
# are keyed by pair, offset noise goes into every draw and Min-SNR weighs
# L_sim only (L_pre is Diffusion-DPO's margin, unweighted).
TRAINING_OPTIONS = ("gradient_accumulation_steps", "loss.snr_gamma",
                    "loss.noise_offset")


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
  # Rewards' image-text model: CLIP b32, b16, l14; align (the paper's,
  # kakaobrain/align-base); a CLIP/ALIGN folder or Hub id; tiny, align-tiny.
  r.reward_model = "b32"
  r.lambda_train = 0.0  # lambda of training rewards (0: text alignment).
  r.lambda_val = 0.3  # lambda of validation (paper table; DreamBench: 0.5).
  r.val_prompts = list(VAL_PROMPTS)  # held-out validation prompts.
  # Validate on the subject's training prompts (the live or object set, as
  # the authors' code does) instead of val_prompts.
  r.val_on_training_prompts = False
  r.num_val_images = 4  # validation images per validation prompt.
  r.shared_noise = False  # one noise and timestep per pair (Diffusion-DPO).
  r.ref_prompt = "training"  # prompt of L_pre's ref half: training, instance.
  # Online RPO (the paper's future work): every N steps the U-Net being
  # trained redraws the negatives, the reward rescores them and the labels
  # follow the new rewards; 0: offline, the base model's negatives (the paper).
  r.online_every_steps = 0
  c.rpo = r
  return c


def is_live_subject(config: ml_collections.ConfigDict) -> bool:
  """``rpo.live_subject``, else whether ``data.class_name`` is a live class."""
  if config.rpo.live_subject is not None:
    return bool(config.rpo.live_subject)
  return config.data.class_name.strip().lower() in LIVE_CLASSES


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
  prob = preference_prob(reward_ref, reward_gen)
  return (rng.random(prob.shape) < prob).astype(np.float32)


def preference_prob(reward_ref, reward_gen) -> np.ndarray:
  """Bradley-Terry ``sigmoid(r_ref - r_gen)`` (float64, without overflow)."""
  diff = np.asarray(reward_ref, np.float64) - np.asarray(reward_gen, np.float64)
  return 0.5 * (1.0 + np.tanh(0.5 * diff))


def validation_prompts(config: ml_collections.ConfigDict) -> list[str]:
  """The prompts validation draws: ``rpo.val_prompts``, or the training
  prompts of the subject's kind with ``rpo.val_on_training_prompts``."""
  if config.rpo.val_on_training_prompts:
    return training_prompts(config)
  return common.format_prompts(config, config.rpo.val_prompts)


def _fingerprint(value) -> str:
  text = json.dumps(value, sort_keys=True)
  return hashlib.sha1(text.encode()).hexdigest()[:10]


def training_prompts(config: ml_collections.ConfigDict) -> list[str]:
  """The 8 training prompts of the subject's kind (object or live)."""
  r = config.rpo
  return common.format_prompts(
      config, r.live_prompts if is_live_subject(config) else r.object_prompts)


def online_folder(workdir, step: int):
  """Where online RPO keeps the negatives the policy of ``step`` drew."""
  return workdir / "generated_images" / f"online_{step:06d}"


def generated_images(ctx: Context, prompts: list[str], *, step: int = 0,
                     pipeline=None, draw: bool = True
                     ) -> tuple[list[np.ndarray], str] | None:
  """Negatives of every training prompt, and their fingerprint.

  Step 0: the base model's, image ``j`` of prompt ``k`` in
  ``generated_images/{k:02d}_{j:02d}.png``. Online RPO's refresh at ``step``:
  ``pipeline`` (the policy at that step) draws them into
  ``online_folder(workdir, step)``, from noise keyed by the step. A manifest
  records what made them; when the prompts or settings change they are all
  drawn again, in one ``generate`` call batched over the devices. With
  ``draw=False`` missing images are not drawn: None is returned.
  """
  cfg = ctx.config
  n = cfg.rpo.num_images_per_prompt
  manifest = {"prompts": prompts, "images_per_prompt": n,
              "steps": cfg.rpo.gen_inference_steps,
              "guidance": cfg.rpo.gen_guidance_scale,
              "resolution": cfg.data.resolution,
              "model": str(cfg.model.pretrained), "seed": cfg.seed}
  rng = jax.random.fold_in(jax.random.key(cfg.seed), 1)
  folder = ctx.workdir / "generated_images"
  if step:
    manifest["online_step"] = step
    rng = jax.random.fold_in(rng, step)
    folder = online_folder(ctx.workdir, step)
  paths = [folder / f"{k:02d}_{j:02d}.png"
           for k in range(len(prompts)) for j in range(n)]
  manifest_path = folder / "manifest.json"
  have = (manifest_path.is_file()
          and json.loads(manifest_path.read_text()) == manifest
          and all(p.is_file() for p in paths))
  # Every process has looked before process 0 writes: they all take part
  # in generating, or none does.
  have = not distributed.any_process(not have)
  if not have and not draw:
    return None
  if not have:
    logging.info("generating %d images for %d training prompts%s",
                 len(paths), len(prompts),
                 f" (online refresh at step {step})" if step else "")
    images = diffusion.generate(
        pipeline or ctx.pipeline, [p for p in prompts for _ in range(n)],
        rng=rng,
        num_inference_steps=cfg.rpo.gen_inference_steps,
        guidance_scale=cfg.rpo.gen_guidance_scale,
        resolution=cfg.data.resolution,
        batch_size=max(len(ctx.mesh.devices.flat), 8), progress=True,
        batch_sharding=ctx.batch_sharding)
    if distributed.is_chief():
      folder.mkdir(parents=True, exist_ok=True)
      for path, image in zip(paths, images):
        common.save_png(path, image)
      rundir.atomic_write_text(manifest_path, json.dumps(manifest) + "\n")
    distributed.barrier("generated_images_written")
  return ([images_lib.load_image(p, min_side=1) for p in paths],
          _fingerprint(manifest))


def training_rewards(config: ml_collections.ConfigDict,
                     clip: rewards.Embedder, prompts: list[str],
                     ref_clip: np.ndarray, generated) -> dict:
  """``ref (num_references, num_prompts)``: each photo against each prompt;
  ``gen (num_generated,)``: each image against its own prompt."""
  lam = config.rpo.lambda_train
  n = config.rpo.num_images_per_prompt
  text = clip.texts(prompts, config.data.unique_token)
  gen_ai, gen_at = rewards.alignment_scores(
      clip.images(generated), ref_clip, np.repeat(text, n, axis=0))
  # A photo's ALIGN-I includes itself; it only counts when lambda_train > 0.
  ref_ai = rewards.to_unit(np.mean(
      rewards.pairwise_cosine(ref_clip, ref_clip), axis=-1))
  ref_at = rewards.to_unit(rewards.pairwise_cosine(ref_clip, text))
  return {"ref": np.asarray(rewards.harmonic(ref_ai[:, None], ref_at, lam),
                            np.float32),
          "gen": np.asarray(rewards.harmonic(gen_ai, gen_at, lam),
                            np.float32)}


@dataclasses.dataclass(frozen=True)
class Data:
  """RPO's prepared data: latents, prompt states and training rewards."""
  reference: dict  # posterior mean/std of the photos (flips appended).
  generated: dict  # posterior mean/std of the generated images.
  num_references: int
  num_flips: int
  # common.encode_text's arrays of the instance prompt, then the training
  # prompts: {"emb": (1 + num_prompts, 77, d)} (SDXL: and "pooled").
  emb: dict
  reward_ref: np.ndarray  # (num_references, num_prompts)
  reward_gen: np.ndarray  # (num_generated,)
  scaling: float
  schedule: diffusion.NoiseSchedule
  # SDXL only: the photos' time ids (flips appended), (num_references *
  # num_flips, 6); the generated images are whole squares (sdxl.time_ids).
  ref_time_ids: np.ndarray | None = None
  gen_time_ids: np.ndarray | None = None


def negatives(ctx: Context, clip: rewards.Embedder, prompts: list[str],
              ref_clip: np.ndarray, *, step: int = 0, pipeline=None,
              draw: bool = True) -> tuple[str, dict, dict] | None:
  """The negatives of ``step`` (0: the base model's; see ``generated_images``):
  their fingerprint, VAE latents and training rewards (``training_rewards``),
  all cached in the workdir. None when ``draw`` is False and the images are
  not there."""
  cfg = ctx.config
  drawn = generated_images(ctx, prompts, step=step, pipeline=pipeline,
                           draw=draw)
  if drawn is None:
    return None
  generated, fingerprint = drawn
  latents = common.encode_latents(
      ctx, common.pixels(cfg, generated, flips=False),
      f"generated_latents_{fingerprint}")
  scores = common.cached(
      ctx.cache_dir / "rpo_rewards_{}.npz".format(_fingerprint(
          [fingerprint, cfg.rpo.reward_model, cfg.rpo.lambda_train,
           len(ref_clip)])),
      lambda: training_rewards(cfg, clip, prompts, ref_clip, generated))
  return fingerprint, latents, scores


def prepare(ctx: Context, clip: rewards.Embedder
            ) -> tuple[Data, np.ndarray]:
  """RPO's data, and the CLIP embeddings of the reference photos."""
  cfg = ctx.config
  prompts = training_prompts(cfg)
  val_prompts = validation_prompts(cfg)
  common.check_prompts(ctx, [common.instance_prompt(cfg)] + prompts
                       + val_prompts + common.format_prompts(
                           cfg, cfg.eval.prompts))
  references = common.instance_images(ctx)
  reference = common.encode_latents(
      ctx, common.pixels(cfg, references, flips=cfg.data.random_flip),
      "instance_latents")
  ref_clip = clip.images(references)
  fingerprint, generated_latents, scores = negatives(ctx, clip, prompts,
                                                     ref_clip)
  emb = common.encode_text(ctx, [common.instance_prompt(cfg)] + prompts,
                           f"rpo_prompt_embeddings_{fingerprint}")
  time_ids = {}
  if ctx.pipeline.is_sdxl:
    time_ids = dict(
        ref_time_ids=common.time_ids(cfg, references,
                                     flips=cfg.data.random_flip),
        gen_time_ids=sdxl.time_ids(cfg.data.resolution)[0])
  return Data(reference=reference, generated=generated_latents,
              num_references=len(references),
              num_flips=2 if cfg.data.random_flip else 1, emb=emb,
              reward_ref=scores["ref"], reward_gen=scores["gen"],
              scaling=ctx.pipeline.vae.scaling_factor,
              schedule=ctx.pipeline.schedule, **time_ids), ref_clip


class Online:
  """Online RPO: the data of the last refresh, renewed by ``refresh``.

  ``refresh(step, pipeline, current)`` (the engine calls it every
  ``rpo.online_every_steps`` steps) has the policy of ``step`` draw new
  negatives, rescores them and swaps them into ``data``; the references,
  prompts and their rewards stay. The negatives are cached in the workdir
  under the step, so a run resumed past a refresh reloads them.
  """

  def __init__(self, ctx: Context, clip: rewards.Embedder, data: Data,
               ref_clip: np.ndarray):
    self.ctx, self.clip, self.data, self.ref_clip = ctx, clip, data, ref_clip

  def refresh(self, step: int, pipeline, current: bool) -> dict[str, float]:
    start = time.perf_counter()
    prompts = training_prompts(self.ctx.config)
    kwargs = dict(step=step, pipeline=pipeline)
    out = negatives(self.ctx, self.clip, prompts, self.ref_clip, **kwargs,
                    draw=current)
    if out is None:
      logging.warning(
          "the negatives of the online refresh at step %d are missing from "
          "%s: the restored policy draws them instead, so this run no longer "
          "equals an uninterrupted one", step,
          online_folder(self.ctx.workdir, step))
      out = negatives(self.ctx, self.clip, prompts, self.ref_clip, **kwargs)
    _, latents, scores = out
    self.data = dataclasses.replace(self.data, generated=latents,
                                    reward_gen=scores["gen"])
    n = self.ctx.config.rpo.num_images_per_prompt
    prompt = np.arange(len(scores["gen"])) // n
    return {"online/reward_gen": float(np.mean(scores["gen"])),
            # Mean Bradley-Terry probability that a reference is preferred.
            "online/p_ref": float(np.mean(preference_prob(
                self.data.reward_ref[:, prompt], scores["gen"][None, :]))),
            "online/refresh_sec": time.perf_counter() - start}


def make_batch(config: ml_collections.ConfigDict, data: Data,
               step: int) -> dict[str, np.ndarray]:
  """Pairs: every generated image once per epoch, each with a reference."""
  bs = config.batch_size
  gen = common.epoch_indices(config.seed, step, bs, len(data.reward_gen))
  ref = common.epoch_indices(config.seed + 1, step, bs, data.num_references)
  flip = np.random.default_rng([config.seed, step, 1]).integers(
      0, data.num_flips, bs)
  row = ref + flip * data.num_references
  prompt = gen // config.rpo.num_images_per_prompt
  reward_ref, reward_gen = data.reward_ref[ref, prompt], data.reward_gen[gen]
  # Labels are drawn on the host from a generator seeded by the step: fresh
  # for every use of a pair, the same again when a run resumes.
  labels = preference_labels(np.random.default_rng([config.seed, step, 2]),
                             reward_ref, reward_gen)
  out = {"ref_mean": data.reference["mean"][row],
         "ref_std": data.reference["std"][row],
         "gen_mean": data.generated["mean"][gen],
         "gen_std": data.generated["std"][gen],
         "prompt": prompt.astype(np.int32),
         "labels": labels}
  if data.ref_time_ids is not None:
    out["ref_time_ids"] = data.ref_time_ids[row]
    out["gen_time_ids"] = np.broadcast_to(data.gen_time_ids, (bs, 6)).copy()
  return out


def pair_rows(config: ml_collections.ConfigDict, batch
              ) -> tuple[jax.Array, int] | None:
  """Where a micro-batch's pairs sit among the step's (``state.ROW``):
  ``(index, total)`` of its pairs, None when ``batch`` is the whole step."""
  if state_lib.ROW not in batch:
    return None
  return batch[state_lib.ROW], config.batch_size


def _both_halves(rows):
  """``rows`` of pairs as rows of ``[ref; gen]`` (ref halves first)."""
  if rows is None:
    return None
  index, total = rows
  return jnp.concatenate([index, total + index]), 2 * total


def _noise(schedule, rng, shape, shared: bool, rows=None,
           noise_offset: float = 0.0):
  """Noise and timesteps for ``[ref; gen]``, shared across a pair or not.

  ``rows`` (``pair_rows``) keys each pair's draws by its index in the step.
  """
  count = shape[0] // 2 if shared else shape[0]
  noise, t = diffusion.draw_noise(
      schedule, rng, (count,) + tuple(shape[1:]),
      rows=rows if shared else _both_halves(rows), noise_offset=noise_offset)
  if shared:
    noise, t = jnp.concatenate([noise, noise]), jnp.concatenate([t, t])
  return noise, t


def base_model(graphs: Graphs, unet: nnx.Module
               ) -> Callable[[Any, Any], nnx.Module]:
  """``(params, frozen) -> the frozen base U-Net`` the preference loss uses.

  With LoRA the base is the trained U-Net with its adapters switched off
  (``lora_B`` zero), so no second copy of the weights exists; otherwise it is
  the ``base_unet`` copy ``build`` hands the engine.
  """
  if lora.has_adapters(unet):
    return lambda params, frozen: graphs.merge(
        "unet", lora.disabled(state_of("unet", params, frozen)))
  return lambda params, frozen: graphs("base_unet", params, frozen)


def loss_fn(config: ml_collections.ConfigDict, graphs: Graphs, data: Data,
            base: Callable[[Any, Any], nnx.Module], params, frozen, batch,
            rng):
  """``L_sim + L_pre`` of a batch of (reference, generated) pairs.

  ``base`` builds the frozen base U-Net (see ``base_model``).
  """
  r = config.rpo
  schedule = data.schedule
  unet = graphs("unet", params, frozen)
  base_unet = base(params, frozen)
  emb = common.text_cond(frozen["constants"])
  bs = batch["ref_mean"].shape[0]
  rows = pair_rows(config, batch)
  offset = config.loss.noise_offset
  latent_rng, pair_rng, sim_rng = jax.random.split(rng, 3)
  latents = common.sample_latents(
      jnp.concatenate([batch["ref_mean"], batch["gen_mean"]]),
      jnp.concatenate([batch["ref_std"], batch["gen_std"]]), latent_rng,
      data.scaling, rows=_both_halves(rows))
  # SDXL: each row with its image's time ids (None for SD).
  ref_ids, gen_ids = batch.get("ref_time_ids"), batch.get("gen_time_ids")
  instance = diffusion.cond_repeat(diffusion.cond_rows(emb, slice(0, 1)), bs)
  prompt = diffusion.cond_rows(emb, 1 + batch["prompt"])
  ref_emb = instance if r.ref_prompt == "instance" else prompt
  pair_emb = sdxl.with_time_ids(
      diffusion.cond_concat(ref_emb, prompt),
      None if ref_ids is None else jnp.concatenate([ref_ids, gen_ids]))
  instance = sdxl.with_time_ids(instance, ref_ids)
  noise, t = _noise(schedule, pair_rng, latents.shape, r.shared_noise, rows,
                    offset)
  err_base = jax.lax.stop_gradient(diffusion.denoising_error(
      base_unet, schedule, latents, noise, t, pair_emb))
  if r.ref_prompt == "instance":
    err_theta = diffusion.denoising_error(unet, schedule, latents, noise, t,
                                          pair_emb)
    err_sim, t_sim = err_theta[:bs], t[:bs]
  else:
    # L_sim's instance-prompt pass rides in the same U-Net call.
    sim_noise, sim_t = diffusion.draw_noise(
        schedule, sim_rng, latents[:bs].shape, rows=rows, noise_offset=offset)
    err = diffusion.denoising_error(
        unet, schedule, jnp.concatenate([latents, latents[:bs]]),
        jnp.concatenate([noise, sim_noise]), jnp.concatenate([t, sim_t]),
        diffusion.cond_concat(pair_emb, instance))
    err_theta, err_sim, t_sim = err[:2 * bs], err[2 * bs:], sim_t
  labels = batch["labels"]
  errors = (err_theta[:bs], err_base[:bs], err_theta[bs:], err_base[bs:])
  margin = r.beta * implicit_margin(*errors)
  pref_loss = preference_loss(*errors, labels, r.beta)
  gamma = config.loss.snr_gamma
  if gamma:  # on L_sim, the denoising term; L_pre's margin stays as it is.
    snr_weight = diffusion.min_snr_weight(schedule, t_sim, gamma)
    err_sim = err_sim * snr_weight
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
  if gamma:
    metrics["loss/snr_weight"] = jnp.mean(snr_weight)
  return sim_loss + pref_loss, metrics


def validation(ctx: Context, clip: rewards.Embedder, ref_clip: np.ndarray):
  """``evaluate``: the lambda_val-Harmonic of validation images (fixed seeds)."""
  cfg = ctx.config
  val_prompts = validation_prompts(cfg)
  val_text = clip.texts(val_prompts, cfg.data.unique_token)

  def evaluate(step: int, pipeline) -> dict[str, float]:
    del step
    images = diffusion.generate(
        pipeline, val_prompts * cfg.rpo.num_val_images,
        seed=cfg.eval.seed, num_inference_steps=cfg.eval.num_inference_steps,
        guidance_scale=cfg.eval.guidance_scale,
        resolution=cfg.data.resolution,
        batch_size=max(len(ctx.mesh.devices.flat), len(val_prompts)),
        batch_sharding=ctx.batch_sharding)
    align_i, align_t = rewards.alignment_scores(
        clip.images(images), ref_clip,
        np.tile(val_text, (cfg.rpo.num_val_images, 1)))
    score = rewards.harmonic(align_i, align_t, cfg.rpo.lambda_val)
    return {"val/harmonic": float(np.mean(score)),
            "val/align_i": float(np.mean(align_i)),
            "val/align_t": float(np.mean(align_t))}

  return evaluate


def build(ctx: Context) -> Method:
  """RPO: the U-Net trains against a frozen copy of itself."""
  config = ctx.config
  clip = rewards.Embedder.image_text(config.rpo.reward_model, chunk=8)
  data, ref_clip = prepare(ctx, clip)
  unet = ctx.pipeline.unet
  frozen = {}
  if not lora.has_adapters(unet):
    # A host copy: the trained U-Net's buffers are donated every step, so
    # the frozen base must not share them.
    graphdef, state = nnx.split(unet)
    frozen["base_unet"] = nnx.merge(graphdef, jax.tree.map(np.array, state))
  graphs = ctx.graphs({"unet": unet, **frozen})
  base = base_model(graphs, unet)
  online = Online(ctx, clip, data, ref_clip)
  return Method(
      trainable={"unet": unet}, frozen=frozen,
      constants=dict(data.emb),
      loss_fn=lambda params, frozen_, batch, rng: loss_fn(
          config, graphs, data, base, params, frozen_, batch, rng),
      batch=lambda step: make_batch(config, online.data, step),
      evaluate=validation(ctx, clip, ref_clip),
      best_metric=("val/harmonic", "max"),
      refresh=online.refresh if config.rpo.online_every_steps else None,
      refresh_every_steps=config.rpo.online_every_steps)


def validate(config: ml_collections.ConfigDict) -> None:
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
  try:
    if not rewards.is_image_text_model(str(r.reward_model)):
      fail("reward_model", f"use one of {', '.join(rewards.IMAGE_TEXT_MODELS)}"
           ", or a transformers CLIP or ALIGN folder or Hub id")
  except CheckpointError as e:  # a folder of another model
    fail("reward_model", str(e))
  key = "live_prompts" if is_live_subject(config) else "object_prompts"
  if not r[key]:
    fail(key, "list at least one prompt template with {token} {class_name}")
  if not r.val_prompts and not r.val_on_training_prompts:
    fail("val_prompts", "list at least one validation prompt template, or "
         "set rpo.val_on_training_prompts=true")
  if not r.beta > 0:
    fail("beta", "it must be a positive number")
  every = r.online_every_steps
  if not isinstance(every, int) or isinstance(every, bool) or every < 0:
    fail("online_every_steps", "use 0 (offline, the paper) or a positive "
         "number of steps between refreshes of the negatives")
  if every >= config.num_steps:
    fail("online_every_steps", f"no refresh happens before the last step "
         f"(num_steps={config.num_steps}); use a smaller value, or 0")
