"""``python -m personalize_jax.generate`` on the tiny models (64 px, 2 steps).

Most runs are in-process (``generate.run``), sharing two compiled batch
shapes (4 and 2 images); the command line runs once in a subprocess and once
more over 8 CPU devices.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

import personalize_jax
from personalize_jax import diffusion, eval_dreambench, generate
from personalize_jax.engine import sharding
from personalize_jax.errors import UserError
from personalize_jax.models import checkpoint, lora
from personalize_jax.models.tokenizer import load_tokenizer
from personalize_jax.pipeline import load_stable_diffusion

import torch_reference
import xla_env

PROMPTS = ("a photo of a mug", "a mug on the beach")
NAMES = ["00_00.png", "00_01.png", "01_00.png", "01_01.png"]


def _settings(out, **overrides) -> generate.Settings:
  values = dict(model="tiny", prompt=PROMPTS, out=str(out), num_images=2,
                steps=2, resolution=64)
  return generate.Settings(**{**values, **overrides})


def _pngs(folder) -> dict[str, bytes]:
  return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))
          if p.name != generate.GRID}


def _pixels(folder) -> np.ndarray:
  rows = eval_dreambench.read_generated(folder.parent, folder.name,
                                        len(PROMPTS), 2)
  return np.stack([im for row in rows for im in row])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Runs by name, each ``(settings, folder)``; made on first use."""
  root = tmp_path_factory.mktemp("generate")
  lora_file = root / "lora.safetensors"
  pipe = load_stable_diffusion("tiny")
  lora.add_adapters(pipe.unet, ["to_q", "to_v"], rank=4, alpha=4.0)
  rng = np.random.default_rng(0)
  for _, linear in lora.linear_modules(pipe.unet):
    if linear.lora_B is not None:
      shape = linear.lora_B.kernel.get_value().shape
      linear.lora_B.kernel.set_value(
          jax.numpy.asarray(rng.standard_normal(shape), jax.numpy.float32))
  checkpoint.write_safetensors(
      lora_file, lora.adapter_tensors(pipe.unet, prefix="unet."))
  # A LoRA run's export: the adapters and the config naming their base.
  export = root / "run" / "export"
  export.mkdir(parents=True)
  checkpoint.write_safetensors(export / "pytorch_lora_weights.safetensors",
                               lora.adapter_tensors(pipe.unet, prefix="unet."))
  (export / "train_config.json").write_text(
      json.dumps({"model": {"pretrained": "tiny"}, "seed": 0}))
  specs = {
      "base": {}, "again": dict(overwrite=True),
      "batch2": dict(batch_size=2), "seed1": dict(seed=1, batch_size=2),
      "lora": dict(lora=(str(lora_file),), batch_size=2),
      "lora0": dict(lora=(str(lora_file),), lora_scale=(0.0,), batch_size=2),
      "export": dict(model=str(export), batch_size=2),
  }
  done = {}

  def get(name):
    if name not in done:
      s = _settings(root / name, **specs[name])
      if s.overwrite:  # a non-empty folder to replace
        (root / name).mkdir()
        (root / name / "stale.txt").write_text("old")
      done[name] = (s, generate.run(s, progress=False))
    return done[name]

  get.root, get.lora_file = root, lora_file
  return get


def test_writes_the_layout_the_evaluation_reads(runs):
  _, folder = runs("base")
  assert sorted(p.name for p in folder.iterdir()) == sorted(
      NAMES + [generate.GRID, generate.SETTINGS])
  for name in NAMES:
    with Image.open(folder / name) as image:
      assert image.size == (64, 64) and image.mode == "RGB"
  assert _pixels(folder).shape == (4, 64, 64, 3)
  assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]


def test_images_are_diffusion_generate_s(runs):
  """The command adds nothing to the images ``diffusion.generate`` makes."""
  s, folder = runs("base")
  mesh = sharding.create_mesh(-1, 1)
  direct = diffusion.generate(
      load_stable_diffusion("tiny"), [p for p in PROMPTS for _ in range(2)],
      seed=0, num_inference_steps=2, guidance_scale=s.guidance, resolution=64,
      batch_sharding=sharding.batch_sharding(mesh))
  np.testing.assert_array_equal(_pixels(folder), direct)


