"""The run directory: one run at a time, and the config it was started with.

A workdir holds everything a run writes (``config.json``, ``metrics.jsonl``,
``tensorboard/``, ``checkpoints/<step>/``, sample grids). Two runs writing the
same workdir would interleave metrics and race on checkpoints, and resuming a
run under a different config would silently mix two experiments; this module
refuses both before any work starts.
"""

import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from personalize_jax.errors import UserError

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
# Keys that never make two configs "different runs": `overwrite` is how the
# user acknowledges a difference, so it must not be one itself.
ALWAYS_IGNORED = ("overwrite",)
_MAX_SHOWN_DIFFERENCES = 3


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
  """Writes ``data`` to ``path``: readers see the old or new file, never half.

  The bytes go to a temporary file in the same folder (so the rename stays on
  one filesystem), are fsynced, and replace ``path`` with ``os.replace``; the
  folder is fsynced too so the rename itself survives a power cut.

  Args:
    path: the destination; its folder must exist.
    data: the complete new content.

  Returns:
    ``path`` as a ``Path``.
  """
  path = Path(path)
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()
  _fsync_dir(path.parent)
  return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
  """``atomic_write_bytes`` for UTF-8 text."""
  return atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(folder: Path) -> None:
  fd = os.open(folder, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


class WorkdirLock:
  """Holds an exclusive lock on a workdir for the lifetime of a run.

  ``fcntl.flock`` locks are released by the kernel when the process dies, even
  by ``kill -9``, so a crashed run never leaves a stale lock behind. The lock
  file keeps the holder's pid only to name it in the error message.

  Usage::

    with WorkdirLock(workdir):
      train(...)
  """

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = Path(workdir)
    self._fd = None

  def __enter__(self) -> "WorkdirLock":
    self.workdir.mkdir(parents=True, exist_ok=True)
    fd = os.open(self.workdir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      raise UserError(
          f"another run is using {self.workdir} (pid {holder}); wait for it "
          "to finish or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode("ascii"))
    self._fd = fd
    return self

  def __exit__(self, *exc_info) -> None:
    # The file stays: unlinking it would let a third process lock a new inode
    # while a second one still waits on the old.
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      flat.update(_flatten(value, f"{name}."))
    else:
      flat[name] = value
  return flat


def _normalize(config: Any) -> dict[str, Any]:
  """A plain JSON-shaped dict (tuples become lists) of a dict or ConfigDict."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return json.loads(json.dumps(config, sort_keys=True))


_ABSENT = object()


def _show(value: Any) -> str:
  return "(absent)" if value is _ABSENT else json.dumps(value)


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any],
                       ignore: Iterable[str] = ()) -> list[str]:
  """``"key: old -> new"`` for each dotted key whose value differs.

  Args:
    old: the config a workdir was started with (nested dicts).
    new: the config of this run (nested dicts).
    ignore: dotted keys that may differ (e.g. ``num_steps`` to extend a run);
      a key also ignores everything under it.

  Returns:
    The differences, sorted by key.
  """
  ignored = tuple(ALWAYS_IGNORED) + tuple(ignore)
  old, new = _flatten(_normalize(old)), _flatten(_normalize(new))
  diffs = []
  for key in sorted(set(old) | set(new)):
    if any(key == i or key.startswith(f"{i}.") for i in ignored):
      continue
    before, after = old.get(key, _ABSENT), new.get(key, _ABSENT)
    if before != after:
      diffs.append(f"{key}: {_show(before)} -> {_show(after)}")
  return diffs


def check_config(workdir: str | os.PathLike, config: Any, *,
                 overwrite: bool = False, ignore: Iterable[str] = ()):
  """Raises if ``<workdir>/config.json`` is another run's; writes nothing.

  Returns the recorded config (a nested dict), or None when there is none
  (or ``overwrite`` is set). Run before taking the workdir's lock, so that a
  refused run does not touch the workdir at all.

  Raises:
    UserError: as ``check_or_write_config``.
  """
  workdir = Path(workdir)
  path = workdir / CONFIG_FILE
  if not path.exists() or overwrite:
    return None
  try:
    old = json.loads(path.read_text(encoding="utf-8"))
  except (ValueError, UnicodeDecodeError) as e:
    raise UserError(
        f"{CONFIG_FILE} in {workdir} is not valid JSON ({e}); use a new "
        "--workdir or pass --config.overwrite=true") from None
  diffs = config_differences(old, _normalize(config), ignore)
  if diffs:
    shown = ", ".join(diffs[:_MAX_SHOWN_DIFFERENCES])
    if len(diffs) > _MAX_SHOWN_DIFFERENCES:
      shown += f", and {len(diffs) - _MAX_SHOWN_DIFFERENCES} more"
    raise UserError(
        f"{CONFIG_FILE} in {workdir} is from a different run ({shown}); use "
        "a new --workdir or pass --config.overwrite=true")
  return old


def check_or_write_config(workdir: str | os.PathLike, config: Any, *,
                          overwrite: bool = False,
                          ignore: Iterable[str] = ()) -> Path:
  """Records the resolved config in ``<workdir>/config.json``, or refuses.

  A workdir belongs to one experiment: a run whose config differs from the
  recorded one (other than in ``overwrite`` and the ``ignore`` keys) is
  refused unless ``overwrite`` is set. A refusal leaves the workdir untouched.
  When only ignored keys differ the file is rewritten, so it always describes
  the latest run.

  Args:
    workdir: the run directory; created if missing.
    config: the resolved config, a nested dict or ``ml_collections.ConfigDict``.
    overwrite: replace a differing or unreadable ``config.json``.
    ignore: dotted keys allowed to differ, e.g. ``("num_steps",)``.

  Returns:
    The path of ``config.json``.

  Raises:
    UserError: the workdir holds a different run's config (up to three
      differing keys are named) or an unreadable ``config.json``.
  """
  workdir = Path(workdir)
  path = workdir / CONFIG_FILE
  new = _normalize(config)
  text = json.dumps(new, indent=2, sort_keys=True) + "\n"
  if check_config(workdir, config, overwrite=overwrite, ignore=ignore) == new:
    return path
  workdir.mkdir(parents=True, exist_ok=True)
  return atomic_write_text(path, text)
