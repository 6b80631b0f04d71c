"""Look Forward: its reward, actor and critic, the engine hooks, the CLI.

Most tests run the method's loss on a stub denoiser (a few parameters, fast to
compile) through the engine's real optimizer and train step; the DINO test
uses the tiny pipeline and the tiny DINO ViT; the last ones run the three
recipes through the command line.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx
from PIL import Image

from personalize_jax import diffusion, rewards
from personalize_jax.engine import optim, sharding, state as state_lib
from personalize_jax.engine.method import Graphs
from personalize_jax.errors import UserError
from personalize_jax.methods import dreambooth, lookforward
from personalize_jax.models import presets
from personalize_jax.models.unet import UNet2DConditionModel
from personalize_jax.models.vae import AutoencoderKL

import recipes
import xla_env

REPO = Path(__file__).resolve().parents[2]
LATENT = 8  # the tiny VAE's latent side (64 px images)
SD1 = dict(presets.SCHEDULER)
MESH = sharding.create_mesh(1, 1)


def _config(recipe="lookforward_dreambooth_tpu", **overrides):
  return recipes.load(recipe, "tiny", **overrides)


class _StubUNet(nnx.Module):
  """``(x_t, t, text) -> prediction`` in a few parameters: a U-Net stand-in."""

  def __init__(self, width: int, rngs: nnx.Rngs):
    self.mix = nnx.Conv(4, 4, (1, 1), rngs=rngs)
    self.text = nnx.Linear(width, 4, rngs=rngs)

  def __call__(self, x, t, emb):
    scale = 1.0 + t.astype(jnp.float32)[:, None, None, None] / 1000.0
    return self.mix(x) * scale + self.text(emb.mean(1))[:, None, None, :]


def _method(tmp_path=None, unet=None, frozen_modules=None,
            dino_reference=None, **overrides):
  """Look Forward set up by hand: stub U-Net, random embeddings, no VAE.

  Returns a namespace with the ``setup`` its loss closes over, ``loss`` (the
  method's ``loss_fn``), ``params`` and ``frozen`` split as the engine does,
  and the ``config``.
  """
  del tmp_path
  config = _config(**{"dreambooth.train_text_encoder": False, **overrides})
  lookforward.validate(config)
  lf = config.lookforward
  terms, td = lookforward.REWARDS[lf.reward], lookforward.uses_td(config)
  trainable = {"unet": unet or _StubUNet(32, nnx.Rngs(0))}
  if lf.critic:
    trainable["qnetwork"] = lookforward.make_critics(terms, LATENT, config.seed)
    if td:
      trainable["qnetwork_target"] = lookforward.make_critics(
          terms, LATENT, config.seed)
  frozen_modules = frozen_modules or {}
  emb = np.random.default_rng(0).normal(size=(2, 77, 32)).astype(np.float32)
  data = dreambooth.Data(
      instance={}, klass=None, num_flips=1, text={"emb": emb},
      scaling=presets.VAE["scaling_factor"],
      schedule=diffusion.NoiseSchedule.from_config(SD1))
  graphs = Graphs({**trainable, **frozen_modules})
  setup = lookforward.Setup(config=config, graphs=graphs, data=data,
                            terms=terms,
                            weights=lookforward.reward_weights(config), td=td,
                            rows={})
  constants = {"emb": jnp.asarray(emb)}
  if dino_reference is not None:
    constants["dino_reference"] = jnp.asarray(dino_reference)
  return SimpleNamespace(
      setup=setup, config=config, graphs=graphs, data=data, emb=emb,
      loss=lambda p, f, b, r: lookforward.loss_fn(setup, p, f, b, r),
      params={n: nnx.state(m) for n, m in trainable.items()},
      frozen={"modules": {n: nnx.state(m) for n, m in frozen_modules.items()},
              "constants": constants})


def _batch(batch_size=2, seed=0):
  rng = np.random.default_rng(seed)
  shape = (batch_size, LATENT, LATENT, 4)
  draw = lambda scale: (scale * rng.normal(size=shape)).astype(np.float32)
  return {"instance_mean": draw(1.0), "instance_std": np.abs(draw(0.1)),
          "class_mean": draw(1.0), "class_std": np.abs(draw(0.1))}


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _norm(tree):
  return float(optax.tree.norm(tree))


def _assert_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------ look forward


def test_look_forward_error_is_the_noise_error_times_one_minus_abar_over_abar():
  schedule = diffusion.NoiseSchedule.from_config(SD1)
  keys = jax.random.split(jax.random.key(0), 3)
  x0, eps, eps_hat = (jax.random.normal(k, (4, 8, 8, 4)) for k in keys)
  t = jnp.array([0, 10, 500, 999])
  x0_hat = schedule.predict_x0(schedule.add_noise(x0, eps, t), eps_hat, t)
  a = schedule.alpha_bar(t)
  want = -(1 - a) / a * jnp.mean((eps_hat - eps) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(lookforward.latent_reward(x0_hat, x0), want,
                             rtol=2e-3)


@pytest.mark.parametrize(
    "config", [SD1, dict(SD1, prediction_type="v_prediction")])
def test_x0_hat_is_diffusers_pred_original_sample(config):
  ours = diffusion.NoiseSchedule.from_config(config)
  ref = diffusers.DDIMScheduler.from_config(config)
  ref.set_timesteps(50)
  rng = np.random.default_rng(0)
  for t in (1, 250, 981):
    sample, output = rng.normal(size=(2, 1, 4, 8, 8)).astype(np.float32)
    want = ref.step(torch.from_numpy(output), t, torch.from_numpy(sample)
                    ).pred_original_sample.numpy()
    got = ours.predict_x0(jnp.asarray(sample.transpose(0, 2, 3, 1)),
                          jnp.asarray(output.transpose(0, 2, 3, 1)), t)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), want,
                               rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------- loss


def test_without_the_actor_the_loss_is_dreamboths(tmp_path):
  method = _method(tmp_path, **{"lookforward.critic": False,
                                "lookforward.actor_weight": 0.0})
  params, frozen = method.params, method.frozen
  batch, rng = _batch(), jax.random.key(3)
  loss, metrics = method.loss(params, frozen, batch, rng)
  want, want_metrics = dreambooth.denoising_loss(
      method.config, method.graphs, method.data, params, frozen, batch, rng)
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  for key in ("loss/instance", "loss/prior"):
    np.testing.assert_allclose(metrics[key], want_metrics[key], rtol=1e-6)
  # The public code's objective drops the instance loss: prior (+ actor) only.
  method.config.lookforward.instance_loss_weight = 0.0
  loss, metrics = method.loss(params, frozen, batch, rng)
  np.testing.assert_allclose(loss, metrics["loss/prior"], rtol=1e-6)


def test_released_loss_matches_a_numpy_transcription(tmp_path):
  """The public code's objective (``released``: no instance term) written out
  in NumPy from the step's draws: prior loss + critic regression + actor."""
  method = _method(tmp_path, **{"lookforward.instance_loss_weight": 0.0,
                                "lookforward.critic_clip_grad_norm": 0.0})
  lf = method.config.lookforward
  params, frozen = method.params, method.frozen
  batch, rng = _batch(batch_size=3), jax.random.key(11)
  loss, metrics = jax.jit(method.loss)(params, frozen, batch, rng)

  # The step's draws, as the loss makes them (keys split the same way).
  latent_rng, noise_rng = jax.random.split(rng)
  mean = np.concatenate([batch["instance_mean"], batch["class_mean"]])
  std = np.concatenate([batch["instance_std"], batch["class_std"]])
  eps = np.asarray(jax.random.normal(latent_rng, mean.shape), np.float64)
  noise_key, t_key = jax.random.split(noise_rng)
  noise = np.asarray(jax.random.normal(noise_key, mean.shape), np.float64)
  t = np.asarray(jax.random.randint(t_key, (len(mean),), 0, 1000))
  # NumPy from here; the stub U-Net and the critic are the models.
  x0 = (mean + std * eps) * method.data.scaling
  a = np.asarray(method.data.schedule.alphas_cumprod, np.float64)[t]
  a = a[:, None, None, None]
  noisy = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
  emb = np.concatenate([np.repeat(method.emb[:1], 3, 0),
                        np.repeat(method.emb[1:2], 3, 0)])
  unet = method.graphs.merge("unet", params["unet"])
  pred = np.asarray(unet(jnp.asarray(noisy, jnp.float32), jnp.asarray(t),
                         jnp.asarray(emb)), np.float64)
  err = np.mean((pred - noise) ** 2, axis=(1, 2, 3))  # epsilon targets
  prior = err[3:].mean()
  x0_hat = (noisy[:3] - np.sqrt(1 - a[:3]) * pred[:3]) / np.sqrt(a[:3])
  residual = (x0_hat - x0[:3]) ** 2
  reward = -residual.mean(axis=(1, 2, 3))
  critic = method.graphs.merge("qnetwork", params["qnetwork"])["latent"]
  fitted = np.asarray(critic(jnp.asarray(residual, jnp.float32)), np.float64)
  critic_loss = np.mean((fitted - (-reward)) ** 2)
  q = -fitted
  actor = -lf.actor_weight * np.mean(lf.gamma ** t[:3] * q)
  want = {"loss/prior": prior, "loss/critic": critic_loss,
          "loss/actor": actor, "q/mean": q.mean(),
          "reward/latent": reward.mean(),
          "loss": method.config.dreambooth.prior_loss_weight * prior
                  + critic_loss + actor}
  for key, value in want.items():
    got = loss if key == "loss" else metrics[key]
    np.testing.assert_allclose(float(got), value, rtol=2e-5, err_msg=key)


def test_actor_and_critic_gradients_separate_by_construction(tmp_path):
  method = _method(tmp_path)
  params, frozen = method.params, method.frozen
  batch, rng = _batch(), jax.random.key(1)

  @jax.jit
  def grads(params):
    grad_of = lambda key: jax.grad(
        lambda p: method.loss(p, frozen, batch, rng)[1][key])(params)
    total = jax.grad(lambda p: method.loss(p, frozen, batch, rng)[0])(params)
    return grad_of("loss/critic"), grad_of("loss/actor"), total

  critic, actor, total = grads(params)
  assert _norm(critic["qnetwork"]) > 0 and _norm(actor["unet"]) > 0
  assert all(not x.any() for x in _leaves(critic["unet"]))
  assert all(not x.any() for x in _leaves(actor["qnetwork"]))
  for got, want in zip(_leaves(total["qnetwork"]), _leaves(critic["qnetwork"])):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


def test_td_target_adds_the_discounted_target_critic_of_the_next_state(
    tmp_path):
  method = _method(tmp_path, **{"lookforward.critic_target": "td"})
  params, frozen = method.params, method.frozen
  rng = np.random.default_rng(0)
  x0, noisy, pred = (jnp.asarray(rng.normal(size=(2, LATENT, LATENT, 4)),
                                 jnp.float32) for _ in range(3))
  emb = jnp.asarray(method.emb[:1].repeat(2, 0))

  one_step = _method(tmp_path)
  one_step = dataclasses.replace(one_step.setup, graphs=method.graphs)
  method = method.setup

  def critic_loss(setup, params, t):
    t = jnp.full((2,), t, jnp.int32)
    x0_hat = setup.data.schedule.predict_x0(noisy, pred, t)
    r = {"latent": lookforward.latent_reward(x0_hat, x0)}
    return lookforward.critic_terms(setup, params, frozen, x0_hat, x0, r,
                                    (noisy, pred, t, emb))[1]

  # t = 0 ends the chain: nothing is bootstrapped.
  np.testing.assert_allclose(critic_loss(method, params, 0),
                             critic_loss(one_step, params, 0), rtol=1e-6)
  # A zero target critic bootstraps zero; the initial (positive) one more.
  zeroed = dict(params, qnetwork_target=jax.tree.map(
      jnp.zeros_like, params["qnetwork_target"]))
  one = critic_loss(one_step, params, 500)
  np.testing.assert_allclose(critic_loss(method, zeroed, 500), one, rtol=1e-6)
  assert abs(float(critic_loss(method, params, 500)) - float(one)) > 1e-3


def test_dino_reward_gradient_reaches_the_denoiser_not_the_frozen_models(
    tmp_path):
  # All tiny models: the gradient runs from DINO through the VAE decoder into
  # the tiny U-Net's parameters.
  method = _method(
      tmp_path, unet=UNet2DConditionModel.from_pretrained("tiny", seed=0),
      frozen_modules={"vae": AutoencoderKL.from_pretrained("tiny", seed=1),
                      "dino": rewards.DinoReward.from_pretrained("tiny")},
      dino_reference=np.random.default_rng(0).normal(
          size=(3, 32)).astype(np.float32),
      **{"lookforward.reward": "dino", "lookforward.critic": False,
         "lookforward.instance_loss_weight": 0.0,
         "dreambooth.prior_preservation": False})
  params, frozen = method.params, method.frozen
  batch = {k: v[:1] for k, v in _batch().items() if k.startswith("instance")}
  loss_fn = lambda p, f: method.loss(p, f, batch, jax.random.key(0))
  (loss, metrics), (grads, frozen_grads) = jax.jit(jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True))(params, frozen)
  # The loss is the actor term alone: -gamma^t * reward/dino.
  assert -2.0 <= float(metrics["reward/dino"]) <= 0.0
  assert float(loss) >= 0.0 and "loss/critic" not in metrics
  unet = _leaves(grads["unet"])
  assert all(np.isfinite(x).all() for x in unet)
  assert sum(float(np.abs(x).sum()) for x in unet) > 0
  for name in ("vae", "dino"):
    frozen_grad = _leaves(frozen_grads["modules"][name])
    assert all(not x.any() for x in frozen_grad), name


