"""Tests for the command line: mistakes end in one line and exit code 2.

Each case is what ``python -m personalize_jax.main`` does with its arguments;
the cases run many to a process (``tests/cli.py``: a process of their own
would spend its time importing JAX), one of them also in a process of its
own, and are checked one by one.
"""

import subprocess
import sys
from pathlib import Path

import pytest

import cli
import xla_env

REPO = Path(__file__).resolve().parents[1]
TINY = "--config=configs/dreambooth_tpu.py:tiny"

# name: (arguments, CPU devices, text the error line must contain)
CASES = {
    "unknown_method": ([TINY, "--config.method=nope"], 1, "config.method"),
    # One method-specific mistake per method: checked before the workdir.
    "dreambooth_class_images": (
        [TINY, "--config.dreambooth.num_class_images=-1"], 1,
        "config.dreambooth.num_class_images=-1"),
    "rpo_ref_prompt": (["--config=configs/rpo_tpu.py:tiny",
                        "--config.rpo.ref_prompt=both"], 1,
                       "config.rpo.ref_prompt='both'"),
    "rpo_reward_model": (["--config=configs/rpo_tpu.py:tiny",
                          "--config.rpo.reward_model=nonsense"], 1,
                         "config.rpo.reward_model='nonsense' is invalid"),
    "rpo_online_negative": (["--config=configs/rpo_tpu.py:tiny",
                             "--config.rpo.online_every_steps=-2"], 1,
                            "config.rpo.online_every_steps=-2 is invalid"),
    "rpo_online_never": (["--config=configs/rpo_tpu.py:tiny",
                          "--config.rpo.online_every_steps=20"], 1,
                         "no refresh happens before the last step"),
    "lookforward_reward": (
        ["--config=configs/lookforward_dreambooth_tpu.py:tiny",
         "--config.lookforward.reward=clip"], 1,
        "config.lookforward.reward='clip'"),
    "custom_diffusion_initializer": (
        ["--config=configs/custom_diffusion_tpu.py:tiny",
         "--config.custom_diffusion.initializer_token=zqxv ktn"], 1,
        "initializer_token='zqxv ktn' is 5 tokens"),
    "custom_diffusion_lora": (
        ["--config=configs/custom_diffusion_tpu.py:tiny",
         "--config.lora.rank=4"], 1, "config.lora.rank=4 is invalid for"),
    "lora_part_of_a_component": (
        [TINY + ",lora", "--config.trainable=('^unet\\.up_blocks\\.',)"], 1,
        "selects part of a component"),
    "lora_target_matches_nothing": (
        [TINY + ",lora", "--config.lora.unet_targets=('\\.to_qq$',)"], 1,
        "LoRA target regex '\\.to_qq$' matches no linear layer"),
    "trainable_matches_nothing": (
        [TINY, "--config.trainable=('^unet\\.', '^unet_typo\\.')"], 1,
        "'^unet_typo\\.' matches no parameter"),
    "negative_lr": ([TINY, "--config.learning_rate=-1"], 1,
                    "config.learning_rate"),
    "zero_lr": ([TINY, "--config.learning_rate=0"], 1, "config.learning_rate"),
    "zero_steps": ([TINY, "--config.num_steps=0"], 1, "config.num_steps"),
    "batch_not_divisible": ([TINY, "--config.batch_size=3"], 2,
                            "config.batch_size"),
    "missing_instance_dir": ([TINY, "--config.data.instance_dir={missing}"], 1,
                             "config.data.instance_dir"),
    "unknown_key": ([TINY, "--config.nope=1"], 1, "config.nope"),
    "unknown_nested_key": ([TINY, "--config.data.nope=1"], 1,
                           "config.data.nope"),
    "wrong_type": ([TINY, "--config.num_steps=abc"], 1, "config.num_steps"),
    "unknown_variant": (["--config=configs/dreambooth_tpu.py:huge"], 1,
                        "unknown variant 'huge'"),
    "missing_config_file": (["--config=configs/nope.py"], 1, "configs/nope.py"),
    "no_config": ([], 1, "--config"),
    "process_id_alone": ([TINY, "--process_id=1"], 1,
                         "--process_id only applies to a multi-process run"),
    "process_id_too_large": ([TINY, "--distributed", "--num_processes=2",
                              "--process_id=2",
                              "--coordinator_address=127.0.0.1:1234"], 1,
                             "--process_id=2 is invalid for --num_processes=2"),
    "address_without_port": ([TINY, "--distributed", "--num_processes=2",
                              "--process_id=0",
                              "--coordinator_address=127.0.0.1"], 1,
                             "--coordinator_address='127.0.0.1' is not "
                             "HOST:PORT"),
}


