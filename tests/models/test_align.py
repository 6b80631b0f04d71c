"""ALIGN against transformers' PyTorch AlignModel on tiny random weights."""

import copy
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from PIL import Image

from personalize_jax.errors import CheckpointError, UserError
from personalize_jax.models import (align, align_processor, checkpoint,
                                    image_processor, presets)
from torch_reference import FAST_COMPILE, rel_err

TOL = 1e-4
_HF_ONLY = ("model_type", "architectures")

# Another geometry: max pooling, ReLU, odd kernels, 5 blocks, stage 0
# strided with even padding (depthwise_padding), type ids of 3 kinds.
_VARIANT = {
    **presets.ALIGN_TINY, "projection_dim": 24,
    "text_config": {**presets.ALIGN_TINY["text_config"], "hidden_size": 24,
                    "num_attention_heads": 3, "num_hidden_layers": 1,
                    "hidden_act": "gelu_new", "max_position_embeddings": 20,
                    "type_vocab_size": 3},
    "vision_config": {**presets.ALIGN_TINY["vision_config"],
                      "width_coefficient": 0.5, "depth_coefficient": 1.2,
                      "kernel_sizes": [3, 7], "in_channels": [32, 16],
                      "out_channels": [16, 48], "strides": [2, 2],
                      "num_block_repeats": [1, 2], "expand_ratios": [4, 3],
                      "depthwise_padding": [0], "hidden_act": "relu",
                      "pooling_type": "max", "squeeze_expansion_ratio": 0.5,
                      "batch_norm_eps": 1e-5},
}


def _hf_config(config):
  # A deep copy: transformers' configs update nested dicts in place.
  return transformers.AlignConfig(**copy.deepcopy(
      {k: v for k, v in config.items() if k not in _HF_ONLY}))


def _reference(config, folder):
  """A transformers AlignModel moved off its init, saved to ``folder``."""
  model = transformers.AlignModel(_hf_config(config)).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
    for name, buf in model.named_buffers():
      if name.endswith("running_mean"):
        buf.copy_(0.2 * torch.randn(buf.shape, generator=gen))
      elif name.endswith("running_var"):
        buf.copy_(0.5 + torch.rand(buf.shape, generator=gen))
  model.save_pretrained(folder)
  return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  folder = tmp_path_factory.mktemp("align_ref")
  return _reference(presets.ALIGN_TINY, folder), folder


def _jit(model, fn):
  """``fn(model, *args)`` compiled once."""
  graph, state = nnx.split(model)
  run = jax.jit(lambda s, *a: fn(nnx.merge(graph, s), *a),
                compiler_options=FAST_COMPILE)
  return lambda *args: run(state, *map(jnp.asarray, args))


def _nchw(pixels_bhwc):
  return torch.from_numpy(pixels_bhwc.transpose(0, 3, 1, 2).copy())


def _text_inputs(config, seed=0):
  """Ids with padding (padded ids not 0, so a mask that is ignored shows)."""
  text = config["text_config"]
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, text.get("vocab_size", 30522), size=(3, 12))
  mask = np.ones_like(ids)
  mask[1, 7:], mask[2, 3:] = 0, 0
  types = rng.integers(0, text.get("type_vocab_size", 2), size=ids.shape)
  return ids, mask, types


@pytest.mark.parametrize("name", ["tiny", "variant"])
def test_features_match_transformers(tmp_path, tiny, name):
  config = presets.ALIGN_TINY if name == "tiny" else _VARIANT
  ref, folder = tiny if name == "tiny" else (
      _reference(_VARIANT, tmp_path), tmp_path)
  ours = align.AlignModel.from_pretrained(folder)
  pixels = np.random.default_rng(0).normal(size=(2, 33, 38, 3)).astype(
      np.float32)
  ids, mask, types = _text_inputs(config)
  got = _jit(ours, lambda m, i, a, t, p: dict(
      image=m.get_image_features(p), vision=m.vision_model(p)[0],
      text=m.get_text_features(i, a), typed=m.get_text_features(i, a, t),
      bert=m.text_model(i, a), logits=m(i, p, a)))(ids, mask, types, pixels)
  t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
  with torch.no_grad():
    image = ref.get_image_features(pixel_values=_nchw(pixels))
    text = ref.get_text_features(input_ids=t_ids, attention_mask=t_mask)
    typed = ref.get_text_features(input_ids=t_ids, attention_mask=t_mask,
                                  token_type_ids=torch.from_numpy(types))
    bert = ref.text_model(input_ids=t_ids, attention_mask=t_mask)
    logits = ref(input_ids=t_ids, attention_mask=t_mask,
                 pixel_values=_nchw(pixels)).logits_per_image
  assert got["image"].shape == (2, config["projection_dim"])
  errors = {
      "image": rel_err(got["image"], image.pooler_output),
      "vision": rel_err(got["vision"],
                        image.last_hidden_state.permute(0, 2, 3, 1)),
      "text": rel_err(got["text"], text.pooler_output),
      "typed": rel_err(got["typed"], typed.pooler_output),
      "bert": rel_err(got["bert"][0], bert.last_hidden_state),
      "pooler": rel_err(got["bert"][1], bert.pooler_output),
      "logits": rel_err(got["logits"], logits),
  }
  assert max(errors.values()) < TOL, errors
  # The mask is honoured: without it the padded sequences change.
  unmasked = _jit(ours, lambda m, i: m.get_text_features(i))(ids)
  assert rel_err(unmasked[1:], np.asarray(got["text"])[1:]) > 1e-3


