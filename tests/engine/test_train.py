"""Tests for the train loop: meshes agree, resume is exact, masks hold, outputs.

Every run is a tiny DreamBooth training in a subprocess (``_run_tiny.py``): the
CPU device count is fixed when jax is imported, and a resumed run must start in
a new process. All runs share one module fixture and the session's compilation
cache (``tests/xla_env.py``), so the whole file compiles the train step four times (on one device
and on a data x FSDP mesh of 8, full fine-tuning and LoRA alike). A pure
data-parallel mesh of 8 is tests/test_distributed.py's reference run.
"""

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from personalize_jax.engine import metrics as metrics_lib
from personalize_jax.models import checkpoint
import xla_env

REPO = Path(__file__).resolve().parents[2]
RUN_TINY = Path(__file__).with_name("_run_tiny.py")
UNET_FILE = "diffusion_pytorch_model.safetensors"
# The U-Net's blocks train; conv_in, the time embedding and the output head
# stay frozen, so one set of runs tests the optimizer mask too.
TRAINABLE = r"^unet\.(down_blocks|mid_block|up_blocks)\."
LEARNING_RATE = 1e-4
BASE = {
    "batch_size": 8,  # divisible by the 8 devices of the sharded runs.
    "learning_rate": LEARNING_RATE,
    # Runs on different meshes are compared step by step: no num_steps-dependent
    # schedule.
    "optimizer.schedule": "constant",
    "optimizer.warmup_steps": 0,
    "trainable": [TRAINABLE],
    # The switch off: the text encoder must come out byte for byte the base's.
    "dreambooth.train_text_encoder": False,
    "dreambooth.prior_preservation": False,  # no class images to generate.
    "log_every_steps": 1,
    "checkpoint_every_steps": 1000,  # only at the end or when stopped.
    "eval_every_steps": 1000,  # only the sample grid of the last step.
    "eval.num_inference_steps": 2,
}
# Two replicas of a model sharded four ways: both axes of the mesh at once.
MESHES = {"fsdp4": {"mesh.data": 2, "mesh.fsdp": 4}}
# LoRA on the U-Net and the text encoder, the fused pipeline exported beside
# the adapters; rank 4, alpha 8 (scale 2, so a forgotten scale shows). A
# larger learning rate: 3 steps must move the model well past the tolerance
# of the comparisons with diffusers.
LORA_LEARNING_RATE = 3e-3
LORA = {**BASE, "trainable": [r"^unet\."],
        "learning_rate": LORA_LEARNING_RATE,
        "dreambooth.train_text_encoder": True, "lora.alpha": 8.0,
        "lora.export_fused": True}
# Adam's first steps are +-lr wherever |grad| >> eps, so a gradient that
# differs in its last bits (another reduction order) moves some components
# whose gradient is near eps by a fraction of lr; the model as a whole agrees
# to float32 precision.
RELATIVE_TOLERANCE = 1e-5
COMPONENT_TOLERANCE = 0.5 * LEARNING_RATE  # half an Adam step.


def _start(devices: int, jobs: list[dict]) -> subprocess.Popen:
  return subprocess.Popen(
      [sys.executable, str(RUN_TINY), f"--devices={devices}",
       f"--jobs={json.dumps(jobs)}"],
      cwd=REPO, env=xla_env.env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True)


