"""Tests for the train state and the shared jitted train step.

The step tests run on the devices of the test process (one CPU device unless
``XLA_FLAGS`` says otherwise) with a quadratic loss of dyadic numbers, so the
expected parameters are computed by hand and compared bit for bit. Layouts on
an 8-device FSDP mesh are checked in a child process, as the device count is
fixed once JAX has started.
"""

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P
import ml_collections

from personalize_jax.engine import checkpoints, ema as ema_lib, optim, sharding
from personalize_jax.engine import state as state_lib

REPO = Path(__file__).resolve().parents[2]
SEED = 3
W0 = np.array([1.0, -2.0, 0.5, 4.0], np.float32)
B0 = np.array([0.25, -0.75], np.float32)
SCALE = 2.0
SHIFT = np.array([1.0, 0.5, -0.25, 2.0], np.float32)
# Eight rows, so the batch splits over 1, 2, 4 or 8 devices; the mean of the
# rows is W0 - SHIFT, so the first gradient is SCALE * SHIFT.
X = np.stack([W0 - SHIFT + d for d in (0.5, -0.5, 1, -1, 2, -2, 0, 0)])


def _quadratic(params, frozen, batch, rng):
  """``scale / 2 * mean_b |w - x_b|^2 + |b|^2``, and a draw from ``rng``."""
  w, b = params["unet"]["w"][...], params["unet"]["b"][...]
  fit = 0.5 * jnp.mean(jnp.sum((w - batch["x"]) ** 2, axis=1))
  loss = frozen["scale"] * fit + jnp.sum(b ** 2)
  return loss, {"draw": jax.random.uniform(rng)}


def _expected_grad(w):
  """The gradient of ``_quadratic`` for ``w`` (``b`` is frozen)."""
  return SCALE * (w - X.mean(axis=0))


def _build(nan_policy="stop", post_update=None, debug_nan_at_step=0,
           accumulation_steps=1, ema_decay=None, loss_fn=_quadratic):
  """The toy problem's parameters, optimizer, frozen values and jitted step.

  ``w`` trains with SGD (rate 0.5, momentum 0.5: a state worth keeping);
  ``b`` is frozen. The reported learning rate is ``0.5 + 0.25 * step``.
  A step donates its state's arrays, the parameters returned among them:
  step one state made from them (``_problem`` caches one per configuration).
  """
  mesh = sharding.create_mesh()
  params = {"unet": nnx.State({"w": nnx.Param(jnp.asarray(W0)),
                               "b": nnx.Param(jnp.asarray(B0))})}
  labels = optim.trainable_labels(params, [r"^unet\.w$"])
  tx = optax.multi_transform({optim.TRAIN: optax.sgd(0.5, momentum=0.5),
                              optim.FREEZE: optax.set_to_zero()}, labels)
  frozen = jax.device_put({"scale": jnp.float32(SCALE)},
                          sharding.replicated(mesh))
  state = state_lib.create_train_state(params, tx, SEED, mesh,
                                       ema=ema_decay is not None)
  step = state_lib.make_train_step(
      loss_fn, tx, lambda count: 0.5 + 0.25 * count, labels,
      nan_policy=nan_policy, state_shardings=state_lib.shardings_of(state),
      frozen_shardings=state_lib.shardings_of(frozen), mesh=mesh,
      post_update=post_update, debug_nan_at_step=debug_nan_at_step,
      accumulation_steps=accumulation_steps, ema_decay=ema_decay)
  return params, tx, frozen, step, mesh


# The tests of one configuration share its compiled step.
_problem = functools.cache(_build)


def _setup(build=_problem, **kwargs):
  """A fresh initial state with the frozen values and step of ``build``."""
  params, tx, frozen, step, mesh = build(**kwargs)
  state = state_lib.create_train_state(
      params, tx, SEED, mesh, ema=kwargs.get("ema_decay") is not None)
  return state, frozen, step, mesh


