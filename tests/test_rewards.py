"""Rewards: similarity and lambda-Harmonic, DreamBench scores, the DINO / CLIP
reward models and the host embedders (DINO, CLIP, ALIGN)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from personalize_jax import rewards
from personalize_jax.data import prompts as prompts_lib
from personalize_jax.errors import CheckpointError, UserError
from personalize_jax.models import align_processor, image_processor, presets
from personalize_jax.models.align import AlignModel


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


def test_normalize_runs_device_arrays_in_float32_and_host_arrays_in_float64():
  x = np.random.default_rng(2).normal(size=(3, 4))
  on_host = rewards.normalize(x.astype(np.float32))
  assert isinstance(on_host, np.ndarray) and on_host.dtype == np.float64
  np.testing.assert_allclose(on_host, _unit(x.astype(np.float32)), rtol=1e-15)
  on_device = rewards.normalize(jnp.asarray(x, jnp.bfloat16))
  assert isinstance(on_device, jax.Array) and on_device.dtype == jnp.float32
  # Traced values take the device path too.
  traced = jax.jit(rewards.normalize)(jnp.asarray(x))
  np.testing.assert_allclose(traced, _unit(x), rtol=1e-6)
  # A zero row stays zero instead of dividing by zero.
  np.testing.assert_array_equal(rewards.normalize(np.zeros((1, 4))), 0.0)


def test_dreambench_scores_match_numpy():
  rng = np.random.default_rng(0)
  gen, ref, text = (rng.normal(size=s) for s in [(6, 5), (3, 5), (6, 5)])
  cos = lambda a, b: a @ b / np.linalg.norm(a) / np.linalg.norm(b)
  sims = np.array([[cos(a, b) for b in ref] for a in gen])
  text_cos = np.array([cos(a, b) for a, b in zip(gen, text)])
  align_i, align_t = (sims.mean(1) + 1) / 2, (text_cos + 1) / 2
  # DINO from other embeddings (gen * 2: the same directions as CLIP's).
  dino_gen, dino_ref = gen * 2, ref
  metrics = rewards.subject_metrics(dino_gen, dino_ref, gen, ref, text,
                                    (0.3, 0.5, 0.7))
  assert sorted(metrics) == ["clip_i", "clip_t", "dino", "harmonic_0.3",
                             "harmonic_0.5", "harmonic_0.7"]
  assert metrics["clip_i"] == pytest.approx(sims.mean(), rel=1e-12)
  assert metrics["dino"] == pytest.approx(sims.mean(), rel=1e-12)
  assert metrics["clip_t"] == pytest.approx(text_cos.mean(), rel=1e-12)
  for lam in (0.3, 0.5, 0.7):
    expected = np.mean(1 / (lam / align_i + (1 - lam) / align_t))
    assert metrics[rewards.harmonic_key(lam)] == pytest.approx(expected,
                                                               rel=1e-12)
  # Float32 embeddings (what the embedders return) are scored in float64.
  as_f32 = rewards.subject_metrics(*(x.astype(np.float32) for x in (
      dino_gen, dino_ref, gen, ref, text)), (0.5,))
  assert as_f32["clip_t"] == pytest.approx(np.mean([
      cos(a, b) for a, b in zip(gen.astype(np.float32).astype(np.float64),
                                text.astype(np.float32).astype(np.float64))]),
                                           rel=1e-12)
  ref_ref = [cos(ref[i], ref[j]) for i in range(3) for j in range(3) if i != j]
  photos = rewards.reference_metrics(ref * 3, ref)
  assert photos == pytest.approx({"dino": np.mean(ref_ref),
                                  "clip_i": np.mean(ref_ref)}, rel=1e-12)
  # Identical pairs (cos = 1) are left out: including them would raise it.
  assert photos["clip_i"] < (_unit(ref) @ _unit(ref).T).mean()
  assert np.isnan(rewards.reference_metrics(ref[:1], ref[:1])["dino"])


def test_clip_t_at_least_zero_clamps_each_image_before_the_mean():
  rng = np.random.default_rng(3)
  gen, ref = rng.normal(size=(8, 5)), rng.normal(size=(3, 5))
  # Half the prompts point away from their image: negative cosines.
  text = np.concatenate([gen[:4], -gen[4:]]) + 0.5 * rng.normal(size=(8, 5))
  text_cos = np.sum(_unit(gen) * _unit(text), -1)
  assert (text_cos < 0).sum() >= 3 and (text_cos > 0).sum() >= 3
  align_i = ((_unit(gen) @ _unit(ref).T).mean(1) + 1) / 2
  align_t = (text_cos + 1) / 2
  plain = rewards.subject_metrics(gen, ref, gen, ref, text, (0.3, 0.5))
  floored = rewards.subject_metrics(gen, ref, gen, ref, text, (0.3, 0.5),
                                    clip_t_at_least_zero=True)
  assert plain["clip_t"] == pytest.approx(text_cos.mean(), rel=1e-12)
  assert floored["clip_t"] == pytest.approx(np.maximum(text_cos, 0).mean(),
                                            rel=1e-12)
  assert floored["clip_t"] > plain["clip_t"] + 0.1
  # The other scores, the harmonic ones included, read the raw cosines.
  for lam in (0.3, 0.5):
    assert floored[rewards.harmonic_key(lam)] == pytest.approx(
        np.mean(1 / (lam / align_i + (1 - lam) / align_t)), rel=1e-12)
  assert {k: v for k, v in floored.items() if k != "clip_t"} == {
      k: v for k, v in plain.items() if k != "clip_t"}


def test_protocols_name_their_models():
  assert {name: (p.dino_model, p.clip_model, p.clip_t_at_least_zero)
          for name, p in rewards.PROTOCOLS.items()} == {
              "dreambooth": ("facebook/dino-vits16",
                             "openai/clip-vit-base-patch32", False),
              "rpo_code": ("facebook/dino-vits16",
                           "openai/clip-vit-base-patch16", True)}
  assert all(rewards.get_protocol(name).name == name
             for name in rewards.PROTOCOLS)


def test_an_unknown_protocol_is_a_one_line_user_error():
  with pytest.raises(UserError) as raised:
    rewards.get_protocol("rpo", key="final_eval.protocol")
  assert str(raised.value) == ("config.final_eval.protocol='rpo' is unknown: "
                               "use one of dreambooth, rpo_code")
  with pytest.raises(UserError, match=r"^config.protocol='' is unknown"):
    rewards.get_protocol("")


def test_protocol_models_are_the_protocols_unless_set():
  rpo = rewards.PROTOCOLS["rpo_code"]
  assert rewards.protocol_models(rpo) == ("facebook/dino-vits16",
                                          "openai/clip-vit-base-patch16")
  assert rewards.protocol_models(rpo, "/m/dino", "") == (
      "/m/dino", "openai/clip-vit-base-patch16")
  assert rewards.protocol_models(rewards.PROTOCOLS["dreambooth"], "",
                                 "tiny") == ("facebook/dino-vits16", "tiny")


def test_describe_protocol_says_whose_and_what_was_overridden():
  assert rewards.describe_protocol(
      "dreambooth", "facebook/dino-vits16", "openai/clip-vit-base-patch32"
  ) == ("the DreamBooth paper's (DINO facebook/dino-vits16; "
        "CLIP openai/clip-vit-base-patch32)")
  assert rewards.describe_protocol(
      "rpo_code", "facebook/dino-vits16", "tiny"
  ) == ("the RPO code's (DINO facebook/dino-vits16; CLIP tiny, overriding "
        "the protocol's openai/clip-vit-base-patch16; CLIP-T of each image "
        "counted as at least 0)")


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


@pytest.fixture(scope="module")
def clip_embedder():
  return rewards.Embedder.clip("tiny", chunk=3)


def _images(seed, sizes):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (h, w, 3), np.uint8) for h, w in sizes]


def test_embedder_matches_one_image_at_a_time_in_the_order_given(
    clip_embedder):
  # pylint: disable-next=g-import-not-at-top
  from personalize_jax.models.clip import CLIPModel
  # Mixed sizes, interleaved; 5 images in chunks of 3 (the last one padded).
  images = _images(5, [(40, 40), (48, 56), (40, 40), (64, 48), (48, 56)])
  got = clip_embedder.images(images)
  assert got.shape == (5, 32) and got.dtype == np.float32
  clip = CLIPModel.from_pretrained("tiny")
  each = nnx.jit(lambda model, px: model.get_image_features(px))
  expected = np.concatenate([each(clip, clip_embedder.processor(im[None]))
                             for im in images])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # A batch array is a list of images.
  np.testing.assert_allclose(
      clip_embedder.images(np.stack([images[1], images[4]])), got[[1, 4]],
      rtol=1e-6)


def test_embedder_compiles_once_for_any_count(clip_embedder):
  images = _images(6, [(40, 40)] * 7)
  clip_embedder.images(images[:1])  # compiles the image forward.
  before = rewards._features._cache_size()  # pylint: disable=protected-access
  for n in (2, 3, 4, 7):
    out = clip_embedder.images(images[:n])
    assert out.shape[0] == n
  assert rewards._features._cache_size() == before  # pylint: disable=protected-access
  # Padding does not leak into the results: row i is the same in every call.
  np.testing.assert_allclose(clip_embedder.images(images)[:1],
                             clip_embedder.images(images[:1]), rtol=1e-6)


def test_embedder_reads_prompts_without_the_unique_token(clip_embedder):
  got = clip_embedder.texts(["a sks dog on the Moon", "a SKS dog", "a sksy dog"],
                            "sks")
  assert got.shape == (3, 32) and got.dtype == np.float32
  np.testing.assert_array_equal(
      got, clip_embedder.texts(["a dog on the Moon", "a dog", "a sksy dog"],
                               "zzz"))
  # The token changes what CLIP reads when it is left in.
  assert not np.allclose(got[:1], clip_embedder.texts(
      ["a sks dog on the Moon"], "zzz"))


def test_dino_embedder_embeds_images_and_has_no_text():
  dino = rewards.Embedder.dino("tiny", chunk=2)
  images = _images(7, [(40, 40), (48, 48), (40, 40)])
  reward = rewards.DinoReward.from_pretrained("tiny")
  expected = np.concatenate([
      np.asarray(reward.vit(dino.processor(im[None]))[:, 0]) for im in images])
  np.testing.assert_allclose(dino.images(images), expected, rtol=1e-5,
                             atol=1e-6)
  with pytest.raises(ValueError, match="CLIP or ALIGN"):
    dino.texts(["a sks dog"], "sks")


# ------------------------------------------------------------------- ALIGN --

_PROMPTS = ["a sks dog on the Moon", "a SKS dog", "a red sks backpack",
            "a photo of sks"]


@pytest.fixture(scope="module")
def align_folder(tmp_path_factory):
  """A transformers ALIGN folder: weights, config, BERT tokenizer, processor
  (the tiny one's 32 px crop, to keep it cheap)."""
  folder = tmp_path_factory.mktemp("align")
  AlignModel.from_pretrained("tiny", seed=3).save_pretrained(folder)
  align_processor.load_tokenizer("tiny").save_pretrained(str(folder))
  (folder / image_processor.CONFIG_NAME).write_text(
      json.dumps(presets.ALIGN_TINY_PROCESSOR))
  return folder


@pytest.fixture(scope="module")
def align_embedder(align_folder):
  return rewards.Embedder.image_text(str(align_folder), chunk=3)


@pytest.fixture(scope="module")
def align_port_features(align_folder):
  """``(images, texts)``: our AlignModel's features of uint8 images and of
  prompts (without "sks"), from the folder, one call each, unnormalised."""
  model = AlignModel.from_pretrained(align_folder)
  processor = align_processor.AlignImageProcessor.from_pretrained(
      align_folder)
  tokenizer = align_processor.load_tokenizer(align_folder)
  image_features = nnx.jit(lambda m, px: m.get_image_features(px))
  text_features = nnx.jit(lambda m, i, a: m.get_text_features(i, a))

  def images(images):
    return np.concatenate([image_features(model, processor(im[None]))
                           for im in images])

  def texts(prompts):
    ids, mask = align_processor.tokenize(tokenizer, [
        prompts_lib.without_token(p, "sks") for p in prompts])
    return np.asarray(text_features(model, ids, mask))

  return images, texts


def test_align_embedder_equals_align_model_features(align_embedder,
                                                    align_port_features):
  port_images, port_texts = align_port_features
  images = _images(8, [(40, 40), (48, 56), (40, 40), (64, 48), (36, 36)])
  got = align_embedder.images(images)
  assert got.shape == (5, 16) and got.dtype == np.float32
  np.testing.assert_allclose(_unit(got), _unit(port_images(images)),
                             rtol=1e-5, atol=1e-6)
  text = align_embedder.texts(_PROMPTS, "sks")
  assert text.shape == (4, 16) and text.dtype == np.float32
  expected = port_texts(_PROMPTS)
  np.testing.assert_allclose(_unit(text), _unit(expected), rtol=1e-5,
                             atol=1e-6)
  # The rows padding a chunk do not leak into a prompt's features.
  np.testing.assert_allclose(align_embedder.texts(_PROMPTS[1:2], "sks"),
                             text[1:2], rtol=1e-5, atol=1e-6)


def test_harmonic_with_align_matches_numpy(align_embedder,
                                           align_port_features):
  port_images, port_texts = align_port_features
  generated, photos = _images(9, [(40, 40)] * 4), _images(10, [(48, 48)] * 3)
  gen_emb, ref_emb = (align_embedder.images(x) for x in (generated, photos))
  text_emb = align_embedder.texts(_PROMPTS, "sks")
  lam = 0.3
  got = rewards.harmonic_reward(gen_emb, ref_emb, text_emb, lam)
  metrics = rewards.subject_metrics(gen_emb, ref_emb, gen_emb, ref_emb,
                                    text_emb, (lam,))
  # NumPy, from the port's features.
  gen, ref, text = (_unit(x) for x in (port_images(generated),
                                       port_images(photos),
                                       port_texts(_PROMPTS)))
  align_i = ((gen @ ref.T + 1) / 2).mean(axis=1)
  align_t = (np.sum(gen * text, axis=-1) + 1) / 2
  expected = 1 / (lam / align_i + (1 - lam) / align_t)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert metrics[rewards.harmonic_key(lam)] == pytest.approx(
      expected.mean(), rel=1e-5)
  assert len(np.unique(np.round(got, 6))) == 4  # the images do differ


def test_image_text_models_by_name_and_by_folder(align_folder, tmp_path):
  assert rewards.image_text_model("align") == ("align",
                                               "kakaobrain/align-base")
  assert rewards.image_text_model("align-tiny") == ("align", "tiny")
  assert rewards.image_text_model("b16") == (
      "clip", "openai/clip-vit-base-patch16")
  # A folder says what it is in config.json.
  assert rewards.image_text_model(align_folder) == ("align",
                                                    str(align_folder))
  from personalize_jax.models.clip import CLIPModel  # pylint: disable=g-import-not-at-top
  CLIPModel.from_pretrained("tiny").save_pretrained(tmp_path / "clip")
  assert rewards.image_text_model(tmp_path / "clip")[0] == "clip"
  for name in ("align", "align-tiny", str(align_folder),
               "openai/clip-vit-base-patch32"):
    assert rewards.is_image_text_model(name), name
  assert not rewards.is_image_text_model("nonsense")
  # Another family's folder is a one-line error naming its model_type.
  (tmp_path / "vit").mkdir()
  (tmp_path / "vit" / "config.json").write_text('{"model_type": "vit"}')
  for check in (rewards.image_text_model, rewards.is_image_text_model):
    with pytest.raises(CheckpointError) as info:
      check(str(tmp_path / "vit"))
    assert "\n" not in str(info.value) and "'vit'" in str(info.value)


def test_align_tiny_embedder_works_offline():
  embedder = rewards.Embedder.image_text("align-tiny", chunk=2)
  assert isinstance(embedder.processor, align_processor.AlignImageProcessor)
  images = embedder.images(_images(11, [(40, 40), (50, 60), (40, 40)]))
  text = embedder.texts(["a sks dog", "a dog on the beach", "a cat"], "sks")
  assert images.shape == text.shape == (3, 16)
  assert np.isfinite(images).all() and np.isfinite(text).all()
  assert not np.allclose(text[1], text[2])
