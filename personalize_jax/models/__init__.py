"""Flax NNX ports of the Stable Diffusion, CLIP and DINO models (NHWC).

Names resolve lazily so that importing one model does not import them all.
"""

import importlib

_EXPORTS = {
    "UNet2DConditionModel": "unet",
    "AutoencoderKL": "vae",
    "CLIPTextModel": "clip",
    "CLIPVisionModel": "clip",
    "CLIPModel": "clip",
    "CLIPTokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "ViTModel": "vit",
    "Dinov2Model": "dinov2",
    "ImageProcessor": "image_processor",
    "QNetwork": "qnetwork",
    "count_params": "checkpoint",
    "AlignModel": "align",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name not in _EXPORTS:
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
  module = importlib.import_module(f"{__name__}.{_EXPORTS[name]}")
  return getattr(module, name)