def _halve_and_add_step(params, step):
  return jax.tree.map(lambda p: 0.5 * p + step, params)


def _run(steps, *, batches=None, **kwargs):
  """Host copies of the state before and after each step, and the metrics."""
  state, frozen, step, mesh = _setup(**kwargs)
  return _steps(state, frozen, step, mesh, steps, batches)


def _steps(state, frozen, step, mesh, steps, batches=None):
  """``_run`` from a given state."""
  states, metrics = [jax.device_get(state)], []
  for i in range(steps):
    x = X if batches is None else batches[i]
    # The step donates the state: keep host copies, not the arrays.
    state, m = step(state, frozen, state_lib.shard_batch({"x": x}, mesh))
    states.append(jax.device_get(state))
    metrics.append(jax.device_get(m))
  return states, metrics


@pytest.fixture(scope="module")
def clean():
  """Three finite steps under ``nan_policy="stop"``."""
  return _run(3)


def _w(state):
  return np.asarray(state.params["unet"]["w"][...])


def _b(state):
  return np.asarray(state.params["unet"]["b"][...])


def _key_data(x):
  """A PRNG key's raw bits; other arrays as they are."""
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    return jax.random.key_data(x)
  return x


def _assert_same(a, b):
  """Two host pytrees are equal bit for bit (keys compared by their data)."""
  a, b = (jax.tree.map(_key_data, t) for t in (a, b))
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


# ------------------------------------------------------------------ state


def test_create_train_state_starts_at_step_zero_with_the_seed_key():
  state, _, _, _ = _setup()
  assert state.step.dtype == jnp.int32 and int(state.step) == 0
  np.testing.assert_array_equal(jax.random.key_data(state.rng),
                                jax.random.key_data(jax.random.key(SEED)))
  np.testing.assert_array_equal(_w(state), W0)
  np.testing.assert_array_equal(_b(state), B0)


def test_place_params_casts_floating_leaves_only():
  mesh = sharding.create_mesh()
  placed = state_lib.place_params(
      {"f": jnp.ones(4, jnp.float32), "i": jnp.arange(4)}, mesh, jnp.bfloat16)
  assert placed["f"].dtype == jnp.bfloat16
  assert placed["i"].dtype == jnp.arange(4).dtype


def test_opt_state_shardings_follow_each_moments_own_parameter():
  # Two parameters of one shape laid out differently: each moment must take
  # the layout of the parameter at the end of its own path.
  mesh = AbstractMesh((2, 4), (sharding.DATA, sharding.FSDP))
  on = lambda *spec: NamedSharding(mesh, P(*spec))
  params = {"a": {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32,
                                            sharding=on(None, "fsdp"))},
            "b": {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32,
                                            sharding=on("fsdp", None))}}
  tx = optax.adamw(1e-3)
  layouts = state_lib.opt_state_shardings(jax.eval_shape(tx.init, params),
                                          params, mesh)
  specs = {jax.tree_util.keystr(path): s.spec for path, s
           in jax.tree_util.tree_leaves_with_path(layouts)}
  assert specs == {
      "[0].count": P(),
      "[0].mu['a']['w']": P(None, "fsdp"), "[0].nu['a']['w']": P(None, "fsdp"),
      "[0].mu['b']['w']": P("fsdp", None), "[0].nu['b']['w']": P("fsdp", None),
  }


def test_abstract_of_and_shardings_of_round_trip():
  state, _, _, _ = _setup()
  abstract = state_lib.abstract_of(state)
  for leaf, target in zip(jax.tree.leaves(state), jax.tree.leaves(abstract)):
    assert isinstance(target, jax.ShapeDtypeStruct)
    assert (target.shape, target.dtype, target.sharding) == (
        leaf.shape, leaf.dtype, leaf.sharding)
  assert state_lib.shardings_of(abstract) == state_lib.shardings_of(state)
  # Arrays made to the abstract description describe themselves the same way.
  made = jax.jit(lambda: jax.tree.map(
      lambda a: jax.random.key(0) if jax.dtypes.issubdtype(
          a.dtype, jax.dtypes.prng_key) else jnp.zeros(a.shape, a.dtype),
      abstract), out_shardings=state_lib.shardings_of(abstract))()
  assert state_lib.abstract_of(made) == abstract