def test_save_pretrained_round_trip(tmp_path, tiny):
  ref, folder = tiny
  ours = align.AlignModel.from_pretrained(folder)
  ours.save_pretrained(tmp_path / "ours")
  back, info = transformers.AlignModel.from_pretrained(
      tmp_path / "ours", output_loading_info=True)
  assert not any(info.values()), info
  ref_sd, back_sd = ref.state_dict(), back.state_dict()
  assert ref_sd.keys() == back_sd.keys()
  for key, value in ref_sd.items():
    assert torch.equal(value, back_sd[key]), key
  again = align.AlignModel.from_pretrained(tmp_path / "ours")
  assert again.config == ours.config
  np.testing.assert_array_equal(
      again.vision_model.embeddings.batchnorm.running_var[...],
      ref.vision_model.embeddings.batchnorm.running_var.numpy())


def test_parameter_count_of_align_base():
  default = transformers.AlignConfig()
  config = align.AlignConfig.from_dict(default.to_dict())
  model = nnx.eval_shape(lambda: align.AlignModel(
      config, rngs=checkpoint.shape_only_rngs()))
  assert checkpoint.count_params(model) == 172_117_841
  with torch.device("meta"):
    ref = transformers.AlignModel(default)
  assert sum(p.numel() for p in ref.parameters()) == 172_117_841
  # The published config differs from the default only where no shape does.
  base = align.AlignConfig.from_dict(presets.ALIGN_BASE)
  assert dataclasses.replace(
      base, vision_config=dataclasses.replace(
          base.vision_config, image_size=600, hidden_dim=2560)) == config
  # and transformers reads it as we do.
  hf_base = _hf_config(presets.ALIGN_BASE)
  for ours, theirs in ((base.text_config, hf_base.text_config),
                       (base.vision_config, hf_base.vision_config)):
    for field in dataclasses.fields(ours):
      value = getattr(theirs, field.name)
      assert getattr(ours, field.name) == (
          tuple(value) if isinstance(value, list) else value), field.name


def test_block_geometry_follows_the_coefficients():
  specs = align.block_specs(align.AlignConfig.from_dict(
      presets.ALIGN_BASE).vision_config)
  # ceil(3.1 * n) blocks per stage: 4, 7, 7, 10, 10, 13, 4.
  assert len(specs) == 55
  assert (specs[0].in_dim, specs[0].out_dim, specs[-1].out_dim) == (64, 32, 640)
  assert [s.residual for s in specs[:6]] == [False, True, True, True, False,
                                             True]
  assert [s.stride for s in specs[3:5]] == [1, 2]


# ------------------------------------------------------------ preprocessing

_PROCESSORS = {
    "align-base": presets.ALIGN_PROCESSOR,
    # transformers' class defaults: bicubic, no crop, mean/std, include_top.
    "defaults": {"image_processor_type": "EfficientNetImageProcessor",
                 "size": {"height": 48, "width": 40}},
    "imagenet": {"image_processor_type": "EfficientNetImageProcessorPil",
                 "size": 64, "crop_size": 56, "do_center_crop": True,
                 "resample": 3, "rescale_factor": 1 / 127.5,
                 "rescale_offset": True, "image_mean": [0.485, 0.456, 0.406],
                 "image_std": [0.229, 0.224, 0.225]},
}


def _processors(folder, name):
  folder.mkdir(exist_ok=True)
  (folder / image_processor.CONFIG_NAME).write_text(
      json.dumps(_PROCESSORS[name]))
  reference = transformers.AutoImageProcessor.from_pretrained(
      folder, backend="pil")
  return align_processor.AlignImageProcessor.from_pretrained(folder), reference


