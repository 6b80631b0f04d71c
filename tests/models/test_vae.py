"""The AutoencoderKL port against diffusers' PyTorch AutoencoderKL."""

import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from personalize_jax.errors import CheckpointError, UserError
from personalize_jax.models import checkpoint, presets
from personalize_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

CONFIGS = {
    "tiny": presets.VAE,
    # Two blocks, two resnets each (three in the decoder), other groups/latents.
    "two_blocks": {
        "block_out_channels": [8, 16], "layers_per_block": 2,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "norm_num_groups": 4, "latent_channels": 3, "scaling_factor": 0.5},
    # No quant convs and no mid-block attention (optional parts of the config).
    "bare": {
        "block_out_channels": [8, 8], "layers_per_block": 1,
        "down_block_types": ["DownEncoderBlock2D"] * 2,
        "up_block_types": ["UpDecoderBlock2D"] * 2,
        "norm_num_groups": 2, "use_quant_conv": False,
        "use_post_quant_conv": False, "mid_block_add_attention": False},
}
_LEGACY = {"to_q": "query", "to_k": "key", "to_v": "value",
           "to_out.0": "proj_attn"}


def _rel(a, b):
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def _torch_vae(config):
  torch.manual_seed(0)
  model = diffusers.AutoencoderKL.from_config(config).eval()
  with torch.no_grad():  # norms start at identity, biases at zero: perturb all
    for p in model.parameters():
      p.add_(0.2 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def references(tmp_path_factory):
  """``get(name)``: a perturbed diffusers VAE and the folder it was saved in."""
  cache = {}

  def get(name):
    if name not in cache:
      model = _torch_vae(CONFIGS[name])
      folder = tmp_path_factory.mktemp(name)
      model.save_pretrained(folder)
      cache[name] = model, folder
    return cache[name]

  return get


def _inputs(model, seed=0):
  rng = np.random.default_rng(seed)
  factor = 2 ** (len(model.config.block_out_channels) - 1)
  images = rng.uniform(-1, 1, (1, 2 * factor, 3 * factor, 3)).astype(np.float32)
  latents = rng.normal(size=(1, 2, 3, model.config.latent_channels))
  return images, latents.astype(np.float32)


def _nchw(x):
  return torch.from_numpy(x).permute(0, 3, 1, 2)


def _nhwc(x):
  return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_diffusers(references, name):
  torch_model, folder = references(name)
  ours = AutoencoderKL.from_pretrained(folder)
  images, latents = _inputs(torch_model)
  # One compilation is faster than eager op-by-op dispatch on a small CPU.
  (mean, logvar), decoded = nnx.jit(lambda m, x, z: (m.encode(x), m.decode(z)))(
      ours, jnp.asarray(images), jnp.asarray(latents))
  with torch.no_grad():
    dist = torch_model.encode(_nchw(images)).latent_dist
    ref_decoded = _nhwc(torch_model.decode(_nchw(latents)).sample)
  assert mean.shape == _nhwc(dist.mean).shape
  assert _rel(mean, _nhwc(dist.mean)) < 1e-4
  assert _rel(logvar, _nhwc(dist.logvar)) < 1e-4
  assert _rel(decoded, ref_decoded) < 1e-4
  assert ours.scaling_factor == torch_model.config.scaling_factor


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_save_pretrained_round_trips_into_diffusers(references, name, tmp_path):
  torch_model, folder = references(name)
  AutoencoderKL.from_pretrained(folder).save_pretrained(tmp_path)
  back = diffusers.AutoencoderKL.from_pretrained(tmp_path)
  expected = torch_model.state_dict()
  assert set(back.state_dict()) == set(expected)
  for key, value in back.state_dict().items():
    assert torch.equal(value, expected[key]), key
  for key, value in torch_model.config.items():
    if not key.startswith("_"):
      assert back.config[key] == value, key


def _write_legacy(torch_model, folder, conv_shaped):
  """Saves with the old attention names, optionally 1x1-conv-shaped."""
  legacy = {}
  for key, value in torch_model.state_dict().items():
    for new, old in _LEGACY.items():
      if f".attentions.0.{new}." in key:
        key = key.replace(f".{new}.", f".{old}.")
        if conv_shaped and key.endswith("weight"):
          value = value[:, :, None, None]
    legacy[key] = value.numpy()
  assert any(k.endswith("proj_attn.weight") for k in legacy)
  checkpoint.write_safetensors(folder / checkpoint.DIFFUSERS_WEIGHTS, legacy)
  (folder / "config.json").write_text(json.dumps(dict(torch_model.config)))
  return folder


def test_legacy_attention_keys_load_to_the_same_model(references, tmp_path):
  torch_model, folder = references("tiny")
  expected = checkpoint.module_tensors(AutoencoderKL.from_pretrained(folder))
  for conv_shaped in (False, True):
    legacy = _write_legacy(torch_model, tmp_path / f"conv_{conv_shaped}",
                           conv_shaped)
    if not conv_shaped:  # diffusers itself reads these names
      diffusers.AutoencoderKL.from_pretrained(legacy)
    got = checkpoint.module_tensors(AutoencoderKL.from_pretrained(legacy))
    assert set(got) == set(expected)
    for key, value in expected.items():
      np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_tiny_preset_shapes_and_config():
  # Shapes only: random init of every weight is slow on a shared CPU.
  vae = nnx.eval_shape(lambda: AutoencoderKL.from_pretrained(presets.TINY))
  images = jnp.zeros((1, presets.TINY_RESOLUTION, presets.TINY_RESOLUTION, 3))
  mean, logvar = nnx.eval_shape(lambda m, x: m.encode(x), vae, images)
  assert mean.shape == logvar.shape == (1, 8, 8, 4)
  decoded = nnx.eval_shape(lambda m, z: m.decode(z), vae, mean)
  assert decoded.shape == images.shape
  assert vae.scaling_factor == presets.VAE["scaling_factor"]
  assert vae.config.to_dict()["_class_name"] == "AutoencoderKL"
  assert AutoencoderKLConfig.from_dict(vae.config.to_dict()) == vae.config


def test_remat_gives_the_same_gradients(tmp_path):
  _torch_vae({"block_out_channels": [4], "norm_num_groups": 2}).save_pretrained(
      tmp_path)
  images = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 2, 2, 3)),
                       jnp.float32)

  def loss(model, x):
    mean, logvar = model.encode(x)
    return jnp.mean(model.decode(mean) ** 2) + jnp.mean(logvar)

  grads = [nnx.grad(loss)(AutoencoderKL.from_pretrained(tmp_path, remat=remat),
                          images) for remat in (False, True)]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6), *grads)


def test_config_errors_are_one_line(tmp_path):
  with pytest.raises(UserError, match="AttnDownEncoderBlock2D") as info:
    AutoencoderKLConfig.from_dict(
        {"down_block_types": ["AttnDownEncoderBlock2D"]})
  assert "\n" not in str(info.value)
  (tmp_path / "config.json").write_text(json.dumps(presets.VAE))
  with pytest.raises(CheckpointError, match="no diffusion_pytorch_model"):
    AutoencoderKL.from_pretrained(tmp_path)
