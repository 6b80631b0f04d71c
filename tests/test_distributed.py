"""Several processes training as one, as on a Cloud TPU pod slice.

A pod slice runs one process per host (JAX's multi-controller runtime). Here
two processes of 2 CPU devices each join through ``jax.distributed`` (gloo
between them) on one shared workdir, and must train like one process of 4
devices, leave the run directory to process 0 and resume after both are
killed. All runs share one fixture and the session's compilation cache
(``tests/xla_env.py``):

* ``one``: the config on 1 x 4 devices;
* ``killed``: 2 x 2 devices, each process logging the paths it writes
  (``tests/_audited_run.py``), both sent SIGKILL once checkpoint
  ``CHECKPOINT_STEP`` is complete;
* ``resumed``: the same command again, audited too: it finishes the run of
  two processes, which must end like ``one``.

That a resumed run ends bit for bit like an uninterrupted one is
``tests/test_faults.py``'s (one process); here the two-process run is the
killed and resumed one.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from personalize_jax.engine import distributed
from personalize_jax.engine import metrics as metrics_lib
from personalize_jax.errors import UserError
import xla_env

REPO = Path(__file__).resolve().parents[1]
AUDITED_RUN = Path(__file__).with_name("_audited_run.py")
NUM_STEPS = 3
DEVICES = 4  # in all: one process of 4, or two of 2.
CHECKPOINT_STEP = 2
LEARNING_RATE = 1e-4  # the tiny recipe's.
ARGS = [
    "--config=configs/dreambooth_tpu.py:tiny",
    f"--config.num_steps={NUM_STEPS}",
    f"--config.checkpoint_every_steps={CHECKPOINT_STEP}",
    f"--config.batch_size={DEVICES}",  # one instance image per device.
    "--config.log_every_steps=1",
    # Prior preservation stays on: its class images are generated over all
    # devices of both processes and written by process 0 alone.
    "--config.dreambooth.class_inference_steps=1",
    "--config.eval.num_inference_steps=1",
]
UNET = Path("unet/diffusion_pytorch_model.safetensors")
# XLA's CPU backend gives each process a thread pool as large as its device
# count (4 here, 2 in each of two processes) and splits large reductions over
# it, so the same single-device sum differs in its last bits between the two
# layouts (the cached VAE latents, a generated class image, the gradients).
# Adam then turns round-off in gradients near zero into update differences;
# after NUM_STEPS steps the largest is about 1e-5 while a weight moves about
# LEARNING_RATE per step. A quarter step is far from both.
UNET_ATOL = LEARNING_RATE / 4
# Only a guard against a hung process: in the full suite on 2 cores these six
# processes share the CPUs with the other worker's file.
DEADLINE_S = 1800


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class _Run:
  """A training run: one process of 4 devices, or two of 2 joined as one.

  Each process's output goes to files (a pipe could fill up); with ``audit``
  each one also logs the paths it writes (``tests/_audited_run.py``).
  """

  def __init__(self, tmp: Path, name: str, num_processes: int,
               workdir: Path | None = None, audit: bool = False):
    self.name, self.tmp = name, tmp
    self.workdir = workdir or tmp / name
    devices = DEVICES // num_processes
    port = _free_port()
    self.processes = []
    for i in range(num_processes):
      args = [*ARGS, f"--workdir={self.workdir}"]
      if num_processes > 1:
        args += ["--distributed", f"--coordinator_address=127.0.0.1:{port}",
                 f"--num_processes={num_processes}", f"--process_id={i}"]
      command = ([sys.executable, str(AUDITED_RUN)] if audit
                 else [sys.executable, "-m", "personalize_jax.main"])
      env = xla_env.env(devices, WRITES_LOG=str(self.writes_log(i))
                        if audit else "")
      with open(self._file(i, "stdout"), "w") as out, open(
          self._file(i, "stderr"), "w") as err:
        self.processes.append(subprocess.Popen(
            [*command, *args], cwd=REPO, env=env, stdout=out, stderr=err))

  def _file(self, i: int, kind: str) -> Path:
    return self.tmp / f"{self.name}.p{i}.{kind}"

  def writes_log(self, i: int) -> Path:
    return self._file(i, "writes")

  def stdout(self, i: int) -> str:
    return self._file(i, "stdout").read_text()

  def stderr(self, i: int) -> str:
    return self._file(i, "stderr").read_text()

  def done(self) -> bool:
    return all(p.poll() is not None for p in self.processes)

  def failed(self) -> bool:
    return any(p.poll() not in (None, 0) for p in self.processes)

  def kill(self) -> None:
    for p in self.processes:
      if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    for p in self.processes:
      p.wait()

  def describe(self) -> str:
    return "\n".join(
        f"{self.name} process {i}: exit {p.returncode}\n"
        + self.stderr(i)[-2000:] for i, p in enumerate(self.processes))


def _wait(condition, runs, deadline: float, what: str) -> None:
  while not condition():
    for run in runs:
      assert not run.failed(), run.describe()
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.02)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every run of this file, finished; processes never outlive it."""
  tmp = tmp_path_factory.mktemp("distributed")
  deadline = time.monotonic() + DEADLINE_S
  started = []

  def start(*args, **kwargs) -> _Run:
    started.append(_Run(tmp, *args, **kwargs))
    return started[-1]

  r = types.SimpleNamespace()
  try:
    r.killed = start("killed", 2, audit=True)
    r.one = start("one", 1)
    checkpoint = r.killed.workdir / "checkpoints" / str(CHECKPOINT_STEP)
    _wait(checkpoint.is_dir, [r.killed], deadline,
          f"checkpoint {CHECKPOINT_STEP} of the run to kill")
    r.killed.kill()
    r.killed_left = sorted(os.listdir(r.killed.workdir))
    r.resumed = start("resumed", 2, workdir=r.killed.workdir, audit=True)
    everything = [r.one, r.resumed]
    _wait(lambda: all(run.done() for run in everything), everything,
          deadline, "the runs to finish")
    return r
  finally:
    for run in started:
      run.kill()