def _reference_pixels(reference, image_hwc):
  out = reference(image_hwc, return_tensors="np")["pixel_values"][0]
  return out.transpose(1, 2, 0)


def _smooth_image(height: int, width: int) -> np.ndarray:
  """A photo-like uint8 image: smooth shading with a sharp-edged band."""
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  rgb = np.stack([np.sin(6 * x + 2 * y), np.cos(5 * y - 3 * x), x * y], -1)
  rgb[height // 3:height // 2, width // 4:] = [0.9, -0.9, 0.2]
  return np.round((rgb + 1) * 127.5).clip(0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", sorted(_PROCESSORS))
def test_preprocessing_matches_transformers(tmp_path, name):
  ours, reference = _processors(tmp_path, name)
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, size=(37, 91, 3), dtype=np.uint8),
            rng.integers(0, 256, size=(420, 380, 3), dtype=np.uint8),
            _smooth_image(300, 500)]
  for image in images:
    expected = _reference_pixels(reference, image)
    got = np.asarray(ours(image[None]))[0]
    assert got.shape == expected.shape, image.shape
    # Pillow's integer arithmetic, bit for bit (float32 rounding aside).
    assert np.abs(got - expected).max() < 1e-5 * np.abs(expected).max()


def test_dreambench_photos_match_transformers(shared_dir, tmp_path):
  paths = sorted((shared_dir / "dreambench" / "dataset").glob("*/*.jpg"))
  assert paths, f"no DreamBench photos under {shared_dir}"
  ours, reference = _processors(tmp_path, "align-base")
  for path in paths[::40]:  # 4 subjects, 767 to 2048 px
    image = np.asarray(Image.open(path).convert("RGB"))
    expected = _reference_pixels(reference, image)
    got = np.asarray(ours(image[None]))[0]
    assert got.shape == expected.shape == (289, 289, 3), path
    assert np.abs(got - expected).max() < 1e-5, path


def test_reward_path_is_differentiable_and_close_to_eval_path(tmp_path, tiny):
  model = align.AlignModel.from_pretrained(tiny[1])
  # No preprocessor_config.json in the folder: align-base's processing.
  processor = align_processor.AlignImageProcessor.from_pretrained(tiny[1])
  assert processor.resize.crop_hw == (289, 289)
  image = _smooth_image(400, 360)
  decoded = jnp.asarray(image[None], jnp.float32) / 127.5 - 1.0
  eval_pixels = processor(image[None])
  # Pillow rounds each of its two passes to uint8: about a level apart.
  diff = np.abs(np.asarray(processor.preprocess_decoded(decoded))
                - np.asarray(eval_pixels))
  assert diff.mean() < 0.2 / 127.5 and diff.max() < 1.5 / 127.5
  weights = jax.random.normal(jax.random.key(0), (1, 16))

  def reward(m, x):
    features = m.get_image_features(processor.preprocess_decoded(x))
    return jnp.sum(features * weights), features

  (_, features), grad = _jit(model, lambda m, x: jax.value_and_grad(
      lambda y: reward(m, y), has_aux=True)(x))(decoded)
  expected = _jit(model, lambda m, p: m.get_image_features(p))(eval_pixels)
  assert rel_err(features, expected) < 1e-3
  assert grad.shape == decoded.shape and np.isfinite(np.asarray(grad)).all()
  assert float(jnp.abs(grad).max()) > 0


# ------------------------------------------------------- tokenizer, presets


def _write_vocab(folder):
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of",
           "dog", "cat", "##s", "the", "on", "beach"]
  (folder / "vocab.txt").write_text("\n".join(words) + "\n")


def test_tokenizer_pads_like_align_processor(tmp_path):
  _write_vocab(tmp_path)
  tokenizer = align_processor.load_tokenizer(tmp_path)
  prompts = ["a photo of a dog on the beach", "Cats"]
  ids, mask = align_processor.tokenize(tokenizer, prompts)
  reference = transformers.AlignProcessor(
      image_processor=transformers.EfficientNetImageProcessorPil(),
      tokenizer=tokenizer)(text=prompts, return_tensors="np")
  np.testing.assert_array_equal(ids, reference["input_ids"])
  np.testing.assert_array_equal(mask, reference["attention_mask"])
  assert ids.shape == (2, align_processor.MAX_LENGTH)
  assert ids.dtype == np.int32
  assert mask.sum(axis=1).tolist() == [10, 4]  # [CLS] ... [SEP]


