"""The optimizer: AdamW (or Adafactor, Lion, SGD) with clipping and a schedule,
masked to trainable leaves.

Which parameters train is a list of regexes (``config.trainable``) matched
against each parameter's PyTorch-style name prefixed by its component, e.g.
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight`` —
the names users know from diffusers' training scripts. Leaves that match no
pattern get ``optax.set_to_zero``: they stay bit-identical and carry no
optimizer state.
"""

import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from personalize_jax.models import checkpoint

TRAIN, FREEZE = "train", "freeze"


def param_names(params: Mapping[str, nnx.State]) -> Any:
  """A tree like ``params`` whose leaves are ``component.torch.key`` strings."""

  def name(component):
    def leaf_name(path, _):
      # nnx.State paths end in GetAttrKey("value") (the Variable's payload).
      keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path
                   if not isinstance(k, jax.tree_util.GetAttrKey))
      return f"{component}.{checkpoint.torch_key(keys)}"
    return leaf_name

  return {c: jax.tree_util.tree_map_with_path(name(c), s)
          for c, s in params.items()}


def labeler(patterns: Sequence[str],
            extra: Mapping[str, Sequence[str]] | None = None
            ) -> Callable[[str], str]:
  """``name -> label``: the first of ``extra``'s labels whose regexes match,
  else ``"train"`` when a ``patterns`` regex searches the name, else ``"freeze"``.
  """
  compiled = [re.compile(p) for p in patterns]
  groups = [(label, [re.compile(p) for p in regexes])
            for label, regexes in (extra or {}).items()]

  def label(name):
    for group, regexes in groups:
      if any(p.search(name) for p in regexes):
        return group
    return TRAIN if any(p.search(name) for p in compiled) else FREEZE

  return label


def trainable_labels(params: Mapping[str, nnx.State],
                     patterns: Sequence[str],
                     extra: Mapping[str, Sequence[str]] | None = None) -> Any:
  """A label per leaf of ``params`` (see ``labeler``)."""
  return jax.tree.map(labeler(patterns, extra), param_names(params))


def mask_rows(params: Mapping[str, nnx.State],
              row_masks: Mapping[str, Any]) -> optax.GradientTransformation:
  """Zeroes the updates of all but the selected rows of some parameters.

  Args:
    params: the parameters (for names and shapes).
    row_masks: ``{"component.torch.key": bool rows}``: only rows marked True
      change (Custom Diffusion trains the new token's embedding row alone).
      Applied after weight decay, so the other rows stay bit-identical.
  """
  def factor(name, leaf):
    if name not in row_masks:
      return None
    rows = jnp.asarray(row_masks[name], leaf.dtype)
    return rows.reshape(rows.shape + (1,) * (leaf.ndim - 1))

  factors = jax.tree.map(factor, param_names(params), params)

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, f: u if f is None else u * f, updates,
                        factors, is_leaf=lambda x: x is None), state

  return optax.GradientTransformation(lambda _: optax.EmptyState(), update)


# ``config.optimizer.schedule`` -> ``(peak, steps, power) -> schedule``: what
# follows the warmup, over ``steps`` steps (diffusers' get_scheduler names).
SCHEDULES = {
    "constant": lambda lr, steps, power: optax.constant_schedule(lr),
    "linear": lambda lr, steps, power: optax.linear_schedule(lr, 0.0, steps),
    "cosine": lambda lr, steps, power: optax.cosine_decay_schedule(lr, steps),
    "polynomial": lambda lr, steps, power: optax.polynomial_schedule(
        lr, 0.0, power, steps),
}


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup from 0 (``optimizer.warmup_steps``), then
  ``optimizer.schedule``: constant, or a linear, cosine or polynomial
  (``optimizer.power``) decay to 0 at ``num_steps``."""
  lr, opt = config.learning_rate, config.optimizer
  warmup = opt.warmup_steps
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={opt.schedule!r}")
  after = SCHEDULES[opt.schedule](lr, max(config.num_steps - warmup, 1),
                                  opt.power)
  if warmup <= 0:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), after], [warmup])


# ``config.optimizer.name`` -> ``(optimizer config, schedule) -> transform``.
# Lion reads b1/b2 as AdamW does; Adafactor keeps optax's settings except
# that the learning rate is the step size (no parameter scaling: kohya's
# ``scale_parameter=False relative_step=False``); SGD's weight decay is
# torch's (added to the gradient).
OPTIMIZERS = {
    "adamw": lambda opt, lr: optax.adamw(
        lr, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay),
    "adafactor": lambda opt, lr: optax.adafactor(
        lr, multiply_by_parameter_scale=False,
        weight_decay_rate=opt.weight_decay or None),
    "lion": lambda opt, lr: optax.lion(
        lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay),
    "sgd": lambda opt, lr: optax.chain(
        optax.add_decayed_weights(opt.weight_decay),
        optax.sgd(lr, momentum=opt.momentum or None)),
}


def make_optimizer(config, params: Mapping[str, nnx.State], *,
                   extra: Mapping[str, tuple[Sequence[str],
                                             optax.GradientTransformation]]
                   | None = None,
                   row_masks: Mapping[str, Any] | None = None
                   ) -> tuple[optax.GradientTransformation, optax.Schedule, Any]:
  """``optimizer.name`` + global-norm clipping on trainable leaves, zero
  updates elsewhere.

  Args:
    config: the run config (``learning_rate``, ``optimizer``, ``trainable``).
    params: the trainable components' parameters.
    extra: ``{label: (regexes, optimizer)}`` for leaves that a method trains
      with an optimizer of its own (Look Forward's critic uses SGD).
    row_masks: see ``mask_rows``.

  Returns:
    The optimizer, the learning-rate schedule, and the label of every leaf.
  """
  schedule = learning_rate_schedule(config)
  opt = config.optimizer
  chain = []
  if opt.clip_grad_norm > 0:
    chain.append(optax.clip_by_global_norm(opt.clip_grad_norm))
  if opt.name not in OPTIMIZERS:
    raise ValueError(f"optimizer.name={opt.name!r}")
  chain.append(OPTIMIZERS[opt.name](opt, schedule))
  extra = extra or {}
  labels = trainable_labels(params, config.trainable,
                            {k: v[0] for k, v in extra.items()})
  transforms = {TRAIN: optax.chain(*chain), FREEZE: optax.set_to_zero()}
  transforms.update({k: v[1] for k, v in extra.items()})
  tx = optax.multi_transform(transforms, labels)
  if row_masks:
    tx = optax.chain(tx, mask_rows(params, row_masks))
  return tx, schedule, labels
