"""ViT image encoder (transformers ``ViTModel``) for the DINO reward, NHWC.

Layout: ``facebook/dino-vits16`` / ``dino-vitb16`` checkpoints. The module tree
mirrors the published state-dict keys (``encoder.layer.N.attention.attention.
query`` ...), which is what transformers 5.x still writes with
``save_pretrained`` even though its in-memory modules were renamed
(``layers.N.attention.q_proj``); so checkpoints load and save with no renaming.

The port has no pooler: the DINO embedding is the CLS token of the last hidden
state, and the ``pooler.*`` keys of the checkpoints are skipped on load.

The pieces shared with DINOv2 (patch embedding, attention, position-embedding
interpolation, the config mixin) live here and are imported by ``dinov2``.
"""

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from personalize_jax.errors import UserError
from personalize_jax.models import attention, checkpoint, layers, presets

_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def activation(name: str):
  """The activation function transformers calls ``name`` (``ACT2FN``)."""
  if name not in _ACTIVATIONS:
    raise UserError(f"hidden_act={name!r} is not supported; use one of "
                    f"{sorted(_ACTIVATIONS)}")
  return _ACTIVATIONS[name]


class ConfigMixin:
  """``from_dict`` / ``to_dict`` for frozen dataclass configs of HF models.

  Subclasses set ``MODEL_TYPE`` and ``ARCHITECTURE`` (what transformers needs
  in ``config.json`` to pick the class).
  """

  MODEL_TYPE = ""
  ARCHITECTURE = ""

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]):
    """Builds the config from ``config.json`` contents; unknown keys are ignored.

    Missing keys take transformers' defaults; lists become tuples so the
    config stays hashable (it is static metadata of the nnx module).
    """
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v
              for k, v in values.items() if k in names}
    return cls(**kwargs)

  def to_dict(self) -> dict:
    """A ``config.json`` dict transformers loads (model_type, architectures)."""
    out = {k: list(v) if isinstance(v, tuple) else v
           for k, v in dataclasses.asdict(self).items()}
    out.update(model_type=self.MODEL_TYPE, architectures=[self.ARCHITECTURE])
    return out


def pair(value) -> tuple[int, int]:
  """``image_size`` / ``patch_size`` (an int or a pair) as ``(height, width)``."""
  if isinstance(value, (tuple, list)):
    return int(value[0]), int(value[1])
  return int(value), int(value)


@dataclasses.dataclass(frozen=True)
class ViTConfig(ConfigMixin):
  """transformers ``ViTConfig`` (its field names and defaults)."""

  MODEL_TYPE = "vit"
  ARCHITECTURE = "ViTModel"

  hidden_size: int = 768  # token width
  num_hidden_layers: int = 12  # transformer blocks
  num_attention_heads: int = 12  # heads per block
  intermediate_size: int = 3072  # MLP width
  hidden_act: str = "gelu"  # MLP activation (exact erf GELU)
  hidden_dropout_prob: float = 0.0  # unused: the port is inference/reward only
  attention_probs_dropout_prob: float = 0.0  # unused, kept for round trips
  initializer_range: float = 0.02  # std of the random init of embeddings
  layer_norm_eps: float = 1e-12  # LayerNorm epsilon
  image_size: int | tuple[int, int] = 224  # training resolution (position grid)
  patch_size: int | tuple[int, int] = 16  # square patch side
  num_channels: int = 3  # input channels
  qkv_bias: bool = True  # biases on query/key/value
  encoder_stride: int = 16  # unused here (masked-image-modeling head)


