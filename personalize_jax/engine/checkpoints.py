"""Checkpoints that survive kill -9 and full disks, and stopping on a signal.

Each checkpoint is a folder ``checkpoints/<step>/`` with two orbax items:
``state`` (the sharded train state) and ``meta`` (JSON: data position, config,
anything the run needs to resume). Atomicity comes from orbax: a save writes
into ``<step>.orbax-checkpoint-tmp/`` and renames it to ``<step>/`` only after
every file is written, so a folder named by a bare number is complete and a
killed save leaves only a tmp folder that step discovery ignores (and the next
manager removes). Old checkpoints are first renamed into ``.deleted/`` and
removed from there, so a kill during deletion cannot leave a half-deleted
folder that looks like a checkpoint. This covers a killed process; orbax
does not fsync its small metadata files before the rename, so a power cut
right after a save is not covered.
"""

import errno
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from personalize_jax.errors import CheckpointError, UserError

# Old steps are renamed in here (one atomic rename) and then removed.
TRASH_DIR = ".deleted"
TMP_SUFFIX = ".orbax-checkpoint-tmp"
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# tensorstore, which writes the arrays, reports OS errors as ValueError text.
_DISK_FULL_TEXT = ("No space left on device", "Disk quota exceeded",
                   "os_error_code='28'", "os_error_code='122'")
_MAX_DETAIL = 300  # characters of an orbax error quoted in CheckpointError.


def _is_disk_full(error: BaseException) -> bool:
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
      return True
    if any(text in str(error) for text in _DISK_FULL_TEXT):
      return True
    error = error.__cause__ or error.__context__
  return False


def _mib(num_bytes: int) -> str:
  return f"{num_bytes / 2**20:.1f} MiB"


