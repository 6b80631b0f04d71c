"""The best evaluation so far: which step the export holds, and early stopping.

A method may name an evaluation scalar (``Method.best_metric``); the loop
exports the step with its best value and stops after
``config.early_stopping_patience`` evaluations without a better one. The
record lives in each checkpoint's metadata and in ``best.json``.
"""

import json
from pathlib import Path

from personalize_jax.engine import rundir


class Best:
  """Tracks a method's best evaluation scalar; the export follows the best step."""

  def __init__(self, metric: tuple[str, str] | None, patience: int):
    self.name, self.mode = metric if metric else (None, "max")
    self.patience = patience
    self.step, self.value, self.evals_since = None, None, 0

  def update(self, step: int, scalars: dict) -> bool:
    """Records an evaluation; True when it is a new best."""
    if self.name is None or self.name not in scalars:
      return False
    value = float(scalars[self.name])
    better = self.value is None or (value > self.value if self.mode == "max"
                                    else value < self.value)
    if better:
      self.step, self.value, self.evals_since = step, value, 0
    else:
      self.evals_since += 1
    return better

  @property
  def exhausted(self) -> bool:
    return bool(self.patience) and self.evals_since >= self.patience

  def state(self) -> dict:
    return {"best_step": self.step, "best_value": self.value,
            "evals_since_best": self.evals_since}

  def restore(self, meta: dict) -> None:
    self.step = meta.get("best_step")
    self.value = meta.get("best_value")
    self.evals_since = meta.get("evals_since_best", 0)

  def write(self, workdir: Path) -> None:
    rundir.atomic_write_text(workdir / "best.json", json.dumps(
        {"step": self.step, self.name: self.value}) + "\n")
