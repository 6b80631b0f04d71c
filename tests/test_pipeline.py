"""Whole-pipeline parity with diffusers' StableDiffusionPipeline, both directions."""

import diffusers
import jax
import numpy as np
import pytest
import torch

from personalize_jax import diffusion
from personalize_jax.errors import CheckpointError
from personalize_jax.models import checkpoint
from personalize_jax.pipeline import load_stable_diffusion

import torch_reference
import xla_env

PROMPTS = ["a photo of sks dog", "a sks dog on the beach"]
STEPS = 4


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A tiny diffusers pipeline saved in the Hub layout, and its folder."""
  folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
  return torch_reference.tiny_pipeline(folder), folder


def _diffusers_images(pipe, rng):
  latents = np.array(diffusion.initial_latents(rng, range(len(PROMPTS)),
                                                 (8, 8, 4)))
  out = pipe(PROMPTS, latents=torch.from_numpy(latents).permute(0, 3, 1, 2),
             num_inference_steps=STEPS, guidance_scale=7.5, output_type="np")
  return out.images


def test_generate_matches_diffusers_pipeline(reference):
  pipe, folder = reference
  ours = load_stable_diffusion(folder)
  rng = jax.random.key(3)
  images = diffusion.generate(ours, PROMPTS, rng=rng,
                              num_inference_steps=STEPS, guidance_scale=7.5)
  assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8
  theirs = _diffusers_images(pipe, rng)
  # Ours are rounded to uint8: half a level of quantisation plus model error.
  np.testing.assert_allclose(images / 255.0, theirs, atol=1.5 / 255)
  assert images.std() > 1.0  # not a constant image


def test_generate_is_independent_of_batch_size(reference):
  ours = load_stable_diffusion(reference[1])
  rng = jax.random.key(5)
  both = diffusion.generate(ours, PROMPTS, rng=rng, num_inference_steps=2,
                            batch_size=2)
  one_by_one = diffusion.generate(ours, PROMPTS, rng=rng,
                                  num_inference_steps=2, batch_size=1)
  # Same noise per image; only float reassociation across batch sizes differs,
  # which may flip the rounding of a rare pixel by one level.
  diff = np.abs(both.astype(int) - one_by_one.astype(int))
  assert diff.max() <= 1 and (diff > 0).mean() < 1e-3


def test_export_loads_in_diffusers_and_back(reference, tmp_path):
  ours = load_stable_diffusion(reference[1])
  ours.save_pretrained(tmp_path / "export")
  back = load_stable_diffusion(tmp_path / "export")
  for component in ("unet", "vae", "text_encoder"):
    a = checkpoint.module_tensors(getattr(ours, component))
    b = checkpoint.module_tensors(getattr(back, component))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a), component
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "export")
  rng = jax.random.key(7)
  theirs = _diffusers_images(pipe, rng)
  images = diffusion.generate(ours, PROMPTS, rng=rng,
                              num_inference_steps=STEPS, guidance_scale=7.5)
  np.testing.assert_allclose(images / 255.0, theirs, atol=1.5 / 255)


def test_folder_errors_are_one_line(reference, tmp_path):
  with pytest.raises(CheckpointError, match="no model_index.json"):
    load_stable_diffusion(tmp_path)
  (tmp_path / "model_index.json").write_text("{}")
  (tmp_path / "unet").mkdir()
  with pytest.raises(CheckpointError) as info:
    load_stable_diffusion(tmp_path)
  assert "vae/" in str(info.value) and "\n" not in str(info.value)


_SHARDED_GENERATE = r"""
import jax, numpy as np
from personalize_jax import diffusion
from personalize_jax.engine import sharding
from personalize_jax.pipeline import load_stable_diffusion
assert jax.device_count() == 8
pipe = load_stable_diffusion("tiny")
prompts = ["a photo of sks dog"] * 3 + ["a sks dog on the beach"] * 3
plain = diffusion.generate(pipe, prompts, seed=1, num_inference_steps=2)
batch = sharding.batch_sharding(sharding.create_mesh(-1, 1))
spread = diffusion.generate(pipe, prompts, seed=1, num_inference_steps=2,
                            batch_sharding=batch)
diff = np.abs(plain.astype(int) - spread.astype(int))
print("RESULT", plain.shape == spread.shape, diff.max(), (diff > 0).mean())
"""


def test_generate_spreads_over_devices(tmp_path):
  """Sampling split over 8 devices gives the images of the 1-device path."""
  import os, subprocess, sys  # pylint: disable=g-import-not-at-top,multiple-imports
  env = xla_env.env(8)
  out = subprocess.run([sys.executable, "-c", _SHARDED_GENERATE], env=env,
                       capture_output=True, text=True, timeout=600,
                       cwd=tmp_path, check=False)
  line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")]
  assert line, out.stderr[-2000:]
  _, same_shape, max_diff, frac = line[0].split()
  assert same_shape == "True"
  assert int(max_diff) <= 1 and float(frac) < 1e-3


def test_load_export_of_a_lora_run_is_the_base_with_the_adapters_fused(
    tmp_path):
  """A LoRA-only export names its base in train_config.json."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from personalize_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  from personalize_jax.engine import train  # pylint: disable=g-import-not-at-top
  from personalize_jax.models import lora  # pylint: disable=g-import-not-at-top
  import recipes  # pylint: disable=g-import-not-at-top
  config = recipes.load("dreambooth_tpu", "tiny,lora",
                        **{"seed": 3, "lora.alpha": 8.0})
  config.trainable = (r"^unet\..*\.lora_[AB]\.weight$",)
  trained = load_stable_diffusion("tiny", seed=3)
  lora.add_adapters(trained.unet, config.lora.unet_targets, rank=4, alpha=8.0)
  rng = np.random.default_rng(0)
  for _, linear in lora.linear_modules(trained.unet):
    if linear.lora_B is not None:
      linear.lora_B.kernel.set_value(jax.numpy.asarray(
          rng.standard_normal(linear.lora_B.kernel.get_value().shape),
          jax.numpy.float32))
  folder = tmp_path / "export"
  train.write_export(trained, folder, config)
  (folder / "train_config.json").write_text(
      ml_collections.ConfigDict(config).to_json())
  assert sorted(p.name for p in folder.iterdir()) == [
      "pytorch_lora_weights.safetensors", "train_config.json"]
  assert pipeline_lib.is_lora_folder(folder)
  loaded = pipeline_lib.load_export(folder)
  assert loaded.source == str(folder)
  expected = checkpoint.module_tensors(lora.fused(trained.unet))
  ours = checkpoint.module_tensors(loaded.unet)
  assert expected.keys() == ours.keys()
  for key, value in expected.items():
    np.testing.assert_allclose(ours[key], value, rtol=1e-5, atol=1e-6,
                               err_msg=key)
  base = checkpoint.module_tensors(load_stable_diffusion("tiny", seed=3).unet)
  adapted = [n for n, m in lora.linear_modules(trained.unet)
             if m.lora_A is not None]
  assert adapted and sum(not np.array_equal(base[k], ours[k])
                         for k in base) == len(adapted)
  (folder / "train_config.json").unlink()
  with pytest.raises(CheckpointError, match="no train_config.json"):
    pipeline_lib.load_export(folder)
  assert checkpoint.module_tensors(pipeline_lib.load_export(
      folder, base="tiny", seed=3).unet).keys() == ours.keys()