# ------------------------------------------------------------------- step


def test_one_step_is_the_hand_computed_sgd_update(clean):
  states, metrics = clean
  g = _expected_grad(W0)
  # SGD with momentum: the first trace is the gradient itself.
  np.testing.assert_array_equal(_w(states[1]), W0 - 0.5 * g)
  np.testing.assert_array_equal(_b(states[1]), B0)  # frozen: no update.
  fit = 0.5 * np.mean(np.sum((W0 - X) ** 2, axis=1))
  assert float(metrics[0]["loss"]) == SCALE * fit + np.sum(B0 ** 2)
  # The frozen leaf's gradient (2 b) is left out of the norm.
  assert float(metrics[0]["grad_norm"]) == pytest.approx(
      np.linalg.norm(g), rel=1e-6)
  assert float(metrics[0]["learning_rate"]) == 0.5
  assert bool(metrics[0]["finite"])


def test_steps_count_up_and_each_draws_from_fold_in_of_its_step(clean):
  states, metrics = clean
  assert [int(s.step) for s in states] == [0, 1, 2, 3]
  assert [float(m["learning_rate"]) for m in metrics] == [0.5, 0.75, 1.0]
  key = jax.random.key(SEED)
  draws = [float(m["draw"]) for m in metrics]
  assert draws == [float(jax.random.uniform(jax.random.fold_in(key, k)))
                   for k in range(3)]
  assert len(set(draws)) == 3
  # The base key stays: a resumed run draws what an uninterrupted one would.
  _assert_same(states[-1].rng, key)
  # Momentum carries over: the second step moves by 0.5 (g2 + 0.5 g1).
  g1 = _expected_grad(W0)
  w1 = W0 - 0.5 * g1
  np.testing.assert_array_equal(_w(states[2]),
                                w1 - 0.5 * (_expected_grad(w1) + 0.5 * g1))


def test_post_update_follows_the_optimizer_and_sees_the_step():
  states, _ = _run(2, post_update=_halve_and_add_step)
  np.testing.assert_array_equal(_w(states[1]),
                                0.5 * (W0 - 0.5 * _expected_grad(W0)))
  # b has no optimizer update: halved then raised by the step (0, then 1).
  np.testing.assert_array_equal(_b(states[1]), 0.5 * B0)
  np.testing.assert_array_equal(_b(states[2]), 0.25 * B0 + 1)


def test_skip_keeps_params_and_opt_state_bit_identical_on_nan():
  poisoned = X.copy()
  poisoned[3, 1] = np.nan
  states, metrics = _run(2, batches=[X, poisoned], nan_policy="skip")
  assert [bool(m["finite"]) for m in metrics] == [True, False]
  assert np.isnan(metrics[1]["loss"])
  _assert_same((states[2].params, states[2].opt_state),
               (states[1].params, states[1].opt_state))
  assert int(states[2].step) == 2


def test_stop_applies_the_nan_update_and_reports_it():
  poisoned = X.copy()
  poisoned[3, 1] = np.nan
  states, metrics = _run(2, batches=[X, poisoned], nan_policy="stop")
  assert [bool(m["finite"]) for m in metrics] == [True, False]
  assert np.isnan(metrics[1]["grad_norm"])
  # Only the poisoned column's weight had a NaN gradient.
  assert np.isnan(_w(states[2])).tolist() == [False, True, False, False]
  np.testing.assert_array_equal(_b(states[2]), B0)  # frozen stays finite.


