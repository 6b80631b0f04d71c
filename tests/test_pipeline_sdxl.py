"""Stable Diffusion XL pipelines against diffusers' StableDiffusionXLPipeline.

One tiny random SDXL pipeline (tests/torch_reference.py) saved in the Hub
layout: its text conditioning, a guided DDIM trajectory, the decoded images
(at a non-native size, so the time ids follow the resolution) and the round
trip of our export through ``StableDiffusionXLPipeline.from_pretrained``.
"""

import dataclasses
import json

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from personalize_jax import diffusion, pipeline as pipeline_lib, sdxl
from personalize_jax.errors import CheckpointError
from personalize_jax.models import checkpoint, clip, presets
from personalize_jax.pipeline import load_stable_diffusion

import torch_reference

PROMPTS = ["a photo of sks dog", "a sks dog on the beach"]
STEPS = 10
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The tiny diffusers SDXL pipeline, and the folder it is saved in."""
  folder = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"
  return torch_reference.tiny_sdxl_pipeline(folder), folder


@pytest.fixture(scope="module")
def ours(reference):
  return load_stable_diffusion(reference[1])


def _latents(rng, side):
  return np.array(diffusion.initial_latents(rng, range(len(PROMPTS)),
                                            (side // 8, side // 8, 4)))


def _diffusers(pipe, latents, output_type):
  """diffusers' guided sampling from our initial latents, NHWC numpy."""
  side = latents.shape[1] * 8
  with torch.no_grad():
    out = pipe(PROMPTS, latents=torch.from_numpy(latents).permute(0, 3, 1, 2),
               num_inference_steps=STEPS, guidance_scale=7.5, height=side,
               width=side, output_type=output_type).images
  return out.permute(0, 2, 3, 1).numpy() if output_type == "latent" else out


def test_the_folder_loads_as_sdxl(ours):
  assert ours.is_sdxl
  assert not dataclasses.replace(ours, text_encoder_2=None).is_sdxl
  assert isinstance(ours.text_encoder_2, clip.CLIPTextModelWithProjection)
  assert ours.vae.scaling_factor == 0.13025
  assert ours.force_zeros_for_empty_prompt
  assert ours.tokenizer_2.pad_token_id == 0 and ours.resolution == 64


def test_encode_prompts_matches_diffusers(reference, ours):
  pipe, _ = reference
  states, pooled = diffusion.encode_prompts(ours, PROMPTS)
  with torch.no_grad():
    ref = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False)
    blurry = pipe.encode_prompt(PROMPTS, negative_prompt="blurry")
    empty = pipe.encode_prompt(PROMPTS, negative_prompt="")
  assert states.shape == (2, 77, 64) and pooled.shape == (2, 32)
  assert torch_reference.rel_err(states, ref[0]) < 1e-4
  assert torch_reference.rel_err(pooled, ref[2]) < 1e-4
  # Negatives: zeros for the default empty prompt, else the encoded prompt
  # ("" too once force_zeros_for_empty_prompt is off).
  zeros = sdxl.negative_conditioning(ours, "")
  assert all(not np.any(x) for x in zeros) and zeros[1].shape == (1, 32)
  kept = dataclasses.replace(ours, force_zeros_for_empty_prompt=False)
  for got, want in ((sdxl.negative_conditioning(ours, "blurry"), blurry),
                    (sdxl.negative_conditioning(kept, ""), empty)):
    assert torch_reference.rel_err(got[0], want[1][:1]) < 1e-4
    assert torch_reference.rel_err(got[1], want[3][:1]) < 1e-4


