"""The device mesh and how parameters and batches are laid out on it.

The mesh has two axes: ``data`` (pure data parallelism: parameters replicated)
and ``fsdp`` (fully sharded data parallelism: each parameter split along one of
its dimensions, the batch split too). Parameters carry logical axis names
(``personalize_jax.models.layers``); ``LOGICAL_RULES`` says, in order of
preference, which logical dimension goes onto the ``fsdp`` axis. A dimension
that the axis size does not divide is skipped, so odd shapes (a 3-channel
conv, a 4-channel latent projection) stay replicated instead of failing.
"""

from typing import Any, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)

# (logical name, mesh axis), in order of preference: shard the output side of
# projections and convolutions first, then the input side.
LOGICAL_RULES = (
    ("mlp", FSDP),
    ("conv_out", FSDP),
    ("vocab", FSDP),
    ("embed", FSDP),
    ("conv_in", FSDP),
)


def create_mesh(data: int = -1, fsdp: int = 1,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ``(data, fsdp)`` mesh over ``devices`` (all of them by default).

  Args:
    data: size of the data axis; -1 fills with the devices ``fsdp`` leaves.
    fsdp: size of the fsdp axis; -1 fills with the devices ``data`` leaves.
    devices: the devices; ``jax.devices()`` if None.

  Raises:
    ValueError: the sizes do not multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data == -1 and fsdp == -1:
    raise ValueError("mesh.data and mesh.fsdp cannot both be -1")
  if data == -1:
    data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
  if fsdp == -1:
    fsdp = n // data if data > 0 and n % data == 0 else 0
  if data <= 0 or fsdp <= 0 or data * fsdp != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} does not use the {n} "
                     "devices present; choose sizes whose product is "
                     f"{n} (-1 fills one axis)")
  return Mesh(np.asarray(devices).reshape(data, fsdp), (DATA, FSDP))


def logical_axes(variable: Any) -> tuple[str | None, ...] | None:
  """The logical axis names a parameter was created with, if any."""
  meta = variable.get_metadata() if hasattr(variable, "get_metadata") else {}
  return meta.get("out_sharding")


def partition_spec(shape: Sequence[int], axes: Sequence[str | None] | None,
                   mesh: Mesh, rules=LOGICAL_RULES) -> P:
  """The layout of one array: at most one dimension per mesh axis.

  A rule applies when the array has a dimension with that logical name whose
  size the mesh axis divides; otherwise the next rule is tried.
  """
  spec = [None] * len(shape)
  if not axes:
    return P(*spec)
  used = set()
  for logical, mesh_axis in rules:
    size = mesh.shape[mesh_axis]
    if mesh_axis in used or size == 1:
      continue
    for dim, name in enumerate(axes):
      if name == logical and spec[dim] is None and shape[dim] % size == 0:
        spec[dim] = mesh_axis
        used.add(mesh_axis)
        break
  return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules=LOGICAL_RULES):
  """A tree of ``NamedSharding`` matching an (abstract) ``nnx.State``."""

  def one(variable):
    value = variable.get_value() if hasattr(variable, "get_value") else variable
    spec = partition_spec(value.shape, logical_axes(variable), mesh, rules)
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def sharded_fraction(state: nnx.State, shardings) -> float:
  """The fraction of parameter bytes that is split over the mesh (0 to 1)."""
  total = split = 0
  leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  for variable, sharding in zip(leaves, jax.tree.leaves(shardings)):
    value = variable.get_value() if hasattr(variable, "get_value") else variable
    size = int(np.prod(value.shape)) * np.dtype(value.dtype).itemsize
    total += size
    if any(axis is not None for axis in sharding.spec):
      split += size
  return split / max(total, 1)


def put(tree: Any, shardings: Any) -> Any:
  """``jax.device_put`` of values every process holds whole (a prefix tree).

  On several processes ``device_put`` onto devices of other processes first
  checks that each leaf is equal everywhere, one collective program per leaf;
  here each process instead cuts out the pieces its own devices hold.
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, shardings)

  def place(x, target):
    return jax.make_array_from_callback(np.shape(x), target,
                                        lambda index: x[index])

  return jax.tree.map(
      lambda target, subtree: jax.tree.map(lambda x: place(x, target),
                                           subtree), shardings, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are split along their leading axis over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
