"""A CPU host with libtpu installed (the tpu and test extras) stays quiet.

The CLI's first command and every entry point import ``personalize_jax``
before JAX; on a host without TPU chips the package then runs JAX on the CPU
without libtpu's initialisation warnings, unless the user chose a platform.
"""

import importlib.util
import os
import subprocess
import sys

PROBE = ("import personalize_jax, jax, os; "
         "print(os.environ.get('JAX_PLATFORMS'), flush=True); "
         "print(jax.default_backend())")


def _probe(**env_changes):
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  env.update(env_changes)
  return subprocess.run([sys.executable, "-c", PROBE], env=env,
                        capture_output=True, text=True, timeout=120)


def test_libtpu_is_installed_here():
  # The premise of the next test (the test extra brings libtpu).
  assert importlib.util.find_spec("libtpu") is not None


def test_a_cpu_host_with_libtpu_runs_on_cpu_with_a_clean_stderr():
  result = _probe()
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["cpu", "cpu"]
  assert "TPU" not in result.stderr and "libtpu" not in result.stderr, (
      result.stderr)


def test_jax_without_the_package_would_probe_the_tpu():
  # What the package prevents: bare JAX tries libtpu first and says so.
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  result = subprocess.run(
      [sys.executable, "-c", "import jax; print(jax.default_backend())"],
      env=env, capture_output=True, text=True, timeout=120)
  assert result.stdout.strip() == "cpu"
  assert "TPU" in result.stderr


def test_a_platform_the_user_chose_is_kept():
  result = _probe(JAX_PLATFORMS="tpu")
  assert result.stdout.split()[0] == "tpu"
  assert result.returncode != 0  # and JAX then finds no TPU here
