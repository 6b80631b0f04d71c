"""Look Forward (Wei et al., ECCV 2024): deterministic policy gradients.

"Powerful and Flexible: Personalized Text-to-Image Generation via
Reinforcement Learning" (arXiv 2407.06642) treats the U-Net as a deterministic
policy: the state is ``(x_t, t, text)``, the action the predicted noise. One
model call "looks forward" to the clean sample it implies,

  x0_hat = (x_t - sqrt(1 - abar_t) eps_hat) / sqrt(abar_t),

whose squared error to the instance latents x0 is ``(1 - abar_t) / abar_t``
times the squared noise error: DreamBooth's signal, weighted up to ~200x at
the noisiest timesteps, where the image's structure is laid down. Rewards of
x0_hat:

  latent  ``-mean((x0_hat - x0)^2)``: the look-forward reconstruction error.
  dino    ``-(1 - cos)`` of the DINO ViT-S/16 embedding of the decoded x0_hat
          to those of the subject's photos.
  both    ``latent + dino_weight * dino``.

A critic per reward term, the 0.26M-parameter ``QNetwork``, is fitted to it
(the reconstruction critic reads the squared residual ``(x0_hat - x0)^2``, as
in the public code; the DINO critic reads x0_hat) and the actor, the U-Net,
maximises ``lambda * gamma^t * Q`` through the critic's input, alongside
DreamBooth's prior-preservation loss and (weighted) instance loss. The critic
regresses the one-step reward (the public code: SGD, lr 0.01; here its
gradient is also clipped, see ``extra_optimizers``) or the paper's cumulative
form ``Q(x_t) = r(x_t) + gamma Q(x_{t-1})`` with a lagging target
network, ``x_{t-1}`` being the deterministic DDIM step of the action.

Sign convention: each ``QNetwork`` estimates a cost (minus a reward), and
``Q = -cost``. The public code's positive initialisation makes the untrained
network grow with its non-negative input, so it starts out as a rough cost;
fitted to a reward instead, it would start by pushing the error up.

Actor and critic update in one jitted step from one loss: the actor term sees
the critic's parameters under ``stop_gradient``, the critic's regression sees
its input and target under ``stop_gradient``, so their gradients separate by
construction; ``extra_optimizers`` gives the critic its SGD.

``config.lookforward.critic=False`` maximises the reward itself (it must be
differentiable: DINO through the frozen VAE decoder and ViT): an ablation.
The paper's "DreamBooth + DINO reward" row learns the DINO reward with a
critic (``configs/dino_reward_dreambooth_tpu.py``; its ``direct`` variant is
the ablation). ``config.lookforward.base`` picks the
method it builds on: DreamBooth, or Custom Diffusion (what trains, the new
token).
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from personalize_jax import diffusion
from personalize_jax import rewards as rewards_lib
from personalize_jax.engine.method import Context, Graphs, Method, state_of
from personalize_jax.errors import UserError
from personalize_jax.methods import common, custom_diffusion, dreambooth
from personalize_jax.models.qnetwork import QNetwork

# The pipeline components config.trainable may name.
COMPONENTS = ("unet", "text_encoder")
# Accumulation, offset noise and Min-SNR act on DreamBooth's part of the loss
# (engine/config.py); the actor and critics see the same draws.
TRAINING_OPTIONS = dreambooth.TRAINING_OPTIONS

REWARDS = {"latent": ("latent",), "dino": ("dino",), "both": ("latent", "dino")}
CRITIC_TARGETS = ("one_step", "td")
BASES = ("dreambooth", "custom_diffusion")
CRITIC, TARGET = "qnetwork", "qnetwork_target"


def add_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds ``config.lookforward`` (after the base method's ``add_config``)."""
  d = ml_collections.ConfigDict()
  d.base = "dreambooth"  # method it builds on: "dreambooth" or "custom_diffusion".
  d.reward = "latent"  # reward of x0_hat: "latent", "dino" or "both".
  d.dino_weight = 1.0  # weight of the DINO reward in "both".
  d.dino_model = rewards_lib.DEFAULT_DINO  # DINO ViT (Hub id, folder or "tiny").
  d.critic = True  # fit a Q-network and maximise it; False: maximise the reward itself.
  d.critic_target = "one_step"  # "one_step": r(x_t); "td": r(x_t) + gamma Q'(x_{t-1}).
  d.critic_learning_rate = 0.01  # SGD learning rate of the Q-network(s).
  d.critic_clip_grad_norm = 1.0  # global-norm clip of the critic's gradient (0 = off, as the public code).
  d.target_tau = 1.0  # td: target <- (1 - tau) target + tau online at each update.
  d.target_update_every_steps = 100  # td: steps between target updates (tau=1: a copy).
  d.gamma = 0.9986  # discount; the actor term of timestep t is weighted gamma^t.
  d.actor_weight = 1.0  # lambda: weight of the actor term -lambda gamma^t Q.
  d.instance_loss_weight = 1.0  # instance epsilon-loss weight (paper 1.0, public code 0.0).
  c.lookforward = d
  return c


