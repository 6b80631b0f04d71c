"""The train state and the jitted train step every method shares.

The state holds only what changes: trainable parameters (fp32 masters), the
optimizer state, the step, a base PRNG key and, with ``config.ema``, the
parameters' moving average. Frozen parameters (VAE, text encoder, a frozen
base U-Net) travel separately, never donated and never in the optimizer.
Every step's randomness is ``fold_in(state.rng, step)``, so a resumed run
draws exactly what an uninterrupted one would.

With gradient accumulation the step's batch (``config.batch_size`` rows)
is split into ``k`` micro-batches inside the one jitted step: micro-batch
``j`` holds rows ``j, j + k, j + 2k, ...`` (so each stays split over all
devices without moving a row) and the row index ``ROW``; the gradients of
the micro-batches' losses are averaged, then the optimizer updates once.
Every micro-batch gets the step's key: a loss whose draws are keyed by
``ROW`` (DreamBooth's) computes the update of the whole batch.
"""

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from personalize_jax.engine import ema as ema_lib
from personalize_jax.engine import optim, sharding
from personalize_jax.models import layers

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]

# The batch key of each micro-batch row's index in the step's batch (int32).
ROW = "row"


@flax.struct.dataclass
class TrainState:
  """What a checkpoint holds (with the data position in its metadata)."""
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  ema: Any = None  # the parameters' moving average (None: config.ema off).


def place_params(params, mesh: Mesh, dtype=None):
  """Puts an ``nnx.State`` (or a dict of them) onto the mesh by logical axes.

  Args:
    params: the parameters; leaves may live on the host.
    mesh: the device mesh.
    dtype: cast floating leaves to this dtype first (bf16 frozen copies).
  """
  if dtype is not None:
    params = jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating)
        else x, params)
  return sharding.put(params, sharding.state_shardings(params, mesh))


def create_train_state(params, tx: optax.GradientTransformation, seed: int,
                       mesh: Mesh, *, ema: bool = False) -> TrainState:
  """The sharded initial state: parameters placed, optimizer state made on device.

  The optimizer state is created by a jitted ``tx.init`` on the already
  sharded parameters, with each moment laid out like its parameter, so
  nothing of model size is ever built on the host or replicated. With
  ``ema`` the moving average starts as a copy of the parameters, laid out
  like them.
  """
  params = place_params(params, mesh)
  opt_shardings = opt_state_shardings(jax.eval_shape(tx.init, params), params,
                                      mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  # Made by a program over the mesh, as a key cannot be cut out on the host.
  step, rng = jax.jit(lambda: (jnp.zeros((), jnp.int32), jax.random.key(seed)),
                      out_shardings=sharding.replicated(mesh))()
  average = None
  if ema:
    # A copy (jit would hand an unchanged input back): both are donated.
    average = jax.jit(lambda p: jax.tree.map(jnp.copy, p),
                      out_shardings=shardings_of(params))(params)
  return TrainState(step=step, params=params, opt_state=opt_state, rng=rng,
                    ema=average)


def opt_state_shardings(abstract_opt_state, params, mesh: Mesh):
  """Shardings of an optimizer state: moments follow their parameters.

  ``jit(tx.init)`` alone would replicate the moments (zeros do not depend on
  the parameters' values, so no layout propagates to them). A state leaf whose
  key path ends with a parameter's path and has its shape is that parameter's
  moment (optax keeps the parameter tree inside ``mu``, ``nu``, ...); the rest
  (step counts) is replicated.
  """
  by_path = {tuple(path): (x.shape, x.sharding)
             for path, x in jax.tree_util.tree_leaves_with_path(params)}
  replicated = sharding.replicated(mesh)

  def pick(path, leaf):
    for start in range(len(path)):
      shape, layout = by_path.get(tuple(path[start:]), (None, None))
      if shape == leaf.shape:
        return layout
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_opt_state)