def test_both_rewards_fit_a_critic_each_and_sum_their_q(tmp_path,
                                                       monkeypatch):
  method = _method(tmp_path, **{"lookforward.reward": "both",
                                "lookforward.dino_weight": 0.25})
  # A stand-in for the DINO reward (the test above runs the real one), so
  # that only the critics' plumbing is compiled here.
  monkeypatch.setattr(lookforward, "rewards", lambda setup, p, f, x0_hat, x0: {
      "latent": lookforward.latent_reward(x0_hat, x0),
      "dino": -jnp.mean(jnp.abs(x0_hat), axis=(1, 2, 3))})
  params, frozen = method.params, method.frozen
  assert set(params["qnetwork"]) == {"latent", "dino"}
  batch, rng = _batch(), jax.random.key(0)

  @jax.jit
  def run(params):
    grads = jax.grad(lambda p: method.loss(
        p, frozen, batch, rng)[1]["loss/critic"])(params)
    return method.loss(params, frozen, batch, rng)[1], grads

  metrics, grads = run(params)
  assert {"reward/latent", "reward/dino", "loss/critic"} <= set(metrics)
  for term in ("latent", "dino"):
    assert _norm(grads["qnetwork"][term]) > 0, term
  zero = lambda term: dict(params, qnetwork=dict(
      params["qnetwork"], **{term: jax.tree.map(jnp.zeros_like,
                                                params["qnetwork"][term])}))
  q = lambda p: float(run(p)[0]["q/mean"])
  q_latent, q_dino = q(zero("dino")), q(zero("latent"))
  # Q = -(Q_latent + 0.25 Q_dino): each critic estimates a (positive) cost.
  np.testing.assert_allclose(q(params), q_latent + q_dino, rtol=1e-5)
  assert q_latent < 0 and q_dino < 0
  method.setup.weights["dino"] = 0.5  # read when traced: a fresh trace doubles it
  np.testing.assert_allclose(
      float(jax.jit(lambda p: method.loss(p, frozen, batch, rng)[1][
          "q/mean"])(zero("latent"))), 2 * q_dino, rtol=1e-5)


