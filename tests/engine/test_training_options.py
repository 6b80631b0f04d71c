"""The diffusers training options: accumulation, Min-SNR, offset noise,
optimizers and schedules, EMA and W&B, through the engine and the CLI.

The formulas are tested beside their modules (tests/test_diffusion.py,
tests/engine/test_optim.py, tests/engine/test_state.py); here DreamBooth's
accumulated step is checked against the whole batch's, the W&B writer against
a stand-in module, and one CLI run of the tiny DreamBooth recipe with every
option on shows each one in what the run leaves behind.
"""

import importlib.abc
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from personalize_jax import methods
from personalize_jax.engine import config as config_lib
from personalize_jax.engine import metrics as metrics_lib
from personalize_jax.engine import optim, state as state_lib, train
from personalize_jax.methods import dreambooth
from personalize_jax.models import checkpoint
from personalize_jax.pipeline import load_stable_diffusion

import recipes
import xla_env

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "methods"))
import helpers as method_helpers  # pylint: disable=g-import-not-at-top,wrong-import-position

REPO = Path(__file__).resolve().parents[2]
NUM_CLASS_IMAGES = 4  # the tiny recipe's.

# A stand-in for the wandb package: it writes what a run gives it to
# <dir>/wandb/fake_run.jsonl, so a subprocess's use of it can be read back.
FAKE_WANDB = '''
import json
from pathlib import Path


class Run:

  def __init__(self, kwargs):
    self.path = Path(kwargs["dir"]) / "wandb" / "fake_run.jsonl"
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._write({"init": {k: v for k, v in kwargs.items() if k != "config"},
                 "config": kwargs.get("config")})

  def _write(self, record):
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(json.dumps(record, default=str) + "\\n")

  def log(self, data, step=None):
    self._write({"log": data, "step": step})

  def finish(self):
    self._write({"finish": True})


def init(**kwargs):
  return Run(kwargs)
'''


def _fake_wandb(folder: Path) -> Path:
  """Writes the stand-in as ``<folder>/wandb/__init__.py``; returns folder."""
  (folder / "wandb").mkdir(parents=True)
  (folder / "wandb" / "__init__.py").write_text(FAKE_WANDB)
  return folder


def _records(workdir: Path) -> list[dict]:
  path = workdir / "wandb" / "fake_run.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()]


def _class_images(folder: Path) -> Path:
  """Random class images, so that nothing is generated."""
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(NUM_CLASS_IMAGES):
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(
        folder / f"class_{i:05d}.png")
  return folder


# ------------------------------------------------------------------- W&B


class _ImportWatch(importlib.abc.MetaPathFinder):
  """Records every attempt to import ``wandb`` (and finds nothing)."""

  def __init__(self):
    self.asked = []

  def find_spec(self, name, path, target=None):
    del path, target
    if name.split(".")[0] == "wandb":
      self.asked.append(name)


def test_with_wandb_off_nothing_imports_it(tmp_path, monkeypatch):
  watch = _ImportWatch()
  monkeypatch.delitem(sys.modules, "wandb", raising=False)
  monkeypatch.setattr(sys, "meta_path", [watch] + sys.meta_path)
  config = recipes.load("dreambooth_tpu", "tiny")
  config_lib.validate(config, 1, methods.get(config.method))
  with metrics_lib.MetricsWriter(tmp_path, run_config=config.to_dict()) as w:
    w.write(1, {"loss": 0.5})
  assert watch.asked == []


