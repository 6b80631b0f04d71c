"""The one attention function every model calls.

Implementations, chosen per model by ``attention_impl``:

  ``xla``     einsum + softmax written out; runs everywhere, the reference path.
              Logits and softmax are computed in float32 when ``upcast`` is set or
              the inputs are float32 (what PyTorch's SDPA math path does).
  ``cudnn``   ``jax.nn.dot_product_attention(implementation="cudnn")``: the fused
              flash-attention kernel on NVIDIA GPUs (bf16/fp16 inputs).
  ``pallas``  the Pallas TPU flash-attention kernel (TPU only).
  ``auto``    ``pallas`` on TPU, ``cudnn`` on GPU when the dtype allows, else ``xla``.
"""

import functools
import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "auto")


def _xla_attention(q, k, v, *, causal, scale, upcast):
  compute_dtype = jnp.float32 if (upcast or q.dtype == jnp.float32) else q.dtype
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(compute_dtype),
                      k.astype(compute_dtype)) * scale
  if causal:
    q_len, k_len = logits.shape[-2:]
    keep = jnp.tril(jnp.ones((q_len, k_len), dtype=bool), k_len - q_len)
    logits = jnp.where(keep, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
  return out.astype(q.dtype)


def _pallas_attention(q, k, v, *, causal, scale):
  # Imported lazily: the module only exists in TPU-enabled jaxlib builds.
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=g-import-not-at-top
  to_bhtd = functools.partial(jnp.transpose, axes=(0, 2, 1, 3))
  out = fa.flash_attention(to_bhtd(q), to_bhtd(k), to_bhtd(v), causal=causal,
                           sm_scale=scale)
  return to_bhtd(out)


def resolve_impl(impl: str, dtype) -> str:
  """Maps ``auto`` onto the concrete implementation for this backend and dtype."""
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention_impl={impl!r} is not one of {IMPLEMENTATIONS}")
  if impl != "auto":
    return impl
  backend = jax.default_backend()
  if backend == "tpu":
    return "pallas"
  if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "xla"


def dot_product_attention(q_bthd: jax.Array, k_bshd: jax.Array,
                          v_bshd: jax.Array, *, impl: str = "xla",
                          causal: bool = False, scale: float | None = None,
                          upcast: bool = False) -> jax.Array:
  """Multi-head attention on ``(batch, length, heads, head_dim)`` tensors.

  Args:
    q_bthd: queries.
    k_bshd: keys.
    v_bshd: values.
    impl: one of ``IMPLEMENTATIONS``.
    causal: mask out keys after each query (text encoders).
    scale: logit scale; ``1/sqrt(head_dim)`` if None.
    upcast: compute logits and softmax in float32 (SD 2.x ``upcast_attention``).

  Returns:
    ``(batch, length, heads, head_dim)`` in the dtype of ``q_bthd``.
  """
  scale = 1.0 / math.sqrt(q_bthd.shape[-1]) if scale is None else scale
  impl = resolve_impl(impl, q_bthd.dtype)
  if impl == "xla":
    return _xla_attention(q_bthd, k_bshd, v_bshd, causal=causal, scale=scale,
                          upcast=upcast)
  if impl == "cudnn":
    return jax.nn.dot_product_attention(
        q_bthd, k_bshd, v_bshd, scale=scale, is_causal=causal,
        implementation="cudnn")
  return _pallas_attention(q_bthd, k_bshd, v_bshd, causal=causal, scale=scale)
