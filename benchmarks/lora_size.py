"""LoRA sizes of the published models: adapter parameters and file bytes.

For each model (``--models``, Hub ids of ``presets.PUBLISHED``) and rank
(``--ranks``): the U-Net (and text encoder) is built abstractly from its
published config, gets the default adapters of ``config.lora`` (diffusers'
``to_q``/``to_k``/``to_v``/``to_out.0``; ``q_proj``/``k_proj``/``v_proj``/
``out_proj``), and ``pytorch_lora_weights.safetensors`` is written as the
engine's export writes it (fp32), with zeros: the reported size is the real
file's.

  python benchmarks/lora_size.py --ranks=4,32

Prints one JSON line per (model, rank, components), then a markdown table.
"""

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from flax import nnx

import common
from personalize_jax.engine import config as config_lib
from personalize_jax.models import checkpoint, lora, presets
from personalize_jax.models.clip import CLIPTextConfig, CLIPTextModel
from personalize_jax.models.unet import (UNet2DConditionConfig,
                                         UNet2DConditionModel)

COLUMNS = [("model", "model"), ("components", "adapted"), ("rank", "rank"),
           ("adapted_layers", "layers"), ("params_m", "adapter M params"),
           ("fraction", "of the adapted models"), ("file_mib", "file MiB")]
BUILD = {"unet": (UNet2DConditionModel, UNet2DConditionConfig),
         "text_encoder": (CLIPTextModel, CLIPTextConfig)}


def _abstract(name: str, values: dict) -> nnx.Module:
  cls, config_cls = BUILD[name]
  config = config_cls.from_dict(values)
  return nnx.eval_shape(lambda: cls(config, rngs=checkpoint.shape_only_rngs()))


def measure(model: str, rank: int, components: tuple[str, ...],
            folder: Path) -> dict:
  """Adapter parameters and the size of their file for one setting."""
  defaults = config_lib.base_config().lora
  tensors, layers, base = {}, 0, 0
  for name in components:
    module = _abstract(name, presets.PUBLISHED[model][name])
    base += checkpoint.count_params(module)
    layers += len(lora.add_adapters(
        module, defaults[f"{name}_targets"], rank=rank, alpha=rank,
        component=name))
    for path, var in checkpoint.iter_params(module):
      if lora.is_adapter_path(path):
        shape = var.get_value().shape
        tensors[f"{name}.{checkpoint.torch_key(path)}"] = np.zeros(
            shape[::-1], np.float32)  # torch layout: out x in
  params = sum(t.size for t in tensors.values())
  path = folder / f"{rank}-{'+'.join(components)}.safetensors"
  checkpoint.write_safetensors(path, tensors)
  return {"benchmark": "lora_size", "model": model,
          "components": "+".join(components), "rank": rank,
          "adapted_layers": layers, "params": params, "params_m": params / 1e6,
          "fraction": params / base, "file_bytes": os.path.getsize(path),
          "file_mib": os.path.getsize(path) / 2**20}


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="CompVis/stable-diffusion-v1-4")
  parser.add_argument("--ranks", default="4,32")
  args = parser.parse_args(argv)
  models = common.parse_list(args.models, presets.PUBLISHED)
  ranks = [int(r) for r in args.ranks.split(",")]
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for model in models:
      for components in (("unet",), ("unet", "text_encoder")):
        for rank in ranks:
          record = measure(model, rank, components, Path(tmp))
          common.emit(record)
          rows.append(record)
  print()
  print(common.markdown_table(rows, COLUMNS))
  return rows


if __name__ == "__main__":
  main()
