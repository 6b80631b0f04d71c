"""The recipes of ``configs/`` as tests load them: one loader for every test."""

import importlib.util
from pathlib import Path

import ml_collections

REPO = Path(__file__).resolve().parents[1]


def override(config: ml_collections.ConfigDict,
             overrides: dict) -> ml_collections.ConfigDict:
  """Sets dotted keys (``{"mesh.fsdp": 4}``) in place; returns ``config``."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def load(recipe: str, variant: str | None = "tiny",
         **overrides) -> ml_collections.ConfigDict:
  """``configs/<recipe>.py:<variant>`` with dotted-key ``overrides``.

  Pass dotted keys as ``**{"mesh.fsdp": 4}``.
  """
  path = REPO / "configs" / f"{recipe}.py"
  spec = importlib.util.spec_from_file_location(f"recipe_{recipe}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return override(module.get_config(variant), overrides)