# ------------------------------------------------------------------ engine


def _engine(method):
  """The engine's optimizer, state and jitted step for a hand-made method."""
  params, frozen, config = method.params, method.frozen, method.config
  td = lookforward.uses_td(config)
  tx, schedule, labels = optim.make_optimizer(
      config, params, extra=lookforward.critic_optimizers(config, td))
  mesh = MESH
  state = state_lib.create_train_state(params, tx, 0, mesh)
  frozen = jax.device_put(frozen, sharding.replicated(mesh))
  step = state_lib.make_train_step(
      method.loss, tx, schedule, labels, nan_policy="stop",
      state_shardings=state_lib.shardings_of(state),
      frozen_shardings=state_lib.shardings_of(frozen), mesh=mesh,
      post_update=(lambda p, s: lookforward.update_target(config, p, s))
      if td else None)
  return state, frozen, step


def test_engine_trains_the_critic_until_its_loss_falls(tmp_path):
  method = _method(tmp_path, **{"learning_rate": 1e-3})
  state, frozen, step = _engine(method)
  batch = state_lib.shard_batch(_batch(), MESH)
  first = jax.device_get(state.params)
  for _ in range(40):
    state, metrics = step(state, frozen, batch)
    assert bool(metrics["finite"])
  last = jax.device_get(state.params)

  @jax.jit
  def critic_loss(critic):
    # The same draws for both critics, on the trained denoiser.
    params = dict(last, qnetwork=critic)
    keys = jax.random.split(jax.random.key(7), 16)
    return jnp.mean(jax.vmap(lambda k: method.loss(
        params, frozen, batch, k)[1]["loss/critic"])(keys))

  before, after = critic_loss(first["qnetwork"]), critic_loss(last["qnetwork"])
  assert float(after) < 0.5 * float(before), (before, after)


