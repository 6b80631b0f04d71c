"""SDXL's models against diffusers/transformers on tiny random weights.

The U-Net's added embedding (pooled text + time ids) and per-block transformer
depths, the second text encoder (``CLIPTextModelWithProjection``), the hidden
states SDXL conditions on, and the published parameter counts.
"""

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from personalize_jax.errors import UserError
from personalize_jax.models import checkpoint, clip, presets
from personalize_jax.models.unet import (UNet2DConditionConfig,
                                         UNet2DConditionModel)

import torch_reference

# Three levels, depths (1, 2, 3) down, 3 in the middle, (3, 2, 1) up, so a
# wrong reversal shows; odd sinusoid width (5), the other sinusoid order and
# shift, SDXL's null upcast_attention, and odd 10x10 latents.
DEEP = dict(
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
                      "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[16, 32, 32], layers_per_block=[1, 2, 1],
    attention_head_dim=[1, 2, 4], transformer_layers_per_block=[1, 2, 3],
    cross_attention_dim=24, use_linear_projection=True, upcast_attention=None,
    addition_embed_type="text_time", addition_time_embed_dim=5,
    projection_class_embeddings_input_dim=12 + 6 * 5, norm_num_groups=4,
    flip_sin_to_cos=False, freq_shift=1, sample_size=10)

# (config, latent size, pooled text width, with gradients).
CASES = {"tiny": (torch_reference.public(presets.TINY_SDXL_UNET), 8, 32, True),
         "deep": (DEEP, 10, 12, False)}

# Original size, crop top-left, target size: one row per batch element.
TIME_IDS = np.array([[64, 64, 0, 0, 64, 64], [96, 80, 8, 4, 64, 64]],
                    np.float32)


def _torch_forward(model, inputs):
  out = model(
      torch.from_numpy(inputs["x"]).permute(0, 3, 1, 2),
      torch.tensor(inputs["t"]), torch.from_numpy(inputs["context"]),
      added_cond_kwargs={"text_embeds": torch.from_numpy(inputs["text_embeds"]),
                         "time_ids": torch.from_numpy(inputs["time_ids"])})
  return out.sample.permute(0, 2, 3, 1)


def _call(model, inputs):
  return model(inputs["x"], inputs["t"], inputs["context"],
               text_embeds=inputs["text_embeds"], time_ids=inputs["time_ids"])


def _ours(model, inputs, with_grads):
  """The prediction, and d mean((pred - target)^2) / d params if asked."""
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(params, inputs):
    pred = _call(nnx.merge(graphdef, params), inputs)
    return jnp.mean((pred - inputs["target"]) ** 2), pred

  fn = (jax.grad(loss_fn, has_aux=True) if with_grads
        else lambda params, inputs: (None, loss_fn(params, inputs)[1]))
  grads, pred = jax.jit(fn, compiler_options=torch_reference.FAST_COMPILE)(
      params, {k: jnp.asarray(v) for k, v in inputs.items()})
  return np.asarray(pred), grads


def _build(name, folder):
  """The diffusers model, saved to ``folder``, ours loaded from it, outputs."""
  config, size, text_dim, with_grads = CASES[name]
  torch.manual_seed(0)
  torch_model = diffusers.UNet2DConditionModel(**config).eval()
  with torch.no_grad():  # norms and biases start at 1/0: move them
    for name, p in torch_model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.2 * torch.randn_like(p))
  torch_model.save_pretrained(folder)
  rng = np.random.default_rng(0)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  inputs = dict(x=normal(2, size, size, 4), t=[10.0, 500.0],
                context=normal(2, 5, config["cross_attention_dim"]),
                text_embeds=normal(2, text_dim), time_ids=TIME_IDS,
                target=normal(2, size, size, 4))
  ours = UNet2DConditionModel.from_pretrained(folder)
  out, grads = _ours(ours, inputs, with_grads)
  with torch.no_grad():
    ref = _torch_forward(torch_model, inputs).numpy()
  return dict(torch_model=torch_model, ours=ours, inputs=inputs, out=out,
              grads=grads, ref=ref)


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  """``cases(name)``: each case built on first use, then shared."""
  built = {}

  def get(name):
    if name not in built:
      built[name] = _build(name, tmp_path_factory.mktemp(name))
    return built[name]

  return get


@pytest.mark.parametrize("name", sorted(CASES))
def test_unet_forward_matches_diffusers(cases, name):
  case = cases(name)
  assert case["out"].shape == case["ref"].shape
  assert torch_reference.rel_err(case["out"], case["ref"]) < 1e-4


