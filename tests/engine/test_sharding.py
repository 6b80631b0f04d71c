"""Tests for the mesh and the parameter layout rules.

These run on the one CPU device of the test process: layouts are computed
against an ``AbstractMesh`` of any shape. That training on real 8-device
meshes gives the same parameters is tested in ``test_train.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec as P

from personalize_jax.engine import sharding
from personalize_jax.models.unet import UNet2DConditionModel

FSDP4 = AbstractMesh((2, 4), (sharding.DATA, sharding.FSDP))
CONV = (None, None, "conv_in", "conv_out")  # HWIO kernels.


@pytest.mark.parametrize("shape, axes, expected", [
    ((3, 3, 16, 32), CONV, P(None, None, None, "fsdp")),  # output side first.
    ((3, 3, 16, 30), CONV, P(None, None, "fsdp", None)),  # else input side.
    ((3, 3, 3, 30), CONV, P(None, None, None, None)),  # neither divides.
    ((32, 128), ("embed", "mlp"), P(None, "fsdp")),  # mlp before embed.
    ((32, 126), ("embed", "mlp"), P("fsdp", None)),
    ((49408, 32), ("vocab", "embed"), P("fsdp", None)),
    ((32,), ("mlp",), P("fsdp")),
    ((30,), ("mlp",), P(None)),
    ((32, 32), None, P(None, None)),  # no logical axes: replicated.
    ((32, 32), ("unknown", None), P(None, None)),
])
def test_partition_spec_shards_one_divisible_dimension(shape, axes, expected):
  assert sharding.partition_spec(shape, axes, FSDP4) == expected


def test_partition_spec_replicates_when_the_fsdp_axis_is_one():
  data8 = AbstractMesh((8, 1), (sharding.DATA, sharding.FSDP))
  assert sharding.partition_spec((3, 3, 16, 32), CONV, data8) == P(
      None, None, None, None)


def test_partition_spec_uses_each_mesh_axis_once():
  spec = sharding.partition_spec((64, 64), ("mlp", "mlp"), FSDP4)
  assert list(spec).count("fsdp") == 1


def test_tiny_unet_is_mostly_sharded_and_every_split_divides():
  unet = UNet2DConditionModel.from_pretrained("tiny")
  total = split = 0
  for _, variable in nnx.iter_graph(unet):
    if not isinstance(variable, nnx.Param):
      continue
    value = variable.get_value()
    spec = sharding.partition_spec(value.shape, sharding.logical_axes(variable),
                                   FSDP4)
    total += value.nbytes
    for size, axis in zip(value.shape, spec):
      if axis is not None:
        assert size % 4 == 0
        split += value.nbytes
  assert split / total > 0.5


def test_sharded_fraction_counts_bytes_of_split_leaves():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1),
                           (sharding.DATA, sharding.FSDP))
  state = {"big": jnp.zeros((4, 8)), "small": jnp.zeros((2,))}
  shardings = {"big": NamedSharding(mesh, P(None, "fsdp")),
               "small": NamedSharding(mesh, P())}
  assert sharding.sharded_fraction(state, shardings) == pytest.approx(32 / 34)
  assert sharding.sharded_fraction(
      state, {"big": NamedSharding(mesh, P()), "small": shardings["small"]}
  ) == 0


@pytest.mark.parametrize("data, fsdp, expected", [
    (-1, 1, (8, 1)), (-1, 4, (2, 4)), (2, -1, (2, 4)), (1, -1, (1, 8)),
    (2, 4, (2, 4)),
])
def test_create_mesh_fills_one_axis(data, fsdp, expected):
  devices = jax.devices()[:1] * 8  # only the sizes matter here.
  mesh = sharding.create_mesh(data, fsdp, devices=devices)
  assert tuple(mesh.shape.values()) == expected
  assert mesh.axis_names == (sharding.DATA, sharding.FSDP)


@pytest.mark.parametrize("data, fsdp", [
    (-1, -1), (3, 1), (-1, 3), (3, -1), (2, 2), (0, 8), (16, 1),
])
def test_create_mesh_rejects_sizes_that_do_not_use_every_device(data, fsdp):
  with pytest.raises(ValueError, match="mesh"):
    sharding.create_mesh(data, fsdp, devices=jax.devices()[:1] * 8)


def test_batches_split_over_every_device_and_the_rest_is_replicated():
  mesh = sharding.create_mesh()
  assert sharding.batch_sharding(mesh).spec == P((sharding.DATA,
                                                  sharding.FSDP))
  assert sharding.replicated(mesh).spec == P()


def test_activation_batch_rows_per_device_under_the_step_context():
  from personalize_jax.models import layers  # pylint: disable=g-import-not-at-top
  x = jnp.ones((6, 3))
  assert layers.local_batch(8) == 8 and layers.constrain_batch(x) is x
  with layers.batch_sharded_activations(FSDP4, sharding.BATCH_AXES):
    assert layers.local_batch(16) == 2  # 16 rows over 2 x 4 devices
    assert layers.local_batch(12) == 12  # does not divide: not split
    assert layers.constrain_batch(x) is x  # 6 rows cannot split over 8
  assert layers.local_batch(16) == 16  # the context is gone afterwards
