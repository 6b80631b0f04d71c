"""Tests for the optimizer: schedule, trainable labels, masks, extra optimizers.

Parameters are tiny hand-made ``nnx.State`` trees of ``nnx.Param`` (what
``nnx.split`` gives the engine), so every expected value is computed by hand.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from personalize_jax.engine import config as config_lib
from personalize_jax.engine import optim

import recipes

LR = 1e-3


def _config(**overrides):
  """The base config with a round learning rate and dotted-key ``overrides``."""
  config = config_lib.base_config()
  config.learning_rate = LR
  return recipes.override(config, overrides)


def _state(tree):
  """An ``nnx.State`` of float32 ``nnx.Param`` leaves from nested dicts."""

  def convert(node):
    if isinstance(node, dict):
      return {k: convert(v) for k, v in node.items()}
    return nnx.Param(jnp.asarray(node, jnp.float32))

  return nnx.State(convert(tree))


def _params():
  """Two components; leaf names map as nnx paths do to PyTorch keys."""
  return {
      "unet": _state({
          "down": {"kernel": np.arange(6.0).reshape(2, 3) - 2.5,
                   "bias": np.array([0.5, -1.5, 2.0])},
          "up": {"kernel": np.full((3, 2), 0.75)},
      }),
      "text_encoder": _state({
          "emb": {"embedding": np.arange(12.0).reshape(4, 3) / 4 + 1},
      }),
  }


def _by_name(tree, params):
  """``{component.torch.key: leaf}`` of a tree shaped like ``params``."""
  return dict(zip(jax.tree.leaves(optim.param_names(params)),
                  jax.tree.leaves(tree)))


def _run(tx, params, loss_fn, steps):
  """``steps`` optimizer updates on the gradients of ``loss_fn``."""
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  for _ in range(steps):
    params, opt_state = step(params, opt_state)
  return params, opt_state


def _sum_of_squares(params):
  return sum(jnp.sum(x ** 2) for x in jax.tree.leaves(params))


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize("step, expected", [
    (0, 0.0), (1, LR / 10), (5, LR / 2), (9, 9 * LR / 10), (10, LR),
    (60, LR), (10_000, LR)])
def test_linear_warmup_then_constant(step, expected):
  schedule = optim.learning_rate_schedule(_config(**{
      "optimizer.warmup_steps": 10, "optimizer.schedule": "constant"}))
  assert float(schedule(step)) == pytest.approx(expected, rel=1e-6, abs=0)


@pytest.mark.parametrize("step", [10, 35, 60, 85, 110, 200])
def test_cosine_after_warmup_follows_the_closed_form(step):
  # 100 decay steps after 10 of warmup: half of the peak at step 60, zero at
  # the end (num_steps) and after it.
  schedule = optim.learning_rate_schedule(_config(**{
      "num_steps": 110, "optimizer.warmup_steps": 10,
      "optimizer.schedule": "cosine"}))
  progress = min((step - 10) / 100, 1.0)
  expected = LR * 0.5 * (1 + math.cos(math.pi * progress))
  assert float(schedule(step)) == pytest.approx(expected, rel=1e-6, abs=1e-12)
  if step == 60:
    assert float(schedule(step)) == pytest.approx(LR / 2, rel=1e-6)


def test_without_warmup_the_first_step_has_the_peak_rate():
  constant = optim.learning_rate_schedule(_config())
  cosine = optim.learning_rate_schedule(_config(**{
      "num_steps": 4, "optimizer.schedule": "cosine"}))
  assert float(constant(0)) == pytest.approx(LR, rel=1e-6)
  assert float(cosine(0)) == pytest.approx(LR, rel=1e-6)
  assert float(cosine(2)) == pytest.approx(LR / 2, rel=1e-6)


def test_unknown_schedule_is_refused():
  with pytest.raises(ValueError, match="optimizer.schedule='exponential'"):
    optim.learning_rate_schedule(_config(**{
        "optimizer.schedule": "exponential"}))


@pytest.mark.parametrize("schedule, power", [
    ("linear", 1.0), ("polynomial", 1.0), ("polynomial", 2.0),
    ("polynomial", 0.5)])
@pytest.mark.parametrize("step", [0, 5, 10, 35, 60, 109, 110, 200])
def test_decays_to_zero_after_warmup_follow_their_closed_forms(
    schedule, power, step):
  # diffusers' get_scheduler: linear warmup over 10 steps, then
  # lr * (1 - progress) ** power over the 100 remaining steps (linear: 1).
  rate = optim.learning_rate_schedule(_config(**{
      "num_steps": 110, "optimizer.warmup_steps": 10,
      "optimizer.schedule": schedule, "optimizer.power": power}))
  if step < 10:
    expected = LR * step / 10
  else:
    expected = LR * (1 - min((step - 10) / 100, 1.0)) ** power
  assert float(rate(step)) == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_schedules_differ_where_they_say():
  rates = {name: float(optim.learning_rate_schedule(_config(**{
      "num_steps": 4, "optimizer.schedule": name, "optimizer.power": 2.0}))(2))
           for name in optim.SCHEDULES}
  assert rates == pytest.approx({"constant": LR, "linear": LR / 2,
                                 "cosine": LR / 2, "polynomial": LR / 4},
                                rel=1e-6)


# ------------------------------------------------------------------ labels


def test_param_names_are_component_and_torch_keys():
  class Tiny(nnx.Module):

    def __init__(self):
      self.blocks = nnx.List([nnx.Linear(2, 3, rngs=nnx.Rngs(0)),
                              nnx.LayerNorm(3, rngs=nnx.Rngs(0))])
      self.tok = nnx.Embed(4, 3, rngs=nnx.Rngs(0))

  _, state = nnx.split(Tiny())
  # nnx's kernel / scale / embedding are PyTorch's weight; list items are
  # indices; the Variable's ``value`` attribute is not part of the name.
  assert sorted(jax.tree.leaves(optim.param_names({"te": state}))) == [
      "te.blocks.0.bias", "te.blocks.0.weight", "te.blocks.1.bias",
      "te.blocks.1.weight", "te.tok.weight"]


def test_labels_search_names_and_extra_groups_come_first():
  params = _params()
  extra = {"critic": [r"\.up\.", r"down\.bias"]}
  labels = _by_name(optim.trainable_labels(
      params, [r"^unet\.down\.", "emb"], extra), params)
  assert labels == {
      "unet.down.bias": "critic",  # an extra group wins over "train".
      "unet.down.weight": optim.TRAIN,
      "unet.up.weight": "critic",
      "text_encoder.emb.weight": optim.TRAIN,  # search, not match.
  }
  assert set(_by_name(optim.trainable_labels(params, [r"^vae\."]),
                      params).values()) == {optim.FREEZE}


# --------------------------------------------------------------- masking


def _train_down_only(**overrides):
  """3 steps training ``unet.down`` alone; checks that only it moves.

  Returns the optimizer state.
  """
  params = _params()
  config = _config(trainable=[r"^unet\.down\."], **{
      "optimizer.weight_decay": 0.5, **overrides})
  tx, _, _ = optim.make_optimizer(config, params)
  new, opt_state = _run(tx, params, _sum_of_squares, steps=3)
  before, after = _by_name(params, params), _by_name(new, params)
  for name in ("unet.up.weight", "text_encoder.emb.weight"):
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  for name in ("unet.down.weight", "unet.down.bias"):
    # Both the gradient and the weight decay move every element.
    assert np.all(after[name] != before[name]), name
  # The loss falls: a working optimizer, not only a mover.
  assert _sum_of_squares(new) < _sum_of_squares(params)
  return opt_state


def test_frozen_leaves_stay_bit_identical_and_carry_no_moments():
  opt_state = _train_down_only()
  # Adam's mu and nu exist for the two trainable leaves only.
  moments = sorted(x.shape for x in jax.tree.leaves(opt_state) if x.ndim)
  assert moments == [(2, 3), (2, 3), (3,), (3,)]


def test_adamw_first_step_is_lr_times_sign_plus_decay():
  # Adam's first bias-corrected step is g / (|g| + eps) = sign(g), whatever
  # the clipping scale; decoupled weight decay adds wd * p, all times -lr.
  params = {"unet": _state({"w": [3.0, -2.0, 0.5]})}
  config = _config(**{"optimizer.weight_decay": 0.25,
                      "optimizer.clip_grad_norm": 0.1})
  tx, _, _ = optim.make_optimizer(config, params)
  new, _ = _run(tx, params, lambda p: jnp.sum(p["unet"]["w"][...] ** 3), 1)
  w = np.array([3.0, -2.0, 0.5])
  np.testing.assert_allclose(new["unet"]["w"][...], w - LR * (1 + 0.25 * w),
                             rtol=1e-6)


def test_row_mask_keeps_other_rows_bit_identical_under_weight_decay():
  params = _params()
  config = _config(trainable=[r"^text_encoder\."], **{
      "optimizer.weight_decay": 0.5})
  name = "text_encoder.emb.weight"
  masked_tx, _, _ = optim.make_optimizer(
      config, params, row_masks={name: [False, False, True, False]})
  plain_tx, _, _ = optim.make_optimizer(config, params)
  before = np.asarray(_by_name(params, params)[name])
  masked = np.asarray(_by_name(
      _run(masked_tx, params, _sum_of_squares, 3)[0], params)[name])
  plain = np.asarray(_by_name(
      _run(plain_tx, params, _sum_of_squares, 3)[0], params)[name])
  np.testing.assert_array_equal(masked[[0, 1, 3]], before[[0, 1, 3]])
  # The selected row trains as without a mask (up to the clipping norm,
  # which sees the other rows' gradients); unmasked, all rows move.
  np.testing.assert_allclose(masked[2], plain[2], rtol=1e-6)
  assert np.all(masked[2] != before[2])
  assert np.all(plain != before)


# -------------------------------------------------------- extra optimizers


def test_extra_optimizer_trains_its_leaves_with_its_own_rate():
  params = {"unet": _state({"w": [1.0, -2.0]}),
            "qnetwork": _state({"w": [4.0, 8.0, -6.0]})}
  config = _config(**{"optimizer.weight_decay": 0.0,
                      "optimizer.clip_grad_norm": 1.0})
  tx, _, labels = optim.make_optimizer(
      config, params, extra={"critic": ([r"^qnetwork\."], optax.sgd(0.5))})
  assert _by_name(labels, params) == {"unet.w": optim.TRAIN,
                                      "qnetwork.w": "critic"}
  new, _ = _run(tx, params, _sum_of_squares, steps=1)
  # SGD on 2 * w with rate 0.5, neither clipped (|g| = 20) nor decayed:
  # exactly zero. AdamW moves the U-Net by lr * sign(g).
  np.testing.assert_array_equal(new["qnetwork"]["w"][...], [0.0, 0.0, 0.0])
  np.testing.assert_allclose(new["unet"]["w"][...], [1.0 - LR, -2.0 + LR],
                             rtol=1e-6)


# ----------------------------------------------------------- optimizer.name


def test_unknown_optimizer_is_refused():
  with pytest.raises(ValueError, match="optimizer.name='adam'"):
    optim.make_optimizer(_config(**{"optimizer.name": "adam"}), _params())


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_every_optimizer_trains_the_trainable_leaves_only(name):
  _train_down_only(**{"optimizer.name": name})


W = np.array([3.0, -2.0, 0.5])


def _trained_w(name, loss, steps=1, **overrides):
  """``w``, from ``W``, after ``steps`` unclipped steps of ``name`` on ``loss``."""
  params = {"unet": _state({"w": W})}
  config = _config(**{"optimizer.name": name, "optimizer.clip_grad_norm": 0.0,
                      **overrides})
  tx, _, _ = optim.make_optimizer(config, params)
  new, _ = _run(tx, params, lambda p: loss(p["unet"]["w"][...]), steps)
  return np.asarray(new["unet"]["w"][...])


def _cube(w):
  return jnp.sum(w ** 3)  # gradient 3 w ** 2, positive.


def test_lion_first_step_is_lr_times_sign_plus_decay():
  # Lion: sign((1 - b1) g) = sign(g) = +1 here, then decoupled decay.
  np.testing.assert_allclose(
      _trained_w("lion", _cube, **{"optimizer.weight_decay": 0.25}),
      W - LR * (1 + 0.25 * W), rtol=1e-6)


def test_sgd_first_step_is_lr_times_gradient_plus_l2():
  # torch.optim.SGD: the momentum buffer starts as g + wd * p.
  np.testing.assert_allclose(
      _trained_w("sgd", _cube, **{"optimizer.weight_decay": 0.25}),
      W - LR * (3 * W ** 2 + 0.25 * W), rtol=1e-6)


@pytest.mark.parametrize("momentum, moved", [(0.0, 2.0), (0.5, 2.5)])
def test_sgd_momentum_comes_from_the_config(momentum, moved):
  # Two steps of a unit gradient: 2 lr plain, (1 + 1.5) lr with momentum.
  # The weights are float32: each step rounds at 1 ulp of |W| <= 3.
  np.testing.assert_allclose(
      W - _trained_w("sgd", jnp.sum, 2, **{"optimizer.momentum": momentum,
                                           "optimizer.weight_decay": 0.0}),
      moved * LR, rtol=0, atol=2 * np.spacing(np.float32(3.0)))


def test_adafactor_factors_its_second_moment_of_large_matrices():
  # Rows and columns of a 128 x 256 matrix, not 32k numbers.
  params = {"unet": _state({"w": np.ones((128, 256)), "b": np.ones(4)})}
  tx, _, _ = optim.make_optimizer(_config(**{"optimizer.name": "adafactor"}),
                                  params)
  sizes = sorted(x.size for x in jax.tree.leaves(tx.init(params)) if x.ndim)
  assert 128 * 256 not in sizes and {128, 256} <= set(sizes)
