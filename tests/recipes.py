"""The recipes of ``configs/`` as tests load them: one loader for every test."""

from pathlib import Path

import ml_collections

from personalize_jax.engine import config as config_lib

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
  module = config_lib.load_recipe(REPO / "configs" / f"{recipe}.py")
  return override(module.get_config(variant), overrides)