def test_tiny_preset():
  model = align.AlignModel.from_pretrained("tiny", seed=1)
  assert model.config == align.AlignConfig.from_dict(presets.ALIGN_TINY)
  assert float(model.temperature[...]) == 1.0
  norm = model.vision_model.encoder.blocks[0].projection.project_bn
  np.testing.assert_array_equal(norm.running_var[...], np.ones(8))
  # layers.conv's depthwise conv: one input channel a group, axis unnamed.
  depthwise = model.vision_model.encoder.blocks[0].depthwise_conv
  kernel = depthwise.depthwise_conv.kernel
  assert kernel.shape == (3, 3, 1, 8)
  assert kernel.out_sharding == (None, None, None, "conv_out")
  processor = align_processor.AlignImageProcessor.from_pretrained("tiny")
  pixels = processor(np.zeros((1, 50, 60, 3), np.uint8))
  assert pixels.shape == (1, 32, 32, 3) and float(pixels.max()) == -1.0
  features = _jit(model, lambda m, p: m.get_image_features(p))(pixels)
  assert np.isfinite(np.asarray(features)).all()
  # The tiny tokenizer works offline, within the tiny vocabulary; words it
  # lacks split into pieces, not [UNK].
  tokenizer = align_processor.load_tokenizer("tiny")
  assert len(tokenizer) == presets.ALIGN_TINY["text_config"]["vocab_size"]
  ids, mask = align_processor.tokenize(tokenizer, ["a sks dog, zqxv!", "a"])
  assert ids.max() < len(tokenizer)
  assert tokenizer.unk_token_id not in ids[mask.astype(bool)]
  assert mask.sum(axis=1).tolist() == [12, 3]  # [CLS] a sk ##s ... [SEP]
  text = _jit(model, lambda m, i, a: m.get_text_features(i, a))(ids, mask)
  assert text.shape == (2, 16) and np.isfinite(np.asarray(text)).all()


def _one_line(error_type, fn, *match):
  with pytest.raises(error_type) as info:
    fn()
  message = str(info.value)
  assert "\n" not in message and all(m in message for m in match), message


def test_user_errors_are_one_line(tmp_path, tiny):
  empty = tmp_path / "empty"
  empty.mkdir()
  _one_line(CheckpointError, lambda: align.AlignModel.from_pretrained(empty),
            "config.json")
  clip_folder = tmp_path / "clip"
  clip_folder.mkdir()
  (clip_folder / "config.json").write_text(json.dumps(presets.CLIP))
  _one_line(CheckpointError,
            lambda: align.AlignModel.from_pretrained(clip_folder),
            "'clip'", "AlignModel")
  _one_line(CheckpointError, lambda: align_processor.load_tokenizer(tiny[1]),
            "tokenizer")
  corrupt = tmp_path / "corrupt"
  corrupt.mkdir()
  (corrupt / "tokenizer.json").write_text("{not json")
  _one_line(CheckpointError, lambda: align_processor.load_tokenizer(corrupt),
            "could not load the tokenizer", "re-download")
  (corrupt / "tokenizer.json").unlink()
  (corrupt / "vocab.txt").write_bytes(b"\xff\xfe\x00 not utf-8")
  _one_line(CheckpointError, lambda: align_processor.load_tokenizer(corrupt),
            "could not load the tokenizer")
  _one_line(UserError, lambda: align_processor.AlignImageProcessor.from_config(
      {"image_processor_type": "CLIPImageProcessor"}), "CLIPImageProcessor")
  bad_vision = {"vision_config": {"pooling_type": "median"}}
  _one_line(UserError, lambda: align.AlignConfig.from_dict(bad_vision),
            "pooling_type")
  bad_stages = {"vision_config": {"strides": [1, 2]}}
  _one_line(UserError, lambda: align.AlignConfig.from_dict(bad_stages),
            "per-stage")
  bad_text = {"text_config": {"hidden_size": 30, "num_attention_heads": 4}}
  _one_line(UserError, lambda: align.AlignConfig.from_dict(bad_text),
            "multiple")
  # Weights without a BatchNorm statistic the config implies.
  tensors = checkpoint.read_safetensors_file(
      tiny[1] / checkpoint.TRANSFORMERS_WEIGHTS)
  del tensors["vision_model.embeddings.batchnorm.running_var"]
  broken = tmp_path / "broken"
  checkpoint.write_safetensors(broken / checkpoint.TRANSFORMERS_WEIGHTS,
                               tensors)
  (broken / "config.json").write_text((tiny[1] / "config.json").read_text())
  _one_line(CheckpointError, lambda: align.AlignModel.from_pretrained(broken),
            "running_var")
