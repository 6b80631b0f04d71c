"""Tests for the attention function: chunked equals xla, auto picks per
backend, key padding masks match a NumPy softmax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from personalize_jax.models import attention


def _qkv(b=2, q_len=1024, k_len=1024, h=8, d=8, seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return tuple(jnp.asarray(rng.standard_normal((b, n, h, d)), dtype)
               for n in (q_len, k_len, k_len))


@pytest.mark.parametrize("b, q_len, h, k_len, expected", [
    (2, 1024, 8, 1024, 128),  # 2*8*128*1024 = 2**21 logits per block.
    (2, 4096, 8, 4096, 32),  # SD at 512 px, highest resolution.
    (1, 4096, 5, 4096, 64),
    (2, 1024, 8, 77, None),  # cross-attention: the whole matrix is small.
    (2, 64, 8, 64, None),  # tiny models.
    (2, 1000, 8, 1000, None),  # 1000 = 8 x 125: no block of >= 16 divides it.
    (1, 48, 1, 2**17, 16),  # 32 would not divide 48.
    (1, 48, 1, 2**20, None),  # a block of 16 would exceed the budget.
])
def test_query_chunk_fits_the_budget_and_divides(b, q_len, h, k_len, expected):
  chunk = attention.query_chunk(b, q_len, h, k_len)
  assert chunk == expected
  if chunk:
    assert q_len % chunk == 0
    assert b * h * chunk * k_len <= attention.CHUNK_ELEMENTS


@pytest.mark.parametrize("upcast", [False, True])
def test_chunked_matches_xla_forward_and_gradients(upcast):
  q, k, v = _qkv()
  weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape),
                        jnp.float32)

  def loss(impl):
    return lambda q, k, v: jnp.sum(weights * attention.dot_product_attention(
        q, k, v, impl=impl, upcast=upcast))

  ours, ours_grads = jax.jit(jax.value_and_grad(
      loss("chunked"), argnums=(0, 1, 2)))(q, k, v)
  ref, ref_grads = jax.jit(jax.value_and_grad(
      loss("xla"), argnums=(0, 1, 2)))(q, k, v)
  # The loss sums 131,072 signed terms: float32 round-off scales with
  # the sum of their magnitudes, not with the far smaller sum itself (and
  # moves with the compiler's fusion choices).
  magnitude = float(jnp.sum(jnp.abs(weights * attention.dot_product_attention(
      q, k, v, impl="xla", upcast=upcast))))
  assert abs(float(ours) - float(ref)) <= 1e-6 * magnitude
  for a, b in zip(ours_grads, ref_grads):
    scale = float(jnp.max(jnp.abs(b)))
    assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * scale


def test_chunked_training_never_holds_the_whole_logit_matrix():
  q, k, v = _qkv()

  def temp_bytes(impl):
    loss = lambda q, k, v: jnp.sum(attention.dot_product_attention(
        q, k, v, impl=impl))
    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    return grad.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

  whole = 2 * 8 * 1024 * 1024 * 4  # bytes of the float32 logits
  assert temp_bytes("xla") >= whole  # the backward pass keeps the softmax
  # A block of 128 queries is 1/8 of the matrix; its backward pass keeps a
  # few block-sized buffers (logits, probabilities, their gradient).
  assert temp_bytes("chunked") < whole / 2


def test_chunked_falls_back_to_xla_for_causal_and_short_sequences():
  for args, causal in ((dict(q_len=1024, k_len=1024), True),
                       (dict(q_len=64, k_len=64), False)):
    q, k, v = _qkv(**args)
    ours = attention.dot_product_attention(q, k, v, impl="chunked",
                                           causal=causal)
    ref = attention.dot_product_attention(q, k, v, impl="xla", causal=causal)
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))


def _masked_reference(q, k, v, keep_bk):
  """NumPy attention whose softmax runs over the kept keys only."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(keep_bk[:, None, None, :], logits, -np.inf)
  weights = np.exp(logits - logits.max(axis=-1, keepdims=True))
  weights /= weights.sum(axis=-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("impl, q_len", [("xla", 12), ("chunked", 1024),
                                         ("auto", 12)])
def test_key_padding_mask_matches_a_numpy_softmax_over_kept_keys(impl, q_len):
  q, k, v = _qkv(q_len=q_len, k_len=q_len)
  keep = np.ones((2, q_len), bool)
  keep[0, 5:] = False  # a padded sequence: 5 tokens
  keep[1, ::3] = False  # any pattern, not only trailing padding
  if impl == "chunked":  # the mask rides along every block of queries
    assert attention.query_chunk(2, q_len, 8, q_len) is not None
  got = attention.dot_product_attention(q, k, v, impl=impl,
                                        key_mask_bk=jnp.asarray(keep))
  np.testing.assert_allclose(got, _masked_reference(q, k, v, keep),
                             atol=2e-5, rtol=2e-5)
  # An integer mask (BERT's attention_mask) is read the same way.
  as_ints = attention.dot_product_attention(
      q, k, v, impl=impl, key_mask_bk=jnp.asarray(keep, jnp.int32))
  np.testing.assert_array_equal(as_ints, got)
  # Without the mask the padded keys count.
  unmasked = attention.dot_product_attention(q, k, v, impl=impl)
  assert float(jnp.max(jnp.abs(unmasked - got))) > 1e-2


@pytest.mark.parametrize("impl", ["cudnn", "pallas"])
def test_key_padding_mask_is_refused_by_kernels_that_cannot_take_it(impl):
  q, k, v = _qkv(q_len=8, k_len=8)
  with pytest.raises(ValueError) as info:
    attention.dot_product_attention(q, k, v, impl=impl,
                                    key_mask_bk=jnp.ones((2, 8), bool))
  message = str(info.value)
  assert "\n" not in message and f"attention_impl={impl!r}" in message
  assert "'xla'" in message


def test_auto_with_a_mask_is_xla_where_it_would_pick_a_kernel(monkeypatch):
  monkeypatch.setattr(attention, "target_platform", lambda: "tpu")
  assert attention.resolve_impl("auto", jnp.float32) == "pallas"
  q, k, v = _qkv(q_len=8, k_len=8)
  keep = jnp.arange(8)[None, :] < jnp.array([[3], [8]])
  np.testing.assert_array_equal(
      attention.dot_product_attention(q, k, v, impl="auto", key_mask_bk=keep),
      attention.dot_product_attention(q, k, v, impl="xla", key_mask_bk=keep))


def test_auto_is_chunked_on_cpu_and_unknown_names_fail():
  assert jax.default_backend() == "cpu"
  assert attention.resolve_impl("auto", jnp.float32) == "chunked"
  assert attention.resolve_impl("xla", jnp.float32) == "xla"
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    attention.resolve_impl("flash", jnp.float32)


# ------------------------------------------------- pallas (TPU interpret mode)
# The Pallas TPU kernel runs on the CPU in TPU interpret mode, so what our
# wrapper adds (padding to the kernel's 128 blocks, masking padded keys,
# zero-padded wide heads, shard_map over the mesh) is checked numerically
# against the xla path, values and gradients.


def _pallas_vs_xla(q_shape, k_len, causal, mesh=None):
  """Max relative error of pallas against xla (value and the 3 gradients)."""
  import jax.experimental.pallas.tpu as pltpu  # pylint: disable=g-import-not-at-top
  from personalize_jax.engine import sharding  # pylint: disable=g-import-not-at-top
  from personalize_jax.models import layers  # pylint: disable=g-import-not-at-top
  b, _, h, d = q_shape
  q, k, v = _qkv(b=b, q_len=q_shape[1], k_len=k_len, h=h, d=d)

  def grads(impl):
    def loss(q, k, v):
      out = attention.dot_product_attention(q, k, v, impl=impl, causal=causal)
      return jnp.sum(jnp.sin(out))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

  ref = grads("xla")(q, k, v)
  with pltpu.force_tpu_interpret_mode():
    if mesh is None:
      ours = grads("pallas")(q, k, v)
    else:
      with layers.batch_sharded_activations(mesh, sharding.BATCH_AXES):
        ours = grads("pallas")(q, k, v)
  return max(float(jnp.max(jnp.abs(a - r)) / jnp.max(jnp.abs(r)))
             for a, r in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)))