def resolve(config: ml_collections.ConfigDict) -> None:
  """The base method's convenience switches."""
  _base_module(config).resolve(config)


def _base_module(config: ml_collections.ConfigDict):
  if config.lookforward.base == "custom_diffusion":
    return custom_diffusion
  return dreambooth


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ``UserError`` naming the first bad ``config.lookforward`` value."""
  lf = config.lookforward
  choices = (("base", BASES), ("reward", tuple(REWARDS)),
             ("critic_target", CRITIC_TARGETS))
  for key, valid in choices:
    if lf[key] not in valid:
      raise UserError(f"config.lookforward.{key}={lf[key]!r} is invalid: use "
                      f"one of {', '.join(valid)}")
  recipe = ("custom_diffusion" if "custom_diffusion" in config
            else "dreambooth")
  if lf.base != recipe:
    raise UserError(
        f"config.lookforward.base={lf.base!r} does not match the recipe, "
        f"which configures {recipe}; use configs/lookforward_{lf.base}_tpu.py")
  if not 0.0 < lf.target_tau <= 1.0:
    raise UserError(f"config.lookforward.target_tau={lf.target_tau!r} is "
                    "invalid: use a value in (0, 1] (1 copies the online "
                    "critic)")
  if (not isinstance(lf.target_update_every_steps, int)
      or lf.target_update_every_steps <= 0):
    raise UserError("config.lookforward.target_update_every_steps="
                    f"{lf.target_update_every_steps!r} is invalid: it must be "
                    "a positive integer")
  if not 0.0 < lf.gamma <= 1.0:
    raise UserError(f"config.lookforward.gamma={lf.gamma!r} is invalid: use a "
                    "discount in (0, 1]")
  if not lf.critic_learning_rate > 0:
    raise UserError("config.lookforward.critic_learning_rate="
                    f"{lf.critic_learning_rate!r} is invalid: it must be a "
                    "positive number")
  _base_module(config).validate(config)


def latent_reward(x0_hat: jax.Array, x0: jax.Array) -> jax.Array:
  """``-mean((x0_hat - x0)^2)`` per sample, ``(b,)``, in float32."""
  err = (x0_hat.astype(jnp.float32) - x0.astype(jnp.float32)) ** 2
  return -jnp.mean(err, axis=tuple(range(1, err.ndim)))


def critic_input(term: str, x0_hat: jax.Array, x0: jax.Array) -> jax.Array:
  """What the critic of a reward term reads: the squared residual, or x0_hat."""
  if term == "latent":
    return (x0_hat.astype(jnp.float32) - x0.astype(jnp.float32)) ** 2
  return x0_hat.astype(jnp.float32)


def discount(gamma: float, t: jax.Array) -> jax.Array:
  """``gamma^t``: the weight of a timestep's actor term, ``(b,)``."""
  return jnp.asarray(gamma, jnp.float32) ** t.astype(jnp.float32)


