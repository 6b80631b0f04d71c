"""CLIP ports against transformers' PyTorch models on tiny random weights."""

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

from personalize_jax.errors import CheckpointError, UserError
from personalize_jax.models import checkpoint, clip, presets, tokenizer

TOL = 1e-4
_HF_ONLY = ("model_type", "architectures")


def _rel_err(ours, ref):
  ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref
  return float(np.abs(np.asarray(ours, np.float32) - ref).max()
               / np.abs(ref).max())


def _jit(model, fn):
  """``fn(model, *args)`` compiled once (eager JAX compiles op by op)."""
  graph, state = nnx.split(model)
  run = jax.jit(lambda s, *a: fn(nnx.merge(graph, s), *a))
  return lambda *args: run(state, *map(jnp.asarray, args))


def _hf_kwargs(preset, **overrides):
  # A deep copy: transformers' CLIPConfig updates nested dicts in place.
  return copy.deepcopy({**{k: v for k, v in preset.items()
                           if k not in _HF_ONLY}, **overrides})


def _perturbed(model):
  """Moves every weight off its init (norms start at exactly 1 and 0)."""
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _pixels(batch, size, seed=0):
  return np.random.default_rng(seed).normal(
      size=(batch, size, size, 3)).astype(np.float32)


def _nchw(pixels_bhwc):
  return torch.from_numpy(pixels_bhwc.transpose(0, 3, 1, 2).copy())


def _assert_round_trip(ours, hf_cls, ref, folder):
  """Our save_pretrained loads in transformers with the reference's weights."""
  ours.save_pretrained(folder)
  back, info = hf_cls.from_pretrained(folder, output_loading_info=True)
  assert not any(info.values()), info
  ref_sd, back_sd = ref.state_dict(), back.state_dict()
  assert ref_sd.keys() == back_sd.keys()
  for key, value in ref_sd.items():
    assert torch.equal(value, back_sd[key]), key


def _text_ref(folder, **overrides):
  """A perturbed transformers CLIPTextModel, saved by transformers 5."""
  ref = _perturbed(transformers.CLIPTextModel(transformers.CLIPTextConfig(
      **_hf_kwargs(presets.CLIP_TEXT, **overrides))))
  ref.save_pretrained(folder)  # transformers 5 drops the text_model. prefix
  return ref


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
  folder = tmp_path_factory.mktemp("text_ref")
  return _text_ref(folder), folder


def _text_ids():
  ids = np.random.default_rng(0).integers(6, 40000, size=(3, 12))
  ids[:, 0] = presets.CLIP_TEXT["bos_token_id"]
  ids[0, 5:] = 49407                            # EOS then EOS padding (SD 1.x)
  ids[1, 4], ids[1, 8:] = 5, [49407, 0, 0, 0]   # 5 first, 49407 later
  ids[2, 7], ids[2, 9] = 49407, 5
  return ids


@pytest.mark.parametrize("act, eos", [
    ("quick_gelu", 49407),  # SD 1.x
    ("gelu", 2),            # SD 2.x; eos 2 as in configs before 4.31: argmax
    ("quick_gelu", 5),      # a custom end token that is not the largest id
])
def test_text_model_matches_transformers(tmp_path, text_ckpt, act, eos):
  if (act, eos) == ("quick_gelu", 49407):
    ref, folder = text_ckpt
  else:
    ref, folder = _text_ref(tmp_path / "ref", hidden_act=act,
                            eos_token_id=eos), tmp_path / "ref"
  ours = clip.CLIPTextModel.from_pretrained(folder)
  assert ours.config.hidden_act == act and ours.config.eos_token_id == eos
  ids = _text_ids()
  hidden, pooled, called = _jit(ours, lambda m, x: (*m.encode(x), m(x)))(ids)
  with torch.no_grad():
    out = ref(torch.from_numpy(ids))
  assert _rel_err(hidden, out.last_hidden_state) < TOL
  assert _rel_err(pooled, out.pooler_output) < TOL
  np.testing.assert_array_equal(called, hidden)
  _assert_round_trip(ours, transformers.CLIPTextModel, ref, tmp_path / "ours")


