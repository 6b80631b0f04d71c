"""DINOv2 image encoder (transformers ``Dinov2Model``), NHWC.

Layout: ``facebook/dinov2-small`` / ``dinov2-base`` (and the SwiGLU MLP of
``dinov2-giant``). As for ViT, the module tree mirrors the published
state-dict keys, which transformers 5.x still writes on ``save_pretrained``.

DINOv2 differs from ViT by LayerScale on both residual branches, a
``mask_token`` (kept only so checkpoints round-trip; masking is a pre-training
feature), an MLP sized by ``mlp_ratio``, and position embeddings that are
always interpolated to the input's patch grid (the checkpoints are trained at
518 px and used at 224 px).
"""

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from personalize_jax.models import layers, presets, vit


@dataclasses.dataclass(frozen=True)
class Dinov2Config(vit.ConfigMixin):
  """transformers ``Dinov2Config`` (its field names and defaults)."""

  MODEL_TYPE = "dinov2"
  ARCHITECTURE = "Dinov2Model"

  hidden_size: int = 768  # token width
  num_hidden_layers: int = 12  # transformer blocks
  num_attention_heads: int = 12  # heads per block
  mlp_ratio: int = 4  # MLP width / hidden_size
  hidden_act: str = "gelu"  # MLP activation (exact erf GELU)
  hidden_dropout_prob: float = 0.0  # unused: the port is inference/reward only
  attention_probs_dropout_prob: float = 0.0  # unused, kept for round trips
  initializer_range: float = 0.02  # std of the random init of embeddings
  layer_norm_eps: float = 1e-6  # LayerNorm epsilon
  image_size: int | tuple[int, int] = 224  # resolution of the position grid
  patch_size: int | tuple[int, int] = 14  # square patch side
  num_channels: int = 3  # input channels
  qkv_bias: bool = True  # biases on query/key/value
  layerscale_value: float = 1.0  # initial LayerScale (random init only)
  drop_path_rate: float = 0.0  # unused: stochastic depth is training-only
  use_swiglu_ffn: bool = False  # SwiGLU MLP (dinov2-giant) instead of GELU MLP
  use_mask_token: bool = True  # checkpoints carry embeddings.mask_token


class Dinov2Embeddings(nnx.Module):
  """CLS token + patch tokens + position embeddings resized to the input grid."""

  def __init__(self, config: Dinov2Config, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.patch = vit.pair(config.patch_size)[0]
    size_h, size_w = vit.pair(config.image_size)
    self.grid_hw = (size_h // self.patch, size_w // self.patch)
    width = config.hidden_size
    init = nnx.initializers.normal(config.initializer_range)
    self.cls_token = layers.param(rngs, (1, 1, width), (None, None, "embed"),
                                  init=init, param_dtype=param_dtype)
    if config.use_mask_token:
      self.mask_token = layers.param(rngs, (1, width), (None, "embed"),
                                     init=nnx.initializers.zeros,
                                     param_dtype=param_dtype)
    self.position_embeddings = layers.param(
        rngs, (1, 1 + self.grid_hw[0] * self.grid_hw[1], width),
        (None, None, "embed"), init=init, param_dtype=param_dtype)
    self.patch_embeddings = vit.PatchEmbeddings(
        config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixel_values_bhwc: jax.Array) -> jax.Array:
    _, height, width, _ = pixel_values_bhwc.shape
    tokens_bnd = self.patch_embeddings(pixel_values_bhwc.astype(self.dtype))
    cls_b1d = jnp.broadcast_to(self.cls_token[...].astype(self.dtype),
                               (tokens_bnd.shape[0], 1, tokens_bnd.shape[-1]))
    tokens_bnd = jnp.concatenate([cls_b1d, tokens_bnd], axis=1)
    positions = vit.interpolate_pos_encoding(
        self.position_embeddings[...], self.grid_hw,
        (height // self.patch, width // self.patch))
    return tokens_bnd + positions.astype(self.dtype)


class LayerScale(nnx.Module):
  """Per-channel scale of a residual branch (``lambda1``)."""

  def __init__(self, config: Dinov2Config, *, param_dtype, rngs: nnx.Rngs):
    self.lambda1 = layers.param(
        rngs, (config.hidden_size,), ("norm",),
        init=nnx.initializers.constant(config.layerscale_value),
        param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.lambda1[...].astype(x.dtype)


class Mlp(nnx.Module):
  """``mlp``: fc1 -> activation -> fc2, width ``hidden_size * mlp_ratio``."""

  def __init__(self, config: Dinov2Config, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    width = int(config.hidden_size * config.mlp_ratio)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.act = vit.activation(config.hidden_act)
    self.fc1 = layers.linear(config.hidden_size, width, **kw)
    self.fc2 = layers.linear(width, config.hidden_size, axes=("mlp", "embed"),
                             **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(self.act(self.fc1(x)))


class SwiGLUFFN(nnx.Module):
  """``mlp`` of dinov2-giant: ``weights_in`` holds the gate and up halves."""

  def __init__(self, config: Dinov2Config, *, dtype, param_dtype,
               rngs: nnx.Rngs):
    # Two thirds of the MLP width, rounded up to a multiple of 8, as in DINOv2.
    width = (int(int(config.hidden_size * config.mlp_ratio) * 2 / 3) + 7) // 8 * 8
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.weights_in = layers.linear(config.hidden_size, 2 * width, **kw)
    self.weights_out = layers.linear(width, config.hidden_size,
                                     axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    gate, up = jnp.split(self.weights_in(x), 2, axis=-1)
    return self.weights_out(jax.nn.silu(gate) * up)


class Dinov2Layer(nnx.Module):
  """One pre-norm block with LayerScale (``encoder.layer.N``)."""

  def __init__(self, config: Dinov2Config, *, dtype, param_dtype,
               attention_impl: str, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    norm = lambda: layers.layer_norm(config.hidden_size,
                                     epsilon=config.layer_norm_eps, **kw)
    self.norm1 = norm()
    self.attention = vit.Attention(config, attention_impl=attention_impl, **kw)
    self.layer_scale1 = LayerScale(config, param_dtype=param_dtype, rngs=rngs)
    self.norm2 = norm()
    self.mlp = (SwiGLUFFN if config.use_swiglu_ffn else Mlp)(config, **kw)
    self.layer_scale2 = LayerScale(config, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_btd: jax.Array) -> jax.Array:
    x_btd = x_btd + self.layer_scale1(self.attention(self.norm1(x_btd)))
    return x_btd + self.layer_scale2(self.mlp(self.norm2(x_btd)))


class Dinov2Model(vit.VisionTransformer):
  """transformers ``Dinov2Model`` on NHWC pixel values.

  Calling it returns the last hidden state after the final LayerNorm,
  ``(batch, 1 + patches, hidden)``; transformers' ``pooler_output`` is its CLS
  token ``[:, 0]``. Any input size works (a multiple of the patch size is
  expected; the remainder is dropped by the patch convolution, as in torch).
  """

  CONFIG_CLS = Dinov2Config
  EMBEDDINGS_CLS = Dinov2Embeddings
  LAYER_CLS = Dinov2Layer
  PRESET = presets.DINOV2