def soft_update(target, online, tau: float, due: jax.Array):
  """``(1 - tau) target + tau online`` where ``due``, else ``target``."""
  return jax.tree.map(
      lambda old, new: jnp.where(due, (1.0 - tau) * old + tau * new, old),
      target, online)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What Look Forward's loss closes over (built once by ``build``)."""
  config: ml_collections.ConfigDict
  graphs: Graphs
  data: dreambooth.Data
  terms: tuple[str, ...]
  weights: dict
  td: bool
  rows: dict  # Custom Diffusion's token-table rows by table ({} for DreamBooth).


def make_critics(terms, latent_size: int, seed: int) -> nnx.Dict:
  """A ``QNetwork`` per reward term, seeded ``seed``, ``seed + 1``, ..."""
  return nnx.Dict({term: QNetwork(latent_size, rngs=nnx.Rngs(seed + i))
                   for i, term in enumerate(terms)})


def reference_embeddings(ctx: Context, dino) -> np.ndarray:
  """DINO embeddings of the subject's photos (``cache/dino_reference.npz``).

  The photos go through the training preprocessing (crop, resize to the
  training resolution, [-1, 1]) and then the reward's own path, so they are
  embedded exactly as decoded look-forward samples are.
  """
  pixels = common.pixels(ctx.config, common.instance_images(ctx), flips=False)

  def compute():
    graphdef, state = nnx.split(dino)
    emb = jax.jit(lambda s, x: nnx.merge(graphdef, s).embed(x))(
        state, jnp.asarray(pixels))
    return {"emb": np.asarray(emb, np.float32)}

  return common.cached(ctx.cache_dir / "dino_reference.npz", compute)["emb"]


def critic_optimizers(config: ml_collections.ConfigDict, td: bool) -> dict:
  """The critic's SGD (and the frozen target's zero update), by label."""
  lf = config.lookforward
  out = {}
  if lf.critic:
    # The public code trains its critic with plain SGD at lr 0.01. Unclipped,
    # one noisy timestep (whose look-forward error is (1 - abar) / abar,
    # up to ~200, times the noise error) can throw it off for good.
    sgd = optax.sgd(lf.critic_learning_rate)
    if lf.critic_clip_grad_norm > 0:
      sgd = optax.chain(optax.clip_by_global_norm(lf.critic_clip_grad_norm),
                        sgd)
    out["critic"] = ([rf"^{CRITIC}\."], sgd)
  if td:
    # Only ``update_target`` moves the target network.
    out["critic_target"] = ([rf"^{TARGET}\."], optax.set_to_zero())
  return out


def update_target(config: ml_collections.ConfigDict, params, step: jax.Array):
  """``post_update``: moves the target critic towards the online one."""
  lf = config.lookforward
  due = (step + 1) % lf.target_update_every_steps == 0
  return dict(params, **{TARGET: soft_update(
      params[TARGET], params[CRITIC], lf.target_tau, due)})


def rewards(setup: Setup, params, frozen, x0_hat: jax.Array,
            x0: jax.Array) -> dict:
  """``{term: (b,)}`` rewards of look-forward latents (U-Net scale)."""
  out = {}
  if "latent" in setup.terms:
    out["latent"] = latent_reward(x0_hat, x0)
  if "dino" in setup.terms:
    # Frozen weights: no gradient is spent on (or leaks into) them.
    modules = jax.lax.stop_gradient(frozen["modules"])
    vae = setup.graphs.merge("vae", modules["vae"])
    dino = setup.graphs.merge("dino", modules["dino"])
    images = vae.decode(x0_hat / setup.data.scaling)
    out["dino"] = dino(images, frozen["constants"]["dino_reference"])
  del params
  return out