def _finish(process: subprocess.Popen) -> dict:
  stdout, stderr = process.communicate(timeout=1200)
  assert process.returncode == 0, stderr[-3000:]
  return json.loads(stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """All trainings of this file; the 8-device process runs beside the others.

  ``straight``: 3 steps on one device; ``fsdp4``: the same 3 steps on 8
  devices; ``lora``/``lora_fsdp4``: 3 LoRA steps (``LORA``) on one
  device and under FSDP on 8. Steps 1 and 3 of every run are kept for
  comparison.
  (Resuming after SIGTERM and SIGKILL is tested through the CLI in
  tests/test_faults.py.)
  """
  tmp = tmp_path_factory.mktemp("train")
  w = types.SimpleNamespace(straight=tmp / "straight", lora=tmp / "lora",
                            lora_fsdp4=tmp / "lora_fsdp4",
                            **{name: tmp / name for name in MESHES})
  lora = {"variant": "tiny,lora", "dump_steps": [1, 3]}
  sharded = _start(8, [
      {"workdir": str(getattr(w, name)), "dump_steps": [1, 3],
       "overrides": {**BASE, **mesh, "num_steps": 3}}
      for name, mesh in MESHES.items()] + [
          {"workdir": str(w.lora_fsdp4), **lora,
           "overrides": {**LORA, **MESHES["fsdp4"], "num_steps": 3}}])
  w.straight_run, w.lora_run = _finish(_start(1, [
      {"workdir": str(w.straight), "overrides": {**BASE, "num_steps": 3},
       "dump_steps": [1, 3]},
      {"workdir": str(w.lora), **lora,
       "overrides": {**LORA, "num_steps": 3}}]))["runs"]
  w.sharded = _finish(sharded)
  return w


def _tensors(path: Path) -> dict[str, np.ndarray]:
  if path.suffix == ".npz":
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  return checkpoint.read_safetensors_file(path)


def _relative_error(ours: dict, reference: dict) -> float:
  """``|ours - reference| / |reference|`` over all parameters as one vector."""
  assert ours.keys() == reference.keys()
  return float(np.sqrt(sum(np.sum((ours[k] - reference[k]) ** 2)
                           for k in reference)
                       / sum(np.sum(reference[k] ** 2) for k in reference)))


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_sharded_training_matches_one_device(runs, mesh, steps):
  reference = _tensors(runs.straight / f"params_step{steps}.npz")
  ours = _tensors(getattr(runs, mesh) / f"params_step{steps}.npz")
  assert _relative_error(ours, reference) < RELATIVE_TOLERANCE
  worst = max(reference, key=lambda k: np.abs(ours[k] - reference[k]).max())
  assert (np.abs(ours[worst] - reference[worst]).max()
          < COMPONENT_TOLERANCE), worst


def test_the_mesh_comparison_can_tell_steps_apart(runs):
  one = _tensors(runs.straight / "params_step1.npz")
  three = _tensors(runs.straight / "params_step3.npz")
  assert _relative_error(one, three) > 100 * RELATIVE_TOLERANCE


def test_fsdp_shards_most_parameter_and_optimizer_bytes(runs):
  assert runs.sharded["devices"] == 8
  fsdp4, _ = runs.sharded["runs"]
  assert fsdp4["steps"] == runs.straight_run["steps"] == 3
  straight = runs.straight_run
  assert straight["params_fraction"] == 0 and straight["state_fraction"] == 0
  assert fsdp4["params_fraction"] > 0.5
  assert fsdp4["state_fraction"] > 0.5


def test_only_trainable_parameters_move(runs):
  from personalize_jax.models.unet import UNet2DConditionModel  # pylint: disable=g-import-not-at-top
  initial = checkpoint.module_tensors(
      UNet2DConditionModel.from_pretrained("tiny", seed=0))
  trained = _tensors(runs.straight / "export" / "unet" / UNET_FILE)
  assert initial.keys() == trained.keys()
  trainable = {k for k in initial if re.search(TRAINABLE, f"unet.{k}")}
  frozen = initial.keys() - trainable
  assert {k.split(".")[0] for k in frozen} >= {"conv_in", "time_embedding",
                                               "conv_out"}
  for key in frozen:
    assert np.array_equal(initial[key], trained[key]), key
  unchanged = [k for k in trainable if np.array_equal(initial[k], trained[k])]
  assert not unchanged


def test_train_text_encoder_false_leaves_it_byte_identical(runs):
  """``dreambooth.train_text_encoder=false`` (the other side is
  tests/methods/test_dreambooth.py's): the text encoder is not in the train
  state, logs no update, and is exported exactly as the base's."""
  from personalize_jax.pipeline import load_stable_diffusion  # pylint: disable=g-import-not-at-top
  names = runs.straight_run["param_names"]
  assert names and all(n.startswith("['unet']") for n in names)
  base = load_stable_diffusion("tiny", seed=0)
  export = load_stable_diffusion(runs.straight / "export")
  for name in ("text_encoder", "vae"):
    ours, theirs = (checkpoint.module_tensors(getattr(p, name))
                    for p in (export, base))
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[k], theirs[k]) for k in theirs), name
  logged = [r for r in metrics_lib.read_metrics(runs.straight) if "loss" in r]
  assert [r["step"] for r in logged] == [1, 2, 3]
  assert all("update_norm/text_encoder" not in r and r["update_norm/unet"] > 0
             for r in logged)