class CheckpointManager:
  """Saves and restores ``(state, meta)`` under numbered step folders.

  Saves are asynchronous: ``save`` returns once the arrays are copied off the
  devices (so the caller may donate or change the state) and the files are
  written in the background; ``wait`` blocks until the last save is committed.
  A failed background write surfaces at the next ``save``, ``wait`` or
  ``close``.

  Args:
    directory: the checkpoints folder, normally ``<workdir>/checkpoints``.
    keep: how many of the newest checkpoints to keep.
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 2):
    self.directory = Path(directory).absolute()
    self._remove_trash()
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            todelete_subdir=TRASH_DIR, enable_async_checkpointing=True),
        item_names=("state", "meta"))
    self._pending_step = None

  def _remove_trash(self) -> None:
    # Orbax moves old steps in here from process 0 only, so only it removes.
    if jax.process_index() == 0:
      shutil.rmtree(self.directory / TRASH_DIR, ignore_errors=True)

  def _fail(self, step: int, error: BaseException) -> None:
    """Turns a write error into a one-line ``UserError`` when the disk is full.

    The partial ``<step>.orbax-checkpoint-tmp`` folder stays: orbax threads may
    still be writing into it. The next manager on this folder removes it.
    """
    self._manager.reload()  # forget the step orbax had counted as saved.
    if not _is_disk_full(error):
      raise error
    free = shutil.disk_usage(self.directory).free
    steps = self.all_steps()
    resume = f"rerun to resume from step {steps[-1]}" if steps else "rerun"
    raise UserError(
        f"could not write checkpoint at step {step} to {self.directory}: No "
        f"space left on device; free space on that disk ({_mib(free)} free "
        f"now) or use another --workdir, then {resume}") from error

  def _finish_pending(self) -> None:
    step, self._pending_step = self._pending_step, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._fail(step, e)
    self._remove_trash()
    self._manager.reload()

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> bool:
    """Starts saving ``state`` and ``meta`` as ``<directory>/<step>/``.

    Saving a step that already has a complete checkpoint does nothing, so a
    loop may save on its cadence and again when stopping at the same step.

    Args:
      step: the step number, which names the folder.
      state: a pytree of (possibly sharded) ``jax.Array``s and scalars.
      meta: JSON-serialisable dict stored beside the state.

    Returns:
      True if a save was started, False if ``step`` was already saved.

    Raises:
      UserError: the disk is full (for this save or a pending earlier one);
        the previous complete checkpoint stays restorable.
      TypeError: ``meta`` is not JSON-serialisable.
    """
    self._finish_pending()
    if step in self.all_steps():
      return False
    # Check now: a bad value would otherwise fail in the background thread.
    json.dumps(meta)
    try:
      self._manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(meta)),
          force=True)
    except Exception as e:  # pylint: disable=broad-except
      self._fail(step, e)
    self._pending_step = step
    return True

  def wait(self) -> None:
    """Blocks until the last save is committed (or raises its error)."""
    self._finish_pending()

  def all_steps(self) -> list[int]:
    """Steps with a complete checkpoint on disk, ascending."""
    # Read the folder rather than orbax's cache, which counts a save as done
    # when it starts; reloading that cache mid-save would race its thread.
    return sorted(ocp.path.step.checkpoint_steps(self.directory))

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None if there is none.

    Reads the folder, so it sees checkpoints other processes wrote and never
    counts a save still in flight.
    """
    steps = self.all_steps()
    return steps[-1] if steps else None

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Loads checkpoint ``step`` straight into the target layout.

    Args:
      step: a step from ``all_steps()``.
      abstract_state: the state's structure as ``jax.ShapeDtypeStruct``
        leaves whose ``.sharding`` says where each array goes.

    Returns:
      ``(state, meta)``.

    Raises:
      CheckpointError: there is no complete checkpoint at ``step``, or it
        does not match ``abstract_state``.
    """
    steps = self.all_steps()
    if step not in steps:
      raise CheckpointError(
          f"no complete checkpoint for step {step} in {self.directory} "
          f"(complete: {steps or 'none'}); pick one of those or start fresh")
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(abstract_state),
              meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      # Orbax spreads a tree mismatch over many lines; keep it one line.
      detail = " ".join(line.strip() for line in str(e).splitlines())
      if len(detail) > _MAX_DETAIL:
        detail = detail[:_MAX_DETAIL] + "..."
      raise CheckpointError(
          f"checkpoint {self.directory / str(step)} does not match this run's "
          f"state ({type(e).__name__}: {detail}); was it written by a "
          "different model or config? use a new --workdir") from e
    return restored.state, restored.meta

  def close(self) -> None:
    """Waits for a pending save, then releases orbax's threads."""
    try:
      self._finish_pending()
    finally:
      self._manager.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


class PreemptionHandler:
  """Turns SIGTERM and SIGINT into a flag the train loop polls.

  Cluster schedulers send SIGTERM before killing a job, and Ctrl-C sends
  SIGINT; either way the loop should finish its step, save and exit 0 rather
  than die mid-step. A second signal while a stop is pending raises
  ``KeyboardInterrupt`` at once, for a user who does not want to wait.
  The previous handlers are restored on exit. Must be entered on the main
  thread (Python only delivers signals there).

  Usage::

    with PreemptionHandler() as preemption:
      for step in ...:
        state = train_step(state, ...)
        if preemption.stop_requested:
          save(...); break
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.stop_requested = False
    self.signal = None  # the first signal received (a signal.Signals).
    self._previous = {}

  @property
  def signal_name(self) -> str | None:
    """``"SIGTERM"`` or ``"SIGINT"`` once a stop was requested."""
    return self.signal.name if self.signal is not None else None

  def _handle(self, signum: int, frame) -> None:
    del frame  # unused
    if self.stop_requested:
      raise KeyboardInterrupt(
          f"second {signal.Signals(signum).name}: stopping without saving")
    self.stop_requested = True
    self.signal = signal.Signals(signum)

  def __enter__(self) -> "PreemptionHandler":
    for signum in self.SIGNALS:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}
