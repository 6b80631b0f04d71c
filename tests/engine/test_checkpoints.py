"""Tests for checkpoint save/restore, crash and full-disk safety, signals."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import async_path
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from personalize_jax.engine import checkpoints
from personalize_jax.errors import CheckpointError, UserError

REPO = Path(__file__).resolve().parents[2]
TMP = checkpoints.TMP_SUFFIX
# Orbax's asyncio callbacks may fire after their loop closed when a save or a
# restore fails on purpose; Python reports them as unraisable, not as errors.
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array


class _Tiny(nnx.Module):

  def __init__(self):
    self.proj = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
    self.frozen = nnx.Linear(8, 2, rngs=nnx.Rngs(1))


def _train_state(step=3):
  """A state shaped like the engine's: nnx params, masked AdamW, typed key."""
  params = {"unet": nnx.state(_Tiny(), nnx.Param)}
  labels = jax.tree_util.tree_map_with_path(
      lambda path, _: "train" if "proj" in jax.tree_util.keystr(path)
      else "freeze", params)
  tx = optax.multi_transform(
      {"train": optax.adamw(1e-3), "freeze": optax.set_to_zero()}, labels)
  params = jax.tree.map(lambda x: x + step, params)
  return TrainState(step=jnp.int32(step), params=params,
                    opt_state=tx.init(params),
                    rng=jax.random.fold_in(jax.random.key(0), step))


def _abstract(state):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
      state)


def _assert_equal(a, b):
  def data(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(data(x), data(y)),
               a, b)


def _small(step):
  return {"w": jnp.full((16,), step, jnp.float32), "step": jnp.int32(step)}


def test_roundtrip_of_a_train_state(tmp_path):
  mesh = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  state = jax.device_put(_train_state(), NamedSharding(mesh, P()))
  meta = {"data_position": 17, "config": json.dumps({"lr": 1e-5})}
  with checkpoints.CheckpointManager(tmp_path / "checkpoints") as manager:
    assert manager.latest_step() is None
    assert manager.save(3, state, meta)
    manager.wait()
    assert manager.latest_step() == 3
    restored, restored_meta = manager.restore(3, _abstract(state))
  assert restored_meta == meta
  assert isinstance(restored, TrainState)
  assert isinstance(restored.params["unet"], nnx.State)
  _assert_equal(restored, state)
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding == NamedSharding(mesh, P())
  assert sorted(os.listdir(tmp_path / "checkpoints" / "3")) == [
      "_CHECKPOINT_METADATA", "commit_success.txt", "meta", "state"]


def test_keeps_newest_and_skips_saved_steps(tmp_path):
  manager = checkpoints.CheckpointManager(tmp_path, keep=2)
  for step in (1, 2, 3):
    assert manager.save(step, _small(step), {"step": step})
  assert not manager.save(3, _small(99), {"step": 99})
  manager.close()
  assert sorted(os.listdir(tmp_path)) == ["2", "3"]  # no trash left behind.
  manager = checkpoints.CheckpointManager(tmp_path, keep=2)
  state, meta = manager.restore(3, _abstract(_small(0)))
  assert meta == {"step": 3} and float(state["w"][0]) == 3
  with pytest.raises(CheckpointError, match=r"no complete checkpoint for step "
                     r"1 .* \(complete: \[2, 3\]\)"):
    manager.restore(1, _abstract(_small(0)))
  with pytest.raises(CheckpointError, match="does not match this run's state"):
    manager.restore(3, _abstract({"w": jnp.zeros((8,)), "step": jnp.int32(0)}))
  manager.close()


def test_save_returns_before_write_and_state_may_be_donated(tmp_path):
  manager = checkpoints.CheckpointManager(tmp_path)
  state = _small(1)
  manager.save(1, state, {})
  state = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s),
                  donate_argnums=0)(state)
  manager.wait()
  restored, _ = manager.restore(1, _abstract(state))
  assert float(restored["w"][0]) == 1 and float(state["w"][0]) == 2
  manager.close()


def test_leftover_temporary_folder_is_ignored_then_removed(tmp_path):
  manager = checkpoints.CheckpointManager(tmp_path)
  manager.save(1, _small(1), {"step": 1})
  manager.close()
  # What a save killed mid-write leaves: orbax's tmp folder, half filled.
  partial = tmp_path / f"2{TMP}"
  (partial / f"state{TMP}").mkdir(parents=True)
  (partial / f"state{TMP}" / "manifest.ocdbt").write_bytes(b"\0" * 10)
  (tmp_path / "checkpoints-note.txt").write_text("not a step")
  manager = checkpoints.CheckpointManager(tmp_path)
  assert manager.all_steps() == [1]
  assert manager.restore(1, _abstract(_small(0)))[1] == {"step": 1}
  manager.save(2, _small(2), {"step": 2})
  manager.wait()
  assert manager.latest_step() == 2
  assert not partial.exists()
  manager.close()


def _raise_enospc(*args, **kwargs):
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_full_disk_is_a_user_error_and_keeps_previous(tmp_path, monkeypatch):
  manager = checkpoints.CheckpointManager(tmp_path, keep=1)
  manager.save(1, _small(1), {"step": 1})
  manager.wait()
  # The commit marker is the last file a save writes, from orbax's background
  # thread, as a real full disk fails (tensorstore) while writing arrays.
  monkeypatch.setattr(async_path, "write_text", _raise_enospc)
  manager.save(2, _small(2), {"step": 2})
  with pytest.raises(UserError) as e:
    manager.wait()
  assert str(e.value).startswith(
      f"could not write checkpoint at step 2 to {tmp_path}: No space left on "
      "device; free space on that disk (")
  assert str(e.value).endswith("MiB free now) or use another --workdir, then "
                               "rerun to resume from step 1")
  assert manager.latest_step() == 1
  state, meta = manager.restore(1, _abstract(_small(0)))
  assert meta == {"step": 1} and float(state["w"][0]) == 1
  monkeypatch.undo()
  manager.close()
  # The rerun: the partial folder is cleared and saving works again.
  manager = checkpoints.CheckpointManager(tmp_path, keep=1)
  assert manager.latest_step() == 1
  manager.save(3, _small(3), {"step": 3})
  manager.close()
  assert sorted(os.listdir(tmp_path)) == ["3"]