def _export_files(workdir: Path) -> dict[Path, Path]:
  folder = workdir / "export"
  return {p.relative_to(folder): p for p in sorted(folder.rglob("*"))
          if p.is_file()}


def _without_timings(workdir: Path) -> list[dict]:
  return [{k: v for k, v in record.items() if not k.startswith("perf/")}
          for record in metrics_lib.read_metrics(workdir)]


def _finished(run: _Run) -> None:
  for i, process in enumerate(run.processes):
    assert process.returncode == 0, run.describe()
    assert "Traceback" not in run.stderr(i), run.describe()
    assert f"done: {NUM_STEPS} steps" in run.stderr(i)


# ------------------------------------------------------------ one process


@pytest.mark.parametrize("flags, message", [
    ((False, None, None, 1), "--process_id only applies to a multi-process"),
    ((False, "h:1", None, None), "--coordinator_address only applies"),
    ((False, None, 2, None), "--num_processes only applies"),
    ((True, "127.0.0.1", 2, 0), "--coordinator_address='127.0.0.1' is not"),
    ((True, "h:0", 2, 0), "is not HOST:PORT"),
    ((True, "h:70000", 2, 0), "is not HOST:PORT"),
    ((True, "h:1", 0, None), "--num_processes=0 is invalid"),
    ((True, "h:1", None, -1), "--process_id=-1 is invalid"),
    ((True, "h:1", 2, 2), "processes are numbered 0 to 1"),
])
def test_bad_flag_combinations_are_refused_in_one_line(flags, message):
  with pytest.raises(UserError, match=r"^--") as error:
    distributed.check_flags(*flags)
  assert message in str(error.value)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("flags", [
    (False, None, None, None),
    (True, None, None, None),  # all detected, as on Cloud TPU VMs.
    (True, "10.0.0.2:1234", 4, 3),
    (True, "[::1]:8476", None, None),
    (True, "host-0.example:80", 2, None),
])
def test_good_flag_combinations_pass(flags):
  distributed.check_flags(*flags)


def test_cpu_platforms_use_gloo_collectives(monkeypatch):
  assert distributed.uses_cpu(None) and distributed.uses_cpu("")
  assert distributed.uses_cpu("cpu") and distributed.uses_cpu("tpu, cpu")
  assert not distributed.uses_cpu("tpu") and not distributed.uses_cpu("cuda")
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize",
                      lambda **kwargs: calls.append(kwargs))
  before = jax.config.jax_cpu_collectives_implementation
  jax.config.update("jax_cpu_collectives_implementation", None)
  try:
    distributed.initialize("127.0.0.1:1234", 2, 1)
    assert jax.config.jax_cpu_collectives_implementation == "gloo"
  finally:
    jax.config.update("jax_cpu_collectives_implementation", before)
  assert calls == [{"coordinator_address": "127.0.0.1:1234",
                    "num_processes": 2, "process_id": 1}]


