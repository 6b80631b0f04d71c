"""Runs tiny DreamBooth trainings in a fresh process with N CPU devices.

The CPU backend's device count is fixed when jax is imported, and a resumed
run should start in a new process, so tests drive the engine through this
script::

  python tests/engine/_run_tiny.py --devices=8 --jobs='[{"workdir": "/tmp/w",
      "overrides": {"mesh.data": 2, "mesh.fsdp": 4, "num_steps": 3}}]'

Each job runs ``train_and_evaluate`` on ``configs/dreambooth_tpu.py:tiny``
with dotted-key ``overrides``. Optional job keys: ``variant`` (default
``tiny``; e.g. ``tiny,lora``), ``dump_steps`` writes the
train state's parameters after those steps to ``<workdir>/params_step<N>.npz``
(keyed by their tree paths). The last stdout line is
JSON: the device count and, per job, the steps done, what stopped it, the
fractions of parameter and train-state bytes that the engine sharded, the
trained parameters' names, and the bytes of parameters and optimizer state.
"""

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def tiny_config(overrides: dict, variant: str = "tiny"):
  """``configs/dreambooth_tpu.py:<variant>`` with dotted-key ``overrides``."""
  sys.path.insert(0, str(REPO / "tests"))
  import recipes  # pylint: disable=g-import-not-at-top
  return recipes.load("dreambooth_tpu", variant, **overrides)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--jobs", required=True, help="JSON list of jobs.")
  args = parser.parse_args()
  # Both sides of every comparison compile the same way (tests/xla_env.py).
  sys.path.insert(0, str(REPO / "tests"))
  import xla_env  # pylint: disable=g-import-not-at-top
  os.environ.update(xla_env.env(args.devices))
  # pylint: disable=g-import-not-at-top
  import jax
  import numpy as np
  from personalize_jax.engine import sharding
  from personalize_jax.engine import state as state_lib, train
  from personalize_jax.methods import dreambooth
  # pylint: enable=g-import-not-at-top

  record, job = {}, {}
  create = state_lib.create_train_state
  make_train_step = state_lib.make_train_step

  def recording_create(*a, **k):
    state = create(*a, **k)
    arrays = [x for x in jax.tree.leaves(state) if x.ndim]
    record["params_fraction"] = sharding.sharded_fraction(
        state.params, state_lib.shardings_of(state.params))
    record["state_fraction"] = (
        sum(x.nbytes for x in arrays
            if any(axis is not None for axis in x.sharding.spec))
        / sum(x.nbytes for x in arrays))
    record["param_names"] = sorted(
        jax.tree_util.keystr(path) for path, _
        in jax.tree_util.tree_leaves_with_path(state.params))
    record["param_bytes"] = sum(x.nbytes for x in jax.tree.leaves(state.params))
    record["opt_bytes"] = sum(x.nbytes for x in jax.tree.leaves(state.opt_state)
                              if x.ndim)
    return state

  def dumping_make_train_step(*a, **k):
    train_step = make_train_step(*a, **k)

    def step_and_dump(state, *rest):
      state, metrics = train_step(state, *rest)
      done = int(state.step)
      if done in job.get("dump_steps", ()):
        np.savez(Path(job["workdir"]) / f"params_step{done}.npz", **{
            jax.tree_util.keystr(path): np.asarray(x) for path, x
            in jax.tree_util.tree_leaves_with_path(state.params)})
      return state, metrics

    return step_and_dump

  state_lib.create_train_state = recording_create
  state_lib.make_train_step = dumping_make_train_step
  runs = []
  for spec in json.loads(args.jobs):
    record.clear()
    job.clear()
    job.update(spec)
    summary = train.train_and_evaluate(
        tiny_config(job["overrides"], job.get("variant", "tiny")),
        job["workdir"], dreambooth)
    runs.append({"steps": summary.steps, "stopped_by": summary.stopped_by,
                 **record})
  print(json.dumps({"devices": jax.device_count(), "runs": runs}))


if __name__ == "__main__":
  main()
