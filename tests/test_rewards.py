"""Rewards: lambda-Harmonic, Bradley-Terry, and the DINO / CLIP reward models."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from personalize_jax import rewards


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_harmonic_worked_example():
  # The inputs are ALIGN values (already in [0, 1]).
  np.testing.assert_allclose(rewards.harmonic(0.9, 0.01, 0.5), 0.0198, atol=5e-5)
  np.testing.assert_allclose(rewards.harmonic(0.7, 0.21, 0.5), 0.3231, atol=5e-5)
  a_i, a_t = np.array([0.3, 0.8, 0.55]), np.array([0.6, 0.2, 0.55])
  for lam in (0.0, 0.3, 0.7, 1.0):
    np.testing.assert_allclose(
        rewards.harmonic(jnp.asarray(a_i), jnp.asarray(a_t), lam),
        1 / (lam / a_i + (1 - lam) / a_t), rtol=1e-6)
  np.testing.assert_allclose(rewards.harmonic(a_i, a_t, 1.0), a_i)
  np.testing.assert_allclose(rewards.harmonic(a_i, a_t, 0.0), a_t)


def test_to_unit_and_alignment_scores():
  np.testing.assert_allclose(rewards.to_unit(jnp.array([-1.0, 0.0, 1.0])),
                             [0.0, 0.5, 1.0])
  rng = np.random.default_rng(0)
  img, ref, txt = (rng.normal(size=s) for s in [(4, 8), (3, 8), (4, 8)])
  align_i, align_t = rewards.alignment_scores(jnp.asarray(img),
                                              jnp.asarray(ref), jnp.asarray(txt))
  expected_i = ((_unit(img) @ _unit(ref).T + 1) / 2).mean(axis=1)
  expected_t = (np.sum(_unit(img) * _unit(txt), -1) + 1) / 2
  np.testing.assert_allclose(align_i, expected_i, rtol=1e-5)
  np.testing.assert_allclose(align_t, expected_t, rtol=1e-5)
  lam = 0.3
  np.testing.assert_allclose(
      rewards.harmonic_reward(jnp.asarray(img), jnp.asarray(ref),
                              jnp.asarray(txt), lam),
      1 / (lam / expected_i + (1 - lam) / expected_t), rtol=1e-5)


def test_dino_similarity_reward():
  rng = np.random.default_rng(1)
  img, ref = rng.normal(size=(5, 6)), rng.normal(size=(2, 6))
  expected = -(1 - (_unit(img) @ _unit(ref).T).mean(axis=1))
  np.testing.assert_allclose(
      rewards.dino_similarity_reward(jnp.asarray(img), jnp.asarray(ref)),
      expected, rtol=1e-5)
  # An image embedded exactly like its single reference gets the maximum, 0.
  np.testing.assert_allclose(
      rewards.dino_similarity_reward(jnp.asarray(ref[:1] * 3),
                                     jnp.asarray(ref[:1])),
      [0.0], atol=1e-6)


def test_bradley_terry_prob():
  r_ref = np.array([0.0, 1.0, -2.0, 3.5, 10.0])
  r_gen = np.array([0.0, 0.5, 1.0, -1.5, 9.0])
  expected = np.exp(r_ref) / (np.exp(r_ref) + np.exp(r_gen))
  np.testing.assert_allclose(rewards.bradley_terry_prob(r_ref, r_gen), expected,
                             rtol=1e-6)
  # exp() of these overflows float32 (and float64 for 1e4); the result must not.
  big = rewards.bradley_terry_prob(jnp.array([1000.0, 1e4, -1e4, 1e4]),
                                   jnp.array([999.0, -1e4, 1e4, 1e4]))
  np.testing.assert_allclose(big, [1 / (1 + np.exp(-1.0)), 1.0, 0.0, 0.5],
                             atol=1e-7)
  p = rewards.bradley_terry_prob(r_ref, r_gen)
  np.testing.assert_allclose(p + rewards.bradley_terry_prob(r_gen, r_ref), 1.0,
                             rtol=1e-6)


def test_sample_preference_labels_frequencies():
  r_ref = jnp.array([-2.0, -0.5, 0.0, 1.0, 3.0])
  r_gen = jnp.array([0.0, 0.0, 0.0, 0.5, -1.0])
  n = 20000
  labels = rewards.sample_preference_labels(
      jax.random.key(0), jnp.tile(r_ref, (n, 1)), r_gen)
  assert labels.shape == (n, 5) and labels.dtype == jnp.float32
  assert set(np.unique(labels)) <= {0.0, 1.0}
  expected = 1 / (1 + np.exp(-(np.asarray(r_ref) - np.asarray(r_gen))))
  # Binomial standard error is at most 0.5 / sqrt(n) = 0.0035; allow 4 of it.
  np.testing.assert_allclose(labels.mean(axis=0), expected, atol=0.014)


def _jit(module, fn):
  """``fn(module, *args)`` jitted with the module split once (one compile)."""
  graphdef, state = nnx.split(module)
  run = jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))
  return lambda *args: run(state, *args)


def test_dino_reward_gradient():
  dino = rewards.DinoReward.from_pretrained("tiny")
  images = jax.random.uniform(jax.random.key(0), (2, 40, 40, 3),
                              minval=-0.9, maxval=0.9)
  refs = jax.random.uniform(jax.random.key(1), (3, 40, 40, 3),
                            minval=-0.9, maxval=0.9)
  direction = jax.random.normal(jax.random.key(2), images.shape) * 0.05
  eps = 0.1

  def run(model, images, refs):
    ref_emb = model.embed(refs)
    total = lambda x: model(x, ref_emb).sum()
    (value, grad) = jax.value_and_grad(total)(images)
    # Both finite-difference points in one batch: one more forward pass.
    shifted = model(jnp.concatenate([images + eps * direction,
                                     images - eps * direction]), ref_emb)
    return value, grad, shifted, model.embed(images), ref_emb

  value, grad, shifted, emb, ref_emb = _jit(dino, run)(images, refs)
  # The reward is -(1 - cos) of the DINO CLS embeddings, averaged over refs.
  expected = -(1 - _unit(emb) @ _unit(ref_emb).T).mean(axis=1)
  np.testing.assert_allclose(value, expected.sum(), rtol=1e-5)
  assert np.isfinite(grad).all() and np.abs(grad).max() > 0
  # The gradient is the real one: compare with a central finite difference.
  numeric = (shifted[:2].sum() - shifted[2:].sum()) / (2 * eps)
  np.testing.assert_allclose(numeric, jnp.vdot(grad, direction), rtol=0.05)


def test_harmonic_reward_model_tiny():
  # pylint: disable-next=g-import-not-at-top
  from personalize_jax.models.tokenizer import load_tokenizer, tokenize
  assert rewards.clip_model_id("l14") == "openai/clip-vit-large-patch14"
  assert rewards.clip_model_id("tiny") == "tiny"
  model = rewards.HarmonicReward.from_pretrained("tiny", lam=0.3)
  tokenizer = load_tokenizer(rewards.clip_model_id("tiny"), subfolder=None)
  ids = jnp.asarray(tokenize(tokenizer, ["a dog in the snow", "a red dog"]))
  images = jax.random.uniform(jax.random.key(3), (2, 48, 48, 3),
                              minval=-1, maxval=1)
  refs = jax.random.uniform(jax.random.key(4), (3, 48, 48, 3),
                            minval=-1, maxval=1)

  def run(model, images, refs, ids):
    ref_emb, text_emb = model.embed_images(refs), model.embed_text(ids)
    reward = model(images, ref_emb, text_emb)
    scores = rewards.alignment_scores(model.embed_images(images), ref_emb,
                                      text_emb)
    grad = jax.grad(lambda x: model(x, ref_emb, text_emb).sum())(images)
    return reward, scores, grad

  reward, (align_i, align_t), grad = _jit(model, run)(images, refs, ids)
  np.testing.assert_allclose(reward, 1 / (0.3 / align_i + 0.7 / align_t),
                             rtol=1e-5)
  assert reward.shape == (2,) and ((reward > 0) & (reward <= 1)).all()
  assert np.isfinite(grad).all() and np.abs(grad).max() > 0
