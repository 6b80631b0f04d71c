"""RPO: the preference loss, its labels and data, its wiring, and a tiny run."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from personalize_jax import diffusion, rewards
from personalize_jax.errors import UserError
from personalize_jax.engine.method import Graphs
from personalize_jax.methods import common, rpo
from personalize_jax.models import checkpoint as checkpoint_lib
from personalize_jax.models.unet import UNet2DConditionModel
from personalize_jax.pipeline import load_stable_diffusion

import recipes
import xla_env

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helpers  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = Path(__file__).resolve().parents[2]
PAPER_RECIPE = REPO / "configs" / "rpo_paper.py"


def _config(arg=None):
  return recipes.load("rpo_tpu", arg)


def _data(**fields) -> rpo.Data:
  """RPO's data with the tiny schedule, scale 1 and what the test gives."""
  defaults = dict(reference={}, generated={}, num_references=0, num_flips=1,
                  emb=None, reward_ref=None, reward_gen=None, scaling=1.0,
                  schedule=diffusion.NoiseSchedule.from_pretrained("tiny"))
  return rpo.Data(**{**defaults, **fields})


def _loss(config, unet, base_unet):
  """RPO's loss on these denoisers: ``loss(params, frozen, batch, rng)``."""
  graphs = Graphs({"unet": unet, "base_unet": base_unet})
  data = _data()
  base = rpo.base_model(graphs, unet)
  return lambda *args: rpo.loss_fn(config, graphs, data, base, *args)


def _np_loss(e, y, beta):
  z = beta * ((e[1] - e[0]) - (e[3] - e[2]))
  return np.mean(y * np.logaddexp(0.0, -z) + (1 - y) * np.logaddexp(0.0, z))


# ------------------------------------------------------------ preference loss

def test_preference_loss_matches_numpy():
  rng = np.random.default_rng(0)
  errors = rng.uniform(0.0, 2.0, (4, 64)).astype(np.float32)
  for labels in (rng.integers(0, 2, 64).astype(np.float32),
                 rng.uniform(0.0, 1.0, 64).astype(np.float32)):
    got = rpo.preference_loss(*errors, labels, beta=2.5)
    np.testing.assert_allclose(got, _np_loss(errors.astype(np.float64),
                                             labels, 2.5), rtol=1e-5)


@pytest.mark.parametrize("margin", [1e4, 1e30])
def test_preference_loss_limits(margin):
  zero = jnp.zeros(1)
  # err_base_ref = margin, everything else 0: l = margin.
  def loss(l, y):
    return float(rpo.preference_loss(zero, jnp.full(1, l), zero, zero,
                                     jnp.full(1, y), beta=1.0))
  assert loss(margin, 1.0) == 0.0
  assert loss(-margin, 0.0) == 0.0
  assert loss(margin, 0.0) == pytest.approx(margin, rel=1e-6)
  assert loss(0.0, 0.3) == pytest.approx(np.log(2.0), rel=1e-6)
  for l in (0.3, 5.0, 50.0):
    assert loss(l, 0.5) == pytest.approx(loss(-l, 0.5), rel=1e-6)
    assert loss(l, 0.5) > np.log(2.0)


def test_preference_gradient_favours_the_labelled_image():
  ones = jnp.ones(4)
  grad = jax.grad(rpo.preference_loss, argnums=(0, 2))(
      ones, ones, ones, ones, ones, 1.0)
  # With y = 1 the loss falls as the model's error on the reference falls and
  # its error on the generated image rises.
  assert np.all(grad[0] > 0) and np.all(grad[1] < 0)


# ------------------------------------------------------------ labels and data