def test_export_loads_in_diffusers_with_the_same_unet(runs):
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from personalize_jax.pipeline import load_stable_diffusion  # pylint: disable=g-import-not-at-top
  export = runs.straight / "export"
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(export)
  ours = load_stable_diffusion(export)
  rng = np.random.default_rng(0)
  x_bhwc = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  context = rng.standard_normal((2, 77, 32)).astype(np.float32)
  t = np.asarray([10, 700])
  with torch.no_grad():
    theirs = pipe.unet(torch.from_numpy(x_bhwc).permute(0, 3, 1, 2),
                       torch.from_numpy(t), torch.from_numpy(context)
                       ).sample.permute(0, 2, 3, 1).numpy()
  graphdef, state = nnx.split(ours.unet)
  forward = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))
  mine = np.asarray(forward.lower(state, x_bhwc, t, context).compile(
      xla_env.FAST_COMPILE)(state, x_bhwc, t, context))
  assert np.abs(mine - theirs).max() / np.abs(theirs).max() < 1e-4
  assert json.loads((export / "train_config.json").read_text())[
      "num_steps"] == 3


def test_run_directory_holds_config_metrics_events_and_samples(runs):
  workdir = runs.straight
  config = json.loads((workdir / "config.json").read_text())
  assert config["num_steps"] == 3 and config["trainable"] == [TRAINABLE]
  assert config["model"]["pretrained"] == "tiny"

  records = metrics_lib.read_metrics(workdir)
  assert [r["step"] for r in records] == [1, 2, 3]
  for r in records:
    assert {"loss", "learning_rate", "grad_norm", "perf/steps_per_sec",
            "loss/instance"} <= r.keys()
    assert np.isfinite(r["loss"]) and r["loss"] > 0
    assert r["grad_norm"] > 0 and r["perf/steps_per_sec"] > 0
    assert r["learning_rate"] == pytest.approx(LEARNING_RATE)
    assert r["loss"] == r["loss/instance"]  # no prior preservation here.

  (events_file,) = (workdir / "tensorboard").glob("events.out.tfevents.*")
  accumulator = event_accumulator.EventAccumulator(
      str(events_file), size_guidance={event_accumulator.SCALARS: 0})
  accumulator.Reload()
  logged = {s.step: s.value for s in accumulator.Scalars("loss")}
  # Event files store scalars as float32.
  assert logged == {r["step"]: float(np.float32(r["loss"])) for r in records}

  (grid,) = (workdir / "samples").glob("step_*.png")
  assert grid.name == "step_000003.png"
  with Image.open(grid) as image:
    pixels = np.asarray(image.convert("RGB"))
  assert pixels.shape[1] == 2 * 64 and pixels.shape[0] > 64  # 2 prompts
  assert pixels[:64].std() > 0  # an image, not a blank tile


# ------------------------------------------------------------------- LoRA

def _lora_file(workdir: Path) -> dict[str, np.ndarray]:
  return checkpoint.read_safetensors_file(
      workdir / "export" / "pytorch_lora_weights.safetensors")


@pytest.mark.parametrize("steps", [1, 3])
def test_lora_on_8_devices_with_fsdp_matches_one_device(runs, steps):
  reference = _tensors(runs.lora / f"params_step{steps}.npz")
  ours = _tensors(runs.lora_fsdp4 / f"params_step{steps}.npz")
  assert _relative_error(ours, reference) < RELATIVE_TOLERANCE
  worst = max(reference, key=lambda k: np.abs(ours[k] - reference[k]).max())
  assert (np.abs(ours[worst] - reference[worst]).max()
          < 0.5 * LORA_LEARNING_RATE), worst
  if steps == 3:  # the adapters did move
    assert _relative_error(_tensors(runs.lora / "params_step1.npz"),
                           reference) > 100 * RELATIVE_TOLERANCE


