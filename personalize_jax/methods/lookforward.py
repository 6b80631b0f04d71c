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
differentiable: DINO through the frozen VAE decoder and ViT), the paper's
"DreamBooth + DINO reward" baseline. ``config.lookforward.base`` picks the
method it builds on: DreamBooth, or Custom Diffusion (what trains, the new
token).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from personalize_jax import rewards as rewards_lib
from personalize_jax.errors import UserError
from personalize_jax.methods import base, custom_diffusion, dreambooth
from personalize_jax.models.qnetwork import QNetwork

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


def _check(config: ml_collections.ConfigDict) -> None:
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


class LookForward(dreambooth.DreamBooth):
  """DreamBooth's losses plus the look-forward actor and its critic(s)."""

  def __new__(cls, ctx: base.Context):
    # One method name for the engine; the config picks what it builds on.
    if cls is LookForward and ctx.config.lookforward.base == "custom_diffusion":
      cls = LookForwardCustomDiffusion
    return super().__new__(cls)

  def __init__(self, ctx: base.Context):
    super().__init__(ctx)
    _check(self.config)
    lf = self.config.lookforward
    self.terms = REWARDS[lf.reward]
    # "both" weighs the DINO term; a single reward has weight 1.
    self.weights = ({"latent": 1.0, "dino": lf.dino_weight}
                    if lf.reward == "both" else {lf.reward: 1.0})
    self.td = lf.critic and lf.critic_target == "td"
    self.post_update = self.update_target if self.td else None

  # ------------------------------------------------------------------ data

  def prepare(self) -> None:
    super().prepare()
    cfg = self.config
    lf = cfg.lookforward
    if "dino" in self.terms:
      dtype = jnp.bfloat16 if cfg.mixed_precision == "bf16" else jnp.float32
      self.dino = rewards_lib.DinoReward.from_pretrained(
          lf.dino_model, dtype=dtype, seed=cfg.seed)
      self.dino_reference = self.reference_embeddings()
    if lf.critic:
      self.build_critics(self.instance["mean"].shape[1])

  def build_critics(self, latent_size: int) -> None:
    """A ``QNetwork`` per reward term (and a target copy of them for TD)."""
    make = lambda: nnx.Dict({term: QNetwork(latent_size, rngs=nnx.Rngs(
        self.config.seed + i)) for i, term in enumerate(self.terms)})
    self.critics = make()
    # Same seeds: the target starts as an exact copy of the online critic.
    self.targets = make() if self.td else None

  def reference_embeddings(self) -> np.ndarray:
    """DINO embeddings of the subject's photos (``cache/dino_reference.npz``).

    The photos go through the training preprocessing (crop, resize to the
    training resolution, [-1, 1]) and then the reward's own path, so they are
    embedded exactly as decoded look-forward samples are.
    """
    pixels = self.pixels(self.instance_images(), flips=False)

    def compute():
      graphdef, state = nnx.split(self.dino)
      emb = jax.jit(lambda s, x: nnx.merge(graphdef, s).embed(x))(
          state, jnp.asarray(pixels))
      return {"emb": np.asarray(emb, np.float32)}

    path = self.ctx.cache_dir / "dino_reference.npz"
    return base.cached(path, compute)["emb"]

  def trainable_modules(self) -> dict[str, nnx.Module]:
    modules = super().trainable_modules()
    if self.config.lookforward.critic:
      modules[CRITIC] = self.critics
    if self.td:
      modules[TARGET] = self.targets
    return modules

  def frozen_modules(self) -> dict[str, nnx.Module]:
    modules = super().frozen_modules()
    if "dino" in self.terms:
      modules.update(vae=self.ctx.pipeline.vae, dino=self.dino)
    return modules

  def constants(self) -> dict[str, np.ndarray]:
    out = dict(super().constants())
    if "dino" in self.terms:
      out["dino_reference"] = self.dino_reference
    return out

  # ------------------------------------------------------------ optimizers

  def extra_optimizers(self) -> dict:
    lf = self.config.lookforward
    out = dict(super().extra_optimizers())
    if lf.critic:
      # The public code trains its critic with plain SGD at lr 0.01. Unclipped,
      # one noisy timestep (whose look-forward error is (1 - abar) / abar,
      # up to ~200, times the noise error) can throw it off for good.
      sgd = optax.sgd(lf.critic_learning_rate)
      if lf.critic_clip_grad_norm > 0:
        sgd = optax.chain(optax.clip_by_global_norm(lf.critic_clip_grad_norm),
                          sgd)
      out["critic"] = ([rf"^{CRITIC}\."], sgd)
    if self.td:
      # Only ``update_target`` moves the target network.
      out["critic_target"] = ([rf"^{TARGET}\."], optax.set_to_zero())
    return out

  def update_target(self, params, step: jax.Array):
    """``post_update``: moves the target critic towards the online one."""
    lf = self.config.lookforward
    due = (step + 1) % lf.target_update_every_steps == 0
    return dict(params, **{TARGET: soft_update(
        params[TARGET], params[CRITIC], lf.target_tau, due)})

  # ------------------------------------------------------------------ loss

  def rewards(self, frozen, x0_hat: jax.Array, x0: jax.Array) -> dict:
    """``{term: (b,)}`` rewards of look-forward latents (U-Net scale)."""
    out = {}
    if "latent" in self.terms:
      out["latent"] = latent_reward(x0_hat, x0)
    if "dino" in self.terms:
      # Frozen weights: no gradient is spent on (or leaks into) them.
      modules = jax.lax.stop_gradient(frozen["modules"])
      vae = self.module("vae", modules["vae"])
      dino = self.module("dino", modules["dino"])
      images = vae.decode(x0_hat / self.scaling)
      out["dino"] = dino(images, frozen["constants"]["dino_reference"])
    return out

  def next_look_forward(self, params, noisy, pred, t, emb):
    """x0_hat at ``x_{t-1}``, the deterministic DDIM step of the action.

    The TD target's next state: one more (gradient-free) U-Net call.
    """
    sg = jax.lax.stop_gradient
    schedule = self.schedule
    x_prev, _ = schedule.ddim_step(sg(noisy), sg(pred), t,
                                   schedule.num_train_timesteps)
    t_prev = jnp.maximum(t - 1, 0)
    unet = self.module("unet", sg(params["unet"]))
    pred_prev = unet(x_prev, t_prev, sg(emb)).astype(jnp.float32)
    return schedule.predict_x0(x_prev, pred_prev, t_prev)

  def loss_fn(self, params, frozen, batch, rng):
    cfg = self.config
    lf = cfg.lookforward
    sg = jax.lax.stop_gradient
    unet = self.module("unet", params["unet"])
    latent_rng, noise_rng = jax.random.split(rng)
    latents, embs = self.training_rows(params, frozen, batch, latent_rng)
    bs = batch["instance_mean"].shape[0]
    prior = cfg.dreambooth.prior_preservation
    # The draws of base.noise_prediction_error, so that with actor_weight=0
    # the loss is DreamBooth's exactly.
    eps_rng, t_rng = jax.random.split(noise_rng)
    noise = jax.random.normal(eps_rng, latents.shape, jnp.float32)
    t = self.schedule.sample_timesteps(t_rng, latents.shape[0])
    noisy = self.schedule.add_noise(latents, noise, t)
    pred = unet(noisy, t, embs).astype(jnp.float32)
    target = self.schedule.training_target(latents, noise, t)
    err = jnp.mean((pred - target) ** 2, axis=tuple(range(1, pred.ndim)))
    instance_loss = jnp.mean(err[:bs])
    loss = lf.instance_loss_weight * instance_loss
    metrics = {"loss/instance": instance_loss}
    if prior:
      prior_loss = jnp.mean(err[bs:])
      loss = loss + cfg.dreambooth.prior_loss_weight * prior_loss
      metrics["loss/prior"] = prior_loss

    # Look forward from the instance rows only: the reward is about the subject.
    x0, t0 = latents[:bs], t[:bs]
    x0_hat = self.schedule.predict_x0(noisy[:bs], pred[:bs], t0)
    rewards = self.rewards(frozen, x0_hat if not lf.critic else sg(x0_hat), x0)
    latent = rewards.get("latent")
    if latent is None:  # not a reward here, but worth watching
      latent = latent_reward(sg(x0_hat), x0)
    metrics["reward/latent"] = jnp.mean(latent)
    if "dino" in rewards:
      metrics["reward/dino"] = jnp.mean(rewards["dino"])
    if lf.critic:
      q, critic_loss = self.critic_terms(params, x0_hat, x0, rewards,
                                         (noisy[:bs], pred[:bs], t0, embs[:bs]))
      loss = loss + critic_loss
      metrics["loss/critic"] = critic_loss
    else:
      # Without a critic the actor maximises the (weighted) reward itself.
      q = sum(self.weights[k] * r for k, r in rewards.items())
    actor_loss = -lf.actor_weight * jnp.mean(discount(lf.gamma, t0) * q)
    metrics.update({"loss/actor": actor_loss, "q/mean": jnp.mean(q)})
    return loss + actor_loss, metrics

  def critic_terms(self, params, x0_hat, x0, rewards, step_inputs):
    """The actor's ``Q`` ``(b,)`` (a reward) and the critics' regression loss.

    Args:
      params: all trainable parameters.
      x0_hat: look-forward latents of the instance rows (differentiable).
      x0: their clean latents.
      rewards: ``{term: (b,)}`` rewards of ``x0_hat`` (regression targets).
      step_inputs: ``(x_t, prediction, t, text embeddings)`` of those rows,
        for the TD target's next state.
    """
    lf = self.config.lookforward
    sg = jax.lax.stop_gradient
    online = self.module(CRITIC, params[CRITIC])
    frozen_online = self.module(CRITIC, sg(params[CRITIC]))
    if self.td:
      targets = self.module(TARGET, sg(params[TARGET]))
      x0_next = self.next_look_forward(params, *step_inputs)
      alive = (step_inputs[2] > 0).astype(jnp.float32)  # t = 0 ends the chain
    q, critic_loss = 0.0, 0.0
    for term in self.terms:
      cost = sg(-rewards[term])
      if self.td:
        cost = cost + lf.gamma * alive * targets[term](
            critic_input(term, x0_next, x0))
      fitted = online[term](sg(critic_input(term, x0_hat, x0)))
      critic_loss = critic_loss + jnp.mean((fitted - cost) ** 2)
      q = q - self.weights[term] * frozen_online[term](
          critic_input(term, x0_hat, x0))
    return q, critic_loss


class LookForwardCustomDiffusion(LookForward, custom_diffusion.CustomDiffusion):
  """Look Forward on Custom Diffusion: its data, what trains and the new token.

  The MRO puts Custom Diffusion's ``prepare``, ``trainable_modules``,
  ``constants`` and ``row_masks`` under Look Forward's, which extend them.
  """

  def loss_fn(self, params, frozen, batch, rng):
    if self.token_id is not None:
      # As CustomDiffusion.loss_fn: only the new token's row gets a gradient.
      params = dict(params, text_encoder=custom_diffusion.only_rows(
          params["text_encoder"], "text_encoder", custom_diffusion.TOKEN_TABLE,
          jnp.asarray(self.new_rows())))
    return super().loss_fn(params, frozen, batch, rng)