def test_td_target_network_lags_the_online_one_as_configured(tmp_path):
  method = _method(tmp_path, **{"lookforward.critic_target": "td",
                                "lookforward.target_tau": 0.5,
                                "lookforward.target_update_every_steps": 2})
  state, frozen, step = _engine(method)
  batch = state_lib.shard_batch(_batch(), MESH)
  init = _leaves(state.params["qnetwork_target"])
  _assert_equal(init, _leaves(state.params["qnetwork"]))
  state, _ = step(state, frozen, batch)  # step 1: no update due
  online = _leaves(state.params["qnetwork"])
  assert any((a != b).any() for a, b in zip(online, init))
  _assert_equal(_leaves(state.params["qnetwork_target"]), init)
  state, _ = step(state, frozen, batch)  # step 2: halfway to the online critic
  online = _leaves(state.params["qnetwork"])
  target = _leaves(state.params["qnetwork_target"])
  for got, old, new in zip(target, init, online):
    np.testing.assert_allclose(got, 0.5 * old + 0.5 * new, rtol=1e-6)
  state, _ = step(state, frozen, batch)  # step 3: held
  _assert_equal(_leaves(state.params["qnetwork_target"]), target)


# ------------------------------------------------------------------ config


@pytest.mark.parametrize("key,value,match", [
    ("reward", "clip", "lookforward.reward='clip'"),
    ("critic_target", "mc", "lookforward.critic_target='mc'"),
    ("base", "rpo", "lookforward.base='rpo'"),
    ("target_tau", 0.0, "target_tau"),
    ("base", "custom_diffusion", "does not match the recipe"),
])
def test_invalid_values_are_one_line_user_errors(tmp_path, key, value, match):
  with pytest.raises(UserError, match=match):
    _method(tmp_path, **{f"lookforward.{key}": value})