def _data_method(batch_size: int):
  """RPO with 3 references and 2 prompts x 2 images; latents name the image."""
  config = _config("tiny")
  config.batch_size = batch_size
  config.rpo.num_images_per_prompt = 2
  data = _data(
      num_references=3,
      reference={"mean": np.arange(3, dtype=np.float32).reshape(3, 1, 1, 1)
                         * np.ones((3, 2, 2, 4), np.float32),
                 "std": np.zeros((3, 2, 2, 4), np.float32)},
      generated={"mean": np.arange(4, dtype=np.float32).reshape(4, 1, 1, 1)
                         * np.ones((4, 2, 2, 4), np.float32),
                 "std": np.zeros((4, 2, 2, 4), np.float32)},
      reward_ref=np.array([[2.0, 0.0], [0.5, -1.0], [1.0, 1.5]], np.float32),
      reward_gen=np.array([0.0, 1.5, -1.0, 2.0], np.float32))
  return SimpleNamespace(batch=lambda step: rpo.make_batch(config, data, step),
                         reward_ref=data.reward_ref,
                         reward_gen=data.reward_gen)


def test_labels_follow_bradley_terry_of_each_pairs_own_rewards():
  m = _data_method(batch_size=4)
  hits, counts = np.zeros((3, 4)), np.zeros((3, 4))
  for step in range(3000):
    b = m.batch(step)
    ref = b["ref_mean"][:, 0, 0, 0].astype(int)
    gen = b["gen_mean"][:, 0, 0, 0].astype(int)
    np.testing.assert_array_equal(b["prompt"], gen // 2)
    np.add.at(hits, (ref, gen), b["labels"])
    np.add.at(counts, (ref, gen), 1)
  assert counts.min() > 800
  want = 1 / (1 + np.exp(-(m.reward_ref[:, np.arange(4) // 2]
                           - m.reward_gen[None, :])))
  # 0.06 is over 3.5 standard errors of a mean of 800 Bernoulli draws.
  np.testing.assert_allclose(hits / counts, want, atol=0.06)


def test_labels_are_redrawn_per_step_and_reproducible():
  m = _data_method(batch_size=4)
  np.testing.assert_array_equal(m.batch(7)["labels"], m.batch(7)["labels"])
  rng = np.random.default_rng(0)
  draws = rpo.preference_labels(rng, np.zeros(10_000), np.zeros(10_000))
  assert draws.dtype == np.float32 and set(np.unique(draws)) == {0.0, 1.0}
  assert abs(draws.mean() - 0.5) < 0.02  # 4 standard errors.


def test_every_generated_image_and_prompt_is_used_each_epoch():
  m = _data_method(batch_size=2)
  for epoch in range(3):
    gen = np.concatenate([m.batch(2 * epoch + i)["gen_mean"][:, 0, 0, 0]
                          for i in range(2)])
    assert sorted(gen.astype(int)) == [0, 1, 2, 3]


# ---------------------------------------------------------------- loss wiring

class _Affine(nnx.Module):
  """A stand-in denoiser: a scale of its input plus its prompt's mean."""

  def __init__(self, scale: float):
    self.scale = nnx.Param(jnp.asarray(scale, jnp.float32))

  def __call__(self, x_bhwc, t, emb_btd):
    del t
    return self.scale * x_bhwc + jnp.mean(emb_btd, axis=(1, 2))[:, None,
                                                               None, None]


def _wired_loss(theta: float, base_scale: float, *, same_images: bool,
                instance_value: float = 0.0, **rpo_overrides):
  config = _config("tiny")
  for key, value in rpo_overrides.items():
    config.rpo[key] = value
  unet, base_unet = _Affine(theta), _Affine(base_scale)
  loss = _loss(config, unet, base_unet)
  params, frozen = nnx.state(unet), nnx.state(base_unet)
  rng = np.random.default_rng(1)
  ref = rng.standard_normal((4, 2, 2, 4)).astype(np.float32)
  gen = ref if same_images else rng.standard_normal(ref.shape).astype(
      np.float32)
  emb = np.stack([np.full((77, 8), v, np.float32)
                  for v in (instance_value, 0.5, -0.5)])
  batch = {"ref_mean": ref, "ref_std": np.zeros_like(ref), "gen_mean": gen,
           "gen_std": np.zeros_like(gen),
           "prompt": np.array([0, 1, 0, 1], np.int32),
           "labels": np.array([1, 0, 1, 1], np.float32)}
  _, metrics = loss({"unet": params},
                         {"modules": {"base_unet": frozen},
                          "constants": {"emb": jnp.asarray(emb)}},
                         batch, jax.random.key(0))
  return {k: float(v) for k, v in metrics.items()}


@pytest.mark.parametrize("shared_noise", [False, True])
@pytest.mark.parametrize("ref_prompt", ["training", "instance"])
def test_margin_is_zero_while_the_model_equals_the_base(shared_noise,
                                                        ref_prompt):
  # Each image meets both U-Nets with the same noise, timestep and prompt.
  metrics = _wired_loss(0.4, 0.4, same_images=False,
                        shared_noise=shared_noise, ref_prompt=ref_prompt)
  assert metrics["pref/reward_margin"] == 0.0
  assert metrics["loss/pref"] == pytest.approx(np.log(2.0), rel=1e-6)


def test_reference_half_is_conditioned_on_the_training_prompt():
  # Same image in both halves with shared noise: only the prompt can differ.
  same = dict(same_images=True, shared_noise=True, instance_value=3.0)
  assert _wired_loss(0.9, 0.1, ref_prompt="training", **same)[
      "pref/reward_margin"] == 0.0
  assert _wired_loss(0.9, 0.1, ref_prompt="instance", **same)[
      "pref/reward_margin"] != 0.0
  # Independent noise by default (the public code): the halves differ.
  assert _wired_loss(0.9, 0.1, same_images=True, shared_noise=False)[
      "pref/reward_margin"] != 0.0


@pytest.mark.parametrize("ref_prompt", ["training", "instance"])
def test_similarity_loss_uses_the_instance_prompt(ref_prompt):
  quiet = _wired_loss(0.9, 0.1, same_images=False, ref_prompt=ref_prompt)
  loud = _wired_loss(0.9, 0.1, same_images=False, ref_prompt=ref_prompt,
                     instance_value=30.0)
  assert loud["loss/sim"] > 100 * quiet["loss/sim"]


def test_implicit_accuracy_rises_with_labels_fixed_to_one():
  """The real loss_fn trains the tiny U-Net to prefer the labelled image."""
  config = _config("tiny")
  unet = UNet2DConditionModel.from_pretrained("tiny", seed=0)
  loss = _loss(config, unet, unet)
  params = nnx.state(unet)
  frozen = {"modules": {"base_unet": jax.tree.map(jnp.copy, params)},
            "constants": {"emb": jax.random.normal(jax.random.key(1),
                                                   (3, 77, 32))}}
  # The tiny random VAE's latents are mostly posterior noise, so the test
  # feeds two distinct latent images directly.
  bs, rng = 4, np.random.default_rng(0)
  ref, gen = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  zeros = np.zeros((bs, 8, 8, 4), np.float32)
  batch = {"ref_mean": zeros + ref, "ref_std": zeros, "gen_mean": zeros + gen,
           "gen_std": zeros, "prompt": np.array([0, 1, 0, 1], np.int32),
           "labels": np.ones(bs, np.float32)}
  tx = optax.adam(1e-3)
  params = {"unet": params}

  def step(params, opt_state, rng):
    (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(
        params, frozen, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  opt_state, acc = tx.init(params), []
  step = jax.jit(step).lower(params, opt_state, jax.random.key(0)).compile(
      compiler_options=xla_env.FAST_COMPILE)
  for i in range(24):
    params, opt_state, metrics = step(params, opt_state, jax.random.key(i))
    acc.append(float(metrics["pref/implicit_acc"]))
  assert np.mean(acc[-8:]) > 0.75, acc


# ------------------------------------------------------------------- config

def test_recipe_follows_the_paper():
  c = _config()
  assert (c.method, c.model.pretrained) == ("rpo",
                                            "CompVis/stable-diffusion-v1-4")
  assert (c.learning_rate, c.optimizer.weight_decay,
          c.optimizer.clip_grad_norm, c.num_steps) == (5e-6, 1e-2, 1.0, 400)
  assert (c.eval_every_steps, c.early_stopping_patience) == (40, 0)
  assert tuple(c.trainable) == (r"^unet\.",) and c.batch_size % 4 == 0
  assert (c.rpo.beta, c.rpo.lambda_train, c.rpo.lambda_val) == (1.0, 0.0, 0.3)
  assert c.rpo.num_images_per_prompt == 4 and c.rpo.reward_model == "b32"
  assert _config("tiny").rpo.reward_model == "tiny"


@pytest.mark.parametrize("class_name,live,expect", [
    ("dog", None, "a sks dog wearing a green outfit"),
    ("backpack", None, "a sks backpack with a volcano in the background"),
    ("backpack", True, "a sks backpack swimming in a pool"),
])
def test_training_prompts_follow_the_kind_of_subject(class_name, live,
                                                     expect):
  c = _config()
  c.data.class_name = class_name
  c.rpo.live_subject = live
  prompts = rpo.training_prompts(c)
  assert len(prompts) == 8 and expect in prompts
  assert not set(rpo.validation_prompts(c)) & set(prompts)


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_prompt_seen_by_the_reward_model_drops_the_token():
  config = _config("tiny")
  config.data.unique_token = "sks"
  config.rpo.num_images_per_prompt = 2
  assert config.rpo.lambda_train == 0.0  # rewards are ALIGN-T alone.
  clip = rewards.Embedder.clip(config.rpo.reward_model)
  rng = np.random.default_rng(0)
  photos, generated = ([rng.integers(0, 256, (40, 40, 3), np.uint8)
                        for _ in range(n)] for n in (3, 4))
  ref_clip = clip.images(photos)
  got = rpo.training_rewards(config, clip, ["a sks dog on the Moon",
                                            "a SKS dog"], ref_clip, generated)
  # What CLIP reads: the prompts as if written without the token.
  text = _unit(clip.texts(["a dog on the Moon", "a dog"], "sks"))
  gen = _unit(clip.images(generated))
  np.testing.assert_allclose(
      got["gen"], (np.sum(gen * np.repeat(text, 2, axis=0), -1) + 1) / 2,
      rtol=1e-6)
  np.testing.assert_allclose(got["ref"], (_unit(ref_clip) @ text.T + 1) / 2,
                             rtol=1e-6)
  # Left in (another token configured), "sks" changes the rewards.
  config.data.unique_token = "zwx"
  kept = rpo.training_rewards(config, clip, ["a sks dog on the Moon",
                                             "a SKS dog"], ref_clip, generated)
  assert not np.allclose(kept["gen"], got["gen"])


def test_bad_rpo_value_is_a_one_line_user_error():
  c = _config("tiny")
  c.rpo.ref_prompt = "both"
  with pytest.raises(UserError, match=r"config\.rpo\.ref_prompt='both'"):
    rpo.validate(c)


def test_reward_model_accepts_clip_and_align_names_and_refuses_others(
    tmp_path):
  c = _config("tiny")
  for name in ("b32", "b16", "l14", "align", "tiny", "align-tiny",
               "kakaobrain/align-base"):
    c.rpo.reward_model = name
    rpo.validate(c)
  c.rpo.reward_model = "nonsense"
  with pytest.raises(UserError) as info:
    rpo.validate(c)
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith("config.rpo.reward_model='nonsense' is invalid")
  assert "b32, b16, l14, align, tiny, align-tiny" in message
  # A folder is read for its model_type before anything runs.
  (tmp_path / "config.json").write_text('{"model_type": "vit"}')
  c.rpo.reward_model = str(tmp_path)
  with pytest.raises(UserError, match="model_type 'vit'"):
    rpo.validate(c)


def test_align_reward_labels_differ_from_clip_ones(tmp_path, monkeypatch):
  """RPO built with rpo.reward_model=align-tiny: its rewards come from ALIGN
  (not CLIP) and its batches carry Bradley-Terry labels drawn from them."""
  config = _config("tiny")
  config.rpo.reward_model = "align-tiny"
  pipeline = load_stable_diffusion("tiny")
  # Random negatives instead of the tiny model's (noise too): compiling the
  # sampler would take most of the test's time.
  monkeypatch.setattr(diffusion, "generate", lambda _, prompts, **kw: (
      np.random.default_rng(0).integers(
          0, 256, (len(prompts), kw["resolution"], kw["resolution"], 3),
          np.uint8)))
  method, _, _ = helpers.build(rpo, config, tmp_path, pipeline)
  labels = method.batch(0)["labels"]
  assert labels.shape == (config.batch_size,)
  assert set(np.unique(labels)) <= {0.0, 1.0}
  (cached,) = (tmp_path / "cache").glob("rpo_rewards_*.npz")
  with np.load(cached) as f:
    align_rewards = {k: f[k] for k in f.files}
  # The same images and prompts (both cached by the build) scored by CLIP.
  config.rpo.reward_model = "tiny"
  clip_data, _ = rpo.prepare(helpers.context(config, tmp_path, pipeline),
                             rewards.Embedder.image_text("tiny"))
  # Each photo against 2 prompts, and 2 prompts x 2 images.
  assert align_rewards["ref"].shape == clip_data.reward_ref.shape
  assert align_rewards["ref"].shape[1] == 2
  assert align_rewards["gen"].shape == clip_data.reward_gen.shape == (4,)
  for key, clip_rewards in (("ref", clip_data.reward_ref),
                            ("gen", clip_data.reward_gen)):
    assert ((align_rewards[key] > 0) & (align_rewards[key] <= 1)).all()
    assert not np.allclose(align_rewards[key], clip_rewards, atol=1e-3)
  # The method's labels are Bradley-Terry draws of those ALIGN rewards.
  align_data = dataclasses.replace(clip_data,
                                   reward_ref=align_rewards["ref"],
                                   reward_gen=align_rewards["gen"])
  np.testing.assert_array_equal(
      labels, rpo.make_batch(config, align_data, 0)["labels"])


# ------------------------------------------------------------------- LoRA

def test_lora_rpo_starts_at_the_full_loss_with_one_copy_of_the_unet(
    tmp_path):
  """B = 0: the adapted U-Net is the base, and the base is that same U-Net."""
  losses, trees = {}, {}
  for variant in ("tiny", "tiny,lora"):
    method, params, frozen = helpers.build(
        rpo, _config(variant), tmp_path, load_stable_diffusion("tiny"))
    losses[variant], _ = jax.jit(method.loss_fn)(
        params, frozen, method.batch(0), jax.random.key(0))
    trees[variant] = (params, frozen)
  np.testing.assert_allclose(losses["tiny,lora"], losses["tiny"], rtol=1e-6)
  full_params, full_frozen = trees["tiny"]
  assert set(full_frozen["modules"]) == {"base_unet"}
  params, frozen = trees["tiny,lora"]
  assert set(params) == set(frozen["modules"]) == {"unet"}
  names = lambda state: {checkpoint_lib.torch_key(path)
                         for path, _ in nnx.to_flat_state(state)}
  adapters, base = names(params["unet"]), names(frozen["modules"]["unet"])
  assert adapters and all(".lora_" in n for n in adapters)
  # Every base weight exactly once, all of them frozen: no second U-Net.
  assert base == names(full_params["unet"])
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))
  assert size(frozen["modules"]) == size(full_params["unet"])


# ------------------------------------------------------- tiny run via the CLI

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """The paper's recipe (``configs/rpo_paper.py:tiny``: a tiny ALIGN reward,
  the instance prompt in L_pre, validation on the training prompts) through
  ``main``, evaluated every 2 steps, patience 2, as online RPO (negatives
  redrawn every 3 steps; early stopping ends it at step 6 or later)."""
  workdir = tmp_path_factory.mktemp("rpo") / "run"
  env = xla_env.env()
  proc = subprocess.run(
      [sys.executable, "-m", "personalize_jax.main",
       f"--config={PAPER_RECIPE}:tiny", f"--workdir={workdir}",
       "--config.eval_every_steps=2", "--config.checkpoint_every_steps=2",
       "--config.keep_checkpoints=10", "--config.early_stopping_patience=2",
       "--config.rpo.online_every_steps=3"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in
          (workdir / "metrics.jsonl").read_text().splitlines()]
  return workdir, proc.stdout, rows


def test_cli_run_writes_negatives_metrics_and_export(cli_run):
  workdir, stdout, rows = cli_run
  names = sorted(p.name for p in (workdir / "generated_images").glob("*.png"))
  assert names == ["00_00.png", "00_01.png", "01_00.png", "01_01.png"]
  cache = [p.name for p in (workdir / "cache").iterdir()]
  assert any(n.startswith("generated_latents_") for n in cache)
  assert any(n.startswith("rpo_rewards_") for n in cache)
  keys = set().union(*rows)
  assert {"loss/sim", "loss/pref", "pref/implicit_acc", "pref/reward_margin",
          "val/harmonic", "val/align_i", "val/align_t"} <= keys
  assert all(np.isfinite(v) for r in rows for v in r.values())
  # The U-Net alone is in the optimizer, and it moves.
  logged = [r for r in rows if "loss" in r]
  assert logged and all(
      {k for k in r if k.startswith("update_norm/")} == {"update_norm/unet"}
      and r["update_norm/unet"] > 0 for r in logged)
  assert (workdir / "export" / "unet").is_dir()
  assert "trained" in stdout
  config = json.loads((workdir / "config.json").read_text())
  assert config["rpo"]["reward_model"] == "align-tiny"
  assert config["rpo"]["ref_prompt"] == "instance"
  assert config["rpo"]["val_on_training_prompts"]
  # Online: the policy of step 3 redrew the 4 negatives, and it was logged.
  redrawn = sorted(p.name for p in rpo.online_folder(workdir, 3).glob("*.png"))
  assert redrawn == names
  assert [r["step"] for r in rows if "online/reward_gen" in r][:1] == [3]


def _stop_step(evals: list[tuple[int, float]], patience: int):
  best, since = -np.inf, 0
  for step, value in evals:
    best, since = (value, 0) if value > best else (best, since + 1)
    if since >= patience:
      return step
  return None


def _unet_weights(tree) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(k.key) for k in path if k.key != "value"):
          np.asarray(leaf) for path, leaf in flat}


def test_early_stopping_and_the_export_follow_val_harmonic(cli_run):
  workdir, stdout, rows = cli_run
  evals = [(r["step"], r["val/harmonic"]) for r in rows
           if "val/harmonic" in r]
  stop = _stop_step(evals, patience=2)
  assert stop is not None and stop < 20, evals
  assert evals[-1][0] == stop and f"trained {stop} steps" in stdout
  best_step = max(evals, key=lambda e: e[1])[0]
  best = json.loads((workdir / "best.json").read_text())
  assert best["step"] == best_step
  assert best["val/harmonic"] == pytest.approx(dict(evals)[best_step])
  exported = _unet_weights(nnx.to_pure_dict(nnx.state(
      UNet2DConditionModel.from_pretrained(workdir / "export", "unet"))))

  def checkpoint(step):
    raw = ocp.StandardCheckpointer().restore(
        workdir / "checkpoints" / str(step) / "state")
    return _unet_weights(raw["params"]["unet"])

  at_best, at_stop = checkpoint(best_step), checkpoint(stop)
  assert exported.keys() == at_best.keys()
  assert all(np.array_equal(exported[k], at_best[k]) for k in exported)
  assert not all(np.array_equal(exported[k], at_stop[k]) for k in exported)


# ------------------------------------------------------------- online RPO

def _online_config():
  """4 steps of the tiny recipe, negatives redrawn at step 2, a checkpoint
  after every step."""
  c = _config("tiny")
  c.num_steps = 4
  c.rpo.online_every_steps = 2
  c.checkpoint_every_steps = 1
  c.keep_checkpoints = 10
  c.log_every_steps = 1
  c.eval_every_steps = 1000  # only after the last step.
  c.final_eval.enabled = False
  return c


def _params_at(workdir: Path, step: int) -> dict:
  raw = ocp.StandardCheckpointer().restore(
      workdir / "checkpoints" / str(step) / "state")
  return _unet_weights(raw["params"]["unet"])


def _pngs(folder: Path) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def online_runs(tmp_path_factory):
  """An online run, and two copies of it resumed from step 3 (past the
  refresh at step 2: its negatives come from the workdir) and from step 2
  with the refresh's negatives deleted (the restored policy redraws them)."""
  from personalize_jax.engine import train  # pylint: disable=g-import-not-at-top
  tmp = tmp_path_factory.mktemp("online")
  whole = tmp / "whole"
  summaries = {"whole": train.train_and_evaluate(_online_config(), whole, rpo)}
  for name, keep, drop_negatives in (("from_3", 3, False),
                                     ("from_2", 2, True)):
    copy = tmp / name
    shutil.copytree(whole, copy)
    for folder in (copy / "checkpoints").iterdir():
      if folder.name.isdigit() and int(folder.name) > keep:
        shutil.rmtree(folder)
    shutil.rmtree(copy / "export")
    if drop_negatives:
      shutil.rmtree(rpo.online_folder(copy, 2))
    summaries[name] = train.train_and_evaluate(_online_config(), copy, rpo)
  return tmp, summaries


def test_online_refresh_redraws_and_rescores_the_negatives(online_runs):
  tmp, _ = online_runs
  whole = tmp / "whole"
  base = _pngs(whole / "generated_images")
  online = _pngs(rpo.online_folder(whole, 2))
  # The same files, drawn by the policy of step 2 from other noise.
  assert online.keys() == base.keys() and len(base) == 4
  assert all(online[k] != base[k] for k in base)
  assert not rpo.online_folder(whole, 4).exists()  # 4 is the last step.
  rewards_files = sorted((whole / "cache").glob("rpo_rewards_*.npz"))
  assert len(rewards_files) == 2
  gen = [np.load(f)["gen"] for f in rewards_files]
  assert gen[0].shape == gen[1].shape == (4,)
  assert not np.allclose(gen[0], gen[1])
  rows = [json.loads(line) for line in
          (whole / "metrics.jsonl").read_text().splitlines()]
  refreshed = [r for r in rows if "online/reward_gen" in r]
  assert [r["step"] for r in refreshed] == [2]
  # The logged mean is that of the new rewards (one of the two files).
  means = [float(np.mean(g)) for g in gen]
  logged = refreshed[0]["online/reward_gen"]
  assert sum(m == pytest.approx(logged, rel=1e-6) for m in means) == 1
  assert 0.0 < refreshed[0]["online/p_ref"] < 1.0


def test_online_run_resumed_before_or_after_a_refresh_is_bit_identical(
    online_runs):
  tmp, summaries = online_runs
  whole = _params_at(tmp / "whole", 4)
  assert not all(np.array_equal(whole[k], v)
                 for k, v in _params_at(tmp / "whole", 2).items())
  for name in ("from_3", "from_2"):
    assert summaries[name].steps == 4
    resumed = _params_at(tmp / name, 4)
    assert resumed.keys() == whole.keys()
    assert all(np.array_equal(resumed[k], whole[k]) for k in whole), name
  # Redrawn from the restored step-2 policy: the same images, byte for byte.
  assert (_pngs(rpo.online_folder(tmp / "from_2", 2))
          == _pngs(rpo.online_folder(tmp / "whole", 2)))


def test_online_every_steps_is_checked():
  c = _config("tiny")
  for bad in (-1, 20, 25):
    c.rpo.online_every_steps = bad
    with pytest.raises(UserError, match="config.rpo.online_every_steps="):
      rpo.validate(c)
  c.rpo.online_every_steps = 19
  rpo.validate(c)
