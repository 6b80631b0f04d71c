"""What a method is to the engine: a value, built once per run.

A method module (``personalize_jax/methods/<name>.py``) exports three
functions, and ``main`` hands the module to the engine:

  add_config(config)  adds ``config.<name>``: the method's own keys.
  validate(config)    raises ``UserError`` on a bad method-specific value; the
                      config alone, no models: it runs before the workdir or a
                      model is touched.
  build(ctx)          prepares the method's data (cached in the workdir) and
                      returns a ``Method``.
  COMPONENTS          the pipeline components ``config.trainable`` may name.
  resolve(config)     optional: turns convenience switches into
                      ``config.trainable`` regexes.

The engine trains the parameters of ``Method.trainable`` that
``config.trainable`` names; the other leaves of such a component, and a
component with no such parameter, move to the frozen side and never enter the
optimizer state. The loss therefore reads a component with
``graphs(name, params, frozen)`` wherever its leaves live.
"""

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from personalize_jax.engine import sharding

# (params, frozen, batch, rng) -> (loss, metrics); ``frozen`` is
# ``{"modules": {name: state}, "constants": {name: array}}``.
LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


@dataclasses.dataclass
class Context:
  """What a method's ``build`` may use: the config, the run directory, models, devices."""
  config: ml_collections.ConfigDict
  workdir: Path
  pipeline: Any  # personalize_jax.pipeline.StableDiffusion
  mesh: Mesh
  # The module a step runs for one the method prepared its data with: the
  # same one, except when a benchmark compiles the step for full-size twins
  # of small stand-in models.
  step_module: Callable[[str, nnx.Module], nnx.Module] = (
      lambda name, module: module)

  def graphs(self, modules: Mapping[str, nnx.Module]) -> "Graphs":
    """The graphs a loss rebuilds ``modules`` from (see ``step_module``)."""
    return Graphs({name: self.step_module(name, module)
                   for name, module in modules.items()})

  @property
  def cache_dir(self) -> Path:
    return self.workdir / "cache"

  @property
  def batch_sharding(self):
    """Splits a batch axis over every device: pass it to ``diffusion.generate``."""
    return sharding.batch_sharding(self.mesh)


@dataclasses.dataclass(frozen=True)
class Method:
  """A method as the engine runs it.

  Attributes:
    trainable: ``{name: module}`` the optimizer may train (filtered by
      ``config.trainable``).
    loss_fn: the pure loss, ``(params, frozen, batch, rng) -> (loss, metrics)``.
    batch: ``step -> {name: array}``, the global batch of a step: a pure
      function of the step, so a resumed run sees the same data.
    frozen: ``{name: module}`` the loss uses but never trains.
    constants: ``{name: array}`` replicated inputs (cached embeddings, ids).
    evaluate: ``(step, pipeline) -> {name: float}`` at every evaluation; the
      pipeline carries the current parameters.
    best_metric: ``(name, "max" | "min")`` of an ``evaluate`` scalar whose
      best value selects the export (``config.early_stopping_patience`` stops
      after that many evaluations without improvement).
    extra_optimizers: ``{label: (regexes, optax transform)}`` for leaves
      trained by an optimizer of their own; see ``optim.make_optimizer``.
    row_masks: ``{"component.torch.key": bool rows}``: only these rows of a
      parameter train; see ``optim.mask_rows``.
    post_update: ``(params, step) -> params``, non-gradient updates inside
      the jitted step (a lagging target network).
    refresh: ``(step, pipeline, current) -> {name: float}``, called before
      the batch of every step that is a positive multiple of
      ``refresh_every_steps``, and once on resume for the last such step at or
      before the restored one: the method renews data that depends on the
      trained model (online RPO's negatives). ``pipeline`` carries the trained
      parameters; ``current`` says whether they are those of ``step``
      (False on a resume past it: the method reloads what it saved then).
      The data must be a pure function of the step and those parameters, so
      that ``batch`` stays one. The scalars are logged at ``step``.
    refresh_every_steps: 0, or how often ``refresh`` runs.
  """
  trainable: Mapping[str, nnx.Module]
  loss_fn: LossFn
  batch: Callable[[int], dict]
  frozen: Mapping[str, nnx.Module] = dataclasses.field(default_factory=dict)
  constants: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)
  evaluate: Callable[[int, Any], dict] | None = None
  best_metric: tuple[str, str] | None = None
  extra_optimizers: Mapping[str, tuple] = dataclasses.field(
      default_factory=dict)
  row_masks: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  post_update: Callable[[Any, jax.Array], Any] | None = None
  refresh: Callable[[int, Any, bool], dict] | None = None
  refresh_every_steps: int = 0


def state_of(name: str, params, frozen):
  """A component's whole (traced) state: its trained leaves and frozen ones.

  A component may be split: only some leaves train (LoRA adapters, Custom
  Diffusion's K/V) and the rest travels with the frozen modules.
  """
  parts = [part[name] for part in (params, frozen["modules"]) if name in part]
  return parts[0] if len(parts) == 1 else nnx.merge_state(*parts)


class Graphs:
  """Rebuilds modules from their graphs and (traced) states inside a loss.

  Built from the modules a method hands the engine; the graph of a module is
  fixed when it is split, so later splits (the engine's) give equal graphs.
  """

  def __init__(self, modules: Mapping[str, nnx.Module]):
    self.graphdefs = {name: nnx.graphdef(m) for name, m in modules.items()}

  def __call__(self, name: str, params, frozen) -> nnx.Module:
    """Component ``name`` with the state the step passes (trained or frozen)."""
    return nnx.merge(self.graphdefs[name], state_of(name, params, frozen))

  def merge(self, name: str, state) -> nnx.Module:
    """Component ``name`` with an explicit state."""
    return nnx.merge(self.graphdefs[name], state)
