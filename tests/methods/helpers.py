"""Builds a method as the engine does, without a run directory's services."""

from pathlib import Path

from flax import nnx

from personalize_jax.engine import config as config_lib
from personalize_jax.engine import sharding, train
from personalize_jax.engine.method import Context


def context(config, workdir, pipeline, mesh=None) -> Context:
  return Context(config=config, workdir=Path(workdir), pipeline=pipeline,
                 mesh=mesh or sharding.create_mesh())


def build(module, config, workdir, pipeline):
  """``(method, params, frozen)``: the method value and the step's inputs.

  ``config`` is resolved first and the pipeline gets its LoRA adapters (as
  ``train_and_evaluate`` does); ``params`` and ``frozen`` are split the
  engine's way (host arrays, not placed).
  """
  config_lib.resolve(config, module)
  for name in config_lib.lora_targets(config):
    train.add_lora(config, name, getattr(pipeline, name))
  method = module.build(context(config, workdir, pipeline))
  params, frozen_parts = train.split_trainable(config, method)
  frozen = {"modules": {**frozen_parts,
                        **{name: nnx.state(m)
                           for name, m in method.frozen.items()}},
            "constants": dict(method.constants)}
  return method, params, frozen
