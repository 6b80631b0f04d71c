"""Many ``python -m personalize_jax.main`` invocations from one warm process.

The command-line mistake tests (``tests/test_main.py``,
``tests/test_bad_inputs.py``) check dozens of invocations that each end
before training: one line on stderr, exit code 2, the workdir untouched.
A fresh interpreter for each would spend most of its time importing JAX and
the models, so this script imports them once and forks a child per case::

  python tests/_cli_cases.py CASES.json RESULTS.json

``CASES.json`` maps a case name to its argument list (without the program
name); ``RESULTS.json`` gets ``{name: [exit code, stdout, stderr]}``. Each
child is a process of its own, as the command would be: it starts from the
imported but unparsed state (no flag parsed, no JAX backend started: the
parent touches no device, so the fork is safe), sends its file descriptors 1
and 2 to files, runs what ``python -m personalize_jax.main`` runs (absl's
``app.run`` with the module's flag parser and ``main``) and exits with the
code the command would exit with. ``tests/cli.py`` starts this script.
"""

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

from absl import app

# What the cases import on their way to their errors, imported once here.
# pylint: disable=unused-import
from personalize_jax import main as cli
from personalize_jax import methods, pipeline
from personalize_jax.engine import train
# pylint: enable=unused-import


def _child(args: list[str], out: Path, err: Path) -> None:
  """Runs one case in this (forked) process and never returns."""
  code = 1
  try:
    for fd, path in ((1, out), (2, err)):
      with open(path, "wb") as f:
        os.dup2(f.fileno(), fd)
    # config_flags reads its overrides (--config.key=value) from sys.argv.
    sys.argv = ["personalize_jax.main", *args]
    try:
      app.run(cli.main, flags_parser=cli._parse)  # pylint: disable=protected-access
      code = 0
    except SystemExit as e:
      if e.code is None or isinstance(e.code, int):
        code = e.code or 0
      else:
        print(e.code, file=sys.stderr)
    except BaseException:  # pylint: disable=broad-except
      traceback.print_exc()  # as the interpreter reports an uncaught one.
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # pylint: disable=protected-access


def run_case(args: list[str], folder: Path) -> tuple[int, str, str]:
  """``(exit code, stdout, stderr)`` of the command with ``args``."""
  out, err = folder / "stdout", folder / "stderr"
  sys.stdout.flush()
  sys.stderr.flush()
  pid = os.fork()
  if pid == 0:
    _child(args, out, err)
  _, status = os.waitpid(pid, 0)
  code = os.waitstatus_to_exitcode(status)
  return code, out.read_text(errors="replace"), err.read_text(errors="replace")


def main() -> None:
  cases_file, results_file = sys.argv[1:]
  cases = json.loads(Path(cases_file).read_text())
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for i, (name, args) in enumerate(cases.items()):
      folder = Path(tmp) / str(i)
      folder.mkdir()
      results[name] = run_case(args, folder)
  Path(results_file).write_text(json.dumps(results))


if __name__ == "__main__":
  main()
