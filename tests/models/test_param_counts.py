"""Parameter counts of the real SD 1.4 / 2.1-base VAE and text encoders.

Built from the published config values under ``nnx.eval_shape`` (nothing is
materialised) and compared with diffusers/transformers built on the meta
device. (The U-Net counts are in test_unet.py.)
"""

import diffusers
import pytest
import torch
import transformers
from flax import nnx

from personalize_jax.models import checkpoint
from personalize_jax.models import presets
from personalize_jax.models.clip import CLIPTextConfig, CLIPTextModel
from personalize_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

# The VAE of CompVis/stable-diffusion-v1-4 and stabilityai/stable-diffusion-2-1-base.
SD_VAE = presets.SD_VAE
# text_encoder/config.json of SD 1.4 (CLIP ViT-L/14) and SD 2.1-base (OpenCLIP ViT-H/14).
TEXT_ENCODERS = {"sd-1.4": presets.SD14_TEXT, "sd-2.1-base": presets.SD21_TEXT}


def _torch_count(build):
  with torch.device("meta"):
    return sum(p.numel() for p in build().parameters())


def test_vae_parameter_count():
  ours = checkpoint.count_params(nnx.eval_shape(lambda: AutoencoderKL(
      AutoencoderKLConfig.from_dict(SD_VAE),
      rngs=checkpoint.shape_only_rngs())))
  theirs = _torch_count(lambda: diffusers.AutoencoderKL(**SD_VAE))
  assert ours == theirs == 83_653_863


@pytest.mark.parametrize("name, expected", [("sd-1.4", 123_060_480),
                                            ("sd-2.1-base", 340_387_840)])
def test_text_encoder_parameter_count(name, expected):
  config = TEXT_ENCODERS[name]
  ours = checkpoint.count_params(nnx.eval_shape(lambda: CLIPTextModel(
      CLIPTextConfig.from_dict(config), rngs=checkpoint.shape_only_rngs())))
  theirs = _torch_count(lambda: transformers.CLIPTextModel(
      transformers.CLIPTextConfig(**config)))
  assert ours == theirs == expected