# Checked in a process of its own too: the driver must show what it shows.
OWN_PROCESS = "unknown_key"


def _snapshot(folder: Path) -> dict:
  return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
          for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """``{case: (returncode, stdout, stderr, workdir)}`` of every case.

  Each case gets a workdir that does not exist yet; ``existing`` repeats the
  negative learning rate on a workdir that holds an earlier run's files. The
  cases run in one process per device count (``tests/cli.py``); the
  ``OWN_PROCESS`` case also as ``python -m personalize_jax.main``, under
  ``own_process``.
  """
  tmp = tmp_path_factory.mktemp("cli")
  missing = tmp / "no_photos_here"
  by_devices, workdirs = {}, {}

  def add(name, args, devices, workdir):
    workdirs[name] = workdir
    by_devices.setdefault(devices, {})[name] = [f"--workdir={workdir}", *args]

  for name, (args, devices, _) in CASES.items():
    add(name, [a.format(missing=missing) for a in args], devices, tmp / name)
  existing = tmp / "existing"
  (existing / "checkpoints").mkdir(parents=True)
  (existing / "config.json").write_text("{}\n")
  (existing / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
  before = _snapshot(existing)
  add("existing", CASES["negative_lr"][0], 1, existing)
  # A workdir holding another run (another config): refused before anything
  # is written, unless --config.overwrite=true.
  other = tmp / "other_run"
  (other / "checkpoints").mkdir(parents=True)
  (other / "config.json").write_text('{"method": "rpo", "num_steps": 7}\n')
  (other / ".lock").write_text("")
  other_before = _snapshot(other)
  add("other_run", [TINY], 1, other)
  own = subprocess.Popen(
      [sys.executable, "-m", "personalize_jax.main",
       *by_devices[1][OWN_PROCESS]], cwd=REPO, env=xla_env.env(1),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  drivers = [cli.Cases(cases, tmp / f"driver_{devices}", devices)
             for devices, cases in by_devices.items()]
  out = {}
  for driver in drivers:
    for name, result in driver.results().items():
      out[name] = (*result, workdirs[name])
  stdout, stderr = own.communicate(timeout=600)
  out["own_process"] = (own.returncode, stdout, stderr, workdirs[OWN_PROCESS])
  out["existing_before"] = before
  out["other_run_before"] = other_before
  return out


def test_a_process_of_its_own_ends_as_the_driver_reports(results):
  assert results["own_process"] == results[OWN_PROCESS]
  returncode, stdout, stderr, _ = results["own_process"]
  assert returncode == 2 and not stdout
  assert stderr.startswith("error: --config.nope: ") and stderr.count("\n") == 1


@pytest.mark.parametrize("case", sorted(CASES))
def test_mistake_is_one_line_exit_2_and_leaves_no_workdir(results, case):
  returncode, stdout, stderr, workdir = results[case]
  lines = stderr.strip().splitlines()
  assert len(lines) == 1, stderr
  assert lines[0].startswith("error: ")
  assert CASES[case][2] in lines[0]
  assert returncode == 2
  assert not stdout
  assert not workdir.exists()


def test_mistake_leaves_an_existing_workdir_unchanged(results):
  returncode, _, stderr, workdir = results["existing"]
  assert returncode == 2
  assert "config.learning_rate" in stderr
  assert _snapshot(workdir) == results["existing_before"]


def test_a_workdir_of_another_config_is_refused_and_left_unchanged(results):
  returncode, stdout, stderr, workdir = results["other_run"]
  lines = stderr.strip().splitlines()
  assert returncode == 2 and not stdout
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr
  assert "from a different run" in lines[0]
  assert lines[0].endswith("pass --config.overwrite=true")
  assert _snapshot(workdir) == results["other_run_before"]
