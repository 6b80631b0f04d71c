"""Faults during training: NaN/Inf, SIGTERM, SIGKILL at any moment, odd inputs.

Every run is a tiny DreamBooth training (3 steps, a checkpoint after each)
through the command line: a kill needs a process of its own and a resume a new
one. ``tests/_fault_run.py`` is the same command with a SIGKILL at a chosen
moment of the checkpoint path. Every run trains LoRA (only the adapters are
in the train state, so checkpoints are small and quick). One workdir is
killed three times, each run resuming the last, before the plain command
finishes it; it must end exactly like the uninterrupted reference run.
Another is stopped by SIGTERM and resumed. (That full fine-tuning resumes bit
for bit is tests/methods/test_rpo.py's online run.) All runs share the
session's compilation cache (``tests/xla_env.py``) and run side by side; those
whose train step is the reference run's start once it is cached, so the file
compiles a train step three times (the reference, and the NaN-injected ones
under ``nan_policy`` stop and skip).
"""

import functools
import io
import os
import re
import signal
import subprocess
import sys
import time
import types
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from PIL import Image

from personalize_jax.engine import config as config_lib
from personalize_jax.engine import metrics as metrics_lib
from personalize_jax.engine import sharding, state as state_lib
from personalize_jax.errors import UserError
import xla_env

# Whole trainings or benchmark scripts in subprocesses: minutes on CPU.
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
FAULT_RUN = Path(__file__).with_name("_fault_run.py")
NUM_STEPS = 3
# LoRA on the U-Net (scale 2): only the adapters are in the train state.
BASE = [
    "--config=configs/dreambooth_tpu.py:tiny,lora", "--config.lora.alpha=8",
    f"--config.num_steps={NUM_STEPS}",
    "--config.dreambooth.prior_preservation=false",  # no class images.
    "--config.checkpoint_every_steps=1", "--config.keep_checkpoints=10",
    "--config.log_every_steps=1", "--config.eval_every_steps=1000",
]
LORA_FILE = Path("export/pytorch_lora_weights.safetensors")
# The runs on one workdir, in order: --fault of tests/_fault_run.py,
# checkpoints/ as the kill left it, and the step the next run resumes from.
KILLS = {
    "before_first_save": ("before_save:1", [], None),
    "during_save": ("during_save:2", ["1", "2.orbax-checkpoint-tmp"], 1),
    "after_save": ("after_save:2", ["1", "2"], 2),
}
NAN_STEP = 2
# Lacks {token}, and is 87 CLIP tokens long with the start and end tokens.
LONG_PROMPT = "a photo of {class_name} " + "very " * 80 + "cute"
LONG_PROMPT_TOKENS = 87
UNET = Path("export/unet/diffusion_pytorch_model.safetensors")
RESUME_LINE = re.compile(
    r"^stopped by SIGTERM at step (\d+); the checkpoint is saved: run the same "
    r"command again to resume$", re.MULTILINE)


class _Run:
  """One command-line run; its output goes to files (a pipe could fill up)."""

  def __init__(self, tmp: Path, name: str, workdir: Path, args: list[str],
               fault: str | None = None):
    self.workdir = workdir
    self._out, self._err = tmp / f"{name}.stdout", tmp / f"{name}.stderr"
    command = ([sys.executable, str(FAULT_RUN), f"--fault={fault}"] if fault
               else [sys.executable, "-m", "personalize_jax.main"])
    env = xla_env.env()
    with open(self._out, "w") as out, open(self._err, "w") as err:
      self.process = subprocess.Popen(
          [*command, f"--workdir={workdir}", *args], cwd=REPO, env=env,
          stdout=out, stderr=err)
    self.checkpoints = None  # checkpoints/ as the run left it.

  def done(self) -> bool:
    if self.process.poll() is None:
      return False
    if self.checkpoints is None:
      folder = self.workdir / "checkpoints"
      self.checkpoints = sorted(os.listdir(folder)) if folder.is_dir() else []
    return True

  @property
  def returncode(self) -> int:
    return self.process.returncode

  @property
  def stdout(self) -> str:
    return self._out.read_text()

  @property
  def stderr(self) -> str:
    return self._err.read_text()