def test_what_jax_cannot_detect_is_a_one_line_error(monkeypatch):

  def undetected(**kwargs):
    del kwargs
    raise ValueError("coordinator_address should be defined.")

  monkeypatch.setattr(jax.distributed, "initialize", undetected)
  with pytest.raises(UserError) as error:
    distributed.initialize()
  assert str(error.value) == (
      "--distributed: coordinator_address should be defined (JAX detects it "
      "on Cloud TPU VMs and clusters it knows); pass --coordinator_address, "
      "--num_processes and --process_id")


def test_agreement_on_one_process_is_the_local_value():
  distributed.barrier("nothing to wait for")
  assert distributed.is_chief()
  assert distributed.any_process(True) and not distributed.any_process(False)
  assert distributed.chief_succeeded(True)
  assert not distributed.chief_succeeded(False)


# ------------------------------------------------------- two processes


@pytest.mark.slow
def test_two_processes_of_2_devices_train_like_one_of_4(runs):
  _finished(runs.resumed)
  _finished(runs.one)
  ours, reference = (_export_files(runs.resumed.workdir),
                     _export_files(runs.one.workdir))
  assert ours.keys() == reference.keys()
  assert UNET in ours
  for name, path in ours.items():
    if name != UNET:
      assert path.read_bytes() == reference[name].read_bytes(), name
  unet, unet_reference = load_file(ours[UNET]), load_file(reference[UNET])
  assert unet.keys() == unet_reference.keys()
  far = {k: float(np.abs(unet[k] - unet_reference[k]).max()) for k in unet
         if not np.allclose(unet[k], unet_reference[k], rtol=0,
                            atol=UNET_ATOL)}
  assert not far, far
  # Both logged every step with the same losses (to the same round-off).
  two, one = _without_timings(runs.resumed.workdir), _without_timings(
      runs.one.workdir)
  assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
  for a, b in zip(two, one):
    assert a.keys() == b.keys()
    np.testing.assert_allclose([a[k] for k in sorted(a)],
                               [b[k] for k in sorted(b)], rtol=1e-4)


def _written(run: _Run, i: int) -> set[Path]:
  """Paths process ``i`` wrote in the run directory, outside checkpoints/."""
  paths = set()
  log = run.writes_log(i)
  for line in (log.read_text() if log.is_file() else "").splitlines():
    path = Path(line.split("\t", 1)[1])
    if path.is_relative_to(run.workdir):
      relative = path.relative_to(run.workdir)
      if relative.parts[:1] != ("checkpoints",):
        paths.add(relative)
  return paths


@pytest.mark.slow
def test_only_process_0_writes_the_run_directory(runs):
  run = runs.resumed
  _finished(run)
  # The run directory was made by the killed run and finished by this one.
  assert not _written(runs.killed, 1) and not _written(run, 1)
  chief = _written(runs.killed, 0) | _written(run, 0)
  # The log sees how the run directory is made: each of its files was
  # written by process 0 or lies in a folder it made (the tokenizer's
  # native code writes tokenizer.json unseen).
  files = [p.relative_to(run.workdir) for p in run.workdir.rglob("*")
           if p.is_file()]
  files = [p for p in files if p.parts[0] != "checkpoints"]
  for expected in ("config.json", ".lock", "metrics.jsonl", "export",
                   "class_images", "cache", "samples", "tensorboard",
                   "instance_images"):
    assert any(f.parts[0] == expected for f in files), expected
  unseen = [f for f in files if f not in chief
            and not any(parent in chief for parent in f.parents[:-1])]
  assert not unseen, unseen
  # Process 1 trained all along; the summary is process 0's to print.
  assert f"trained {NUM_STEPS} steps" in run.stdout(0)
  assert "trained" not in run.stdout(1)


@pytest.mark.slow
def test_both_processes_were_killed_after_the_checkpoint(runs):
  assert [p.returncode for p in runs.killed.processes] == [-signal.SIGKILL] * 2
  # Before the end: no export yet.
  assert "checkpoints" in runs.killed_left and "export" not in runs.killed_left


@pytest.mark.slow
def test_both_processes_resume_from_the_checkpoint(runs):
  resumed = runs.resumed
  _finished(resumed)
  for i in range(2):
    assert f"resumed from step {CHECKPOINT_STEP}" in resumed.stderr(i)
  # Each step logged once: the killed run's before the checkpoint, then
  # this run's (test_two_processes_... compares them with one process's).
  assert [r["step"] for r in _without_timings(resumed.workdir)] == [1, 2, 3]
