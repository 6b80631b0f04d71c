"""Thin constructors for the layers every port uses, with logical axis names.

Every parameter carries logical axis names (``out_sharding`` metadata) so the
engine can map them onto a device mesh (FSDP) without knowing the model. The
names used across the package:

  ``embed``     the model's hidden width (input side of projections)
  ``mlp``       the output side of a projection or a feed-forward width
  ``conv_in``   input channels of a convolution kernel
  ``conv_out``  output channels of a convolution kernel
  ``norm``      scale/bias of a normalisation layer
  ``vocab``     rows of a token embedding table

Eager sharding is off per variable: parameters are created unsharded and the
engine places them, which keeps model construction independent of any mesh.
"""

import contextlib
import contextvars
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Dtype = Any


def _meta(axes: Sequence[str | None]) -> dict:
  return {"out_sharding": tuple(axes), "eager_sharding": False}


class Linear(nnx.Linear):
  """``nnx.Linear`` that may carry a low-rank adapter (LoRA).

  Without one it is ``nnx.Linear``. ``models.lora.add_adapters`` sets
  ``lora_A`` (``in -> rank``) and ``lora_B`` (``rank -> out``), named as PEFT
  names them, so their PyTorch keys are ``<module>.lora_A.weight`` and
  ``<module>.lora_B.weight``; the output is then
  ``W x + b + lora_scale * B(A(x))`` (``lora_scale`` is alpha / rank).
  """

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.lora_A = nnx.data(None)
    self.lora_B = nnx.data(None)
    self.lora_scale = 1.0

  def __call__(self, x: jax.Array) -> jax.Array:
    y = super().__call__(x)
    if self.lora_A is None:
      return y
    delta = self.lora_B(self.lora_A(x))
    return y + (delta * self.lora_scale).astype(y.dtype)


def linear(in_features: int, out_features: int, *, use_bias: bool = True,
           dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
           axes: tuple[str | None, str | None] = ("embed", "mlp"),
           rngs: nnx.Rngs) -> Linear:
  """A dense layer whose kernel is ``(in, out)`` with logical axes ``axes``."""
  return Linear(
      in_features, out_features, use_bias=use_bias, dtype=dtype,
      param_dtype=param_dtype, kernel_metadata=_meta(axes),
      bias_metadata=_meta(axes[1:]), rngs=rngs)


def conv(in_features: int, out_features: int, kernel_size: int = 3, *,
         stride: int = 1,
         padding: int | str | Sequence[tuple[int, int]] | None = None,
         feature_group_count: int = 1, use_bias: bool = True,
         dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
         rngs: nnx.Rngs) -> nnx.Conv:
  """A 2D convolution on NHWC input.

  Args:
    in_features: input channels.
    out_features: output channels.
    kernel_size: the (square) kernel's side.
    stride: the stride along both spatial axes.
    padding: pixels on every side (an int), ``(before, after)`` per spatial
      axis, or ``"SAME"``/``"VALID"``; ``kernel_size // 2`` if None.
    feature_group_count: channel groups (``in_features`` for a depthwise
      conv, PyTorch's ``groups``); the kernel is
      ``(k, k, in_features // groups, out_features)``, and its input axis is
      not named (a group's few channels are not worth sharding).
    use_bias: add a bias.
    dtype: the compute dtype.
    param_dtype: the dtype parameters are stored in.
    rngs: the random streams of the initialisation.
  """
  pad = kernel_size // 2 if padding is None else padding
  if isinstance(pad, int):
    pad = ((pad, pad), (pad, pad))
  conv_in = "conv_in" if feature_group_count == 1 else None
  return nnx.Conv(
      in_features, out_features, (kernel_size, kernel_size),
      strides=(stride, stride), padding=pad,
      feature_group_count=feature_group_count, use_bias=use_bias, dtype=dtype,
      param_dtype=param_dtype,
      kernel_metadata=_meta((None, None, conv_in, "conv_out")),
      bias_metadata=_meta(("conv_out",)), rngs=rngs)


