"""ViTModel (DINO) against transformers' PyTorch ViTModel."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from personalize_jax.errors import CheckpointError
from personalize_jax.models import checkpoint, presets, vit

_VARIANTS = {
    "preset": {},
    # Another shape: no qkv bias, tanh GELU, 3 blocks, 48 px of 16 px patches.
    "variant": {"qkv_bias": False, "hidden_act": "gelu_new",
                "num_hidden_layers": 3, "image_size": 48, "patch_size": 16,
                "hidden_size": 24, "num_attention_heads": 2},
}


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Moves every parameter off its init (norms start at exactly 1 and 0)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.2 * torch.randn(p.shape, generator=gen))
  return model.eval()


def _reference(tmp_path_factory, name):
  values = {k: v for k, v in presets.DINO_VIT.items()
            if k not in ("model_type", "architectures")}
  values.update(_VARIANTS[name])
  ref = _perturb(transformers.ViTModel(transformers.ViTConfig(**values)))
  folder = tmp_path_factory.mktemp(f"vit_{name}")
  ref.save_pretrained(folder)
  return ref, folder


@pytest.fixture(scope="module", params=sorted(_VARIANTS))
def reference(request, tmp_path_factory):
  return _reference(tmp_path_factory, request.param)


def _torch_hidden(ref, pixels_bhwc, **kwargs):
  with torch.no_grad():
    out = ref(torch.from_numpy(pixels_bhwc).permute(0, 3, 1, 2), **kwargs)
  return out.last_hidden_state.numpy()


@nnx.jit
def _forward(model, pixels_bhwc):
  return model(pixels_bhwc)


def _rel_err(a, b):
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def test_matches_transformers_at_native_and_other_sizes(reference):
  ref, folder = reference
  ours = vit.ViTModel.from_pretrained(folder)
  size = ref.config.image_size
  rng = np.random.default_rng(0)
  native = rng.normal(size=(2, size, size, 3)).astype(np.float32)
  assert _rel_err(_forward(ours, native), _torch_hidden(ref, native)) < 1e-4
  # Another, non-square size: interpolated position embeddings.
  other = rng.normal(size=(1, size + 16, size - 8, 3)).astype(np.float32)
  expected = _torch_hidden(ref, other, interpolate_pos_encoding=True)
  assert _rel_err(_forward(ours, other), expected) < 1e-4


def test_save_pretrained_round_trips_into_transformers(reference, tmp_path):
  ref, folder = reference
  vit.ViTModel.from_pretrained(folder).save_pretrained(tmp_path)
  back = transformers.ViTModel.from_pretrained(tmp_path, add_pooling_layer=False)
  expected = {k: v for k, v in ref.state_dict().items()
              if not k.startswith("pooler.")}
  got = back.state_dict()
  assert sorted(got) == sorted(expected)
  for key, value in expected.items():
    assert torch.equal(got[key], value), key
  assert back.config.qkv_bias == ref.config.qkv_bias
  assert back.config.hidden_act == ref.config.hidden_act


def test_dino_vits16_parameter_count():
  config = vit.ViTConfig(hidden_size=384, num_hidden_layers=12,
                         num_attention_heads=6, intermediate_size=1536,
                         patch_size=16, image_size=224, qkv_bias=True)
  model = nnx.eval_shape(lambda: vit.ViTModel(config, rngs=nnx.Rngs(0)))
  assert checkpoint.count_params(model) == 21_665_664
  with torch.device("meta"):
    ref = transformers.ViTModel(transformers.ViTConfig(**config.to_dict()),
                                add_pooling_layer=False)
  assert sum(p.numel() for p in ref.parameters()) == 21_665_664


@pytest.mark.parametrize("grid, new_grid", [((4, 4), (6, 3)), ((5, 5), (2, 7)),
                                            ((3, 4), (3, 4))])
def test_interpolate_pos_encoding_is_torch_bicubic(grid, new_grid):
  dim = 5
  table = np.random.default_rng(1).normal(
      size=(1, 1 + grid[0] * grid[1], dim)).astype(np.float32)
  got = np.asarray(vit.interpolate_pos_encoding(jnp.asarray(table), grid,
                                                new_grid))
  patches = torch.from_numpy(table[0, 1:]).reshape(1, *grid, dim)
  resized = torch.nn.functional.interpolate(
      patches.permute(0, 3, 1, 2), size=new_grid, mode="bicubic",
      align_corners=False).permute(0, 2, 3, 1).reshape(-1, dim).numpy()
  np.testing.assert_allclose(got[0, 0], table[0, 0])
  np.testing.assert_allclose(got[0, 1:], resized, atol=1e-5)


def test_remat_jit_and_bf16_agree_with_the_plain_model():
  model = vit.ViTModel.from_pretrained("tiny", seed=3)
  remat = vit.ViTModel.from_pretrained("tiny", seed=3, remat=True)
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)),
                  jnp.float32)

  def loss(m, x):
    return jnp.sum(m(x)[:, 0] ** 2)

  grads = jax.tree.leaves(nnx.state(nnx.jit(nnx.grad(loss))(model, x)))
  grads_remat = jax.tree.leaves(nnx.state(nnx.jit(nnx.grad(loss))(remat, x)))
  # Some gradients are zero up to rounding (key biases): compare at one scale.
  scale = max(float(jnp.abs(g).max()) for g in grads)
  assert len(grads) == len(grads_remat) and scale > 0
  for a, b in zip(grads, grads_remat):
    np.testing.assert_allclose(a, b, atol=1e-5 * scale)
  half = vit.ViTModel.from_pretrained("tiny", seed=3, dtype=jnp.bfloat16)
  out = _forward(half, x)
  assert out.dtype == jnp.bfloat16
  assert _rel_err(out.astype(jnp.float32), np.asarray(_forward(model, x))) < 5e-2


def test_config_round_trip_and_checkpoint_errors(tmp_path):
  config = vit.ViTConfig.from_dict({**presets.DINO_VIT, "not_a_field": 1,
                                    "image_size": [32, 32]})
  assert config.image_size == (32, 32) and config.hidden_size == 32
  assert vit.ViTConfig.from_dict(config.to_dict()) == config
  assert transformers.ViTConfig(**config.to_dict()).hidden_size == 32

  with pytest.raises(CheckpointError, match="does not exist"):
    vit.ViTModel.from_pretrained(tmp_path / "nope")
  (tmp_path / "config.json").write_text(json.dumps(presets.DINOV2))
  with pytest.raises(CheckpointError, match="model_type 'dinov2'") as info:
    vit.ViTModel.from_pretrained(tmp_path)
  assert "\n" not in str(info.value)
  (tmp_path / "config.json").write_text(json.dumps(presets.DINO_VIT))
  with pytest.raises(CheckpointError, match="no model.safetensors"):
    vit.ViTModel.from_pretrained(tmp_path)


def test_parameters_carry_logical_axes():
  model = vit.ViTModel.from_pretrained("tiny")
  axes = {checkpoint.torch_key(path): var.get_metadata().get("out_sharding")
          for path, var in checkpoint.iter_params(model)}
  assert axes["encoder.layer.0.attention.attention.query.weight"] == (
      "embed", "mlp")
  assert axes["encoder.layer.0.output.dense.weight"] == ("mlp", "embed")
  assert axes["embeddings.position_embeddings"] == (None, None, "embed")
  assert all(a is not None for a in axes.values())
  assert jax.tree.leaves(nnx.state(model, nnx.Param))
