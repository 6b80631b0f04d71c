"""The one attention function every model calls.

Implementations, chosen per model by ``attention_impl``:

  ``xla``     einsum + softmax written out; runs everywhere, the reference path.
              Logits and softmax are computed in float32 when ``upcast`` is set or
              the inputs are float32 (what PyTorch's SDPA math path does).
  ``cudnn``   ``jax.nn.dot_product_attention(implementation="cudnn")``: the fused
              flash-attention kernel on NVIDIA GPUs (bf16/fp16 inputs).
  ``pallas``  the Pallas TPU flash-attention kernel (TPU only). Inside a
              sharded step it runs under ``shard_map`` over the step's mesh
              (XLA cannot partition a Mosaic kernel), split by batch, else
              by heads; sequences and wide heads are padded to the kernel's
              128 blocks.
  ``chunked`` the ``xla`` computation one block of queries at a time
              (``lax.map``), each block's logits recomputed in the backward
              pass: the (queries x keys) matrix never exists whole, so it stays
              in cache. Same numbers as ``xla`` (up to summation order); on
              this project's 2-core CPU a 1024-token attention's forward and
              backward take a third of the time (see benchmarks/RESULTS.md).
  ``auto``    ``pallas`` on TPU, ``cudnn`` on GPU when the dtype allows,
              ``chunked`` on CPU for long non-causal sequences, else ``xla``;
              the platform is that of the devices the step is compiled for
              (``target_platform``), not the host's.

A key padding mask (``key_mask_bk``: which keys each sequence attends to, as
BERT's attention mask) is taken by ``xla`` and ``chunked``; ``auto`` then
picks between those two, and ``cudnn`` or ``pallas`` refuse it.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from personalize_jax.models import layers

IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "chunked", "auto")
MASKED_IMPLEMENTATIONS = ("xla", "chunked")  # those taking key_mask_bk
# A query block's logits hold at most this many elements (8 MiB in float32):
# small enough to stay in a CPU's cache between the softmax passes.
CHUNK_ELEMENTS = 2**21
MIN_CHUNK = 16  # smaller blocks cost more in loop overhead than they save.


def _xla_attention(q, k, v, *, causal, scale, upcast, key_mask_bk=None):
  compute_dtype = jnp.float32 if (upcast or q.dtype == jnp.float32) else q.dtype
  logits = jnp.einsum("bqhd,bkhd->bhqk", q.astype(compute_dtype),
                      k.astype(compute_dtype)) * scale
  if causal:
    q_len, k_len = logits.shape[-2:]
    keep = jnp.tril(jnp.ones((q_len, k_len), dtype=bool), k_len - q_len)
    logits = jnp.where(keep, logits, jnp.finfo(logits.dtype).min)
  if key_mask_bk is not None:
    logits = jnp.where(key_mask_bk.astype(bool)[:, None, None, :], logits,
                       jnp.finfo(logits.dtype).min)
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


def _chunked_attention(q, k, v, *, scale, upcast, chunk, key_mask_bk=None):
  b, q_len, h, d = q.shape
  blocks = q.reshape(b, q_len // chunk, chunk, h, d).swapaxes(0, 1)

  # Recomputed in the backward pass: only the block's inputs are kept.
  @jax.checkpoint
  def one_block(q_block):
    return _xla_attention(q_block, k, v, causal=False, scale=scale,
                          upcast=upcast, key_mask_bk=key_mask_bk)

  out = jax.lax.map(one_block, blocks)
  return out.swapaxes(0, 1).reshape(b, q_len, h, v.shape[-1])


# The Pallas TPU kernel works on blocks of 128 (sequence) x 128 (lanes).
PALLAS_BLOCK = 128
# The largest sequence block tried: bigger blocks mean fewer grid steps, and
# 512 x head_dim blocks still fit the smallest TPU's VMEM with room to spare.
PALLAS_MAX_BLOCK = 512


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _pallas_block(length: int) -> int:
  """The largest of 512, 256, 128 dividing a (padded) sequence length."""
  block = PALLAS_MAX_BLOCK
  while length % block:
    block //= 2
  return block


def _flash_bhtd(q, k, v, *, causal, scale):
  """The Pallas flash-attention kernel on one device's ``(b, h, t, d)`` blocks.

  The kernel needs sequence lengths in multiples of 128 and a head size
  below 128 or a multiple of it; Stable Diffusion has 77-token text, 64-token
  deep levels and 160-wide heads (SD 1.x's 1280 channels over 8 heads). So
  sequences are padded with zero rows (padded keys masked out with segment
  ids, padded queries dropped) and wide heads with zero columns (which add
  nothing to the logits and are sliced off the output).
  """
  # Imported lazily: Pallas pulls in Mosaic, which only TPU programs need.
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=g-import-not-at-top
  b, _, q_len, d = q.shape
  k_len = k.shape[2]
  d_pad = _round_up(d, PALLAS_BLOCK) if d > PALLAS_BLOCK else d
  q_pad = _round_up(q_len, PALLAS_BLOCK)
  k_pad = _round_up(k_len, PALLAS_BLOCK)

  def pad(x, length):
    return jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[2]),
                       (0, d_pad - d)))

  segment_ids = None
  if k_pad != k_len:
    segment_ids = fa.SegmentIds(
        q=jnp.ones((b, q_pad), jnp.int32),
        kv=jnp.broadcast_to(
            (jnp.arange(k_pad) < k_len).astype(jnp.int32), (b, k_pad)))
  bq, bk = _pallas_block(q_pad), _pallas_block(k_pad)
  blocks = fa.BlockSizes(
      block_q=bq, block_k_major=bk, block_k=bk, block_b=1,
      block_q_major_dkv=bq, block_k_major_dkv=bk, block_k_dkv=bk,
      block_q_dkv=bq, block_k_major_dq=bk, block_k_dq=bk, block_q_dq=bq)
  out = fa.flash_attention(pad(q, q_pad), pad(k, k_pad), pad(v, k_pad),
                           segment_ids=segment_ids, causal=causal,
                           sm_scale=scale, block_sizes=blocks)
  return out[:, :, :q_len, :d]


def pallas_partition_spec(shape_bthd, split) -> P | None:
  """How ``pallas`` attention splits over the mesh of ``split``.

  The batch when the devices divide it, else the heads, else nothing (every
  device computes the whole attention). None: no ``shard_map`` (no mesh, or
  a mesh of one device).
  """
  if split is None or split[2] == 1:
    return None
  _, axes, n = split
  b, _, h, _ = shape_bthd
  if b % n == 0:
    return P(axes, None, None, None)
  if h % n == 0:
    return P(None, None, axes, None)
  return P()


def _pallas_attention(q, k, v, *, causal, scale):
  to_bhtd = functools.partial(jnp.transpose, axes=(0, 2, 1, 3))

  def kernel(q, k, v):
    return to_bhtd(_flash_bhtd(to_bhtd(q), to_bhtd(k), to_bhtd(v),
                               causal=causal, scale=scale))

  split = layers.batch_split()
  spec = pallas_partition_spec(q.shape, split)
  if spec is None:
    return kernel(q, k, v)
  # XLA cannot partition a Mosaic kernel: each device runs it on its own
  # block of the batch (or heads) inside shard_map.
  return jax.shard_map(kernel, mesh=split[0], in_specs=(spec, spec, spec),
                       out_specs=spec, check_vma=False)(q, k, v)


def target_platform() -> str:
  """The platform the code being traced is compiled for.

  The devices of the mesh a sharded step is traced over (an ahead-of-time
  compile for a TPU topology runs on a CPU host), else the default backend.
  """
  split = layers.batch_split()
  if split is not None:
    return split[0].devices.flat[0].platform
  return jax.default_backend()


def resolve_impl(impl: str, dtype, platform: str | None = None) -> str:
  """Maps ``auto`` onto the concrete implementation for a platform and dtype.

  Args:
    impl: one of ``IMPLEMENTATIONS``.
    dtype: the attention's input dtype.
    platform: ``tpu``, ``gpu`` or ``cpu``; ``target_platform()`` if None.
  """
  if impl not in IMPLEMENTATIONS:
    raise ValueError(f"attention_impl={impl!r} is not one of {IMPLEMENTATIONS}")
  if impl != "auto":
    return impl
  platform = platform or target_platform()
  if platform == "tpu":
    return "pallas"
  if platform in ("gpu", "cuda", "rocm") and jnp.dtype(dtype) in (
      jnp.bfloat16, jnp.float16):
    return "cudnn"
  if platform == "cpu":
    return "chunked"  # dot_product_attention falls back to xla where it cannot help
  return "xla"


def dot_product_attention(q_bthd: jax.Array, k_bshd: jax.Array,
                          v_bshd: jax.Array, *, impl: str = "xla",
                          causal: bool = False, scale: float | None = None,
                          upcast: bool = False,
                          key_mask_bk: jax.Array | None = None) -> jax.Array:
  """Multi-head attention on ``(batch, length, heads, head_dim)`` tensors.

  Args:
    q_bthd: queries.
    k_bshd: keys.
    v_bshd: values.
    impl: one of ``IMPLEMENTATIONS``.
    causal: mask out keys after each query (text encoders).
    scale: logit scale; ``1/sqrt(head_dim)`` if None.
    upcast: compute logits and softmax in float32 (SD 2.x ``upcast_attention``).
    key_mask_bk: ``(batch, keys)``, True (or 1) where a key is attended to,
      False at padding; None attends to every key. Only ``xla`` and
      ``chunked`` take it (``auto`` picks one of them).

  Returns:
    ``(batch, length, heads, head_dim)`` in the dtype of ``q_bthd``.

  Raises:
    ValueError: a mask with ``impl`` ``cudnn`` or ``pallas``.
  """
  scale = 1.0 / math.sqrt(q_bthd.shape[-1]) if scale is None else scale
  resolved = resolve_impl(impl, q_bthd.dtype)
  if key_mask_bk is not None and resolved not in MASKED_IMPLEMENTATIONS:
    if impl != "auto":
      raise ValueError(f"attention_impl={impl!r} cannot take a key padding "
                       f"mask; use one of {MASKED_IMPLEMENTATIONS}")
    resolved = "xla"
  impl = resolved
  if impl == "chunked":
    b, q_len, h, _ = q_bthd.shape
    # Sized for the rows one device computes when the batch is split.
    chunk = None if causal else query_chunk(layers.local_batch(b), q_len, h,
                                            k_bshd.shape[1])
    if chunk is None:
      impl = "xla"
    else:
      return _chunked_attention(q_bthd, k_bshd, v_bshd, scale=scale,
                                upcast=upcast, chunk=chunk,
                                key_mask_bk=key_mask_bk)
  if impl == "xla":
    return _xla_attention(q_bthd, k_bshd, v_bshd, causal=causal, scale=scale,
                          upcast=upcast, key_mask_bk=key_mask_bk)
  if impl == "cudnn":
    return jax.nn.dot_product_attention(
        q_bthd, k_bshd, v_bshd, scale=scale, is_causal=causal,
        implementation="cudnn")
  return _pallas_attention(q_bthd, k_bshd, v_bshd, causal=causal, scale=scale)