def test_lora_trains_only_the_adapters(runs):
  for run in (runs.lora_run, runs.sharded["runs"][1]):
    names = run["param_names"]
    assert all(re.search(r"\['lora_[AB]'\]\['kernel'\]", n) for n in names)
    assert {n[2:n.index("'", 2)] for n in names} == {"unet", "text_encoder"}
    # Adam's two moments of each adapter leaf; nothing for the frozen base.
    assert run["opt_bytes"] == 2 * run["param_bytes"]
  full = runs.straight_run
  assert not any("lora" in n for n in full["param_names"])
  assert runs.lora_run["param_bytes"] < full["param_bytes"] / 10


def test_lora_fused_export_moves_exactly_the_adapted_weights(runs):
  from personalize_jax.pipeline import load_stable_diffusion  # pylint: disable=g-import-not-at-top
  base = load_stable_diffusion("tiny", seed=0)
  adapters = _lora_file(runs.lora)
  export = runs.lora / "export"
  for name, folder, weights, strip in (
      ("unet", "unet", UNET_FILE, ""),
      ("text_encoder", "text_encoder", "model.safetensors", "text_model.")):
    before = checkpoint.module_tensors(getattr(base, name))
    after = _tensors(export / folder / weights)
    if strip:  # transformers 5 layout, as diffusers saves it
      after = {f"{strip}{k}" if not k.startswith(strip) else k: v
               for k, v in after.items()}
    assert before.keys() == after.keys()
    adapted = 0
    for key, value in before.items():
      module = key[len(strip):-len(".weight")] if key.endswith(".weight") \
          else None
      down = adapters.get(f"{name}.{module}.lora_A.weight")
      if down is None:
        assert np.array_equal(after[key], value), key
        continue
      up = adapters[f"{name}.{module}.lora_B.weight"]
      np.testing.assert_allclose(after[key], value + up @ down, rtol=1e-5,
                                 atol=1e-6, err_msg=key)
      assert not np.array_equal(after[key], value), key
      adapted += 1
    assert 2 * adapted == len([k for k in adapters
                               if k.startswith(name + ".")])
    assert adapted > 0
  vae = _tensors(export / "vae" / UNET_FILE)
  for key, value in checkpoint.module_tensors(base.vae).items():
    assert np.array_equal(vae[key], value), key


def test_lora_export_loads_in_diffusers_and_computes_ours(runs, tmp_path):
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from personalize_jax.pipeline import load_stable_diffusion  # pylint: disable=g-import-not-at-top
  load_stable_diffusion("tiny", seed=0).save_pretrained(tmp_path / "base")
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "base")
  pipe.load_lora_weights(runs.lora / "export")
  # Ours: the fused export, which equals the adapters (previous test).
  ours = load_stable_diffusion(runs.lora / "export")
  rng = np.random.default_rng(0)
  x_bhwc = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  context = rng.standard_normal((2, 77, 32)).astype(np.float32)
  t = np.asarray([10, 700])
  ids = np.asarray(pipe.tokenizer(["a photo of sks mug"], padding="max_length",
                                  max_length=77).input_ids)
  with torch.no_grad():
    theirs = pipe.unet(torch.from_numpy(x_bhwc).permute(0, 3, 1, 2),
                       torch.from_numpy(t), torch.from_numpy(context)
                       ).sample.permute(0, 2, 3, 1).numpy()
    theirs_text = pipe.text_encoder(torch.from_numpy(ids))[0].numpy()
  graphdef, state = nnx.split(ours.unet)
  forward = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args))
  mine = np.asarray(forward.lower(state, x_bhwc, t, context).compile(
      xla_env.FAST_COMPILE)(state, x_bhwc, t, context))
  assert np.abs(mine - theirs).max() / np.abs(theirs).max() < 1e-4
  mine_text = np.asarray(ours.text_encoder(ids))
  assert (np.abs(mine_text - theirs_text).max()
          / np.abs(theirs_text).max() < 1e-4)
  # The LoRA matters: without it diffusers computes something else.
  pipe.unload_lora_weights()
  with torch.no_grad():
    plain = pipe.unet(torch.from_numpy(x_bhwc).permute(0, 3, 1, 2),
                      torch.from_numpy(t), torch.from_numpy(context)
                      ).sample.permute(0, 2, 3, 1).numpy()
  assert np.abs(plain - theirs).max() / np.abs(theirs).max() > 1e-2