def test_guided_ddim_trajectory_matches_diffusers(reference, ours):
  latents = _latents(jax.random.key(3), 64)
  got = diffusion.ddim_sample(
      ours.unet, ours.schedule, latents, diffusion.encode_prompts(ours, PROMPTS),
      sdxl.negative_conditioning(ours), STEPS, 7.5,
      time_ids=sdxl.time_ids(64))
  want = _diffusers(reference[0], latents, "latent")
  assert torch_reference.rel_err(got, want) < 1e-3
  with pytest.raises(ValueError, match="needs time_ids"):
    diffusion.ddim_sample(ours.unet, ours.schedule, latents,
                          diffusion.encode_prompts(ours, PROMPTS), None, 1)


def test_generate_matches_diffusers_images(reference, ours):
  """At 48 px, not the native 64: the time ids follow the resolution."""
  rng = jax.random.key(5)
  images = diffusion.generate(ours, PROMPTS, rng=rng, resolution=48,
                              num_inference_steps=STEPS, guidance_scale=7.5)
  assert images.shape == (2, 48, 48, 3) and images.std() > 1.0
  want = _diffusers(reference[0], _latents(rng, 48), "np")
  # Ours are rounded to uint8: half a level of quantisation plus model error.
  np.testing.assert_allclose(images / 255.0, want, atol=1.5 / 255)


def test_export_loads_in_diffusers_and_back(ours, tmp_path):
  ours.save_pretrained(tmp_path)
  index = json.loads((tmp_path / "model_index.json").read_text())
  assert index["_class_name"] == "StableDiffusionXLPipeline"
  assert index["force_zeros_for_empty_prompt"] is True
  back = load_stable_diffusion(tmp_path)
  assert back.is_sdxl and back.force_zeros_for_empty_prompt
  for name in COMPONENTS:
    a = checkpoint.module_tensors(getattr(ours, name))
    b = checkpoint.module_tensors(getattr(back, name))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a), name
  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(
      tmp_path, add_watermarker=False)
  assert pipe.vae.config.scaling_factor == 0.13025
  rng = jax.random.key(7)
  images = diffusion.generate(ours, PROMPTS, rng=rng,
                              num_inference_steps=STEPS, guidance_scale=7.5)
  want = _diffusers(pipe, _latents(rng, 64), "np")
  np.testing.assert_allclose(images / 255.0, want, atol=1.5 / 255)


def test_tiny_sdxl_shapes_and_float32_vae():
  """``tiny-sdxl`` in bfloat16: its VAE computes in float32 (force_upcast)."""
  tiny = load_stable_diffusion(presets.TINY_SDXL, seed=1, dtype=jnp.bfloat16)
  assert tiny.is_sdxl and tiny.vae.scaling_factor == 0.13025
  assert tiny.tokenizer_2("a dog", padding="max_length",
                          max_length=77)["input_ids"][-1] == 0
  for name in COMPONENTS:
    abstract = pipeline_lib.abstract_component(presets.TINY_SDXL, name)
    assert checkpoint.count_params(abstract) == checkpoint.count_params(
        getattr(tiny, name)), name
  latents = jax.ShapeDtypeStruct((1, 8, 8, 4), jnp.bfloat16)
  assert jax.eval_shape(tiny.vae.decode, latents).dtype == jnp.float32
  assert jax.eval_shape(
      lambda x: tiny.unet(x, 1, jnp.zeros((1, 77, 64)),
                          text_embeds=jnp.zeros((1, 32)),
                          time_ids=sdxl.time_ids(64)), latents
  ).dtype == jnp.bfloat16
  published = presets.PUBLISHED["stabilityai/stable-diffusion-xl-base-1.0"]
  assert published["text_encoder_2"] is presets.SDXL_TEXT_2
  assert published["vae"]["scaling_factor"] == 0.13025


def test_an_incomplete_sdxl_folder_is_a_one_line_error(tmp_path):
  (tmp_path / "model_index.json").write_text(
      json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
  for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
    (tmp_path / name).mkdir()
  with pytest.raises(CheckpointError, match="lacks text_encoder_2/, "
                     "tokenizer_2/; a Stable Diffusion XL folder") as info:
    load_stable_diffusion(tmp_path)
  assert "\n" not in str(info.value)