def _logged_a_step(workdir: Path) -> bool:
  metrics = workdir / "metrics.jsonl"
  return metrics.is_file() and bool(metrics.read_text().strip())


def _odd_photos(folder: Path) -> int:
  """Writes odd but valid photos and a cut-off JPEG; returns the valid count."""
  folder.mkdir()
  rng = np.random.default_rng(0)

  def noise(w, h, channels=3):
    return rng.integers(0, 256, (h, w, channels), np.uint8)

  Image.fromarray(noise(80, 100, 1)[..., 0], "L").save(folder / "gray.png")
  Image.fromarray(noise(100, 80)).convert("CMYK").save(folder / "cmyk.jpg")
  Image.fromarray(noise(96, 96, 4), "RGBA").save(folder / "rgba.png")
  palette = Image.fromarray(noise(90, 70)).convert("P")
  palette.save(folder / "palette.png", transparency=0)
  Image.fromarray(rng.integers(0, 65536, (100, 100), np.uint16)).save(
      folder / "sixteen_bit.png")
  exif = Image.Exif()
  exif[0x0112] = 6  # Orientation: rotate 90 degrees to show upright.
  Image.fromarray(noise(120, 64)).save(folder / "rotated.jpg", exif=exif)
  Image.fromarray(noise(100, 100)).save(folder / "photo.webp")
  Image.fromarray(noise(300, 80)).save(folder / "wide.jpg")
  Image.fromarray(noise(70, 70)).save(folder / "ünïcödé 写真.png")
  valid = len(list(folder.iterdir()))
  whole = io.BytesIO()
  Image.fromarray(noise(128, 128)).save(whole, "JPEG")
  (folder / "broken.jpg").write_bytes(whole.getvalue()[:whole.tell() * 2 // 5])
  return valid


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Every run of this file, finished.

  ``straight``: the uninterrupted reference.
  ``killed``: the runs of KILLS on one workdir, each resuming the one
  before; ``resumed``: the plain command that then finishes it. ``sigterm``:
  the reference config, sent SIGTERM once it logged a step, and
  ``sigterm_rerun``. ``nan_stop``: NaN at NAN_STEP.
  ``lenient``: what should warn and go on: NaN at NAN_STEP under
  ``nan_policy=skip``, on odd photos with a cut-off one skipped, and a prompt
  that lacks the token and is too long.
  """
  tmp = tmp_path_factory.mktemp("faults")
  r = types.SimpleNamespace(killed=[], resumed=None, sigterm_rerun=None,
                            odd_folder=tmp / "odd_photos")
  r.odd_photos = _odd_photos(r.odd_folder)
  killed_workdir = tmp / "killed"

  def start(name, args=(), workdir=None, fault=None, base=BASE):
    return _Run(tmp, name, workdir or tmp / name, [*base, *args], fault)

  nan = f"--config.debug_nan_at_step={NAN_STEP}"
  r.straight = start("straight")
  # Its own train step (skip, NaN hook), compiled beside the reference's.
  r.lenient = start("lenient", [
      nan, "--config.nan_policy=skip",
      f"--config.data.instance_dir={r.odd_folder}",
      "--config.data.skip_bad_images=true",
      f"--config.data.instance_prompt={LONG_PROMPT}"])
  deadline = time.monotonic() + 1500
  while not (_logged_a_step(r.straight.workdir) or r.straight.done()):
    assert time.monotonic() < deadline
    time.sleep(0.05)
  r.nan_stop = start("nan_stop", [nan])
  r.sigterm = start("sigterm")
  faults = [fault for fault, _, _ in KILLS.values()]
  signalled = False
  while True:
    # The kills start once the uninterrupted run compiled its step.
    if r.resumed is None and (not r.killed or r.killed[-1].done()) and (
        _logged_a_step(r.straight.workdir) or r.straight.done()):
      if len(r.killed) < len(faults):
        r.killed.append(start(f"killed_{len(r.killed)}",
                              workdir=killed_workdir,
                              fault=faults[len(r.killed)]))
      else:
        r.resumed = start("resumed", workdir=killed_workdir)
    if not signalled and _logged_a_step(r.sigterm.workdir):
      r.sigterm.process.send_signal(signal.SIGTERM)
      signalled = True
    if r.sigterm_rerun is None and r.sigterm.done():
      r.sigterm_rerun = start("sigterm_rerun", workdir=r.sigterm.workdir)
    everything = [r.straight, r.nan_stop, r.lenient, r.sigterm,
                  r.sigterm_rerun, r.resumed, *r.killed]
    if all(x and x.done() for x in everything):
      return r
    assert time.monotonic() < deadline, "the runs took over 25 minutes"
    time.sleep(0.02)


@functools.lru_cache(maxsize=None)
def _state(workdir: Path, step: int) -> dict[str, np.ndarray]:
  """A checkpoint's train state: ``{tree path: array}``, keys as raw data."""
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "Sharding info not provided".
    tree = ocp.PyTreeCheckpointer().restore(
        workdir / "checkpoints" / str(step) / "state")
  return {jax.tree_util.keystr(path): np.asarray(
      jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
      else x) for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def _params(state: dict) -> dict:
  return {k: v for k, v in state.items() if k.startswith("['params']")}


def _assert_bitwise_equal(ours: dict, reference: dict) -> None:
  assert ours.keys() == reference.keys()
  different = [k for k in reference if not np.array_equal(ours[k],
                                                          reference[k])]
  assert not different, different[:5]


def _without_timings(workdir: Path) -> list[dict]:
  return [{k: v for k, v in record.items() if not k.startswith("perf/")}
          for record in metrics_lib.read_metrics(workdir)]


def _no_traceback(run: _Run) -> None:
  assert "Traceback" not in run.stderr, run.stderr[-3000:]


def _finished(run: _Run, steps: int = NUM_STEPS,
              export: Path = LORA_FILE) -> None:
  assert run.returncode == 0, run.stderr[-3000:]
  _no_traceback(run)
  assert run.stdout.startswith(f"trained {steps} steps")
  assert (run.workdir / export).is_file()


def test_the_reference_run_finishes_and_keeps_every_checkpoint(runs):
  _finished(runs.straight)
  assert runs.straight.checkpoints == ["1", "2", "3"]
  assert [r["step"] for r in metrics_lib.read_metrics(
      runs.straight.workdir)] == [1, 2, 3]
  one, three = _params(_state(runs.straight.workdir, 1)), _params(
      _state(runs.straight.workdir, 3))
  assert any(not np.array_equal(one[k], three[k]) for k in one)


# ------------------------------------------------------------------ SIGKILL


@pytest.mark.parametrize("index", range(len(KILLS)))
def test_kill_9_struck_where_intended(runs, index):
  killed = runs.killed[index]
  assert killed.returncode == -signal.SIGKILL
  assert killed.checkpoints == list(KILLS.values())[index][1]
  assert not killed.stdout


@pytest.mark.parametrize("index", range(len(KILLS)))
def test_the_run_after_a_kill_9_resumes_from_the_last_complete_one(runs,
                                                                   index):
  restart = list(KILLS.values())[index][2]
  after = (runs.killed + [runs.resumed])[index + 1]
  resumed = re.findall(r"resumed from step (\d+)", after.stderr)
  assert resumed == ([str(restart)] if restart else [])


def test_a_run_killed_three_times_ends_like_an_uninterrupted_one(runs):
  resumed, straight = runs.resumed, runs.straight
  _finished(resumed)
  # The killed save's temporary folder is gone; every step is complete.
  assert resumed.checkpoints == ["1", "2", "3"]
  assert ((resumed.workdir / LORA_FILE).read_bytes()
          == (straight.workdir / LORA_FILE).read_bytes())
  assert not (straight.workdir / UNET).exists()  # adapters only
  ours = _state(resumed.workdir, NUM_STEPS)
  _assert_bitwise_equal(ours, _state(straight.workdir, NUM_STEPS))
  assert all("lora_" in k for k in _params(ours))
  assert _without_timings(resumed.workdir) == _without_timings(
      straight.workdir)


# ------------------------------------------------------------------ SIGTERM


def test_sigterm_saves_exits_0_and_the_same_command_finishes(runs):
  stopped, rerun = runs.sigterm, runs.sigterm_rerun
  assert stopped.returncode == 0, stopped.stderr[-3000:]
  _no_traceback(stopped)
  (step,) = [int(s) for s in RESUME_LINE.findall(stopped.stdout)]
  assert 1 <= step <= NUM_STEPS
  assert stopped.checkpoints == [str(s) for s in range(1, step + 1)]
  _finished(rerun)
  assert f"resumed from step {step}" in rerun.stderr
  assert ((rerun.workdir / LORA_FILE).read_bytes()
          == (runs.straight.workdir / LORA_FILE).read_bytes())
  _assert_bitwise_equal(_state(rerun.workdir, NUM_STEPS),
                        _state(runs.straight.workdir, NUM_STEPS))
  assert _without_timings(rerun.workdir) == _without_timings(
      runs.straight.workdir)


# ---------------------------------------------------------------------- NaN


def test_nan_stop_names_the_step_and_keeps_the_last_good_checkpoint(runs):
  run = runs.nan_stop
  assert run.returncode == 1
  _no_traceback(run)
  errors = [line for line in run.stderr.splitlines()
            if line.startswith("error:")]
  good = run.workdir / "checkpoints" / str(NAN_STEP - 1)
  assert errors == [
      f"error: step {NAN_STEP}: the loss or gradients are NaN/Inf, so "
      "training stopped without saving that update; the last good checkpoint "
      f"is step {NAN_STEP - 1} in {good}; lower --config.learning_rate or set "
      "--config.nan_policy=skip"]
  assert not run.stdout
  assert run.checkpoints == [str(s) for s in range(1, NAN_STEP)]
  _assert_bitwise_equal(_state(run.workdir, NAN_STEP - 1),
                        _state(runs.straight.workdir, NAN_STEP - 1))


def test_nan_skip_drops_that_update_and_goes_on(runs):
  run = runs.lenient
  _finished(run)
  assert run.checkpoints == ["1", "2", "3"]
  before = _state(run.workdir, NAN_STEP - 1)
  skipped = _state(run.workdir, NAN_STEP)
  # Parameters, optimizer moments and count, and the key stay; only the step
  # counter moves on.
  assert int(skipped["['step']"]) == NAN_STEP
  _assert_bitwise_equal(
      {k: v for k, v in skipped.items() if k != "['step']"},
      {k: v for k, v in before.items() if k != "['step']"})
  after = _params(_state(run.workdir, NAN_STEP + 1))
  assert all(np.isfinite(v).all() for v in after.values())
  assert any(not np.array_equal(after[k], v)
             for k, v in _params(skipped).items())
  records = {r["step"]: r for r in metrics_lib.read_metrics(run.workdir)}
  assert sorted(records) == [1, 2, 3]
  assert np.isnan(records[NAN_STEP]["loss"])
  assert [records[s]["finite"] for s in (1, 2, 3)] == [1.0, 0.0, 1.0]


def test_debug_nan_at_step_must_be_a_step_or_zero():
  config = config_lib.base_config()
  for value in (-1, True):
    config.debug_nan_at_step = value
    with pytest.raises(UserError, match=r"^config\.debug_nan_at_step="):
      config_lib.validate(config, num_devices=1)


def _toy_steps(nan_policy: str, debug_nan_at_step: int, steps: int = 3):
  """Metrics and states of ``steps`` Adam steps on a linear model."""
  mesh = sharding.create_mesh(-1, 1)
  graphdef, linear = nnx.split(nnx.Linear(3, 2, rngs=nnx.Rngs(0)))
  params = {"unet": linear}
  labels = jax.tree.map(lambda _: "train", params)
  tx = optax.adam(0.1)
  state = state_lib.create_train_state(params, tx, 0, mesh)

  def loss_fn(params, frozen, batch, rng):
    del frozen, rng
    prediction = nnx.merge(graphdef, params["unet"])(batch["x"])
    return jnp.mean((prediction - batch["y"]) ** 2), {}

  step = state_lib.make_train_step(
      loss_fn, tx, optax.constant_schedule(0.1), labels,
      nan_policy=nan_policy, debug_nan_at_step=debug_nan_at_step,
      state_shardings=state_lib.shardings_of(state), frozen_shardings={},
      mesh=mesh)
  batch = state_lib.shard_batch(
      {"x": np.ones((1, 3), np.float32), "y": np.zeros((1, 2), np.float32)},
      mesh)
  out = []
  for _ in range(steps):
    state, metrics = step(state, {}, batch)
    out.append((jax.device_get(metrics), jax.device_get(
        (state.params, state.opt_state))))
  return out


def test_debug_nan_poisons_that_step_only_and_skip_keeps_the_state():
  clean = _toy_steps("stop", 0)
  stop = _toy_steps("stop", 2)
  skip = _toy_steps("skip", 2)
  assert [bool(m["finite"]) for m, _ in clean] == [True, True, True]
  # Under "stop" the poisoned update is applied: the loop must stop there.
  assert [bool(m["finite"]) for m, _ in stop] == [True, False, False]
  assert [bool(m["finite"]) for m, _ in skip] == [True, False, True]
  assert np.isnan(stop[1][0]["loss"]) and np.isnan(stop[1][0]["grad_norm"])
  # Step 1 is bit-identical with and without the hook.
  assert float(stop[0][0]["loss"]) == float(clean[0][0]["loss"])
  jax.tree.map(np.testing.assert_array_equal, stop[0][1], clean[0][1])
  # "skip" leaves params and optimizer state as they were after step 1.
  jax.tree.map(np.testing.assert_array_equal, skip[1][1], clean[0][1])
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(skip[2][1]))


# ----------------------------------------------------------- unusual inputs


def test_odd_photos_train_and_a_cut_off_one_is_skipped_with_a_warning(runs):
  run = runs.lenient
  _finished(run)
  skipped = [line for line in run.stderr.splitlines()
             if "skipping an instance image:" in line]
  assert skipped
  for line in skipped:
    assert f"{runs.odd_folder / 'broken.jpg'} could not be decoded" in line
  with np.load(run.workdir / "cache" / "instance_latents.npz") as latents:
    assert latents["mean"].shape[0] == 2 * runs.odd_photos  # and flips.


def test_prompt_without_token_or_too_long_warns_and_trains(runs):
  run = runs.lenient
  _finished(run)
  prompt = LONG_PROMPT.format(class_name="mug")
  lines = run.stderr.splitlines()
  missing = [line for line in lines if "does not contain the unique token"
             in line]
  long = [line for line in lines if "more than CLIP's 77" in line]
  assert len(missing) == 1 and len(long) == 1
  assert missing[0].endswith(
      f"prompt {prompt!r} does not contain the unique token 'sks', so it does "
      "not name the subject; add {token} to its template")
  assert long[0].endswith(
      f"prompt {prompt!r} has {LONG_PROMPT_TOKENS} tokens, more than CLIP's "
      "77; it will be truncated to 77 tokens (shorten it)")