@pytest.mark.parametrize("q_shape, k_len, causal", [
    ((2, 64, 1, 40), 77, False),  # cross-attention: 77 keys padded to 128.
    ((1, 77, 2, 64), 77, True),  # the text encoder: causal, padded.
    ((1, 128, 1, 160), 256, False),  # SD 1.x's 160-wide heads -> 256.
])
def test_pallas_matches_xla_with_padding(q_shape, k_len, causal):
  assert _pallas_vs_xla(q_shape, k_len, causal) < 1e-5


PALLAS_ON_TWO_DEVICES = """
import sys
sys.path.insert(0, {tests!r})
from models.test_attention import _pallas_vs_xla
from personalize_jax.engine import sharding
from personalize_jax.models import attention, layers
mesh = sharding.create_mesh(-1, 1)
assert mesh.size == 2
with layers.batch_sharded_activations(mesh, sharding.BATCH_AXES):
  spec = attention.pallas_partition_spec({q_shape}, layers.batch_split())
print(tuple(spec), _pallas_vs_xla({q_shape}, 77, False, mesh))
"""


# One process per case, one grid point per device: TPU interpret mode
# simulates the devices' memories per process, and on several devices it
# stalls after one program, or on a kernel grid of more than one point.
@pytest.mark.parametrize("q_shape, spec", [
    ((2, 64, 1, 40), "(('data', 'fsdp'), None, None, None)"),  # by batch
    ((1, 64, 2, 40), "(None, None, ('data', 'fsdp'), None)"),  # by heads
    ((1, 64, 1, 40), "()"),  # neither divides: whole on each device
])
def test_pallas_under_shard_map_matches_xla_on_two_devices(q_shape, spec):
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from pathlib import Path  # pylint: disable=g-import-not-at-top
  tests = str(Path(__file__).resolve().parents[1])
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  result = subprocess.run(
      [sys.executable, "-c", PALLAS_ON_TWO_DEVICES.format(
          tests=tests, q_shape=q_shape)],
      env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  got_spec, err = result.stdout.strip().splitlines()[-1].rsplit(" ", 1)
  assert got_spec == spec
  assert float(err) < 1e-5


def test_pallas_partition_spec_prefers_batch_then_heads():
  from jax.sharding import AbstractMesh, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = AbstractMesh((2, 2), ("data", "fsdp"))
  split = (mesh, ("data", "fsdp"), 4)
  axes = ("data", "fsdp")
  assert attention.pallas_partition_spec((8, 64, 3, 40), split) == P(
      axes, None, None, None)
  assert attention.pallas_partition_spec((2, 64, 8, 40), split) == P(
      None, None, axes, None)
  assert attention.pallas_partition_spec((2, 64, 3, 40), split) == P()
  assert attention.pallas_partition_spec((8, 64, 3, 40), None) is None
  assert attention.pallas_partition_spec(
      (8, 64, 3, 40), (mesh, axes, 1)) is None