def test_legacy_text_checkpoint_with_position_ids(tmp_path, text_ckpt):
  # SD 1.x text_encoder files: `text_model.` keys and the position_ids buffer.
  ours = clip.CLIPTextModel.from_pretrained(text_ckpt[1])
  tensors = checkpoint.module_tensors(ours)
  assert tensors and all(k.startswith("text_model.") for k in tensors)
  legacy = {**tensors,
            "text_model.embeddings.position_ids": np.arange(77)[None]}
  checkpoint.write_safetensors(tmp_path / checkpoint.TRANSFORMERS_WEIGHTS,
                               legacy)
  (tmp_path / "config.json").write_text(json.dumps(ours.config.to_dict()))
  back = checkpoint.module_tensors(clip.CLIPTextModel.from_pretrained(tmp_path))
  assert back.keys() == tensors.keys()
  for key, value in tensors.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_bf16_compute_with_remat_layers(text_ckpt):
  ref, folder = text_ckpt
  bf16 = clip.CLIPTextModel.from_pretrained(folder, dtype=jnp.bfloat16,
                                            remat=True)
  assert bf16.text_model.final_layer_norm.scale.get_value().dtype == jnp.float32
  ids = _text_ids()
  out = _jit(bf16, lambda m, x: m(x))(ids)
  assert out.dtype == jnp.bfloat16
  with torch.no_grad():
    assert _rel_err(out, ref(torch.from_numpy(ids)).last_hidden_state) < 3e-2


def test_vision_model_matches_transformers(tmp_path):
  ref = _perturbed(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      **_hf_kwargs(presets.CLIP_VISION, hidden_act="gelu"))))
  ref.save_pretrained(tmp_path / "ref")
  ours = clip.CLIPVisionModel.from_pretrained(tmp_path / "ref")
  pixels = _pixels(2, presets.CLIP_VISION["image_size"])
  hidden, pooled = _jit(ours, lambda m, x: m.encode(x))(pixels)
  with torch.no_grad():
    out = ref(_nchw(pixels))
  assert _rel_err(hidden, out.last_hidden_state) < TOL
  assert _rel_err(pooled, out.pooler_output) < TOL
  _assert_round_trip(ours, transformers.CLIPVisionModel, ref, tmp_path / "ours")


_CLIP_VARIANT = {
    **presets.CLIP,
    "projection_dim": 24,
    "logit_scale_init_value": 1.5,
    "text_config": {**presets.CLIP_TEXT, "hidden_size": 48,
                    "num_attention_heads": 6, "hidden_act": "gelu",
                    "num_hidden_layers": 1},
    "vision_config": {**presets.CLIP_VISION, "hidden_size": 40,
                      "intermediate_size": 80, "num_attention_heads": 5,
                      "image_size": 48, "patch_size": 16,
                      "num_hidden_layers": 3},
}


@pytest.mark.parametrize("config", [presets.CLIP, _CLIP_VARIANT],
                         ids=["preset", "variant"])
