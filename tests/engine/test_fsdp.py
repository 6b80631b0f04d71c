"""FSDP that shards too little of the trainable bytes is refused (as maxtext)."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from personalize_jax.engine import train
from personalize_jax.errors import UserError


def _params(mesh, unsplit: int):
  """A split ``(8, 4)`` float32 leaf (128 bytes) and a whole ``(unsplit,)`` one."""
  split = NamedSharding(mesh, P(None, "fsdp"))
  whole = NamedSharding(mesh, P())
  return {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=split),
          "b": jax.ShapeDtypeStruct((unsplit,), jnp.float32, sharding=whole)}


def test_fsdp_sharding_under_the_threshold_is_a_one_line_error():
  mesh = AbstractMesh((1, 4), ("data", "fsdp"))
  # 128 of 528 bytes split: 24%.
  with pytest.raises(UserError, match=r"^config\.mesh\.fsdp=4 shards only 24% "
                     r"of the trainable parameter bytes \(at least 50%"):
    train.check_fsdp(_params(mesh, 100), mesh)
  train.check_fsdp(_params(mesh, 8), mesh)  # 128 of 160 bytes: 80%.


def test_without_fsdp_nothing_needs_sharding():
  mesh = AbstractMesh((4, 1), ("data", "fsdp"))
  train.check_fsdp(_params(mesh, 100), mesh)