def next_look_forward(setup: Setup, params, frozen, noisy, pred, t, emb):
  """x0_hat at ``x_{t-1}``, the deterministic DDIM step of the action.

  The TD target's next state: one more (gradient-free) U-Net call.
  """
  sg = jax.lax.stop_gradient
  schedule = setup.data.schedule
  x_prev, _ = schedule.ddim_step(sg(noisy), sg(pred), t,
                                 schedule.num_train_timesteps)
  t_prev = jnp.maximum(t - 1, 0)
  unet = setup.graphs.merge("unet", sg(state_of("unet", params, frozen)))
  pred_prev = diffusion.unet_predict(unet, x_prev, t_prev,
                                     sg(emb)).astype(jnp.float32)
  return schedule.predict_x0(x_prev, pred_prev, t_prev)


def critic_terms(setup: Setup, params, frozen, x0_hat, x0, rewards_,
                 step_inputs):
  """The actor's ``Q`` ``(b,)`` (a reward) and the critics' regression loss.

  Args:
    setup: what ``build`` prepared.
    params: all trainable parameters.
    frozen: the frozen modules and constants.
    x0_hat: look-forward latents of the instance rows (differentiable).
    x0: their clean latents.
    rewards_: ``{term: (b,)}`` rewards of ``x0_hat`` (regression targets).
    step_inputs: ``(x_t, prediction, t, text embeddings)`` of those rows,
      for the TD target's next state.
  """
  lf = setup.config.lookforward
  sg = jax.lax.stop_gradient
  online = setup.graphs.merge(CRITIC, params[CRITIC])
  frozen_online = setup.graphs.merge(CRITIC, sg(params[CRITIC]))
  if setup.td:
    targets = setup.graphs.merge(TARGET, sg(params[TARGET]))
    x0_next = next_look_forward(setup, params, frozen, *step_inputs)
    alive = (step_inputs[2] > 0).astype(jnp.float32)  # t = 0 ends the chain
  q, critic_loss = 0.0, 0.0
  for term in setup.terms:
    cost = sg(-rewards_[term])
    if setup.td:
      cost = cost + lf.gamma * alive * targets[term](
          critic_input(term, x0_next, x0))
    fitted = online[term](sg(critic_input(term, x0_hat, x0)))
    critic_loss = critic_loss + jnp.mean((fitted - cost) ** 2)
    q = q - setup.weights[term] * frozen_online[term](
        critic_input(term, x0_hat, x0))
  return q, critic_loss


def loss_fn(setup: Setup, params, frozen, batch, rng):
  """DreamBooth's losses plus the actor term (and the critics' regression)."""
  cfg = setup.config
  lf = cfg.lookforward
  sg = jax.lax.stop_gradient
  schedule = setup.data.schedule
  params = custom_diffusion.restrict(params, setup.rows)
  unet = setup.graphs("unet", params, frozen)
  latent_rng, noise_rng = jax.random.split(rng)
  rows = dreambooth.step_rows(cfg, batch)
  latents, embs = dreambooth.training_rows(setup.graphs, setup.data.scaling,
                                           params, frozen, batch, latent_rng,
                                           rows=rows)
  bs = batch["instance_mean"].shape[0]
  # DreamBooth's draws and errors (keyed by row, with its offset noise and
  # Min-SNR weights), so that with actor_weight=0 the loss is DreamBooth's
  # exactly.
  noise, t = diffusion.draw_noise(schedule, noise_rng, latents.shape,
                                  rows=rows,
                                  noise_offset=cfg.loss.noise_offset)
  noisy = schedule.add_noise(latents, noise, t)
  pred = diffusion.unet_predict(unet, noisy, t, embs).astype(jnp.float32)
  err = diffusion.per_sample_error(
      pred, schedule.training_target(latents, noise, t))
  gamma = cfg.loss.snr_gamma
  if gamma:
    snr_weight = diffusion.min_snr_weight(schedule, t, gamma)
    err = err * snr_weight
  loss, metrics = dreambooth.loss_from_errors(
      err, bs, prior_loss_weight=dreambooth.prior_weight(cfg),
      instance_loss_weight=lf.instance_loss_weight)
  if gamma:
    metrics["loss/snr_weight"] = jnp.mean(snr_weight)

  # Look forward from the instance rows only: the reward is about the subject.
  x0, t0 = latents[:bs], t[:bs]
  x0_hat = schedule.predict_x0(noisy[:bs], pred[:bs], t0)
  rewards_ = rewards(setup, params, frozen,
                     x0_hat if not lf.critic else sg(x0_hat), x0)
  latent = rewards_.get("latent")
  if latent is None:  # not a reward here, but worth watching
    latent = latent_reward(sg(x0_hat), x0)
  metrics["reward/latent"] = jnp.mean(latent)
  if "dino" in rewards_:
    metrics["reward/dino"] = jnp.mean(rewards_["dino"])
  if lf.critic:
    q, critic_loss = critic_terms(setup, params, frozen, x0_hat, x0, rewards_,
                                  (noisy[:bs], pred[:bs], t0,
                                   diffusion.cond_rows(embs, slice(0, bs))))
    loss = loss + critic_loss
    metrics["loss/critic"] = critic_loss
  else:
    # Without a critic the actor maximises the (weighted) reward itself.
    q = sum(setup.weights[k] * r for k, r in rewards_.items())
  actor_loss = -lf.actor_weight * jnp.mean(discount(lf.gamma, t0) * q)
  metrics.update({"loss/actor": actor_loss, "q/mean": jnp.mean(q)})
  return loss + actor_loss, metrics


