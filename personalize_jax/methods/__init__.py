"""The methods, by ``config.method``: each a module the engine runs.

Every method module exports ``add_config(config)``, ``validate(config)`` and
``build(ctx) -> engine.method.Method`` (see ``personalize_jax.engine.method``),
``COMPONENTS`` (the pipeline components ``config.trainable`` may name: checked
on the models' shapes before anything loads) and, where it has convenience switches, ``resolve(config)``, which turns its convenience switches (DreamBooth's
``train_text_encoder``) into ``config.trainable`` regexes before the config is
validated and written to the run directory.
"""

import importlib
import types

from personalize_jax.errors import UserError

NAMES = ("dreambooth", "custom_diffusion", "rpo", "lookforward")


def get(name: str) -> types.ModuleType:
  """The module of method ``name``.

  Raises:
    UserError: ``name`` is not a method.
  """
  if name not in NAMES:
    raise UserError(f"config.method={name!r} is invalid: use one of "
                    f"{', '.join(NAMES)}")
  return importlib.import_module(f"personalize_jax.methods.{name}")