def test_wandb_writer_logs_offline_in_the_workdir(tmp_path, monkeypatch):
  monkeypatch.delitem(sys.modules, "wandb", raising=False)
  monkeypatch.syspath_prepend(str(_fake_wandb(tmp_path / "fake")))
  workdir = tmp_path / "run"
  writer = metrics_lib.MetricsWriter(workdir, wandb_project="proj",
                                     run_config={"seed": 3})
  writer.write(1, {"loss": 0.5, "learning_rate": 1e-4})
  writer.write(2, {"loss": float("nan")})
  writer.close()
  init, first, second, finish = _records(workdir)
  assert init == {"init": {"project": "proj", "dir": str(workdir),
                           "mode": "offline"}, "config": {"seed": 3}}
  assert first == {"log": {"loss": 0.5, "learning_rate": 1e-4}, "step": 1}
  assert second["step"] == 2 and math.isnan(second["log"]["loss"])
  assert finish == {"finish": True}
  # TensorBoard and metrics.jsonl are written as without W&B.
  assert [r["step"] for r in metrics_lib.read_metrics(workdir)] == [1, 2]


# ---------------------------------------------------- DreamBooth, in-process


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory):
  """DreamBooth's step 1 on 2 rows (and 2 class rows) as 2 micro-batches and
  as one batch, with Min-SNR weights and offset noise on, and the losses of
  the same batch with each of those switched off.

  One trainer (accumulating); the whole-batch step is built from its parts.
  SGD without momentum, so that equal gradients give equal parameters.
  """
  tmp = tmp_path_factory.mktemp("accumulated")
  config = recipes.load("dreambooth_tpu", "tiny", **{
      "batch_size": 2, "gradient_accumulation_steps": 2,
      "loss.snr_gamma": 0.1, "loss.noise_offset": 0.1,
      "optimizer.name": "sgd", "optimizer.momentum": 0.0,
      "dreambooth.class_images_dir": str(_class_images(tmp / "class"))})
  config_lib.resolve(config, dreambooth)
  config_lib.validate(config, 1, dreambooth)
  trainer = train.build_trainer(config, tmp / "run", dreambooth)
  state, frozen, mesh = trainer.state, trainer.frozen, trainer.mesh
  tx, schedule, labels = optim.make_optimizer(config, state.params)
  whole_step = state_lib.make_train_step(
      trainer.method.loss_fn, tx, schedule, labels, nan_policy="stop",
      state_shardings=state_lib.shardings_of(state),
      frozen_shardings=state_lib.shardings_of(frozen), mesh=mesh)
  batch = state_lib.shard_batch(trainer.method.batch(0), mesh)
  rng = jax.random.fold_in(state.rng, 0)

  def loss(**options):
    """The step's whole-batch loss metrics with ``config.loss`` changed."""
    previous = dict(config.loss)
    config.loss.update(options)
    try:  # traced now (a new function: jit's cache is by function), so
      # the loss reads the changed options.
      total, metrics = jax.jit(lambda *args: trainer.method.loss_fn(*args))(
          state.params, frozen, batch, rng)
    finally:
      config.loss.update(previous)
    return {k: float(v) for k, v in dict(metrics, loss=total).items()}

  losses = {"on": loss(), "no_snr": loss(snr_gamma=0.0),
            "no_offset": loss(noise_offset=0.0)}
  copy = jax.jit(lambda s: jax.tree.map(jnp.copy, s))(state)
  whole, whole_metrics = whole_step(copy, frozen, batch)
  micro, micro_metrics = trainer.train_step(state, frozen, batch)
  return {"losses": losses,
          "whole": jax.device_get((whole.params, whole_metrics)),
          "micro": jax.device_get((micro.params, micro_metrics))}