def test_clip_model_matches_transformers(tmp_path, config):
  ref = _perturbed(transformers.CLIPModel(transformers.CLIPConfig(
      **_hf_kwargs(config))))
  ref.save_pretrained(tmp_path / "ref")
  ours = clip.CLIPModel.from_pretrained(tmp_path / "ref")
  pixels = _pixels(3, config["vision_config"]["image_size"])
  ids = np.full((2, 77), 49407)
  ids[:, :5] = [[49406, 320, 1125, 539, 49407], [49406, 2368, 1929, 7, 9]]
  with torch.no_grad():
    ref_image = ref.get_image_features(pixel_values=_nchw(pixels))
    ref_text = ref.get_text_features(input_ids=torch.from_numpy(ids))
    ref_logits = ref(input_ids=torch.from_numpy(ids),
                     pixel_values=_nchw(pixels)).logits_per_image
  image, text, logits = _jit(ours, lambda m, i, p: (
      m.get_image_features(p), m.get_text_features(i), m(i, p)))(ids, pixels)
  assert image.shape == (3, config["projection_dim"])
  assert _rel_err(image, ref_image.pooler_output) < TOL
  assert _rel_err(text, ref_text.pooler_output) < TOL
  assert _rel_err(logits, ref_logits) < TOL
  _assert_round_trip(ours, transformers.CLIPModel, ref, tmp_path / "ours")


def test_vit_b32_parameter_count():
  # openai/clip-vit-base-patch32's config.json, the fields shapes depend on.
  b32 = {"model_type": "clip", "projection_dim": 512, "text_config_dict": None,
         "text_config": {"hidden_size": 512, "intermediate_size": 2048,
                         "num_attention_heads": 8, "num_hidden_layers": 12,
                         "max_position_embeddings": 77, "vocab_size": 49408},
         "vision_config": {"hidden_size": 768, "intermediate_size": 3072,
                           "num_attention_heads": 12, "num_hidden_layers": 12,
                           "image_size": 224, "patch_size": 32}}
  config = clip.CLIPConfig.from_dict(b32)
  model = nnx.eval_shape(lambda: clip.CLIPModel(config, rngs=nnx.Rngs(0)))
  assert checkpoint.count_params(model) == 151_277_313
  with torch.device("meta"):
    ref = transformers.CLIPModel(transformers.CLIPConfig(**b32))
  assert sum(p.numel() for p in ref.parameters()) == 151_277_313


def test_legacy_config_dicts_override_like_transformers():
  raw = {**presets.CLIP, "text_config_dict": {"hidden_size": 48,
                                              "num_attention_heads": 6},
         "vision_config_dict": {"patch_size": 16}, "unknown_key": 1}
  ours = clip.CLIPConfig.from_dict(raw)
  ref = transformers.CLIPConfig(**_hf_kwargs(raw))
  for name in ("text_config", "vision_config"):
    ours_sub = getattr(ours, name)
    for field in dataclasses.fields(ours_sub):
      assert getattr(ours_sub, field.name) == getattr(getattr(ref, name),
                                                      field.name), field.name
  assert ours.text_config.hidden_size == 48
  assert ours.vision_config.patch_size == 16


def test_user_errors_are_one_line(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(presets.CLIP))
  with pytest.raises(CheckpointError) as info:
    clip.CLIPTextModel.from_pretrained(tmp_path)
  assert "CLIPModel" in str(info.value) and "\n" not in str(info.value)
  with pytest.raises(UserError, match="not a multiple"):
    clip.CLIPTextConfig.from_dict({"hidden_size": 30, "num_attention_heads": 4})
  with pytest.raises(UserError, match="hidden_act"):
    clip.CLIPVisionConfig.from_dict({"hidden_act": "swish2"})


def test_tiny_preset_fits_shipped_tokenizer():
  # The preset's forward is checked against transformers above; here: init.
  model = clip.CLIPModel.from_pretrained("tiny", seed=1)
  assert model.config == clip.CLIPConfig.from_dict(presets.CLIP)
  # log(1 / 0.07), which the config rounds to 2.6592.
  assert float(model.logit_scale.get_value()) == pytest.approx(2.6592, abs=1e-4)
  scale = model.text_model.final_layer_norm.scale.get_value()
  np.testing.assert_array_equal(scale, np.ones(32))
  ids = tokenizer.tokenize(tokenizer.load_tokenizer("tiny"), "a sks dog")
  table = model.text_model.embeddings.token_embedding.embedding.get_value()
  assert ids.max() < table.shape[0] and float(np.std(table)) > 0
