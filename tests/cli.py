"""Command-line runs of ``personalize_jax.main`` that end before training,
many to a process (``tests/_cli_cases.py``)."""

import json
import subprocess
import sys
from pathlib import Path

import xla_env

DRIVER = Path(__file__).with_name("_cli_cases.py")


class Cases:
  """Cases running in one process; ``results()`` waits for them.

  Args:
    cases: ``{name: arguments}`` (without the program name).
    folder: a folder of the caller's for the case and result files.
    devices: CPU devices of the process (``xla_env.env``).
    **env: more environment variables of the process.
  """

  def __init__(self, cases: dict[str, list[str]], folder: Path,
               devices: int | None = None, **env: str):
    folder.mkdir(parents=True, exist_ok=True)
    self._results = folder / "results.json"
    cases_file = folder / "cases.json"
    cases_file.write_text(json.dumps(cases))
    self._log = open(folder / "driver.log", "w+", encoding="utf-8")
    self._process = subprocess.Popen(
        [sys.executable, str(DRIVER), str(cases_file), str(self._results)],
        cwd=xla_env.REPO, env=xla_env.env(devices, **env), stdout=self._log,
        stderr=subprocess.STDOUT)

  def results(self, timeout: float = 900) -> dict[str, tuple[int, str, str]]:
    """``{name: (exit code, stdout, stderr)}``, once every case has run."""
    code = self._process.wait(timeout=timeout)
    self._log.seek(0)
    log = self._log.read()
    self._log.close()
    assert code == 0, f"the case driver failed:\n{log[-3000:]}"
    return {name: tuple(result) for name, result in
            json.loads(self._results.read_text()).items()}