def test_two_micro_batches_give_the_step_of_the_whole_batch(accumulated):
  whole_params, whole = accumulated["whole"]
  micro_params, micro = accumulated["micro"]
  for key in ("loss", "loss/instance", "loss/prior", "loss/snr_weight",
              "grad_norm"):
    assert float(micro[key]) == pytest.approx(float(whole[key]), rel=1e-5), key
  assert float(micro["update_norm/unet"]) > 0
  for got, want in zip(jax.tree.leaves(micro_params),
                       jax.tree.leaves(whole_params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_min_snr_and_offset_noise_change_the_dreambooth_loss(accumulated):
  losses = accumulated["losses"]
  assert 0 < losses["on"]["loss/snr_weight"] < 1
  assert "loss/snr_weight" not in losses["no_snr"]
  for off in ("no_snr", "no_offset"):
    assert losses[off]["loss"] != pytest.approx(losses["on"]["loss"],
                                                rel=1e-4), off
  # The step's loss is the whole batch's, with both switches on.
  assert float(accumulated["whole"][1]["loss"]) == pytest.approx(
      losses["on"]["loss"], rel=1e-6)


# The other methods implement the same options in their own losses:
# checked on the loss (the engine's accumulation of gradients is the part
# the DreamBooth step above shows).
OTHER_METHODS = ("custom_diffusion_tpu", "rpo_tpu",
                 "lookforward_dreambooth_tpu")


def _micro_batch(batch: dict, k: int, j: int) -> dict:
  """Micro-batch ``j`` of ``k`` as the engine cuts it: rows j, j + k, ...,
  with their indices in the step."""
  rows = np.arange(len(next(iter(batch.values()))))[j::k]
  return dict({key: value[rows] for key, value in batch.items()},
              **{state_lib.ROW: rows.astype(np.int32)})


@pytest.fixture(scope="module", params=OTHER_METHODS)
def method_losses(request, tmp_path_factory):
  """A method's loss metrics on step 0's batch of 2 (pairs for RPO), whole and
  as 2 micro-batches, with Min-SNR and offset noise on, and with each off."""
  recipe = request.param
  tmp = tmp_path_factory.mktemp(recipe)
  # gamma 0.01: SD's schedule has SNR > 0.01 below t ~ 900, so most rows
  # are weighted down.
  options = {"batch_size": 2, "gradient_accumulation_steps": 2,
             "loss.snr_gamma": 0.01, "loss.noise_offset": 0.1}
  if recipe != "rpo_tpu":
    options["dreambooth.class_images_dir"] = str(_class_images(tmp / "class"))
  config = recipes.load(recipe, "tiny", **options)
  module = methods.get(config.method)
  config_lib.validate(config, 1, module)  # the method takes every option.
  method, params, frozen = method_helpers.build(
      module, config, tmp / "run", load_stable_diffusion("tiny"))
  batch, rng = method.batch(0), jax.random.key(3)

  def loss(part, **changes):
    previous = dict(config.loss)
    config.loss.update(changes)
    try:  # a new function: traced again, with the changed options.
      total, metrics = jax.jit(lambda *args: method.loss_fn(*args))(
          params, frozen, part, rng)
    finally:
      config.loss.update(previous)
    return {k: float(v) for k, v in dict(metrics, loss=total).items()}

  return {"whole": loss(batch),
          "micro": [loss(_micro_batch(batch, 2, j)) for j in range(2)],
          "no_snr": loss(batch, snr_gamma=0.0),
          "no_offset": loss(batch, noise_offset=0.0)}


def test_each_methods_micro_batches_average_to_its_whole_batch(
    method_losses):
  whole, micro = method_losses["whole"], method_losses["micro"]
  assert set(micro[0]) == set(whole)
  for key, value in whole.items():
    if key.startswith(("loss", "q/", "reward/")):
      # Means over equal micro-batches: their mean is the whole batch's.
      assert np.mean([m[key] for m in micro]) == pytest.approx(
          value, rel=1e-5, abs=1e-7), key
  # The two halves are different rows: they do not just repeat the whole.
  assert micro[0]["loss"] != pytest.approx(micro[1]["loss"], rel=1e-4)


def test_each_methods_loss_takes_min_snr_and_offset_noise(method_losses):
  on = method_losses["whole"]
  assert 0 < on["loss/snr_weight"] < 1
  assert "loss/snr_weight" not in method_losses["no_snr"]
  for off in ("no_snr", "no_offset"):
    assert method_losses[off]["loss"] != pytest.approx(on["loss"],
                                                       rel=1e-5), off


# ------------------------------------------------------------------- CLI

LEARNING_RATE = 1e-4
CLI_OPTIONS = {
    "num_steps": 2, "batch_size": 2, "gradient_accumulation_steps": 2,
    "loss.snr_gamma": 0.1, "loss.noise_offset": 0.1,
    # Lion without weight decay moves every weight by exactly the rate.
    "optimizer.name": "lion", "optimizer.weight_decay": 0.0,
    "optimizer.schedule": "polynomial", "optimizer.power": 2.0,
    "ema.decay": 0.9, "log.wandb": True,
    "learning_rate": LEARNING_RATE, "log_every_steps": 1,
    "eval.num_inference_steps": 1,
}


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
  """``python -m personalize_jax.main`` on the tiny DreamBooth recipe, 2
  steps with every option on (W&B through the stand-in module)."""
  tmp = tmp_path_factory.mktemp("cli")
  workdir = tmp / "run"
  fake = _fake_wandb(tmp / "fake")
  args = [f"--config.{k}={v}" for k, v in CLI_OPTIONS.items()] + [
      f"--config.dreambooth.class_images_dir={_class_images(tmp / 'class')}"]
  out = subprocess.run(
      [sys.executable, "-m", "personalize_jax.main",
       "--config=configs/dreambooth_tpu.py:tiny", f"--workdir={workdir}",
       *args], cwd=REPO, capture_output=True, text=True, timeout=1200,
      env=xla_env.env(PYTHONPATH=f"{fake}{os.pathsep}{REPO}"), check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir


def test_cli_records_every_option(cli_run):
  config = json.loads((cli_run / "config.json").read_text())
  for key, value in CLI_OPTIONS.items():
    node = config
    for part in key.split("."):
      node = node[part]
    assert node == value, key


def test_cli_schedule_optimizer_loss_and_ema_show_in_the_metrics(cli_run):
  records = [r for r in metrics_lib.read_metrics(cli_run) if "loss" in r]
  assert [r["step"] for r in records] == [1, 2]
  # polynomial, power 2, over 2 steps: lr, then lr * (1 - 1/2) ** 2.
  assert [r["learning_rate"] for r in records] == pytest.approx(
      [LEARNING_RATE, LEARNING_RATE / 4], rel=1e-6)
  # Lion: every one of the U-Net's weights moves by the rate, each step.
  unet = checkpoint.read_safetensors_file(
      cli_run / "export" / "unet" / "diffusion_pytorch_model.safetensors")
  size = sum(v.size for v in unet.values())
  for r in records:
    assert r["update_norm/unet"] == pytest.approx(
        r["learning_rate"] * math.sqrt(size), rel=1e-3)
  # Min-SNR weights of an epsilon model lie in (0, 1].
  assert all(0 < r["loss/snr_weight"] < 1 for r in records)
  # diffusers' EMA warmup: the first update copies, the second 2/11.
  assert [r["ema_decay"] for r in records] == pytest.approx([0.0, 2 / 11])


def test_cli_export_holds_the_moving_average(cli_run):
  state = ocp.StandardCheckpointer().restore(
      cli_run / "checkpoints" / "2" / "state")

  def values(tree):
    return np.sort(np.concatenate([np.ravel(x) for x in jax.tree.leaves(
        tree)]))

  unet = checkpoint.read_safetensors_file(
      cli_run / "export" / "unet" / "diffusion_pytorch_model.safetensors")
  exported = values(list(unet.values()))
  # Layouts differ (torch's OIHW, ours HWIO): compare the sorted values.
  np.testing.assert_array_equal(exported, values(state["ema"]["unet"]))
  assert not np.array_equal(exported, values(state["params"]["unet"]))


def test_cli_logs_to_wandb_offline_in_the_workdir(cli_run):
  records = _records(cli_run)
  assert records[0]["init"] == {"project": "personalize_jax",
                                "dir": str(cli_run), "mode": "offline"}
  assert records[0]["config"]["ema"]["decay"] == 0.9
  logged = [r for r in records if "log" in r and "loss" in r["log"]]
  assert [r["step"] for r in logged] == [1, 2]
  assert records[-1] == {"finish": True}