def test_custom_diffusion_base_validates_custom_diffusion_keys():
  config = _config("lookforward_custom_diffusion_tpu",
                   **{"custom_diffusion.initializer_token": "zqxv ktn"})
  with pytest.raises(UserError, match="initializer_token='zqxv ktn'"):
    lookforward.validate(config)


# --------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def class_images(tmp_path_factory):
  """Two class images on disk, so the runs skip generating them."""
  folder = tmp_path_factory.mktemp("class_images")
  rng = np.random.default_rng(0)
  for i in range(2):
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(
        folder / f"class_{i:05d}.png")
  return folder


# The recipe lookforward_dreambooth_tpu runs in its LoRA variant below, and
# with the DINO reward as dino_reward_dreambooth_tpu.
RECIPES = {
    "lookforward_custom_diffusion_tpu": {"loss/actor", "loss/critic", "q/mean",
                                         "reward/latent", "loss/prior",
                                         "update_norm/unet",
                                         "update_norm/text_encoder",
                                         "update_norm/qnetwork"},
    # The paper's form: the DINO reward through a critic of its own.
    "dino_reward_dreambooth_tpu": {"loss/actor", "loss/critic", "q/mean",
                                   "reward/dino", "reward/latent",
                                   "loss/prior", "loss/instance",
                                   "update_norm/unet",
                                   "update_norm/text_encoder",
                                   "update_norm/qnetwork"},
    # LoRA on the U-Net and the text encoder; the critic trains as before.
    "lookforward_dreambooth_tpu:lora": {"loss/actor", "loss/critic", "q/mean",
                                        "reward/latent", "update_norm/unet",
                                        "update_norm/text_encoder",
                                        "update_norm/qnetwork"},
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, class_images):
  """Two steps of each tiny recipe through the CLI, one after the other.

  They share a compilation cache: the sampling and VAE programs compile once
  (each recipe's train step is its own). Side by side on two cores they were
  slower, not faster.
  """
  tmp = tmp_path_factory.mktemp("cli")
  # Two steps each: less LLVM optimisation compiles faster than it runs slower.
  env = xla_env.env()
  out = {}
  for recipe in RECIPES:
    name, _, variant = recipe.partition(":")
    result = subprocess.run(
        [sys.executable, "-m", "personalize_jax.main",
         f"--config={REPO / 'configs' / name}.py:tiny"
         + (f",{variant}" if variant else ""),
         f"--workdir={tmp / recipe.replace(':', '-')}", "--config.num_steps=2",
         "--config.log_every_steps=1", "--config.eval.num_inference_steps=1",
         "--config.dreambooth.num_class_images=2",
         f"--config.dreambooth.class_images_dir={class_images}",
         # The LoRA run's final evaluation loads the base with its adapters.
         f"--config.final_eval.enabled={str(bool(variant)).lower()}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out[recipe] = (result.returncode, result.stderr,
                   tmp / recipe.replace(":", "-"))
  return out


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_tiny_recipe_runs_through_the_cli(cli_runs, recipe):
  returncode, stderr, workdir = cli_runs[recipe]
  assert returncode == 0, stderr[-3000:]
  lines = [json.loads(line) for line in
           (workdir / "metrics.jsonl").read_text().splitlines()]
  logged = [line for line in lines if "loss" in line]
  assert [line["step"] for line in logged] == [1, 2]
  scalars = RECIPES[recipe]
  for line in logged:
    assert scalars <= set(line), scalars - set(line)
    assert all(np.isfinite(line[k]) for k in scalars)
    # Every component in the optimizer moves; no other one is in it.
    moved = {k for k in line if k.startswith("update_norm/")}
    assert moved == {k for k in scalars if k.startswith("update_norm/")}
    assert all(line[k] > 0 for k in moved), line
  if recipe.endswith(":lora"):
    exported = sorted(p.name for p in (workdir / "export").iterdir())
    assert exported == ["pytorch_lora_weights.safetensors",
                        "train_config.json"]
    results = json.loads((workdir / "final_eval" / "metrics.json").read_text())
    assert results["models"]["finetuned"] == str(workdir / "export")
    assert all(np.isfinite(v) for v in results["finetuned"].values())
  else:
    assert (workdir / "export" / "unet").is_dir()