def reward_weights(config: ml_collections.ConfigDict) -> dict:
  """``{term: weight}``: "both" weighs the DINO term; a single reward has 1."""
  lf = config.lookforward
  if lf.reward == "both":
    return {"latent": 1.0, "dino": lf.dino_weight}
  return {lf.reward: 1.0}


def uses_td(config: ml_collections.ConfigDict) -> bool:
  """Whether the critic regresses the TD target (with a target network)."""
  return config.lookforward.critic and config.lookforward.critic_target == "td"


def build(ctx: Context) -> Method:
  """Look Forward on the base method ``config.lookforward.base`` names."""
  config = ctx.config
  lf = config.lookforward
  terms = REWARDS[lf.reward]
  td = uses_td(config)
  if lf.base == "custom_diffusion":
    trainable, rows = custom_diffusion.setup(ctx)
  else:
    trainable, rows = {"unet": ctx.pipeline.unet,
                       **dreambooth.text_modules(ctx)}, {}
  data = dreambooth.prepare(ctx, text_trains="text_encoder" in trainable)
  frozen, constants = {}, dreambooth.constants(data)
  if "dino" in terms:
    dtype = jnp.bfloat16 if config.mixed_precision == "bf16" else jnp.float32
    dino = rewards_lib.DinoReward.from_pretrained(lf.dino_model, dtype=dtype,
                                                  seed=config.seed)
    constants["dino_reference"] = reference_embeddings(ctx, dino)
    frozen.update(vae=ctx.pipeline.vae, dino=dino)
  if lf.critic:
    latent_size = data.instance["mean"].shape[1]
    trainable[CRITIC] = make_critics(terms, latent_size, config.seed)
    if td:
      # Same seeds: the target starts as an exact copy of the online critic.
      trainable[TARGET] = make_critics(terms, latent_size, config.seed)
  setup = Setup(
      config=config, graphs=ctx.graphs({**trainable, **frozen}), data=data,
      terms=terms, weights=reward_weights(config), td=td, rows=rows)
  return Method(
      trainable=trainable, frozen=frozen, constants=constants,
      loss_fn=lambda params, frozen_, batch, rng: loss_fn(
          setup, params, frozen_, batch, rng),
      batch=lambda step: dreambooth.make_batch(config, data, step),
      extra_optimizers=critic_optimizers(config, td),
      row_masks=rows,
      post_update=(lambda params, step: update_target(config, params, step))
      if td else None)