def test_debug_nan_at_step_poisons_exactly_that_step(clean):
  clean_states, clean_metrics = clean
  states, metrics = _run(3, nan_policy="skip", debug_nan_at_step=2)
  assert [bool(m["finite"]) for m in metrics] == [True, False, True]
  assert [np.isnan(m["loss"]) for m in metrics] == [False, True, False]
  # Step 1 is bit-identical to a run without the hook (on finite steps the
  # policies agree); step 2 is skipped, so step 3 redoes the clean step 2.
  assert float(metrics[0]["loss"]) == float(clean_metrics[0]["loss"])
  _assert_same(states[1].params, clean_states[1].params)
  _assert_same(states[2].params, clean_states[1].params)
  _assert_same((states[3].params, states[3].opt_state),
               (clean_states[2].params, clean_states[2].opt_state))


# ---------------------------------------- accumulation and moving average


def test_micro_batches_take_every_kth_row_and_its_index():
  mesh = sharding.create_mesh()
  x = np.arange(16, dtype=np.float32).reshape(8, 2)
  micro = jax.jit(lambda b: state_lib.micro_batches(b, 2, mesh))({"x": x})
  np.testing.assert_array_equal(micro[state_lib.ROW],
                                [[0, 2, 4, 6], [1, 3, 5, 7]])
  np.testing.assert_array_equal(micro["x"], [x[0::2], x[1::2]])


