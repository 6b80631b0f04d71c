"""The optimizer: AdamW with clipping and a schedule, masked to trainable leaves.

Which parameters train is a list of regexes (``config.trainable``) matched
against each parameter's PyTorch-style name prefixed by its component, e.g.
``unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight`` —
the names users know from diffusers' training scripts. Leaves that match no
pattern get ``optax.set_to_zero``: they stay bit-identical and carry no
optimizer state.
"""

import re
from typing import Any, Mapping, Sequence

import jax
import optax
from flax import nnx

from personalize_jax.models import checkpoint

TRAIN, FREEZE = "train", "freeze"


def param_names(params: Mapping[str, nnx.State]) -> Any:
  """A tree like ``params`` whose leaves are ``component.torch.key`` strings."""

  def name(component):
    def leaf_name(path, _):
      keys = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path)
      return f"{component}.{checkpoint.torch_key(keys)}"
    return leaf_name

  return {c: jax.tree_util.tree_map_with_path(name(c), s)
          for c, s in params.items()}


def trainable_labels(params: Mapping[str, nnx.State],
                     patterns: Sequence[str]) -> Any:
  """``"train"``/``"freeze"`` per leaf: trained when any regex searches its name."""
  compiled = [re.compile(p) for p in patterns]
  return jax.tree.map(
      lambda n: TRAIN if any(p.search(n) for p in compiled) else FREEZE,
      param_names(params))


def learning_rate_schedule(config) -> optax.Schedule:
  """Constant, or linear warmup then constant/cosine, from ``config``."""
  lr = config.learning_rate
  warmup = config.optimizer.warmup_steps
  if config.optimizer.schedule == "constant":
    after = optax.constant_schedule(lr)
  elif config.optimizer.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, max(config.num_steps - warmup, 1))
  else:
    raise ValueError(f"optimizer.schedule={config.optimizer.schedule!r}")
  if warmup <= 0:
    return after
  return optax.join_schedules(
      [optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(config, params: Mapping[str, nnx.State]
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW + global-norm clipping on trainable leaves, zero updates elsewhere."""
  schedule = learning_rate_schedule(config)
  opt = config.optimizer
  chain = []
  if opt.clip_grad_norm > 0:
    chain.append(optax.clip_by_global_norm(opt.clip_grad_norm))
  chain.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                           weight_decay=opt.weight_decay))
  tx = optax.multi_transform(
      {TRAIN: optax.chain(*chain), FREEZE: optax.set_to_zero()},
      trainable_labels(params, config.trainable))
  return tx, schedule
