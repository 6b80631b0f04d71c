"""QNetwork: its size, positive initialisation, and the PyTorch function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from personalize_jax.models import QNetwork, count_params
from personalize_jax.models import checkpoint


def test_sd_latents_give_the_papers_0_26m_parameters():
  abstract = nnx.eval_shape(lambda: QNetwork(64, rngs=nnx.Rngs(0)))
  assert count_params(abstract) == 262_310


def test_initialisation_is_uniform_on_zero_to_one_over_fan():
  q = QNetwork(16, rngs=nnx.Rngs(0))
  # Conv: the 3x3 kernel area (not its 36 fan-in); dense: the input width.
  bounds = {"conv1": 1 / 9, "fc": 1 / 256, "fc2": 1 / 64}
  for name, high in bounds.items():
    layer = getattr(q, name)
    for param in (layer.kernel, layer.bias):
      value = np.asarray(param.get_value())
      assert value.min() >= 0.0 and value.max() < high, name
      if value.size > 100:  # spread over the interval, not a constant
        assert value.max() > 0.9 * high and value.min() < 0.1 * high, name


def test_untrained_network_grows_with_a_non_negative_input():
  q = QNetwork(8, rngs=nnx.Rngs(1))
  residual = jax.random.uniform(jax.random.key(0), (3, 8, 8, 4))
  scores = q(jnp.stack([residual[0], 2 * residual[0], residual[0] + 1.0]))
  assert scores.shape == (3,)
  assert scores[0] > 0 and scores[1] > scores[0] and scores[2] > scores[1]


def test_matches_the_public_pytorch_module_with_its_weights():
  size = 8
  q = QNetwork(size, rngs=nnx.Rngs(2))
  # FullyConvRegressionModel's forward, sized for 8x8 latents.
  conv = torch.nn.Conv2d(4, 1, kernel_size=3, stride=1, padding=1)
  fc, fc2 = torch.nn.Linear(size * size, 64), torch.nn.Linear(64, 1)
  tensors = checkpoint.module_tensors(q)
  modules = {"conv1": conv, "fc": fc, "fc2": fc2}
  with torch.no_grad():
    for key, value in tensors.items():
      layer, leaf = key.split(".")
      getattr(modules[layer], leaf).copy_(torch.tensor(value))
  x = np.random.default_rng(0).normal(size=(2, size, size, 4))
  x = x.astype(np.float32)
  with torch.no_grad():
    h = torch.nn.functional.leaky_relu(
        conv(torch.from_numpy(x).permute(0, 3, 1, 2)), 0.01)
    want = fc2(torch.relu(fc(h.reshape(2, -1)))).squeeze(-1).numpy()
  np.testing.assert_allclose(np.asarray(q(jnp.asarray(x))), want, rtol=1e-5,
                             atol=1e-6)


def test_rejects_latents_of_another_size_or_layout():
  q = QNetwork(8, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="NHWC"):
    q(jnp.zeros((1, 4, 8, 8)))
