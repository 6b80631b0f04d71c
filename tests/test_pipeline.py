"""Whole-pipeline parity with diffusers' StableDiffusionPipeline, both directions."""

import diffusers
import jax
import numpy as np
import pytest
import torch
import transformers

from personalize_jax import diffusion
from personalize_jax.errors import CheckpointError
from personalize_jax.models import checkpoint, presets
from personalize_jax.models.tokenizer import load_tokenizer
from personalize_jax.pipeline import load_stable_diffusion

PROMPTS = ["a photo of sks dog", "a sks dog on the beach"]
STEPS = 4


def _public(config):
  return {k: v for k, v in config.items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """A tiny diffusers pipeline saved in the Hub layout, and its folder."""
  torch.manual_seed(0)
  text_config = {k: v for k, v in presets.CLIP_TEXT.items()
                 if k not in ("model_type", "architectures")}
  pipe = diffusers.StableDiffusionPipeline(
      vae=diffusers.AutoencoderKL(**_public(presets.VAE)),
      text_encoder=transformers.CLIPTextModel(
          transformers.CLIPTextConfig(**text_config)),
      tokenizer=load_tokenizer(presets.TINY),
      unet=diffusers.UNet2DConditionModel(**_public(presets.UNET)),
      scheduler=diffusers.DDIMScheduler(**_public(presets.SCHEDULER)),
      safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  # Move norms and biases off their identity init so they are exercised.
  with torch.no_grad():
    for name, p in pipe.unet.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
  pipe.save_pretrained(folder)
  return pipe, folder


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
  env = dict(os.environ,
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "-c", _SHARDED_GENERATE], env=env,
                       capture_output=True, text=True, timeout=600,
                       cwd=tmp_path, check=False)
  line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")]
  assert line, out.stderr[-2000:]
  _, same_shape, max_diff, frac = line[0].split()
  assert same_shape == "True"
  assert int(max_diff) <= 1 and float(frac) < 1e-3
