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
from personalize_jax.models.clip import CLIPTextConfig, CLIPTextModel
from personalize_jax.models.vae import AutoencoderKL, AutoencoderKLConfig

# The VAE of CompVis/stable-diffusion-v1-4 and stabilityai/stable-diffusion-2-1-base.
SD_VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu",
    "sample_size": 512,
}
# text_encoder/config.json of SD 1.4 (CLIP ViT-L/14) and SD 2.1-base (OpenCLIP ViT-H/14).
TEXT_ENCODERS = {
    "sd-1.4": {"vocab_size": 49408, "hidden_size": 768,
               "intermediate_size": 3072, "num_hidden_layers": 12,
               "num_attention_heads": 12, "max_position_embeddings": 77,
               "hidden_act": "quick_gelu", "projection_dim": 768},
    "sd-2.1-base": {"vocab_size": 49408, "hidden_size": 1024,
                    "intermediate_size": 4096, "num_hidden_layers": 23,
                    "num_attention_heads": 16, "max_position_embeddings": 77,
                    "hidden_act": "gelu", "projection_dim": 512},
}


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