def _with_shardings(tree, shardings):
  """``ShapeDtypeStruct`` leaves of ``tree`` carrying ``shardings``.

  ``shardings`` may be a prefix of ``tree`` (one sharding per ``nnx.Variable``).
  """
  leaves, treedef = jax.tree.flatten(tree)
  shards = jax.tree.leaves(shardings)
  assert len(leaves) == len(shards), (len(leaves), len(shards))
  return treedef.unflatten([
      jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
      for x, s in zip(leaves, shards)])


def abstract_params(params, mesh: Mesh, dtype=None):
  """What ``place_params`` would make, as ``ShapeDtypeStruct``s: nothing moves."""
  cast = lambda x: jax.ShapeDtypeStruct(
      x.shape, dtype if dtype is not None
      and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype)
  params = jax.tree.map(cast, params)
  return _with_shardings(params, sharding.state_shardings(params, mesh))


def abstract_host(tree, target):
  """Host arrays as ``ShapeDtypeStruct``s typed as ``jax.device_put`` types them."""
  return jax.tree.map(lambda v: jax.ShapeDtypeStruct(
      np.shape(v), jax.dtypes.canonicalize_dtype(np.asarray(v).dtype),
      sharding=target), tree)


def abstract_train_state(params, tx: optax.GradientTransformation,
                         mesh: Mesh, *, ema: bool = False) -> TrainState:
  """What ``create_train_state`` would make, as ``ShapeDtypeStruct``s.

  Shapes, dtypes and shardings only (``jax.eval_shape``): a step can be
  lowered and compiled for it, and its memory read, without allocating a
  parameter; the devices may be compile-only (a TPU topology on a CPU host).
  """
  params = abstract_params(params, mesh)
  abstract_opt = jax.eval_shape(tx.init, params)
  opt_state = _with_shardings(abstract_opt, opt_state_shardings(
      abstract_opt, params, mesh))
  replicated = sharding.replicated(mesh)
  key = jax.eval_shape(lambda: jax.random.key(0))
  return TrainState(
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated),
      params=params, opt_state=opt_state,
      rng=jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated),
      ema=params if ema else None)


def shardings_of(tree):
  """The sharding of every leaf of a placed pytree (for jit and restore)."""
  return jax.tree.map(lambda x: x.sharding, tree)


