"""Dinov2Model against transformers' PyTorch Dinov2Model."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from personalize_jax.errors import CheckpointError
from personalize_jax.models import checkpoint, dinov2, presets

_VARIANTS = {
    "preset": {},
    # dinov2-giant's SwiGLU MLP, no qkv bias, no mask token, 14 px patches.
    "variant": {"use_swiglu_ffn": True, "qkv_bias": False,
                "use_mask_token": False, "image_size": 42, "patch_size": 14,
                "hidden_size": 24, "num_attention_heads": 2, "mlp_ratio": 3,
                "layerscale_value": 0.5},
}


@pytest.fixture(scope="module", params=sorted(_VARIANTS))
def reference(request, tmp_path_factory):
  values = {k: v for k, v in presets.DINOV2.items()
            if k not in ("model_type", "architectures", "intermediate_size")}
  values.update(_VARIANTS[request.param])
  ref = transformers.Dinov2Model(transformers.Dinov2Config(**values))
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():  # norms, biases and layer scales start at constants
    for p in ref.parameters():
      p.add_(0.2 * torch.randn(p.shape, generator=gen))
  folder = tmp_path_factory.mktemp(f"dinov2_{request.param}")
  ref.eval().save_pretrained(folder)
  return ref, folder


@nnx.jit
def _forward(model, pixels_bhwc):
  return model(pixels_bhwc)


def test_matches_transformers_at_native_and_other_sizes(reference):
  ref, folder = reference
  ours = dinov2.Dinov2Model.from_pretrained(folder)
  size, patch = ref.config.image_size, ref.config.patch_size
  rng = np.random.default_rng(0)
  # Native grid; a larger non-square one; a smaller one (the position
  # embeddings are bicubically up- and downsampled, as dinov2 at 224 px).
  for hw in [(size, size), (size + 2 * patch, size + patch),
             (size - patch, size - patch)]:
    x = rng.normal(size=(2, *hw, 3)).astype(np.float32)
    with torch.no_grad():
      expected = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).last_hidden_state
    got = np.asarray(_forward(ours, x))
    assert got.shape == tuple(expected.shape)
    err = np.abs(got - expected.numpy()).max() / expected.abs().max().item()
    assert err < 1e-4, (hw, err)


def test_save_pretrained_round_trips_into_transformers(reference, tmp_path):
  ref, folder = reference
  dinov2.Dinov2Model.from_pretrained(folder).save_pretrained(tmp_path)
  back = transformers.Dinov2Model.from_pretrained(tmp_path)
  expected, got = ref.state_dict(), back.state_dict()
  assert sorted(got) == sorted(expected)
  for key, value in expected.items():
    assert torch.equal(got[key], value), key
  for field in ("use_swiglu_ffn", "use_mask_token", "qkv_bias", "patch_size"):
    assert getattr(back.config, field) == getattr(ref.config, field), field


def test_dinov2_small_parameter_count_matches_transformers():
  values = {"hidden_size": 384, "num_hidden_layers": 12,
            "num_attention_heads": 6, "mlp_ratio": 4, "patch_size": 14,
            "image_size": 518}
  model = nnx.eval_shape(lambda: dinov2.Dinov2Model(values, rngs=nnx.Rngs(0)))
  with torch.device("meta"):
    ref = transformers.Dinov2Model(transformers.Dinov2Config(**values))
  expected = sum(p.numel() for p in ref.parameters())
  assert checkpoint.count_params(model) == expected
  assert expected == 22_056_576  # 21.3M in the blocks, 0.75M in embeddings


def test_tiny_preset_and_checkpoint_errors(tmp_path):
  model = dinov2.Dinov2Model.from_pretrained("tiny")
  assert model.config.hidden_size == presets.DINOV2["hidden_size"]
  assert model.embeddings.mask_token.get_value().shape == (1, 32)
  out = _forward(model, jnp.zeros((1, 40, 24, 3)))
  assert out.shape == (1, 1 + 5 * 3, 32)

  (tmp_path / "config.json").write_text(json.dumps(presets.DINO_VIT))
  with pytest.raises(CheckpointError, match="model_type 'vit'") as info:
    dinov2.Dinov2Model.from_pretrained(tmp_path)
  assert "\n" not in str(info.value)
  model.save_pretrained(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config["num_hidden_layers"] = 3
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(CheckpointError, match="missing key 'encoder.layer.2"):
    dinov2.Dinov2Model.from_pretrained(tmp_path)
