"""Tests for the workdir lock, config recording and atomic writes."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import ml_collections
import pytest

from personalize_jax.engine import rundir
from personalize_jax.errors import UserError

REPO = Path(__file__).resolve().parents[2]

# Takes the lock, says so, then holds it until killed.
_HOLDER = textwrap.dedent("""
    import sys, time
    from personalize_jax.engine.rundir import WorkdirLock
    with WorkdirLock(sys.argv[1]):
      print("locked", flush=True)
      time.sleep(60)
""")


def _snapshot(folder: Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes()
          for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def holder(tmp_path):
  """A subprocess holding the lock on ``tmp_path / 'run'``."""
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.Popen(
      [sys.executable, "-c", _HOLDER, str(tmp_path / "run")],
      stdout=subprocess.PIPE, text=True, env=env)
  assert proc.stdout.readline().strip() == "locked"
  yield proc
  if proc.poll() is None:
    proc.kill()
  proc.wait()


def test_atomic_write_replaces_and_leaves_no_temporaries(tmp_path):
  path = tmp_path / "a.txt"
  rundir.atomic_write_text(path, "one")
  rundir.atomic_write_text(path, "two")
  assert path.read_text() == "two"
  assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_lock_refuses_second_run_and_names_holder(tmp_path, holder):
  with pytest.raises(UserError) as e:
    with rundir.WorkdirLock(tmp_path / "run"):
      pass
  assert str(e.value) == (
      f"another run is using {tmp_path / 'run'} (pid {holder.pid}); wait for "
      "it to finish or use another --workdir")


def test_lock_is_freed_when_holder_is_killed(tmp_path, holder):
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with rundir.WorkdirLock(tmp_path / "run"):
    assert (tmp_path / "run" / ".lock").read_text().strip() == str(os.getpid())


def test_lock_is_reentrant_after_release(tmp_path):
  with rundir.WorkdirLock(tmp_path / "new" / "run"):
    pass
  with rundir.WorkdirLock(tmp_path / "new" / "run"):
    pass


def _config(**overrides):
  config = {"learning_rate": 5e-6, "num_steps": 100, "overwrite": False,
            "optimizer": {"b1": 0.9, "schedule": "constant"},
            "trainable": [r"^unet\."]}
  config.update(overrides)
  return config


def test_config_is_written_sorted_and_kept_when_equal(tmp_path):
  path = rundir.check_or_write_config(tmp_path, _config())
  text = path.read_text()
  assert json.loads(text) == _config()
  assert text == json.dumps(_config(), indent=2, sort_keys=True) + "\n"
  mtime = path.stat().st_mtime_ns
  rundir.check_or_write_config(tmp_path, _config())
  assert path.stat().st_mtime_ns == mtime


def test_different_config_is_refused_without_touching_workdir(tmp_path):
  rundir.check_or_write_config(tmp_path, _config())
  before = _snapshot(tmp_path)
  with pytest.raises(UserError) as e:
    rundir.check_or_write_config(tmp_path, _config(learning_rate=1e-5))
  assert str(e.value) == (
      f"config.json in {tmp_path} is from a different run (learning_rate: "
      "5e-06 -> 1e-05); use a new --workdir or pass --config.overwrite=true")
  assert _snapshot(tmp_path) == before


def test_refusal_names_three_dotted_keys_and_counts_the_rest(tmp_path):
  rundir.check_or_write_config(tmp_path, _config())
  new = _config(learning_rate=1e-5, seed=3, trainable=["attn2"],
                optimizer={"b1": 0.8, "schedule": "cosine"})
  with pytest.raises(UserError, match=(
      r"\(learning_rate: 5e-06 -> 1e-05, optimizer.b1: 0.9 -> 0.8, "
      r'optimizer.schedule: "constant" -> "cosine", and 2 more\)')):
    rundir.check_or_write_config(tmp_path, new)


def test_overwrite_rewrites_and_overwrite_key_is_no_difference(tmp_path):
  rundir.check_or_write_config(tmp_path, _config())
  rundir.check_or_write_config(tmp_path, _config(overwrite=True))  # no error
  new = _config(learning_rate=1e-5, overwrite=True)
  path = rundir.check_or_write_config(tmp_path, new, overwrite=True)
  assert json.loads(path.read_text()) == new


def test_ignored_keys_may_differ_and_file_follows(tmp_path):
  rundir.check_or_write_config(tmp_path, _config())
  path = rundir.check_or_write_config(tmp_path, _config(num_steps=200),
                                      ignore=("num_steps",))
  assert json.loads(path.read_text())["num_steps"] == 200
  with pytest.raises(UserError, match="num_steps: 200 -> 300"):
    rundir.check_or_write_config(tmp_path, _config(num_steps=300))


def test_added_key_and_configdict_input(tmp_path):
  rundir.check_or_write_config(tmp_path, _config())
  new = ml_collections.ConfigDict(_config(seed=0))
  with pytest.raises(UserError, match=r"\(seed: \(absent\) -> 0\)"):
    rundir.check_or_write_config(tmp_path, new)


def test_corrupt_config_is_refused_unless_overwrite(tmp_path):
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(UserError, match="config.json in .* is not valid JSON"):
    rundir.check_or_write_config(tmp_path, _config())
  assert (tmp_path / "config.json").read_text() == "{not json"
  rundir.check_or_write_config(tmp_path, _config(), overwrite=True)
  assert json.loads((tmp_path / "config.json").read_text()) == _config()
