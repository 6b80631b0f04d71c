"""PyTorch references the tests compare against: tiny diffusers pipelines."""

from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers

from personalize_jax.models import presets
from personalize_jax.models.tokenizer import load_tokenizer


def public(config: dict) -> dict:
  """A preset without diffusers' private ``_class_name``-style keys."""
  return {k: v for k, v in config.items() if not k.startswith("_")}


def tiny_pipeline(folder: Path, seed: int = 0
                  ) -> diffusers.StableDiffusionPipeline:
  """The tiny presets as a diffusers pipeline, saved to ``folder``.

  The U-Net's norms and biases are moved off their identity init so that
  they are exercised.
  """
  torch.manual_seed(seed)
  text_config = {k: v for k, v in presets.CLIP_TEXT.items()
                 if k not in ("model_type", "architectures")}
  pipe = diffusers.StableDiffusionPipeline(
      vae=diffusers.AutoencoderKL(**public(presets.VAE)),
      text_encoder=transformers.CLIPTextModel(
          transformers.CLIPTextConfig(**text_config)),
      tokenizer=load_tokenizer(presets.TINY),
      unet=diffusers.UNet2DConditionModel(**public(presets.UNET)),
      scheduler=diffusers.DDIMScheduler(**public(presets.SCHEDULER)),
      safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  with torch.no_grad():
    for name, p in pipe.unet.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  pipe.save_pretrained(folder)
  return pipe


# XLA's CPU optimisation passes and fusion emitters do not pay off for models
# this small (it roughly halves the compile time).
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False}


def rel_err(ours, ref) -> float:
  """``max |ours - ref| / max |ref|``, in float32."""
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())