@pytest.mark.parametrize("k", [2, 4, 8])
def test_accumulated_micro_batches_give_the_update_of_the_whole_batch(
    clean, k):
  seen = []

  def recording(params, frozen, batch, rng):
    seen.append((batch["x"].shape, batch[state_lib.ROW].shape))
    return _quadratic(params, frozen, batch, rng)

  states, metrics = _run(3, build=_build, accumulation_steps=k,
                         loss_fn=recording)
  clean_states, clean_metrics = clean
  # Traced once, inside the scan over micro-batches of 8 / k rows.
  assert set(seen) == {((8 // k, 4), (8 // k,))}
  for got, want in zip(states[1:], clean_states[1:]):
    np.testing.assert_allclose(_w(got), _w(want), rtol=1e-6)
    np.testing.assert_array_equal(_b(got), B0)
  for got, want in zip(metrics, clean_metrics):
    for key in ("loss", "grad_norm", "draw", "learning_rate"):
      assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-6)


def _ema_config(warmup, decay=0.75):
  return ml_collections.ConfigDict(
      {"ema": {"decay": decay, "warmup": warmup, "power": 2 / 3}})


def _numpy_decay(warmup, decay, count):
  """diffusers' ``EMAModel.get_decay(count)`` (inv_gamma 1, power 2/3)."""
  if warmup == "none":
    return decay
  step = count - 1
  if step <= 0:
    return 0.0
  value = ((1 + step) / (10 + step) if warmup == "diffusers"
           else 1 - (1 + step) ** (-2 / 3))
  return min(value, decay)


@pytest.mark.parametrize("warmup", ema_lib.WARMUPS)
def test_ema_after_n_steps_is_the_numpy_recurrence_over_the_params(warmup):
  states, metrics = _run(
      4, build=_build, ema_decay=ema_lib.decay_schedule(_ema_config(warmup)))
  np.testing.assert_array_equal(states[0].ema["unet"]["w"][...], W0)
  average = W0.astype(np.float64)
  for count in range(1, 5):
    decay = _numpy_decay(warmup, 0.75, count)
    assert float(metrics[count - 1]["ema_decay"]) == pytest.approx(decay)
    average = average - (1 - decay) * (average - _w(states[count]))
    # float32 round-off of weights up to 2.5 in size, near-zero ones too.
    np.testing.assert_allclose(states[count].ema["unet"]["w"][...], average,
                               rtol=1e-6, atol=4 * np.spacing(np.float32(2.5)))
    # The frozen leaf never moves, nor does its average.
    np.testing.assert_array_equal(states[count].ema["unet"]["b"][...], B0)
  # Averaged, not followed: the average lags the trained weights.
  assert not np.allclose(states[-1].ema["unet"]["w"][...], _w(states[-1]))


@pytest.mark.parametrize("warmup, use_ema_warmup", [("diffusers", False),
                                                    ("power", True)])
def test_ema_decay_is_diffusers_ema_model_get_decay(warmup, use_ema_warmup):
  import torch  # pylint: disable=g-import-not-at-top
  from diffusers.training_utils import EMAModel  # pylint: disable=g-import-not-at-top
  reference = EMAModel([torch.nn.Parameter(torch.zeros(2))], decay=0.999,
                       use_ema_warmup=use_ema_warmup, power=2 / 3)
  decay = ema_lib.decay_schedule(_ema_config(warmup, 0.999))
  for count in (1, 2, 3, 10, 100, 5000):
    assert float(decay(count)) == pytest.approx(reference.get_decay(count),
                                                rel=1e-6, abs=1e-7)


def test_ema_off_leaves_no_average_in_the_state(clean):
  clean_states, _ = clean
  assert clean_states[-1].ema is None
  assert ema_lib.decay_schedule(_ema_config("diffusers", 0.0)) is None


def test_ema_is_kept_with_the_params_when_a_step_is_skipped():
  poisoned = X.copy()
  poisoned[0, 0] = np.nan
  states, metrics = _run(2, batches=[X, poisoned], build=_build,
                         nan_policy="skip",
                         ema_decay=ema_lib.decay_schedule(_ema_config("none")))
  assert not bool(metrics[1]["finite"])
  _assert_same(states[2].ema, states[1].ema)


def test_ema_is_checkpointed_and_resumes_exactly(tmp_path):
  decay = ema_lib.decay_schedule(_ema_config("diffusers"))
  straight, _ = _run(4, build=_build, ema_decay=decay)
  state, frozen, step, mesh = _setup(build=_build, ema_decay=decay)
  for _ in range(2):
    state, _ = step(state, frozen, state_lib.shard_batch({"x": X}, mesh))
  with checkpoints.CheckpointManager(tmp_path) as manager:
    manager.save(2, state, {"step": 2})
    manager.wait()
    state, _ = manager.restore(2, state_lib.abstract_of(state))
  assert state_lib.shardings_of(state.ema) == state_lib.shardings_of(
      state.params)
  resumed, _ = _steps(state, frozen, step, mesh, 2)
  _assert_same(resumed[-1], straight[-1])


# --------------------------------------------------------- 8-device FSDP

_EIGHT_DEVICES = textwrap.dedent(r"""
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from flax import nnx
    from personalize_jax.engine import config as config_lib, optim, sharding
    from personalize_jax.engine import state as state_lib

    def param(shape, axes):
      value = np.linspace(-1, 1, int(np.prod(shape)), dtype=np.float32)
      return nnx.Param(jnp.asarray(value.reshape(shape)), out_sharding=axes,
                       eager_sharding=False)

    mesh = sharding.create_mesh(2, 4)
    params = {"unet": nnx.State({
        "proj": {"kernel": param((8, 16), ("embed", "mlp")),
                 "bias": param((16,), ("mlp",))},
        "out": {"kernel": param((12, 6), ("embed", "mlp"))},
        "norm": {"scale": param((6,), ("norm",))}})}
    config = config_lib.base_config()
    config.learning_rate = 0.1
    config.trainable = [r"^unet\.(proj|out)\."]
    tx, schedule, labels = optim.make_optimizer(config, params)
    state = state_lib.create_train_state(params, tx, 0, mesh)

    def loss_fn(params, frozen, batch, rng):
      p = params["unet"]
      h = batch["x"] @ p["proj"]["kernel"][...] + p["proj"]["bias"][...]
      loss = (jnp.mean(h ** 2) + jnp.sum(p["out"]["kernel"][...] ** 2)
              + jnp.sum(p["norm"]["scale"][...] ** 2))
      return loss, {}

    def specs(tree):
      return {jax.tree_util.keystr(path): str(tuple(x.sharding.spec))
              for path, x in jax.tree_util.tree_leaves_with_path(tree)}

    ema_state = state_lib.create_train_state(params, tx, 0, mesh, ema=True)
    result = {"devices": jax.device_count(), "params": specs(state.params),
              "ema": specs(ema_state.ema),
              "opt": specs(state.opt_state),
              "scalars": specs((state.step, state.rng)),
              "abstract": specs(state_lib.abstract_of(state)) == specs(state)}
    host_params = jax.device_get(state.params)
    batch_x = np.linspace(-2, 2, 8 * 8, dtype=np.float32).reshape(8, 8)
    step = state_lib.make_train_step(
        loss_fn, tx, schedule, labels, nan_policy="stop",
        state_shardings=state_lib.shardings_of(state), frozen_shardings={},
        mesh=mesh)
    batch = state_lib.shard_batch({"x": batch_x}, mesh)
    result["batch"] = str(tuple(batch["x"].sharding.spec))
    state, metrics = step(state, {}, batch)
    result["params_after"] = specs(state.params)
    result["opt_after"] = specs(state.opt_state)
    # The same update on one device, unsharded.
    @jax.jit
    def reference(params):
      grads = jax.grad(lambda p: loss_fn(p, None, {"x": batch_x}, None)[0])(
          params)
      updates, _ = tx.update(grads, tx.init(params), params)
      return optax.apply_updates(params, updates)

    expected = reference(jax.device_put(host_params, jax.devices()[0]))
    def by_path(tree):
      return {jax.tree_util.keystr(path): np.asarray(x) for path, x
              in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}

    before, after, want = map(by_path, (host_params, state.params, expected))
    result["max_diff"] = max(float(np.max(np.abs(after[k] - want[k])))
                             for k in want)
    result["moved"] = {k: bool(np.any(after[k] != before[k])) for k in before}
    result["finite"] = bool(metrics["finite"])
    print("RESULT", json.dumps(result))
""")


@pytest.fixture(scope="module")
def eight_devices():
  """What the child process saw on a data=2 x fsdp=4 mesh of CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES], env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=300,
                       check=False)
  lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, out.stderr[-3000:]
  result = json.loads(lines[-1][len("RESULT "):])
  assert result["devices"] == 8
  return result


FSDP_SPECS = {  # the layout rules: mlp first, else embed, else replicated.
    "['unet']['proj']['kernel'].value": "(None, 'fsdp')",
    "['unet']['proj']['bias'].value": "('fsdp',)",
    "['unet']['out']['kernel'].value": "('fsdp', None)",
    "['unet']['norm']['scale'].value": "(None,)",
}


def test_create_train_state_places_params_by_logical_axes(eight_devices):
  assert eight_devices["params"] == FSDP_SPECS
  assert eight_devices["scalars"] == {"[0]": "()", "[1]": "()"}
  assert eight_devices["abstract"]


def test_moments_are_sharded_like_their_params(eight_devices):
  opt = eight_devices["opt"]
  moments = {}
  for path, spec in opt.items():
    param = next((p for p in FSDP_SPECS if path.endswith(p)), None)
    if param is None:
      assert spec == "()", path  # step counts are replicated.
    else:
      assert spec == FSDP_SPECS[param], path
      moments[param] = moments.get(param, 0) + 1
  # mu and nu of the three trainable leaves; the frozen norm has none.
  assert moments == {p: 2 for p in FSDP_SPECS if "norm" not in p}


def test_fsdp_step_matches_one_device_and_keeps_the_layout(eight_devices):
  assert eight_devices["batch"] == "(('data', 'fsdp'),)"
  assert eight_devices["finite"]
  assert eight_devices["params_after"] == eight_devices["params"]
  assert eight_devices["opt_after"] == eight_devices["opt"]
  assert eight_devices["max_diff"] < 1e-6
  assert eight_devices["moved"] == {p: "norm" not in p for p in FSDP_SPECS}


def test_the_moving_average_is_sharded_like_its_params(eight_devices):
  assert eight_devices["ema"] == FSDP_SPECS
