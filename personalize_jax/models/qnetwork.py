"""Look Forward's critic (Wei et al., ECCV 2024): a 0.26M-parameter Q-network.

The public code (``FullyConvRegressionModel``, wfanyue/DPG-T2I-Personalization)
scores a 4-channel latent map with one 3x3 convolution to a single channel,
LeakyReLU(0.01), flatten, Dense(h*w -> 64), ReLU, Dense(64 -> 1); at SD's 64x64
latents that is 37 + 262,208 + 65 = 262,310 parameters.

Its initialisation is "positive": every weight and bias is drawn uniformly
from ``[0, 1 / fan)``, where ``fan`` is the 3x3 kernel area (9, not the 36 of
the conv's fan-in) for the convolution and the input width (h*w, then 64) for
the dense layers. With a non-negative input (a squared error) every unit is
then non-negative and the output grows monotonically with each input value, so
before any training the critic already ranks a larger look-forward error as a
larger cost, and the actor's gradient through it points the right way.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from personalize_jax.models import layers

HIDDEN = 64  # width of the hidden dense layer, as in the public code
LATENT_CHANNELS = 4
_KERNEL = 3


def _uniform(variable: nnx.Param, rng: jax.Array, high: float) -> None:
  """Refills a parameter with ``U[0, high)`` (``torch.nn.init.uniform_``)."""
  value = variable.get_value()
  variable.set_value(
      jax.random.uniform(rng, value.shape, value.dtype, 0.0, high))


class QNetwork(nnx.Module):
  """A scalar score of a latent map ``(b, h, w, 4)`` -> ``(b,)`` (NHWC).

  The parameter names follow the public PyTorch module (``conv1``, ``fc``,
  ``fc2``), so its state dict maps onto this one key for key.
  """

  def __init__(self, latent_size: int, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    """Builds the network with the positive initialisation.

    Args:
      latent_size: the latent height (= width) it scores: 64 for 512 px SD.
      dtype: the compute dtype.
      param_dtype: the dtype the parameters are stored in.
      rngs: the random initialisers.
    """
    self.latent_size = latent_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    flat = latent_size * latent_size
    self.conv1 = layers.conv(LATENT_CHANNELS, 1, _KERNEL, padding=1, **kw)
    self.fc = layers.linear(flat, HIDDEN, **kw)
    self.fc2 = layers.linear(HIDDEN, 1, axes=("mlp", "embed"), **kw)
    for layer, fan in ((self.conv1, _KERNEL * _KERNEL), (self.fc, flat),
                       (self.fc2, HIDDEN)):
      _uniform(layer.kernel, rngs.params(), 1.0 / fan)
      _uniform(layer.bias, rngs.params(), 1.0 / fan)

  def __call__(self, latents_bhwc: jax.Array) -> jax.Array:
    """The score of each latent map, ``(b,)``.

    Raises:
      ValueError: the input is not ``(b, latent_size, latent_size, 4)``.
    """
    expected = (self.latent_size, self.latent_size, LATENT_CHANNELS)
    if latents_bhwc.ndim != 4 or tuple(latents_bhwc.shape[1:]) != expected:
      raise ValueError(f"QNetwork({self.latent_size}) scores (b, "
                       f"{', '.join(map(str, expected))}) latents (NHWC), got "
                       f"shape {latents_bhwc.shape}")
    h = jax.nn.leaky_relu(self.conv1(latents_bhwc), negative_slope=0.01)
    # One channel, so the NHWC flatten has PyTorch's (C=1, H, W) order.
    h = h.reshape(h.shape[0], -1)
    return self.fc2(jax.nn.relu(self.fc(h)))[:, 0]
