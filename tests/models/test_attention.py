"""Tests for the attention function: chunked equals xla, auto picks per backend."""

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

  ours = jax.jit(jax.value_and_grad(loss("chunked"), argnums=(0, 1, 2)))(
      q, k, v)
  ref = jax.jit(jax.value_and_grad(loss("xla"), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref)):
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


def test_auto_is_chunked_on_cpu_and_unknown_names_fail():
  assert jax.default_backend() == "cpu"
  assert attention.resolve_impl("auto", jnp.float32) == "chunked"
  assert attention.resolve_impl("xla", jnp.float32) == "xla"
  with pytest.raises(ValueError, match="attention_impl='flash'"):
    attention.resolve_impl("flash", jnp.float32)
