"""The export is replaced whole: a run killed while exporting keeps the old one."""

import pytest
from flax import nnx

from personalize_jax.engine import config as config_lib
from personalize_jax.engine import sharding, train
from personalize_jax.models import checkpoint
from personalize_jax.models.unet import UNet2DConditionModel
from personalize_jax.pipeline import load_stable_diffusion


def _tensors(folder):
  pipe = load_stable_diffusion(folder)
  return {name: checkpoint.module_tensors(getattr(pipe, name))
          for name in ("unet", "text_encoder")}


def test_a_failed_export_leaves_the_previous_one_whole(tmp_path, monkeypatch):
  config = config_lib.base_config()
  mesh = sharding.create_mesh()
  old = load_stable_diffusion("tiny", seed=0)
  new = load_stable_diffusion("tiny", seed=1)
  train.export(mesh, old, {"unet": nnx.state(old.unet)}, tmp_path, config)
  before = _tensors(tmp_path / "export")
  real_save = UNet2DConditionModel.save_pretrained

  def dies_after_the_unet(module, folder, *args, **kwargs):
    real_save(module, folder, *args, **kwargs)
    raise KeyboardInterrupt("killed while exporting")

  monkeypatch.setattr(UNet2DConditionModel, "save_pretrained",
                      dies_after_the_unet)
  with pytest.raises(KeyboardInterrupt):
    train.export(mesh, old, {"unet": nnx.state(new.unet)}, tmp_path, config)
  after = _tensors(tmp_path / "export")
  for name in before:
    assert after[name].keys() == before[name].keys()
    assert all((after[name][k] == before[name][k]).all() for k in before[name])
  monkeypatch.undo()
  train.export(mesh, old, {"unet": nnx.state(new.unet)}, tmp_path, config)
  assert not (tmp_path / ".export.tmp").exists()
  assert not (tmp_path / ".export.old").exists()
  exported = _tensors(tmp_path / "export")["unet"]
  want = checkpoint.module_tensors(new.unet)
  assert all((exported[k] == want[k]).all() for k in want)