def test_unet_gradients_match_torch_autograd(cases):
  case = cases("tiny")
  torch_model = case["torch_model"]
  torch_model.zero_grad()
  pred = _torch_forward(torch_model, case["inputs"])
  torch.mean((pred - torch.from_numpy(case["inputs"]["target"])) ** 2
             ).backward()
  torch_reference.assert_grads_match(case["grads"], torch_model, tol=1e-3)


@pytest.mark.parametrize("name", sorted(CASES))
def test_unet_save_pretrained_loads_in_diffusers(cases, name, tmp_path):
  case = cases(name)
  case["ours"].save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["addition_embed_type"] == "text_time"
  back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
  assert sorted(checkpoint.module_tensors(case["ours"])) == sorted(
      back.state_dict())
  with torch.no_grad():
    ref = _torch_forward(back, case["inputs"]).numpy()
  assert torch_reference.rel_err(case["out"], ref) < 1e-4


def _one_line_error(fn, error, match):
  with pytest.raises(error, match=match) as info:
    fn()
  assert "\n" not in str(info.value)


def test_unet_added_conditioning_errors():
  config = UNet2DConditionConfig.from_dict(presets.TINY_SDXL_UNET)
  sdxl = checkpoint.build_random(lambda: UNet2DConditionModel(
      config, rngs=checkpoint.shape_only_rngs()), seed=0)
  sd1 = UNet2DConditionModel.from_pretrained(presets.TINY)
  x = jnp.zeros((2, 8, 8, 4))
  context = jnp.zeros((2, 7, 64))
  text_embeds = jnp.zeros((2, 32))
  trace = lambda model, **added: lambda: jax.eval_shape(
      lambda: model(x, 1, context[..., :model.config.cross_attention_dim],
                    **added))
  _one_line_error(trace(sdxl), ValueError, "needs text_embeds=")
  _one_line_error(trace(sdxl, text_embeds=text_embeds), ValueError,
                  "needs text_embeds=")
  _one_line_error(trace(sdxl, text_embeds=text_embeds,
                        time_ids=jnp.zeros((2, 5))),
                  ValueError, "projection_class_embeddings_input_dim is 80")
  _one_line_error(trace(sd1, text_embeds=text_embeds), ValueError,
                  "no added embedding")
  # One row of time ids serves the whole batch.
  out = trace(sdxl, text_embeds=text_embeds, time_ids=TIME_IDS[0])()
  assert out.shape == (2, 8, 8, 4)


@pytest.mark.parametrize("overrides, match", [
    (dict(addition_embed_type="text"), "addition_embed_type='text' is not"),
    (dict(addition_time_embed_dim=None), "needs positive integer"),
    (dict(reverse_transformer_layers_per_block=[[1, 1, 1], [1, 1, 1]]),
     "reverse_transformer_layers_per_block"),
    (dict(transformer_layers_per_block=[[1, 1], [2, 2]]),
     "transformer_layers_per_block must be"),
])
def test_unsupported_sdxl_configs_are_user_errors(overrides, match):
  _one_line_error(lambda: UNet2DConditionConfig.from_dict(
      dict(presets.TINY_SDXL_UNET, **overrides)), UserError, match)


# ---------------------------------------------------------- text encoders

BOS, EOS = 49406, 49407


def _token_ids(pad_id):
  """Three 77-token prompts padded with ``pad_id``; the second holds a "!"
  (id 0) inside the prompt, the third fills the context."""
  rng = np.random.default_rng(0)
  ids = np.full((3, 77), pad_id)
  for row, length in enumerate((5, 12, 77)):
    ids[row, :length] = [BOS, *rng.integers(1, 40000, length - 2), EOS]
  ids[1, 3] = 0
  return ids


def test_eos_positions_with_either_padding():
  for pad_id in (0, EOS):
    for eos_token_id in (EOS, 2):  # 2: configs before transformers 4.31
      positions = clip._eos_positions(jnp.asarray(_token_ids(pad_id)),
                                      eos_token_id)
      np.testing.assert_array_equal(positions, [4, 11, 76])


