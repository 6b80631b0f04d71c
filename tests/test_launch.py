"""launch/*.sh: help, dry runs, argument errors, and runs against fake tools.

The scripts never reach a cloud here: dry runs print commands, and "real" runs
meet a fake ``gcloud`` / ``python`` on PATH that logs its arguments.
"""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ("tpu_vm.sh", "gpu.sh", "dreambench_sweep.sh")
CONFIG = "configs/dreambooth_tpu.py"
SEP = "\x1f"
# Logs its argv (one line, fields split by \x1f); as python, a training run
# also leaves the exported pipeline the evaluator looks for.
FAKE_TOOL = r"""#!/usr/bin/env bash
{ printf '%s\x1f' "$@"; echo; } >> "$FAKE_LOG"
for a in "$@"; do case $a in --workdir=*) w=${a#--workdir=};; esac; done
if [[ ${1-} == -m && ${2-} == personalize_jax.main ]]; then
  mkdir -p "$w/export" && echo '{}' > "$w/export/model_index.json"
fi
"""


def run(script, *args, env=None, cwd=ROOT):
  return subprocess.run(["bash", str(LAUNCH / script), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=60, env=env)


def dry(script, *args):
  result = run(script, "--dry-run", *args)
  assert result.returncode == 0, result.stderr
  return result.stdout.splitlines()


def parser_options(script):
  """Every --option the script's ``parse_options`` call accepts.

  Its specs read ``--name=VAR`` (``--name+=ARRAY`` when repeatable); --help
  is every script's, handled by ``parse_options`` itself.
  """
  source = (LAUNCH / script).read_text()
  call = re.search(r'^parse_options (.*?)"\$@"$', source, re.M | re.S)
  assert call, f"{script} does not call parse_options"
  specs = re.findall(r"(?<![\w-])(--[a-z][a-z-]*)\+?=[A-Z_]+\b", call[1])
  assert specs, f"no option specs in {script}'s parse_options call"
  return set(specs) | {"--help"}


@pytest.fixture()
def fake_bin(tmp_path):
  """A PATH with logging fakes of gcloud and python; yields (env, log)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "fakepython"):
    (bin_dir / name).write_text(FAKE_TOOL)
    (bin_dir / name).chmod(0o755)
  log = tmp_path / "calls.log"
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
         "FAKE_LOG": str(log)}
  return env, log


def calls(log):
  if not log.exists():
    return []
  return [line.split(SEP)[:-1] for line in log.read_text().splitlines()]


def synthetic_dataset(root: Path) -> Path:
  """Three subjects in the upstream layout (CRLF, a two-word class)."""
  dataset = root / "dataset"
  for name in ("backpack", "bear_plushie", "dog"):
    (dataset / name).mkdir(parents=True)
    (dataset / name / "00.jpg").write_bytes(b"")
  (dataset / "prompts_and_classes.txt").write_text(
      "Classes\r\n\r\nsubject_name,class\r\nbackpack,backpack\r\n"
      "bear_plushie,stuffed animal\r\ndog,dog\r\n\r\nPrompts\r\n\r\n"
      "Object Prompts\r\n\r\nprompt_list = [\r\n'a {0} {1} in the jungle'"
      ".format(unique_token, class_token),\r\n]\r\n", newline="")
  return dataset


# ----------------------------------------------------------- all scripts --

@pytest.mark.parametrize("script", SCRIPTS)
def test_help_mentions_every_option(script):
  result = run(script, "--help")
  assert result.returncode == 0
  options = parser_options(script)
  assert {"--dry-run", "--help", "--config"} <= options
  missing = [o for o in options if o not in result.stdout]
  assert not missing, f"{script} --help does not mention {missing}"
  assert "Example" in result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args", [("--no-such-option",), ("--config",),
                                  ("--dry-run=yes",), ()])
def test_bad_arguments_exit_2_with_one_line(script, args):
  result = run(script, *args)
  assert result.returncode == 2
  assert result.stdout == ""
  assert len(result.stderr.strip().splitlines()) == 1
  assert result.stderr.startswith(f"{script}: error: ")


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("args,message", [
    (("--no-such-option",),
     "unknown option '--no-such-option' (see {} --help)"),
    (("--no-such=1",), "unknown option '--no-such=1' (see {} --help)"),
    (("--=x",), "unknown option '--=x' (see {} --help)"),
    (("positional",), "unknown option 'positional' (see {} --help)"),
    (("--dry-run", "--config"), "--config needs a value"),
    (("--config", "--dry-run"), "--config needs a value"),
    (("--config=",), "--config needs a value"),
    (("--dry-run=yes",), "--dry-run takes no value"),
    (("--help=1",), "--help takes no value"),
])
def test_parser_errors_name_the_option(script, args, message):
  result = run(script, *args)
  assert (result.returncode, result.stdout) == (2, "")
  assert result.stderr == f"{script}: error: {message.format(script)}\n"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_is_read_in_order(script):
  result = run(script, "--help", "--no-such-option")
  assert result.returncode == 0 and result.stdout.startswith("Usage: ")
  result = run(script, "--no-such-option", "--help")
  assert result.returncode == 2 and result.stdout == ""
  # After --, --help is an argument for personalize_jax.main.
  result = run(script, "--", "--help")
  assert result.returncode == 2
  assert result.stderr == (
      f"{script}: error: pass --config=configs/RECIPE.py[:variant]\n")


@pytest.mark.parametrize("script", SCRIPTS)
def test_bash_syntax_and_shellcheck(script):
  subprocess.run(["bash", "-n", str(LAUNCH / script)], check=True)
  if shutil.which("shellcheck"):
    result = subprocess.run(["shellcheck", "-x", str(LAUNCH / script)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script", ("tpu_vm.sh", "gpu.sh"))
def test_jax_version_matches_setup_py(script):
  pin = re.search(r'"jax==([\d.]+)"', (ROOT / "setup.py").read_text())[1]
  assert f"JAX_VERSION={pin}" in (LAUNCH / script).read_text()


# ------------------------------------------------------------ tpu_vm.sh --

def test_tpu_single_host_dry_run():
  lines = dry("tpu_vm.sh", f"--config={CONFIG}", "--project=my-proj")
  assert lines[0] == (
      "gcloud compute tpus tpu-vm create personalize-jax "
      "--accelerator-type=v4-8 --version=tpu-ubuntu2204-base "
      "--zone=us-central2-b --project=my-proj")
  ssh = [l for l in lines if " ssh personalize-jax --worker=all" in l]
  assert len(ssh) == 2  # setup, run
  # The package's tpu extra brings the libtpu that setup.py pins.
  assert '-e "./personalize_jax[tpu]" jax==0.10.2' in ssh[0]
  assert (f"python -m personalize_jax.main --config={CONFIG} "
          "--workdir=runs/dreambooth_tpu'") in ssh[1]
  assert "--distributed" not in ssh[1]
  assert lines[-1] == (
      "gcloud compute tpus tpu-vm scp --recurse personalize-jax:"
      "personalize_jax/runs/dreambooth_tpu tpu_runs/personalize-jax "
      "--worker=0 --zone=us-central2-b --project=my-proj")
  assert not any("delete" in l for l in lines)


@pytest.mark.parametrize("accelerator,runtime,multi_host", [
    ("v4-32", "tpu-ubuntu2204-base", True),
    ("v5litepod-8", "v2-alpha-tpuv5-lite", False),
    ("v5litepod-16", "v2-alpha-tpuv5-lite", True),
    ("v5p-8", "v2-alpha-tpuv5", False),
    ("v6e-64", "v2-alpha-tpuv6e", True),
])
def test_tpu_families_and_pods(accelerator, runtime, multi_host):
  result = run("tpu_vm.sh", f"--config={CONFIG}", "--dry-run",
               f"--accelerator-type={accelerator}", "--zone=z-1",
               "--workdir=gs://bucket/runs/dog", "--name=pod",
               "--repo=https://example.com/p.git", "--branch=dev",
               "--delete-after", "--spot")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == (f"gcloud compute tpus tpu-vm create pod "
                      f"--accelerator-type={accelerator} --version={runtime} "
                      "--zone=z-1 --spot")
  assert "git clone -q --branch dev https://example.com/p.git" in lines[1]
  assert "gcsfuse" in lines[1]  # installed with the package
  main = ("python -m personalize_jax.main "
          f"--config={CONFIG} --workdir=/tmp/gcs/bucket/runs/dog")
  assert (main + " --distributed" in lines[2]) == multi_host
  assert main in lines[2]
  assert "gcsfuse --implicit-dirs bucket /tmp/gcs/bucket" in lines[2]
  # gs:// is shared already: nothing to copy back; then the VM goes.
  assert lines[3:] == ["gcloud compute tpus tpu-vm delete pod --zone=z-1 --quiet"]
  assert result.stderr == ""


def test_tpu_pod_with_local_workdir_warns():
  result = run("tpu_vm.sh", f"--config={CONFIG}", "--dry-run",
               "--accelerator-type=v4-32")
  assert result.returncode == 0
  assert "gs://" in result.stderr and "4 hosts" in result.stderr


def test_tpu_overrides_reach_main_intact():
  lines = dry("tpu_vm.sh", f"--config={CONFIG}:tiny", "--", "--config.seed=3",
              "--config.data.class_name=stuffed animal", "--config.x=it's")
  run_line = next(l for l in lines if "personalize_jax.main" in l)
  command = next(a for a in shlex.split(run_line) if a.startswith("--command="))
  remote = shlex.split(command.removeprefix("--command="))
  assert remote[remote.index("-m"):] == [
      "-m", "personalize_jax.main", f"--config={CONFIG}:tiny",
      "--workdir=runs/dreambooth_tpu", "--config.seed=3",
      "--config.data.class_name=stuffed animal", "--config.x=it's"]


@pytest.mark.parametrize("args,message", [
    (("--accelerator-type=v9x",), "expected FAMILY-SIZE"),
    (("--accelerator-type=v5litepod-16",), "pass --zone"),
    (("--accelerator-type=v7x-8", "--zone=z"), "--runtime-version"),
    (("--name=Bad_Name",), "--name=Bad_Name"),
    (("--workdir=gs://bucket",), "gs://BUCKET/PATH"),
])
def test_tpu_argument_errors(args, message):
  result = run("tpu_vm.sh", f"--config={CONFIG}", "--dry-run", *args)
  assert result.returncode == 2
  assert message in result.stderr and len(result.stderr.splitlines()) == 1


def test_tpu_runs_the_dry_run_commands(fake_bin, tmp_path):
  env, log = fake_bin
  args = (f"--config={CONFIG}", "--repo=https://example.com/p.git",
          f"--copy-to={tmp_path / 'back'}", "--delete-after")
  printed = dry("tpu_vm.sh", *args)
  result = run("tpu_vm.sh", *args, env=env)
  assert result.returncode == 0, result.stderr
  executed = [shlex.join(c) for c in calls(log)]
  expected = [shlex.join(shlex.split(l)[1:]) for l in printed
              if l.startswith("gcloud ")]
  assert executed == expected
  assert (tmp_path / "back").is_dir()


def test_tpu_failed_run_still_copies_and_deletes(fake_bin, tmp_path):
  env, log = fake_bin
  gcloud = Path(env["PATH"].split(":")[0]) / "gcloud"
  gcloud.write_text(FAKE_TOOL + '[[ "$*" != *personalize_jax.main* ]]\n')
  result = run("tpu_vm.sh", f"--config={CONFIG}", "--skip-create",
               "--skip-setup", f"--copy-to={tmp_path}", "--delete-after",
               env=env)
  assert result.returncode == 1
  assert [c[:5] for c in calls(log)] == [
      ["compute", "tpus", "tpu-vm", "ssh", "personalize-jax"],
      ["compute", "tpus", "tpu-vm", "scp", "--recurse"],
      ["compute", "tpus", "tpu-vm", "delete", "personalize-jax"]]
  assert "a step failed" in result.stderr


def test_tpu_failed_setup_still_deletes(fake_bin):
  env, log = fake_bin
  gcloud = Path(env["PATH"].split(":")[0]) / "gcloud"
  gcloud.write_text(FAKE_TOOL + '[[ "$*" != *"uv venv"* ]]\n')
  result = run("tpu_vm.sh", f"--config={CONFIG}", "--repo=https://e.com/p.git",
               "--delete-after", env=env)
  assert result.returncode == 1
  assert [c[3] for c in calls(log)] == ["create", "ssh", "delete"]


def test_tpu_dry_run_runs_nothing(fake_bin):
  env, log = fake_bin
  result = run("tpu_vm.sh", f"--config={CONFIG}", "--dry-run", env=env)
  assert result.returncode == 0
  assert not log.exists()


# --------------------------------------------------------------- gpu.sh --

def test_gpu_single_host_dry_run():
  lines = dry("gpu.sh", f"--config={CONFIG}", "--workdir=/tmp/run", "--install",
              "--", "--config.num_steps=5")
  assert lines == [
      f"python -m pip install -e {ROOT} 'jax[cuda12]==0.10.2'",
      f"python -m personalize_jax.main --config={CONFIG} --workdir=/tmp/run "
      "--config.num_steps=5"]


def test_gpu_passes_everything_after_the_separator_on():
  lines = dry("gpu.sh", "--config", CONFIG, "--workdir", "/tmp/run", "--",
              "--help", "--no-such-option", "--", "a b")
  assert lines == [
      f"python -m personalize_jax.main --config={CONFIG} --workdir=/tmp/run "
      "--help --no-such-option -- 'a b'"]


def test_gpu_multi_node_dry_run():
  lines = dry("gpu.sh", f"--config={CONFIG}", "--workdir", "/shared/run",
              "--nodes=2", "--node-rank", "1", "--coordinator=10.0.0.2:1234",
              "--gpus=0,1", "--cuda=13", "--install")
  assert "'jax[cuda13]==0.10.2'" in lines[0]
  argv = shlex.split(lines[1])
  assert argv[:3] == ["env", "CUDA_VISIBLE_DEVICES=0,1", "python"]
  assert argv[3] == "-c" and "jax.distributed.initialize(" in argv[4]
  assert argv[5:] == ["10.0.0.2:1234", "2", "1", f"--config={CONFIG}",
                      "--workdir=/shared/run"]


@pytest.mark.parametrize("args,message", [
    (("--nodes=2",), "--coordinator"),
    (("--nodes=2", "--node-rank=2", "--coordinator=h:1"), "--node-rank=2"),
    (("--nodes=0",), "--nodes=0"),
    (("--nodes=2", "--coordinator=nohost"), "HOST:PORT"),
    (("--coordinator=h:1",), "--nodes"),
    (("--cuda=11",), "--cuda=11"),
    (("--gpus=a,b",), "--gpus=a,b"),
])
def test_gpu_argument_errors(args, message):
  result = run("gpu.sh", f"--config={CONFIG}", "--workdir=/tmp/r", "--dry-run",
               *args)
  assert result.returncode == 2
  assert message in result.stderr and len(result.stderr.splitlines()) == 1


def test_gpu_missing_config_file():
  result = run("gpu.sh", "--config=configs/nope.py:tiny", "--workdir=/tmp/r")
  assert result.returncode == 2 and "configs/nope.py" in result.stderr


def test_gpu_multi_node_entry_runs_main():
  """The distributed entry really starts JAX's runtime, then main's parser."""
  lines = dry("gpu.sh", f"--config={CONFIG}", "--workdir=/tmp/r", "--nodes=2",
              "--coordinator=h:1", "--python", sys.executable)
  argv = shlex.split(lines[0])
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  # One process of one, no --config: main stops at its own argument check
  # (loading a recipe would only add import time).
  result = subprocess.run(
      argv[:3] + [f"localhost:{port}", "1", "0", "--workdir=/tmp/r"],
      cwd=ROOT, capture_output=True, text=True, timeout=120,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert result.returncode == 2, result.stderr
  assert "pass --config=configs/<recipe>.py[:variant] and --workdir" in result.stderr


# ------------------------------------------------------ dreambench_sweep --

def test_sweep_dry_run_synthetic(tmp_path):
  dataset = synthetic_dataset(tmp_path)
  out = tmp_path / "out"
  lines = dry("dreambench_sweep.sh", f"--config={CONFIG}:tiny",
              f"--dataset-dir={dataset}", f"--out={out}",
              "--eval-config=configs/eval_dreambench.py:tiny",
              "--eval-arg=--config.num_prompts=1", "--", "--config.num_steps=2")
  train = [l for l in lines if "personalize_jax.main" in l]
  assert train == [
      f"python -m personalize_jax.main --config={CONFIG}:tiny "
      f"--workdir={out}/{s} --config.data.instance_dir={dataset}/{s} "
      f"--config.data.class_name={c} --config.final_eval.enabled=false "
      "--config.num_steps=2"
      for s, c in (("backpack", "backpack"),
                   ("bear_plushie", "'stuffed animal'"), ("dog", "dog"))]
  assert f"ln -sfn ../dog/export {out}/models/dog" in lines
  assert lines[-1] == (
      "python -m personalize_jax.evaluate "
      "--config=configs/eval_dreambench.py:tiny "
      f"--config.model={out}/models --config.dataset_dir={dataset} "
      f"--config.subjects=backpack,bear_plushie,dog --workdir={out}/eval "
      "--config.num_prompts=1")


def test_sweep_eval_args_repeat_and_may_look_like_options(tmp_path):
  dataset = synthetic_dataset(tmp_path)
  common = (f"--config={CONFIG}", f"--dataset-dir={dataset}/",
            f"--out={tmp_path}/o/", "--skip-train")
  lines = dry("dreambench_sweep.sh", *common, "--eval-arg",
              "--config.num_prompts=1", "--eval-arg=--config.seed=2")
  assert lines[-1].endswith(
      f"--config.dataset_dir={dataset} --config.subjects=backpack,"
      f"bear_plushie,dog --workdir={tmp_path}/o/eval "
      "--config.num_prompts=1 --config.seed=2")
  result = run("dreambench_sweep.sh", *common, "--dry-run", "--eval-arg")
  assert result.returncode == 2
  assert result.stderr == (
      "dreambench_sweep.sh: error: --eval-arg needs a value\n")


def test_sweep_dreambench_classes(shared_dir, tmp_path):
  dataset = shared_dir / "dreambench" / "dataset"
  listing = json.loads((shared_dir / "dreambench" / "subjects.json").read_text())
  classes = {s["name"]: s["class"] for s in listing["subjects"]}
  assert len(classes) == 30
  lines = dry("dreambench_sweep.sh", f"--config={CONFIG}",
              f"--dataset-dir={dataset}", f"--out={tmp_path}")
  train = [shlex.split(l) for l in lines if "personalize_jax.main" in l]
  found = {}
  for argv in train:
    flags = dict(a.split("=", 1) for a in argv if a.startswith("--"))
    subject = Path(flags["--workdir"]).name
    assert flags["--config.data.instance_dir"] == f"{dataset}/{subject}"
    found[subject] = flags["--config.data.class_name"]
  assert found == classes
  assert "personalize_jax.evaluate" in lines[-1]
  assert f"--config.subjects={','.join(classes)}" in lines[-1]


def test_sweep_selected_subjects_and_errors(tmp_path):
  dataset = synthetic_dataset(tmp_path)
  common = (f"--config={CONFIG}", f"--dataset-dir={dataset}", "--out=o")
  lines = dry("dreambench_sweep.sh", *common, "--subjects=dog", "--skip-eval")
  assert lines == [
      f"python -m personalize_jax.main --config={CONFIG} --workdir=o/dog "
      f"--config.data.instance_dir={dataset}/dog --config.data.class_name=dog "
      "--config.final_eval.enabled=false"]
  for args, message in [(("--subjects=cat",), "unknown subject 'cat'"),
                        (("--dataset-dir=/nope",), "not a folder")]:
    result = run("dreambench_sweep.sh", *common, *args, "--dry-run")
    assert result.returncode == 2 and message in result.stderr
  shutil.rmtree(dataset / "dog")
  result = run("dreambench_sweep.sh", *common, "--dry-run")
  assert result.returncode == 2 and "no photos folder" in result.stderr


def test_sweep_links_each_export_for_the_evaluator(fake_bin, tmp_path):
  env, log = fake_bin
  dataset = synthetic_dataset(tmp_path)
  out = tmp_path / "out"
  result = run("dreambench_sweep.sh", f"--config={CONFIG}",
               f"--dataset-dir={dataset}", f"--out={out}",
               "--subjects=dog,bear_plushie", "--python=fakepython", env=env)
  assert result.returncode == 0, result.stderr
  made = calls(log)
  assert [c[1] for c in made] == ["personalize_jax.main"] * 2 + [
      "personalize_jax.evaluate"]
  assert "--config.data.class_name=stuffed animal" in made[1]
  assert f"--config.model={out}/models" in made[2]
  from personalize_jax import eval_dreambench  # pylint: disable=g-import-not-at-top
  for subject in ("dog", "bear_plushie"):
    found = eval_dreambench.model_for_subject(str(out / "models"), subject)
    assert Path(found).resolve() == (out / subject / "export").resolve()


def test_sweep_skip_train_needs_trained_models(tmp_path):
  dataset = synthetic_dataset(tmp_path)
  result = run("dreambench_sweep.sh", f"--config={CONFIG}",
               f"--dataset-dir={dataset}", f"--out={tmp_path / 'o'}",
               "--skip-train")
  assert result.returncode == 2
  assert "no trained pipeline" in result.stderr