def test_full_disk_while_saving_meta(tmp_path, monkeypatch):
  manager = checkpoints.CheckpointManager(tmp_path, keep=1)
  manager.save(1, _small(1), {"step": 1})
  manager.wait()
  monkeypatch.setattr(ocp.handlers.JsonCheckpointHandler, "_save_fn",
                      _raise_enospc)
  with pytest.raises(UserError, match="could not write checkpoint at step 2"):
    manager.save(2, _small(2), {"step": 2})  # JSON is written synchronously.
  assert manager.latest_step() == 1
  assert manager.restore(1, _abstract(_small(0)))[1] == {"step": 1}


def test_disk_full_detection_covers_tensorstore_text():
  tensorstore_error = ValueError(
      'RESOURCE_EXHAUSTED: Error writing "w/0": Failed to write 907102 bytes '
      "to file 4: No space left on device [os_error_code='28']")
  assert checkpoints._is_disk_full(tensorstore_error)
  assert not checkpoints._is_disk_full(OSError(errno.EACCES, "denied"))


_CHILD = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from personalize_jax.engine.checkpoints import CheckpointManager

    mesh = Mesh(np.asarray(jax.devices()).reshape(1, 2), ("data", "fsdp"))
    def on(*spec):
      return NamedSharding(mesh, P(*spec))
    def abstract(state, shardings):
      return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(
          x.shape, x.dtype, sharding=s), state, shardings)

    manager = CheckpointManager(sys.argv[2], keep=2)
    if sys.argv[1] == "reshard":
      state = {"w": jnp.arange(32.).reshape(4, 8), "b": jnp.arange(8.),
               "rng": jax.random.key(5)}
      saved = {"w": on(None, "fsdp"), "b": on(), "rng": on()}
      manager.save(1, jax.device_put(state, saved), {})
      manager.wait()
      target = {"w": on(), "b": on("fsdp"), "rng": on()}
      restored, _ = manager.restore(1, abstract(state, target))
      assert all(restored[k].sharding == target[k] for k in target)
      assert (np.asarray(restored["w"]) == np.asarray(state["w"])).all()
      assert (np.asarray(restored["b"]) == np.arange(8.)).all()
      print("ok", flush=True)
    else:  # "loop": save big states until killed.
      step = 0
      while True:
        step += 1
        w = jax.device_put(jnp.full((2, 2_000_000), step, jnp.float32),
                           on(None, "fsdp"))
        manager.save(step, {"w": w}, {"step": step})
        if step == 1:
          manager.wait()
          print("ready", flush=True)
""")


def _child(mode, directory):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  return subprocess.Popen([sys.executable, "-c", _CHILD, mode, str(directory)],
                          stdout=subprocess.PIPE, text=True, env=env)


def test_restores_into_other_shardings_on_two_devices(tmp_path):
  proc = _child("reshard", tmp_path)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0 and out.strip() == "ok"


def _tmp_folder_exists(directory):
  return any(TMP in p.name for p in directory.iterdir())


@pytest.mark.parametrize("moment", ["writing", "deleting_old"])
def test_kill_9_during_save_leaves_last_complete_checkpoint(tmp_path, moment):
  # "writing": as soon as a save's tmp folder appears. "deleting_old": while
  # an old step, moved to the trash folder, is being removed.
  proc = _child("loop", tmp_path)
  try:
    assert proc.stdout.readline().strip() == "ready"
    deadline = time.monotonic() + 60
    while not (_tmp_folder_exists(tmp_path) if moment == "writing"
               else (tmp_path / checkpoints.TRASH_DIR).exists()):
      assert time.monotonic() < deadline, "the child stopped saving"
      time.sleep(0.001)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  if moment == "writing":
    assert _tmp_folder_exists(tmp_path), "killed after the save committed"

  manager = checkpoints.CheckpointManager(tmp_path, keep=2)
  steps = manager.all_steps()
  assert steps and manager.latest_step() == steps[-1]
  abstract = {"w": jax.ShapeDtypeStruct(
      (2, 2_000_000), jnp.float32,
      sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  for step in steps:
    state, meta = manager.restore(step, abstract)
    assert meta == {"step": step}
    assert float(state["w"].min()) == float(state["w"].max()) == step
  manager.save(steps[-1] + 1, {"w": jnp.zeros((2, 2_000_000))}, {})
  manager.close()
  assert not _tmp_folder_exists(tmp_path)
  assert len(manager.all_steps()) == 2


def test_preemption_handler_sets_flag_and_restores_handlers():
  before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
  with checkpoints.PreemptionHandler() as preemption:
    assert not preemption.stop_requested
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not preemption.stop_requested and time.monotonic() < deadline:
      time.sleep(0.001)
    assert preemption.stop_requested
    assert preemption.signal == signal.SIGTERM
    assert preemption.signal_name == "SIGTERM"
  assert {s: signal.getsignal(s) for s in before} == before


def test_second_signal_interrupts_at_once():
  with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
    with checkpoints.PreemptionHandler() as preemption:
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.05)
      assert preemption.signal == signal.SIGINT
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(5)