def _torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """``(out, in)`` weights of torch's ``interpolate(mode="bicubic")``, 1-D.

  torch uses Keys' cubic with a=-0.75 (``jax.image.resize`` uses a=-0.5),
  ``align_corners=False`` source coordinates and border-clamped taps, no
  antialiasing; the 2-D resize is separable, so two such matrices reproduce it.
  """
  a = -0.75
  scale = in_size / out_size
  weights = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    real = scale * (i + 0.5) - 0.5
    base = math.floor(real)
    t = real - base
    taps = (((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a)
    for k, w in enumerate(taps):
      weights[i, min(max(base - 1 + k, 0), in_size - 1)] += w
  return weights


def interpolate_pos_encoding(position_embeddings_1nd: jax.Array,
                             grid_hw: tuple[int, int],
                             new_grid_hw: tuple[int, int]) -> jax.Array:
  """Resizes the patch position embeddings to another patch grid.

  The same computation as transformers' ``interpolate_pos_encoding`` (ViT and
  DINOv2): the CLS position is kept, the patch positions are resized as an
  image with torch's bicubic kernel, in float32.

  Args:
    position_embeddings_1nd: ``(1, 1 + gh * gw, dim)``.
    grid_hw: the grid the embeddings were trained on ``(gh, gw)``.
    new_grid_hw: the grid of the input ``(nh, nw)``.

  Returns:
    ``(1, 1 + nh * nw, dim)`` in the input's dtype.
  """
  if tuple(new_grid_hw) == tuple(grid_hw):
    return position_embeddings_1nd
  dim = position_embeddings_1nd.shape[-1]
  cls_1d = position_embeddings_1nd[:, :1]
  grid = position_embeddings_1nd[0, 1:].reshape(*grid_hw, dim).astype(jnp.float32)
  rows = jnp.asarray(_torch_bicubic_matrix(grid_hw[0], new_grid_hw[0]), jnp.float32)
  cols = jnp.asarray(_torch_bicubic_matrix(grid_hw[1], new_grid_hw[1]), jnp.float32)
  hi = jax.lax.Precision.HIGHEST
  grid = jnp.einsum("yh,hwd,xw->yxd", rows, grid, cols, precision=hi)
  grid = grid.reshape(1, -1, dim).astype(position_embeddings_1nd.dtype)
  return jnp.concatenate([cls_1d, grid], axis=1)


class PatchEmbeddings(nnx.Module):
  """``patch_embeddings``: a strided convolution, one token per patch."""

  def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
    ph, pw = pair(config.patch_size)
    if ph != pw:
      raise UserError(f"patch_size={config.patch_size} is not square; only "
                      "square patches are supported")
    self.num_channels = config.num_channels
    self.projection = layers.conv(
        config.num_channels, config.hidden_size, ph, stride=ph, padding=0,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixel_values_bhwc: jax.Array) -> jax.Array:
    if pixel_values_bhwc.shape[-1] != self.num_channels:
      raise ValueError(f"expected {self.num_channels} channels (NHWC), got "
                       f"pixel values of shape {pixel_values_bhwc.shape}")
    tokens_bhwd = self.projection(pixel_values_bhwc)
    b, h, w, d = tokens_bhwd.shape
    return tokens_bhwd.reshape(b, h * w, d)


class SelfAttention(nnx.Module):
  """``attention.attention``: the query/key/value projections."""

  def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
    width = config.hidden_size
    proj = lambda: layers.linear(width, width, use_bias=config.qkv_bias,
                                 dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.query, self.key, self.value = proj(), proj(), proj()


class SelfOutput(nnx.Module):
  """``attention.output``: the output projection."""

  def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.dense = layers.linear(config.hidden_size, config.hidden_size,
                               axes=("mlp", "embed"), dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)


class Attention(nnx.Module):
  """Multi-head self-attention (``ViTAttention`` / ``Dinov2Attention``)."""

  def __init__(self, config, *, dtype, param_dtype, attention_impl: str,
               rngs: nnx.Rngs):
    self.num_heads = config.num_attention_heads
    self.attention_impl = attention_impl
    self.attention = SelfAttention(config, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
    self.output = SelfOutput(config, dtype=dtype, param_dtype=param_dtype,
                             rngs=rngs)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    b, t, d = x_btd.shape
    split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    qkv = self.attention
    out_bthd = attention.dot_product_attention(
        split(qkv.query(x_btd)), split(qkv.key(x_btd)), split(qkv.value(x_btd)),
        impl=self.attention_impl)
    return self.output.dense(out_bthd.reshape(b, t, d))


class Dense(nnx.Module):
  """A module holding one ``dense`` projection (``intermediate`` / ``output``)."""

  def __init__(self, in_features: int, out_features: int, axes, *, dtype,
               param_dtype, rngs: nnx.Rngs):
    self.dense = layers.linear(in_features, out_features, axes=axes,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class ViTLayer(nnx.Module):
  """One pre-norm transformer block (``encoder.layer.N``)."""

  def __init__(self, config: ViTConfig, *, dtype, param_dtype,
               attention_impl: str, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    norm = lambda: layers.layer_norm(config.hidden_size,
                                     epsilon=config.layer_norm_eps, rngs=rngs, **kw)
    self.act = activation(config.hidden_act)
    self.attention = Attention(config, attention_impl=attention_impl,
                               rngs=rngs, **kw)
    self.intermediate = Dense(config.hidden_size, config.intermediate_size,
                              ("embed", "mlp"), rngs=rngs, **kw)
    self.output = Dense(config.intermediate_size, config.hidden_size,
                        ("mlp", "embed"), rngs=rngs, **kw)
    self.layernorm_before = norm()
    self.layernorm_after = norm()

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    x_btd = x_btd + self.attention(self.layernorm_before(x_btd))
    h = self.act(self.intermediate.dense(self.layernorm_after(x_btd)))
    return x_btd + self.output.dense(h)


def run_layers(blocks, x_btd: jax.Array, remat: bool) -> jax.Array:
  """Applies the blocks in order, rematerialising each one if ``remat``."""
  apply = layers.remat_call if remat else (lambda block, h: block(h))
  for block in blocks:
    x_btd = apply(block, x_btd)
  return x_btd


class ViTEmbeddings(nnx.Module):
  """CLS token + patch tokens + (interpolated) position embeddings."""

  def __init__(self, config: ViTConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
    self.dtype = dtype
    self.patch = pair(config.patch_size)[0]
    size_h, size_w = pair(config.image_size)
    self.grid_hw = (size_h // self.patch, size_w // self.patch)
    init = nnx.initializers.normal(config.initializer_range)
    self.cls_token = layers.param(rngs, (1, 1, config.hidden_size),
                                  (None, None, "embed"), init=init,
                                  param_dtype=param_dtype)
    self.position_embeddings = layers.param(
        rngs, (1, 1 + self.grid_hw[0] * self.grid_hw[1], config.hidden_size),
        (None, None, "embed"), init=init, param_dtype=param_dtype)
    self.patch_embeddings = PatchEmbeddings(config, dtype=dtype,
                                            param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixel_values_bhwc: jax.Array) -> jax.Array:
    _, height, width, _ = pixel_values_bhwc.shape
    tokens_bnd = self.patch_embeddings(pixel_values_bhwc.astype(self.dtype))
    cls_b1d = jnp.broadcast_to(self.cls_token[...].astype(self.dtype),
                               (tokens_bnd.shape[0], 1, tokens_bnd.shape[-1]))
    tokens_bnd = jnp.concatenate([cls_b1d, tokens_bnd], axis=1)
    positions = interpolate_pos_encoding(
        self.position_embeddings[...], self.grid_hw,
        (height // self.patch, width // self.patch))
    return tokens_bnd + positions.astype(self.dtype)


class Encoder(nnx.Module):
  """``encoder``: the list of blocks under ``layer``."""

  def __init__(self, config, layer_cls: type, *, dtype, param_dtype,
               attention_impl: str, rngs: nnx.Rngs):
    self.layer = nnx.List([
        layer_cls(config, dtype=dtype, param_dtype=param_dtype,
                  attention_impl=attention_impl, rngs=rngs)
        for _ in range(config.num_hidden_layers)])


class VisionTransformer(nnx.Module):
  """The body every ViT-family port shares: embeddings, blocks, LayerNorm.

  A subclass names its parts (``CONFIG_CLS``, ``EMBEDDINGS_CLS``,
  ``LAYER_CLS``), the preset of its ``"tiny"`` model and the checkpoint keys
  it skips on load. Calling it returns the last hidden state after the final
  LayerNorm, ``(batch, 1 + patches, hidden)``.
  """

  CONFIG_CLS: type = None
  EMBEDDINGS_CLS: type = None
  LAYER_CLS: type = None
  PRESET: Mapping[str, Any] = {}
  IGNORE_UNEXPECTED: tuple[str, ...] = ()

  def __init__(self, config, *, dtype=jnp.float32, param_dtype=jnp.float32,
               attention_impl: str = "xla", remat: bool = False,
               rngs: nnx.Rngs):
    if not isinstance(config, self.CONFIG_CLS):
      config = self.CONFIG_CLS.from_dict(config)
    self.config = config
    self.remat = remat
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.embeddings = self.EMBEDDINGS_CLS(config, rngs=rngs, **kw)
    self.encoder = Encoder(config, self.LAYER_CLS,
                           attention_impl=attention_impl, rngs=rngs, **kw)
    self.layernorm = layers.layer_norm(config.hidden_size,
                                       epsilon=config.layer_norm_eps,
                                       rngs=rngs, **kw)

  def __call__(self, pixel_values_bhwc: jax.Array) -> jax.Array:
    """Encodes normalised NHWC pixel values into ``(b, 1 + n, hidden)`` tokens."""
    x_btd = self.embeddings(pixel_values_bhwc)
    x_btd = run_layers(self.encoder.layer, x_btd, self.remat)
    return self.layernorm(x_btd)

  @classmethod
  def from_pretrained(cls, path_or_hub_id: str | os.PathLike,
                      subfolder: str | None = None, *, dtype=jnp.float32,
                      param_dtype=jnp.float32, attention_impl: str = "xla",
                      remat: bool = False, seed: int = 0):
    """Loads a transformers checkpoint of this class (``"tiny"``: random preset).

    Args:
      path_or_hub_id: a folder with ``config.json`` + ``model.safetensors``, a
        Hub id (``facebook/dino-vits16`` for ``ViTModel``,
        ``facebook/dinov2-small`` for ``Dinov2Model``), or ``"tiny"``.
      subfolder: a folder inside it.
      dtype: compute dtype.
      param_dtype: storage dtype of the parameters.
      attention_impl: see ``attention.IMPLEMENTATIONS``.
      remat: rematerialise each block in the backward pass.
      seed: the random init of ``"tiny"``.

    Raises:
      CheckpointError: the folder, config or weights cannot be loaded.
    """
    return checkpoint.load_pretrained(
        path_or_hub_id, subfolder, read_config=cls.CONFIG_CLS.from_dict,
        build=functools.partial(cls, dtype=dtype, param_dtype=param_dtype,
                                attention_impl=attention_impl, remat=remat),
        preset=cls.PRESET, weights_name=checkpoint.TRANSFORMERS_WEIGHTS,
        param_dtype=param_dtype, seed=seed,
        model_type=cls.CONFIG_CLS.MODEL_TYPE, cls_name=cls.__name__,
        ignore_unexpected=cls.IGNORE_UNEXPECTED)

  def save_pretrained(self, folder: str | os.PathLike) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` that transformers loads."""
    return checkpoint.save_pretrained(self, folder, self.config.to_dict(),
                                      checkpoint.TRANSFORMERS_WEIGHTS)


class ViTModel(VisionTransformer):
  """transformers ``ViTModel`` without the pooler, on NHWC pixel values.

  Calling it returns the last hidden state after the final LayerNorm,
  ``(batch, 1 + patches, hidden)``; the DINO embedding is ``[:, 0]``. Inputs
  of another size than ``config.image_size`` get interpolated position
  embeddings (transformers' ``interpolate_pos_encoding=True``).
  """

  CONFIG_CLS = ViTConfig
  EMBEDDINGS_CLS = ViTEmbeddings
  LAYER_CLS = ViTLayer
  PRESET = presets.DINO_VIT
  IGNORE_UNEXPECTED = (r"^pooler\.",)
