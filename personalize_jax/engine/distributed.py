"""Runs of several processes: joining them, and what they must agree on.

A Cloud TPU pod slice (or a multi-host GPU job) is one process per host; each
runs the same program on its own devices and ``jax.distributed.initialize``
joins them into one set of global devices. On Cloud TPU VMs the coordinator,
the process count and each process's index are detected; elsewhere (several
CPU processes on one machine, a cluster JAX cannot detect) they are passed.

Every process trains; process 0 alone writes the run directory (the lock,
config.json, metrics, grids, caches, the export) and the others read what it
wrote after a ``barrier``.
"""

import re

import jax
import numpy as np
from jax._src import distributed as jax_distributed  # the coordination client
from jax.experimental import multihost_utils

from personalize_jax.errors import UserError

# HOST:PORT, the host a name, an IPv4 address or a bracketed IPv6 address.
_ADDRESS = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[^:\[\]\s]+):(\d+)$")


def check_flags(distributed: bool, coordinator_address: str | None,
                num_processes: int | None, process_id: int | None) -> None:
  """Refuses flag combinations that cannot join a run, before anything starts.

  Args:
    distributed: ``--distributed``.
    coordinator_address: ``--coordinator_address`` (None: detected).
    num_processes: ``--num_processes`` (None: detected).
    process_id: ``--process_id`` (None: detected).

  Raises:
    UserError: one line naming the flag and how to fix it.
  """
  given = {"--coordinator_address": coordinator_address,
           "--num_processes": num_processes, "--process_id": process_id}
  if not distributed:
    for flag, value in given.items():
      if value is not None:
        raise UserError(f"{flag} only applies to a multi-process run; add "
                        "--distributed or drop it")
    return
  if coordinator_address is not None:
    match = _ADDRESS.match(coordinator_address)
    if not match or not 0 < int(match.group(2)) < 65536:
      raise UserError(
          f"--coordinator_address={coordinator_address!r} is not HOST:PORT; "
          "pass process 0's host and a free port, e.g. 10.0.0.2:1234")
  if num_processes is not None and num_processes < 1:
    raise UserError(f"--num_processes={num_processes} is invalid: it must be "
                    "the positive number of processes of the run")
  if process_id is not None and process_id < 0:
    raise UserError(f"--process_id={process_id} is invalid: it must be 0 for "
                    "the first process, 1 for the second, ...")
  if (process_id is not None and num_processes is not None
      and process_id >= num_processes):
    raise UserError(
        f"--process_id={process_id} is invalid for --num_processes="
        f"{num_processes}: processes are numbered 0 to {num_processes - 1}")


def uses_cpu(platforms: str | None) -> bool:
  """Whether JAX may run on CPU under ``JAX_PLATFORMS=platforms``.

  Decided from the setting, not from the devices: those must not be touched
  before ``jax.distributed.initialize``. An installed ``libtpu`` or CUDA
  plugin does not prove there is a chip, so an unset value counts as CPU.
  """
  return not platforms or "cpu" in [p.strip() for p in platforms.split(",")]


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None) -> None:
  """Joins this process to the run; must come before anything uses a device.

  Args:
    coordinator_address: process 0's ``HOST:PORT``; None lets JAX detect it.
    num_processes: how many processes the run has; None lets JAX detect it.
    process_id: this process's index; None lets JAX detect it.

  Raises:
    UserError: JAX could not detect what was not passed.
  """
  if uses_cpu(jax.config.jax_platforms):
    # CPU devices of different processes talk through gloo; without it a
    # computation over all of them fails to compile. Only the CPU backend
    # reads this, so it is harmless where an accelerator ends up in use.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
  except ValueError as e:
    raise UserError(
        f"--distributed: {str(e).strip().rstrip('.')} (JAX detects it on "
        "Cloud TPU VMs and clusters it knows); pass --coordinator_address, "
        "--num_processes and --process_id") from None


def is_chief() -> bool:
  """Whether this is process 0, the one that writes the run directory."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier of this ``name``.

  Process 0 writes a file and passes a barrier; the others read it after
  theirs. A no-op on one process.
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def meet(name: str, timeout_s: float = 1800.0) -> None:
  """Waits until every process has reached ``name``, without the devices.

  A barrier of the coordination service: unlike ``barrier`` it runs no
  collective, so it cannot itself be a collective whose set-up times out.
  A no-op on one process.
  """
  if jax.process_count() > 1:
    jax_distributed.global_state.client.wait_at_barrier(
        name, int(timeout_s * 1000))


def any_process(flag: bool) -> bool:
  """Whether ``flag`` is True on any process (all of them call this)."""
  if jax.process_count() == 1:
    return bool(flag)
  flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
  return bool(np.any(flags))


def chief_succeeded(ok: bool) -> bool:
  """Process 0's ``ok``, on every process (all of them call this)."""
  if jax.process_count() == 1:
    return bool(ok)
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(ok, np.int32)))