def group_norm(num_features: int, num_groups: int, *, epsilon: float = 1e-5,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs) -> nnx.GroupNorm:
  """GroupNorm over the channel (last) axis, statistics as PyTorch computes them."""
  return nnx.GroupNorm(
      num_features, num_groups=num_groups, epsilon=epsilon, dtype=dtype,
      param_dtype=param_dtype, use_fast_variance=False,
      scale_metadata=_meta(("norm",)), bias_metadata=_meta(("norm",)),
      rngs=rngs)


def layer_norm(num_features: int, *, epsilon: float = 1e-5,
               use_bias: bool = True, use_scale: bool = True,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               rngs: nnx.Rngs) -> nnx.LayerNorm:
  """LayerNorm over the last axis, statistics as PyTorch computes them."""
  return nnx.LayerNorm(
      num_features, epsilon=epsilon, use_bias=use_bias, use_scale=use_scale,
      dtype=dtype, param_dtype=param_dtype, use_fast_variance=False,
      scale_metadata=_meta(("norm",)), bias_metadata=_meta(("norm",)),
      rngs=rngs)


def embed(num_embeddings: int, features: int, *,
          dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          rngs: nnx.Rngs) -> nnx.Embed:
  """A token or position embedding table ``(num_embeddings, features)``."""
  return nnx.Embed(
      num_embeddings, features, dtype=dtype, param_dtype=param_dtype,
      embedding_metadata=_meta(("vocab", "embed")), rngs=rngs)


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], *,
          init=nnx.initializers.normal(0.02),
          param_dtype: Dtype = jnp.float32) -> nnx.Param:
  """A raw parameter (a PyTorch ``nn.Parameter``): stored under its own name."""
  return nnx.Param(init(rngs.params(), tuple(shape), param_dtype), **_meta(axes))


def batch_stat(value: jax.Array, axes: Sequence[str | None] = ("norm",)
               ) -> nnx.BatchStat:
  """A statistic kept with the weights but never trained (BatchNorm's running
  mean and variance): an ``nnx.BatchStat`` with logical axis names."""
  return nnx.BatchStat(value, **_meta(axes))


def remat_call(module: nnx.Module, *args):
  """``module(*args)``, its activations recomputed in the backward pass.

  A pure ``jax.checkpoint`` over the module's split state, not
  ``nnx.remat``: that one writes the state back into the module afterwards,
  which fails when the module was merged outside the trace it is called in
  (a frozen model called inside ``jax.grad``, as RPO's base U-Net is).
  """
  graphdef, state = nnx.split(module)

  def run(state, *args):
    return nnx.merge(graphdef, state)(*args)

  return jax.checkpoint(run)(state, *args)


# (mesh, mesh axes) that activations' leading (batch) axis is split over while
# a sharded step is traced; None elsewhere (models never import the engine).
_BATCH_SHARDING = contextvars.ContextVar("batch_sharding", default=None)


@contextlib.contextmanager
def batch_sharded_activations(mesh, axes: Sequence[str]):
  """While tracing under this, ``constrain_batch`` splits activations' batch.

  Without such constraints XLA's partitioner may follow the FSDP-sharded
  weights instead: split attention by heads and keep the whole global batch's
  activations on every device (4x the memory on 4 chips).
  """
  token = _BATCH_SHARDING.set((mesh, tuple(axes)))
  try:
    yield
  finally:
    _BATCH_SHARDING.reset(token)


def batch_split():
  """``(mesh, axes, devices along them)`` inside the context, else None.

  Kernels that XLA cannot partition (Pallas) run under ``shard_map`` over
  this mesh; ``attention_impl="auto"`` reads the platform from its devices.
  """
  spec = _BATCH_SHARDING.get()
  if spec is None:
    return None
  mesh, axes = spec
  size = 1
  for axis in axes:
    size *= mesh.shape[axis]
  return mesh, axes, size


def constrain_batch(x: jax.Array) -> jax.Array:
  """``x`` with its leading axis split over the batch axes, when inside
  ``batch_sharded_activations`` and the batch divides; otherwise ``x``."""
  split = batch_split()
  if split is None or split[2] == 1 or x.shape[0] % split[2]:
    return x
  mesh, axes, _ = split
  return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(axes)))


def local_batch(batch: int) -> int:
  """Rows of a batch of ``batch`` that one device holds under the constraint."""
  split = batch_split()
  if split is None or batch % split[2]:
    return batch
  return batch // split[2]
