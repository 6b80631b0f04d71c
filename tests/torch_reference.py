"""PyTorch references the tests compare against: tiny diffusers pipelines."""

from pathlib import Path

import diffusers
import numpy as np
import torch
import transformers
from flax import nnx

from personalize_jax.models import checkpoint, presets
from personalize_jax.models import tokenizer as tokenizer_lib
from personalize_jax.models.tokenizer import load_tokenizer

import xla_env


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


def tiny_sdxl_pipeline(folder: Path, seed: int = 0
                       ) -> diffusers.StableDiffusionXLPipeline:
  """The tiny SDXL presets as a diffusers pipeline, saved to ``folder``.

  The second tokenizer pads with "!" (id 0), as SDXL's does; the scheduler is
  a ``DDIMScheduler``. Norms and biases of the U-Net and both text encoders
  are moved off their identity init so that they are exercised.
  """
  torch.manual_seed(seed)
  text = lambda cls, preset: cls(transformers.CLIPTextConfig(**{
      k: v for k, v in preset.items()
      if k not in ("model_type", "architectures")}))
  pipe = diffusers.StableDiffusionXLPipeline(
      vae=diffusers.AutoencoderKL(**public(presets.TINY_SDXL_VAE)),
      text_encoder=text(transformers.CLIPTextModel, presets.TINY_SDXL_TEXT),
      text_encoder_2=text(transformers.CLIPTextModelWithProjection,
                          presets.TINY_SDXL_TEXT_2),
      tokenizer=load_tokenizer(presets.TINY),
      tokenizer_2=transformers.CLIPTokenizer.from_pretrained(
          str(tokenizer_lib.ASSETS), model_max_length=77, pad_token="!"),
      unet=diffusers.UNet2DConditionModel(**public(presets.TINY_SDXL_UNET)),
      scheduler=diffusers.DDIMScheduler(**public(presets.SCHEDULER)),
      add_watermarker=False)
  with torch.no_grad():
    for model in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2):
      for name, p in model.named_parameters():
        if "norm" in name or name.endswith("bias"):
          p.add_(0.1 * torch.randn_like(p))
  pipe.save_pretrained(folder)
  return pipe


# The tests' compile options (tests/xla_env.py), here for the model tests.
FAST_COMPILE = xla_env.FAST_COMPILE


def rel_err(ours, ref) -> float:
  """``max |ours - ref| / max |ref|``, in float32."""
  ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def assert_grads_match(grads, torch_model, tol: float) -> None:
  """Our parameter gradients equal the ``.grad`` torch autograd left.

  Args:
    grads: an ``nnx.State`` of gradients, one per parameter of the port.
    torch_model: the reference after ``loss.backward()``.
    tol: allowed ``max |ours - ref|`` relative to ``max |ref|``, per tensor.
  """
  torch_params = dict(torch_model.named_parameters())
  flat = list(nnx.to_flat_state(grads))
  assert len(flat) == len(torch_params)
  for path, value in flat:
    key = checkpoint.torch_key(path)
    ours = checkpoint.to_torch_layout(path, np.asarray(value.get_value()))
    ref = torch_params[key].grad.numpy()
    assert np.isfinite(ours).all(), key
    scale = np.abs(ref).max()
    assert scale > 0, key
    assert np.abs(ours - ref).max() <= tol * scale, key