def test_tiny_sdxl_images_are_diffusion_generate_s(tmp_path):
  """An SDXL model through the command: its images are the SDXL pipeline's
  (two text encoders, time ids), not an SD 1.x pipeline's."""
  s = _settings(tmp_path / "xl", model="tiny-sdxl", num_images=1,
                prompt=PROMPTS[:1], batch_size=1)
  folder = generate.run(s, progress=False)
  pipe = load_stable_diffusion("tiny-sdxl")
  assert pipe.is_sdxl
  mesh = sharding.create_mesh(-1, 1)
  direct = diffusion.generate(
      pipe, list(PROMPTS[:1]), seed=0, num_inference_steps=2,
      guidance_scale=s.guidance, resolution=64, batch_size=1,
      batch_sharding=sharding.batch_sharding(mesh))
  with Image.open(folder / "00_00.png") as image:
    np.testing.assert_array_equal(np.asarray(image), direct[0])
  settings = json.loads((folder / generate.SETTINGS).read_text())
  assert settings["source"]["model"] == "tiny-sdxl"


def test_same_seed_same_bytes_other_seed_other_images(runs):
  base = _pngs(runs("base")[1])
  assert _pngs(runs("again")[1]) == base
  seed1 = _pngs(runs("seed1")[1])
  assert all(seed1[n] != base[n] for n in NAMES)


def test_images_do_not_depend_on_batch_size(runs):
  # Image i starts from noise fold_in(key, i) whatever the batch; a batch of 2
  # instead of 4 may only reassociate float sums, which could flip the
  # rounding of a rare pixel by one grey level.
  diff = np.abs(_pixels(runs("base")[1]).astype(int)
                - _pixels(runs("batch2")[1]).astype(int))
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_grid_has_a_row_per_prompt(runs):
  s, folder = runs("base")
  images = _pixels(folder)
  rows = [list(images[:2]), list(images[2:])]
  with Image.open(folder / generate.GRID) as grid:
    np.testing.assert_array_equal(
        np.asarray(grid), generate._grid("tiny, seed 0", s.prompt, rows, 64))
  sizes = [generate._grid("tiny, seed 0", PROMPTS[:1] * n, [rows[0]] * n,
                          64).shape[:2] for n in (1, 2, 3)]
  heights = [h for h, _ in sizes]
  assert heights[2] - heights[1] == heights[1] - heights[0] >= 64
  assert len({w for _, w in sizes}) == 1 and sizes[0][1] >= 2 * 64


def test_generate_json_round_trips_every_setting(runs):
  s, folder = runs("base")
  record = json.loads((folder / generate.SETTINGS).read_text())
  assert generate.Settings.from_dict(record["settings"]) == s
  assert record["version"] == personalize_jax.__version__
  assert record["source"] == {"model": "tiny"}
  assert record["settings"]["seed"] == 0 and record["resolution"] == 64
  assert record["devices"] == jax.device_count()
  export_s, export = runs("export")
  assert generate.Settings.from_dict(json.loads(
      (export / generate.SETTINGS).read_text())["settings"]) == export_s


def test_lora_changes_the_images_and_scale_zero_is_the_base(runs):
  base = _pngs(runs("batch2")[1])
  with_lora = _pngs(runs("lora")[1])
  assert all(with_lora[n] != base[n] for n in NAMES)
  assert _pngs(runs("lora0")[1]) == base


def test_lora_only_export_is_its_base_with_the_lora(runs):
  s, folder = runs("export")
  assert _pngs(folder) == _pngs(runs("lora")[1])
  source = json.loads((folder / generate.SETTINGS).read_text())["source"]
  assert source == {"model": s.model, "base_model": "tiny"}