# (our class, transformers' class, preset, overrides, pad id). SDXL's second
# encoder as the tiny preset, then with the published config's legacy
# eos_token_id; the first encoder pads with its end token.
TEXT_CASES = {
    "second": (clip.CLIPTextModelWithProjection,
               transformers.CLIPTextModelWithProjection,
               presets.TINY_SDXL_TEXT_2, {}, 0),
    "second-eos2": (clip.CLIPTextModelWithProjection,
                    transformers.CLIPTextModelWithProjection,
                    presets.TINY_SDXL_TEXT_2,
                    dict(eos_token_id=2, bos_token_id=0, pad_token_id=1), 0),
    "first": (clip.CLIPTextModel, transformers.CLIPTextModel,
              presets.TINY_SDXL_TEXT, {}, EOS),
}


@pytest.mark.parametrize("name", sorted(TEXT_CASES))
def test_text_encoders_match_transformers(tmp_path, name):
  cls, hf_cls, preset, overrides, pad_id = TEXT_CASES[name]
  config = {k: v for k, v in {**preset, **overrides}.items()
            if k not in ("model_type", "architectures")}
  torch.manual_seed(0)
  ref = hf_cls(transformers.CLIPTextConfig(**config)).eval()
  gen = torch.Generator().manual_seed(1)
  with torch.no_grad():  # norms start at exactly 1 and 0
    for p in ref.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  ref.save_pretrained(tmp_path / "ref")
  ours = cls.from_pretrained(tmp_path / "ref")
  ids = _token_ids(pad_id)
  graph, state = nnx.split(ours)
  last, pooled, states = jax.jit(lambda s, x: nnx.merge(graph, s).encode(
      x, output_hidden_states=True))(state, jnp.asarray(ids))
  with torch.no_grad():
    out = ref(torch.from_numpy(ids), output_hidden_states=True)
  ref_pooled = (out.text_embeds if cls is clip.CLIPTextModelWithProjection
                else out.pooler_output)
  assert pooled.shape == ref_pooled.shape
  assert len(states) == len(out.hidden_states) == config[
      "num_hidden_layers"] + 1
  errors = [torch_reference.rel_err(last, out.last_hidden_state),
            torch_reference.rel_err(pooled, ref_pooled),
            *(torch_reference.rel_err(a, b)
              for a, b in zip(states, out.hidden_states))]
  assert max(errors) < 1e-4, errors
  # The penultimate state SDXL reads is not the normed last one.
  assert torch_reference.rel_err(states[-1], last) > 1e-2

  ours.save_pretrained(tmp_path / "ours")
  saved = json.loads((tmp_path / "ours" / "config.json").read_text())
  assert saved["architectures"] == [cls.__name__]
  back, info = hf_cls.from_pretrained(tmp_path / "ours",
                                      output_loading_info=True)
  assert not any(info.values()), info
  ref_sd, back_sd = ref.state_dict(), back.state_dict()
  assert ref_sd.keys() == back_sd.keys()
  for key, value in ref_sd.items():
    assert torch.equal(value, back_sd[key]), key


def test_with_projection_tiny_preset_and_plain_calls():
  model = clip.CLIPTextModelWithProjection.from_pretrained(presets.TINY)
  assert model.config == clip.CLIPTextConfig.from_dict(
      presets.TINY_SDXL_TEXT_2)
  ids = jnp.asarray(_token_ids(0))
  last, text_embeds = jax.eval_shape(model.encode, ids)
  assert last.shape == (3, 77, 32) and text_embeds.shape == (3, 32)
  assert jax.eval_shape(model, ids).shape == (3, 77, 32)


# ------------------------------------------------------ parameter counts

def _abstract_count(build):
  return checkpoint.count_params(nnx.eval_shape(build))


def _meta_count(build):
  with torch.device("meta"):
    return sum(p.numel() for p in build().parameters())


# The SDXL base U-Net's count (2,567,463,684) is checked with the other
# published U-Nets' in tests/models/test_unet.py.


@pytest.mark.parametrize("cls, preset, expected", [
    (clip.CLIPTextModel, presets.SDXL_TEXT, 123_060_480),
    (clip.CLIPTextModelWithProjection, presets.SDXL_TEXT_2, 694_659_840),
])
def test_sdxl_text_encoder_parameter_counts(cls, preset, expected):
  config = clip.CLIPTextConfig.from_dict(preset)
  ours = _abstract_count(lambda: cls(config,
                                     rngs=checkpoint.shape_only_rngs()))
  theirs = _meta_count(lambda: getattr(transformers, cls.__name__)(
      transformers.CLIPTextConfig(**preset)))
  assert ours == theirs == expected
