"""The one attention function every model calls.

Implementations, chosen per model by ``attention_impl``:

  ``xla``     einsum + softmax written out; runs everywhere, the reference path.
              Logits and softmax are computed in float32 when ``upcast`` is set or
              the inputs are float32 (what PyTorch's SDPA math path does).
  ``cudnn``   ``jax.nn.dot_product_attention(implementation="cudnn")``: the fused
              flash-attention kernel on NVIDIA GPUs (bf16/fp16 inputs).
  ``pallas``  the Pallas TPU flash-attention kernel (TPU only).
  ``chunked`` the ``xla`` computation one block of queries at a time
              (``lax.map``), each block's logits recomputed in the backward
              pass: the (queries x keys) matrix never exists whole, so it stays
              in cache. Same numbers as ``xla`` (up to summation order); on
              this project's 2-core CPU a 1024-token attention's forward and
              backward take a third of the time (see benchmarks/RESULTS.md).
  ``auto``    ``pallas`` on TPU, ``cudnn`` on GPU when the dtype allows,
              ``chunked`` on CPU for long non-causal sequences, else ``xla``.
"""

import functools
import math

import jax
import jax.numpy as jnp

from personalize_jax.models import layers

IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "chunked", "auto")
# A query block's logits hold at most this many elements (8 MiB in float32):
# small enough to stay in a CPU's cache between the softmax passes.
CHUNK_ELEMENTS = 2**21
MIN_CHUNK = 16  # smaller blocks cost more in loop overhead than they save.


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


def query_chunk(batch: int, q_len: int, heads: int, k_len: int) -> int | None:
  """The query block of ``chunked`` attention, or None when it would not help.

  The largest power of two dividing ``q_len`` whose logits
  (``batch x heads x block x k_len``) fit ``CHUNK_ELEMENTS``; None when that
  is below ``MIN_CHUNK`` or the whole sequence already fits.
  """
  per_query = batch * heads * k_len
  chunk = 1
  while (q_len % (2 * chunk) == 0
         and 2 * chunk * per_query <= CHUNK_ELEMENTS):
    chunk *= 2
  if chunk < MIN_CHUNK or chunk >= q_len:
    return None
  return chunk


def _chunked_attention(q, k, v, *, scale, upcast, chunk):
  b, q_len, h, d = q.shape
  blocks = q.reshape(b, q_len // chunk, chunk, h, d).swapaxes(0, 1)

  # Recomputed in the backward pass: only the block's inputs are kept.
  @jax.checkpoint
  def one_block(q_block):
    return _xla_attention(q_block, k, v, causal=False, scale=scale,
                          upcast=upcast)

  out = jax.lax.map(one_block, blocks)
  return out.swapaxes(0, 1).reshape(b, q_len, h, v.shape[-1])


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
  if backend == "cpu":
    return "chunked"  # dot_product_attention falls back to xla where it cannot help
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
  if impl == "chunked":
    b, q_len, h, _ = q_bthd.shape
    # Sized for the rows one device computes when the batch is split.
    chunk = None if causal else query_chunk(layers.local_batch(b), q_len, h,
                                            k_bshd.shape[1])
    if chunk is None:
      impl = "xla"
    else:
      return _chunked_attention(q_bthd, k_bshd, v_bshd, scale=scale,
                                upcast=upcast, chunk=chunk)
  if impl == "xla":
    return _xla_attention(q_bthd, k_bshd, v_bshd, causal=causal, scale=scale,
                          upcast=upcast)
  if impl == "cudnn":
    return jax.nn.dot_product_attention(
        q_bthd, k_bshd, v_bshd, scale=scale, is_causal=causal,
        implementation="cudnn")
  return _pallas_attention(q_bthd, k_bshd, v_bshd, causal=causal, scale=scale)