def test_overwrite_replaces_a_non_empty_out(runs, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "stale.txt").write_text("old")
  with pytest.raises(UserError, match="not empty"):
    generate.run(_settings(out), progress=False)
  _, again = runs("again")  # the same settings, with --overwrite
  assert sorted(p.name for p in again.iterdir()) == sorted(
      NAMES + [generate.GRID, generate.SETTINGS])
  assert not [p for p in again.parent.iterdir() if ".tmp-" in p.name
              or ".old-" in p.name]


def test_long_prompts_warn_once(caplog):
  generate._warn_long_prompts(load_tokenizer("tiny"),
                              ["a mug " * 60, "a mug"])
  warnings = [r for r in caplog.records if "tokens" in r.getMessage()]
  assert len(warnings) == 1 and "truncated to its first 77" in (
      warnings[0].getMessage())


def _cli(capsys, *args) -> tuple[int, str]:
  """``main`` as the command line runs it: exit code and stderr."""
  flags.FLAGS.unparse_flags()
  with pytest.raises(SystemExit) as exit_info:
    generate.main(generate._parse(["generate", *args]))
  return exit_info.value.code, capsys.readouterr().err


@pytest.mark.parametrize("case", [
    "missing_model", "png_as_lora", "weights_as_lora", "negative_num_images",
    "zero_steps", "bad_resolution", "no_prompt", "not_a_number",
    "non_empty_out"])
def test_mistakes_are_one_line_and_write_nothing(runs, tmp_path, capsys,
                                                 case):
  weights = tmp_path / "weights.safetensors"
  checkpoint.write_safetensors(weights, {"conv.weight": np.zeros((2, 2))})
  png = runs("base")[1] / NAMES[0]
  out = tmp_path / "out"
  args = {
      "missing_model": ["--model=/no/such/model"],
      "png_as_lora": [f"--lora={png}"],
      "weights_as_lora": [f"--lora={weights}"],
      "negative_num_images": ["--num_images=-1"],
      "zero_steps": ["--steps=0"],
      "bad_resolution": ["--resolution=72"],
      "no_prompt": [],
      "not_a_number": ["--seed=one"],
      "non_empty_out": [],
  }[case]
  if case == "non_empty_out":
    out.mkdir()
    (out / "keep.txt").write_text("mine")
  before = sorted(p.name for p in tmp_path.iterdir())
  prompt = [] if case == "no_prompt" else ["--prompt=a mug"]
  code, err = _cli(capsys, "--model=tiny", *prompt, "--steps=2",
                   f"--out={out}", *args)
  assert code == 2
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert sorted(p.name for p in tmp_path.iterdir()) == before
  if case == "non_empty_out":
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def _command(out, devices: int) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "-m", "personalize_jax.generate", "--model=tiny",
       *[f"--prompt={p}" for p in PROMPTS], "--num_images=2", "--steps=2",
       "--resolution=64", "--seed=3", f"--out={out}"],
      env=xla_env.env(devices), capture_output=True, text=True, timeout=600,
      check=False)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
  out = tmp_path_factory.mktemp("cli") / "out"
  return _command(out, 1), out


def test_command_line(one_device):
  done, out = one_device
  assert done.returncode == 0, done.stderr[-2000:]
  assert sorted(_pngs(out)) == NAMES
  last = done.stdout.strip().splitlines()[-2:]
  assert last[0].startswith("generated 4 images (2 prompts x 2)")
  assert str(out) in last[1]
  assert "generate: 100%" in done.stderr  # the progress bar


@pytest.mark.slow
def test_eight_devices_draw_the_one_device_images(one_device, tmp_path):
  done, out = one_device
  assert done.returncode == 0, done.stderr[-2000:]
  spread = _command(tmp_path / "out", 8)
  assert spread.returncode == 0, spread.stderr[-2000:]
  record = json.loads((tmp_path / "out" / generate.SETTINGS).read_text())
  assert record["devices"] == 8
  # 8 devices sample 8 images per call (4, padded) where 1 device samples 4:
  # float sums reassociate, which flips the rounding of a rare pixel (under
  # 0.1%) by one grey level, so the PNG bytes may differ.
  diff = np.abs(_pixels(tmp_path / "out").astype(int)
                - _pixels(out).astype(int))
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
