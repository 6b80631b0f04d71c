"""``python -m personalize_jax.main`` that logs every path this process writes.

The multi-process tests run each process of a run through this script to
tell which process wrote what::

  WRITES_LOG=/tmp/p1.log python tests/_audited_run.py --workdir=/tmp/w ...

A Python audit hook appends one ``event<TAB>path`` line to ``WRITES_LOG`` for
every file opened for writing and every folder made, renamed or removed, by
any library (numpy, PIL, orbax's Python side), from any thread. Writes made by
native code alone (tensorstore's checkpoint arrays) are not seen.
"""

import os
import sys

from absl import app

from personalize_jax import main as cli

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_PATH_EVENTS = ("os.mkdir", "os.remove", "os.rmdir", "os.truncate",
                "shutil.rmtree")


def install(log_path: str) -> None:
  """Starts logging this process's writes to ``log_path``."""
  # Opened before the hook exists: the hook must not see its own log.
  log = open(log_path, "a", encoding="utf-8", buffering=1)

  def record(event: str, path) -> None:
    if isinstance(path, (str, bytes, os.PathLike)):
      log.write(f"{event}\t{os.path.abspath(os.fsdecode(path))}\n")

  def hook(event: str, args: tuple) -> None:
    if event == "open":
      path, mode, flags = args
      writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
                else bool(flags & _WRITE_FLAGS))
      if writes:
        record(event, path)
    elif event == "os.rename":  # os.rename and os.replace.
      record(event, args[0])
      record(event, args[1])
    elif event in _PATH_EVENTS:
      record(event, args[0])

  sys.addaudithook(hook)


if __name__ == "__main__":
  install(os.environ["WRITES_LOG"])
  app.run(cli.main, flags_parser=cli._parse)  # pylint: disable=protected-access
