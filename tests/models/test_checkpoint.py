"""The generic HF-checkpoint convention against PyTorch's own layers."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from personalize_jax.errors import CheckpointError
from personalize_jax.models import checkpoint, layers


class _Net(nnx.Module):
  """Mirrors ``_TorchNet`` attribute for attribute."""

  def __init__(self, rngs):
    self.proj = layers.linear(6, 5, rngs=rngs)
    self.blocks = nnx.List([layers.conv(5, 4, 3, rngs=rngs),
                            layers.conv(4, 4, 1, rngs=rngs)])
    self.norm = layers.group_norm(4, 2, rngs=rngs)
    self.ln = layers.layer_norm(4, rngs=rngs)
    self.table = layers.embed(7, 4, rngs=rngs)

  def __call__(self, x_bhwc, ids_b):
    h = self.proj(x_bhwc)
    for block in self.blocks:
      h = block(h)
    h = self.ln(self.norm(h))
    return h + self.table(ids_b)[:, None, None, :]


class _TorchNet(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.proj = torch.nn.Linear(6, 5)
    self.blocks = torch.nn.ModuleList([torch.nn.Conv2d(5, 4, 3, padding=1),
                                       torch.nn.Conv2d(4, 4, 1)])
    self.norm = torch.nn.GroupNorm(2, 4)
    self.ln = torch.nn.LayerNorm(4)
    self.table = torch.nn.Embedding(7, 4)

  def forward(self, x_bchw, ids_b):
    h = self.proj(x_bchw.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    for block in self.blocks:
      h = block(h)
    h = self.ln(self.norm(h).permute(0, 2, 3, 1))
    return h + self.table(ids_b)[:, None, None, :]


def _save_torch(module, folder, name=checkpoint.TRANSFORMERS_WEIGHTS):
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  folder.mkdir(parents=True, exist_ok=True)
  safetensors.torch.save_file(
      {k: v.contiguous() for k, v in module.state_dict().items()}, folder / name)


def test_load_matches_torch_and_round_trips(tmp_path):
  torch_net = _TorchNet()
  for p in torch_net.parameters():  # norms start at identity: perturb them
    torch.nn.init.normal_(p, std=0.3)
  _save_torch(torch_net, tmp_path / "ref")
  net = checkpoint.build_and_load(lambda: _Net(nnx.Rngs(0)), tmp_path / "ref",
                                  checkpoint.TRANSFORMERS_WEIGHTS)
  x = np.random.default_rng(0).normal(size=(2, 5, 5, 6)).astype(np.float32)
  ids = np.array([1, 6])
  ours = np.asarray(net(jnp.asarray(x), jnp.asarray(ids)))
  with torch.no_grad():
    ref = torch_net(torch.from_numpy(x).permute(0, 3, 1, 2),
                    torch.from_numpy(ids)).numpy()
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)

  checkpoint.save_pretrained(net, tmp_path / "ours", {"a": 1},
                             checkpoint.TRANSFORMERS_WEIGHTS)
  back = _TorchNet()
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  back.load_state_dict(safetensors.torch.load_file(
      tmp_path / "ours" / checkpoint.TRANSFORMERS_WEIGHTS))
  for (k, a), (_, b) in zip(torch_net.state_dict().items(),
                            back.state_dict().items()):
    assert torch.equal(a, b), k
  assert json.loads((tmp_path / "ours" / "config.json").read_text()) == {"a": 1}


def test_bf16_file_reads_without_torch(tmp_path):
  t = torch.randn(3, 4).to(torch.bfloat16)
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  safetensors.torch.save_file({"w": t}, tmp_path / "x.safetensors")
  got = checkpoint.read_safetensors_file(tmp_path / "x.safetensors")["w"]
  np.testing.assert_array_equal(got.astype(np.float32), t.float().numpy())


@pytest.mark.parametrize("corrupt, message", [
    (lambda sd: sd.pop("proj.weight"), "missing key 'proj.weight'"),
    (lambda sd: sd.__setitem__("extra.weight", torch.zeros(1)),
     "unexpected key 'extra.weight'"),
    (lambda sd: sd.__setitem__("ln.weight", torch.zeros(5)),
     "key 'ln.weight' has shape (5,)"),
])
def test_bad_keys_are_one_line_errors(tmp_path, corrupt, message):
  sd = dict(_TorchNet().state_dict())
  corrupt(sd)
  import safetensors.torch  # pylint: disable=g-import-not-at-top
  safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()},
                              tmp_path / checkpoint.TRANSFORMERS_WEIGHTS)
  with pytest.raises(CheckpointError) as info:
    checkpoint.build_and_load(lambda: _Net(nnx.Rngs(0)), tmp_path,
                              checkpoint.TRANSFORMERS_WEIGHTS)
  text = str(info.value)
  assert message in text and str(tmp_path) in text and "\n" not in text


def test_missing_folder_and_offline_hub_id_are_one_line_errors(tmp_path, monkeypatch):
  with pytest.raises(CheckpointError, match="does not exist"):
    checkpoint.resolve_pretrained(tmp_path / "nope")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  with pytest.raises(CheckpointError) as info:
    checkpoint.resolve_pretrained("no-such-org/no-such-model", "unet")
  assert "could not download" in str(info.value)
  assert "local folder" in str(info.value) and "\n" not in str(info.value)


def test_a_hub_ids_model_index_is_fetched_alone_and_once(tmp_path, monkeypatch):
  """Config checks read a pipeline's model_index.json (is it SDXL?) several
  times before training: a Hub id fetches that one file, once, never the
  weights."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from personalize_jax import pipeline  # pylint: disable=g-import-not-at-top
  (tmp_path / "model_index.json").write_text(json.dumps(
      {"_class_name": "StableDiffusionXLPipeline"}))
  calls = []

  def snapshot_download(repo_id, allow_patterns, local_files_only):
    calls.append((repo_id, allow_patterns, local_files_only))
    return str(tmp_path)

  monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
  checkpoint._hub_model_index.cache_clear()  # pylint: disable=protected-access
  for _ in range(3):
    assert pipeline.is_sdxl_source("some-org/some-sdxl")
  assert calls == [("some-org/some-sdxl", ["model_index.json"], True)]
  assert pipeline.model_components("some-org/some-sdxl")[-1] == "text_encoder_2"
  # A local folder is read as it is now.
  (tmp_path / "model_index.json").write_text(json.dumps(
      {"_class_name": "StableDiffusionPipeline"}))
  assert not pipeline.is_sdxl_source(tmp_path)
  assert len(calls) == 1
