"""An exponential moving average of the trained parameters (``config.ema``).

As diffusers' ``EMAModel`` (``--use_ema``): the average starts as a copy of
the initial parameters and after each optimizer update moves towards them,

  ema <- ema - (1 - decay_t) * (ema - params),

where ``decay_t`` grows to ``ema.decay`` as ``EMAModel.get_decay`` makes it
grow (``ema.warmup``). The average lives in the train state, sharded like
its parameters and checkpointed with them; samples, validation and the
export use it.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

# How decay_t grows with the update count t (1 at the first update):
#   none       decay from the first update;
#   diffusers  EMAModel's default: 0 at t = 1, then (t) / (9 + t);
#   power      EMAModel(use_ema_warmup=True): 0 at t = 1, then
#              1 - t ** -ema.power (inv_gamma 1);
# each capped at ema.decay.
WARMUPS = ("none", "diffusers", "power")


def decay_schedule(config: ml_collections.ConfigDict
                   ) -> Callable[[jax.Array], jax.Array] | None:
  """``count -> decay_t`` for ``config.ema``, or None when it is off.

  ``count`` is the number of optimizer updates including the current one
  (diffusers' ``optimization_step``).
  """
  e = config.ema
  if not e.decay:
    return None
  cap = float(e.decay)
  if e.warmup not in WARMUPS:
    raise ValueError(f"ema.warmup={e.warmup!r}")

  def decay(count):
    if e.warmup == "none":
      return jnp.float32(cap)
    # EMAModel.get_decay: step = optimization_step - 1 (update_after_step 0).
    step = jnp.maximum(jnp.asarray(count, jnp.float32) - 1.0, 0.0)
    if e.warmup == "diffusers":
      value = (1.0 + step) / (10.0 + step)
    else:
      value = 1.0 - (1.0 + step) ** -float(e.power)
    return jnp.where(step <= 0, 0.0, jnp.minimum(value, cap))

  return decay


def update(ema: Any, params: Any, decay: jax.Array) -> Any:
  """One EMA step towards ``params`` (``EMAModel.step``'s formula)."""
  return jax.tree.map(
      lambda e, p: e - (1.0 - decay).astype(e.dtype) * (e - p), ema, params)