def abstract_of(tree):
  """``ShapeDtypeStruct``s with shardings: the target of a checkpoint restore."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      tree)


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, labels, *, nan_policy: str,
                    state_shardings, frozen_shardings, mesh: Mesh,
                    post_update: Callable[[Any, jax.Array], Any] | None = None,
                    debug_nan_at_step: int = 0, accumulation_steps: int = 1,
                    ema_decay: Callable[[jax.Array], jax.Array] | None = None):
  """Builds the jitted ``train_step(state, frozen, batch) -> (state, metrics)``.

  Args:
    loss_fn: the method's pure loss ``(params, frozen, batch, rng)``.
    tx: the optimizer (masked to trainable leaves).
    schedule: the learning-rate schedule, reported per step.
    labels: ``optim.trainable_labels`` of the params, for the gradient norm.
    nan_policy: ``skip`` keeps the old params, optimizer state (and moving
      average) when the loss or gradients are not finite; ``stop`` applies
      the update (the loop stops without saving it).
    state_shardings: shardings of ``TrainState`` leaves.
    frozen_shardings: shardings of the frozen parameters.
    mesh: the mesh; batches are split along their leading axis over it.
    post_update: ``(params, step) -> params`` applied after the optimizer
      (a method's non-gradient updates, e.g. a lagging target network).
    debug_nan_at_step: multiply the loss of this step (counted from 1) by NaN,
      which makes its gradients NaN too, to test ``nan_policy``; 0 leaves the
      compiled step as it would be without this option.
    accumulation_steps: micro-batches per update (see the module docstring);
      1 computes the loss on the whole batch at once. Loss and metrics are
      the micro-batches' means.
    ema_decay: ``ema.decay_schedule``: the state's moving average is updated
      after the optimizer with the decay of the update count (reported as
      ``ema_decay``); None: the state has none.
  """

  def step_loss_fn(params, frozen, batch, rng, step):
    loss, metrics = loss_fn(params, frozen, batch, rng)
    if debug_nan_at_step:
      # A factor rather than a replaced value, so that the NaN reaches the
      # gradients as a real divergence would; 1.0 on other steps changes no bit.
      factor = jnp.where(step + 1 == debug_nan_at_step, jnp.nan, 1.0)
      loss = loss * factor.astype(loss.dtype)
    return loss, metrics

  grad_fn = jax.value_and_grad(step_loss_fn, has_aux=True)

  def accumulated_grad_fn(params, frozen, batch, rng, step):
    """``grad_fn`` over ``accumulation_steps`` micro-batches, averaged."""

    def micro_step(total, micro):
      (loss, metrics), grads = grad_fn(params, frozen, micro, rng, step)
      return jax.tree.map(jnp.add, total, grads), (loss, metrics)

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, (losses, metrics) = jax.lax.scan(
        micro_step, zeros, micro_batches(batch, accumulation_steps, mesh))
    mean = lambda x: jnp.mean(x, axis=0)
    return ((mean(losses), jax.tree.map(mean, metrics)),
            jax.tree.map(lambda g: g / accumulation_steps, grads))

  def train_step(state: TrainState, frozen, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    with layers.batch_sharded_activations(mesh, sharding.BATCH_AXES):
      (loss, metrics), grads = (
          grad_fn if accumulation_steps == 1 else accumulated_grad_fn)(
              state.params, frozen, batch, rng, state.step)
    trained = jax.tree.map(
        lambda g, label: jnp.zeros_like(g) if label == optim.FREEZE else g,
        grads, labels)
    grad_norm = optax.tree.norm(trained)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if post_update is not None:
      params = post_update(params, state.step)
    average = state.ema
    if ema_decay is not None:
      decay = ema_decay(state.step + 1)
      average = ema_lib.update(state.ema, params, decay)
      metrics["ema_decay"] = decay
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    if nan_policy == "skip":
      keep = lambda new, old: jnp.where(finite, new, old)
      params, opt_state, average = jax.tree.map(
          keep, (params, opt_state, average),
          (state.params, state.opt_state, state.ema))
    # Per component, as big_vision's l2_params / l2_updates: a switch that
    # trains nothing shows as a zero update norm (of what was applied).
    for name in params:
      metrics[f"update_norm/{name}"] = optax.tree.norm(
          jax.tree.map(jnp.subtract, params[name], state.params[name]))
      metrics[f"param_norm/{name}"] = optax.tree.norm(params[name])
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm,
                   learning_rate=schedule(state.step), finite=finite)
    return state.replace(step=state.step + 1, params=params,
                         opt_state=opt_state, ema=average), metrics

  return jax.jit(
      train_step,
      in_shardings=(state_shardings, frozen_shardings,
                    sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0)


def micro_batches(batch: dict, k: int, mesh: Mesh) -> dict:
  """A step's batch as ``k`` stacked micro-batches, each split over ``mesh``.

  Leaves ``(n, ...)`` become ``(k, n // k, ...)``: micro-batch ``j`` holds
  rows ``j, j + k, ...``, which on a batch split over the devices are rows
  each device already holds. ``ROW`` holds those rows' indices.
  """
  rows = jax.tree.leaves(batch)[0].shape[0]
  batch = dict(batch, **{ROW: jnp.arange(rows, dtype=jnp.int32)})
  layout = NamedSharding(mesh, P(None, sharding.BATCH_AXES))

  def split(x):
    x = jnp.swapaxes(x.reshape((rows // k, k) + x.shape[1:]), 0, 1)
    return jax.lax.with_sharding_constraint(x, layout)

  return jax.tree.map(split, batch)


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Global host batch -> arrays split over all devices along the batch axis.

  On several processes (Cloud TPU pods) each process holds the whole global
  batch (it is a deterministic function of the step) and contributes the rows
  its devices own.
  """
  target = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_callback(v.shape, target,
                                          lambda index, v=v: v[index])
          for k, v in batch.items()}
