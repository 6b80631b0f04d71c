"""ALIGN (transformers' ``AlignModel``, ``kakaobrain/align-base``), NHWC.

Two towers and a projection, as in transformers 5:

  text    BERT (post-norm encoder, absolute and token-type embeddings, a
          padding mask); the text features are ``text_projection`` of the
          last hidden state at ``[CLS]`` (not BERT's tanh pooler, whose
          weights are kept so checkpoints round-trip).
  image   EfficientNet without its classification top: a stride-2 stem,
          MBConv blocks (1x1 expansion, depthwise conv, squeeze-excite, 1x1
          projection), BatchNorm with running statistics. The image features
          are the last block's output averaged over space (transformers'
          ``AvgPool2d(hidden_dim, ceil_mode=True)``, a global mean whenever the
          map is no larger than ``hidden_dim``): no projection, so its width,
          ``round_filters(out_channels[-1])``, is ``projection_dim``.

``get_image_features`` / ``get_text_features`` return transformers 5.23's
``pooler_output`` of the same methods: unnormalised. ``__call__`` gives
``logits_per_image``: cosine similarities divided by ``temperature``.

Attribute names are the state-dict keys, so ``model.safetensors`` loads as
is. BatchNorm's running statistics are ``nnx.BatchStat`` variables under
PyTorch's buffer names (``running_mean``, ``running_var``): loaded and saved
with the weights, but not parameters (not counted, initialised or trained).

The preprocessing is ``align_processor.AlignImageProcessor`` (transformers'
``EfficientNetImageProcessor``), the tokenizer BERT's
(``align_processor.load_tokenizer``).
"""

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, ClassVar, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from personalize_jax.errors import UserError
from personalize_jax.models import (align_processor, attention, checkpoint,
                                    layers, presets, vit)

# What a checkpoint holds: the weights and BatchNorm's running statistics.
_VARIABLES = (nnx.Param, nnx.BatchStat)
# Buffers the port has no variable for: BatchNorm's batch counter, BERT's
# non-persistent index buffers.
_BUFFER_KEYS = (r"\.num_batches_tracked$", r"(^|\.)position_ids$",
                r"(^|\.)token_type_ids$")


@dataclasses.dataclass(frozen=True)
class AlignTextConfig(vit.ConfigMixin):
  """transformers' ``AlignTextConfig`` (BERT-base), its fields and defaults."""

  MODEL_TYPE = "align_text_model"
  ARCHITECTURE = "AlignTextModel"
  qkv_bias: ClassVar[bool] = True  # BERT's query/key/value have biases

  vocab_size: int = 30522  # token table rows (bert-base-uncased)
  hidden_size: int = 768  # token width
  num_hidden_layers: int = 12  # encoder layers
  num_attention_heads: int = 12  # heads per layer
  intermediate_size: int = 3072  # MLP width
  hidden_act: str = "gelu"  # MLP activation (exact erf GELU)
  hidden_dropout_prob: float = 0.1  # unused: inference/reward only
  attention_probs_dropout_prob: float = 0.1  # unused, kept for round trips
  max_position_embeddings: int = 512  # absolute positions
  type_vocab_size: int = 2  # token-type (segment) embeddings
  initializer_range: float = 0.02  # std of the random init
  layer_norm_eps: float = 1e-12  # LayerNorm epsilon
  pad_token_id: int | None = 0  # padding id (only the init uses it)

  def __post_init__(self):
    vit.activation(self.hidden_act)
    if self.hidden_size % self.num_attention_heads:
      raise UserError(
          f"ALIGN text config: hidden_size {self.hidden_size} is not a "
          f"multiple of num_attention_heads {self.num_attention_heads}")


_STAGE_FIELDS = ("kernel_sizes", "in_channels", "out_channels", "strides",
                 "num_block_repeats", "expand_ratios")


@dataclasses.dataclass(frozen=True)
class AlignVisionConfig(vit.ConfigMixin):
  """transformers' ``AlignVisionConfig`` (EfficientNet), fields and defaults.

  The per-stage tuples (``kernel_sizes`` ... ``expand_ratios``) describe the
  EfficientNet-B0 stages; ``width_coefficient`` and ``depth_coefficient``
  scale their channels and repeats (``round_filters``, ``round_repeats``).
  """

  MODEL_TYPE = "align_vision_model"
  ARCHITECTURE = "AlignVisionModel"

  num_channels: int = 3  # input channels
  image_size: int | tuple[int, ...] = 600  # unused by the model (any size runs)
  width_coefficient: float = 2.0  # channel multiplier
  depth_coefficient: float = 3.1  # repeat multiplier
  depth_divisor: int = 8  # channels are rounded to multiples of this
  kernel_sizes: tuple[int, ...] = (3, 3, 5, 3, 5, 5, 3)  # depthwise kernels
  in_channels: tuple[int, ...] = (32, 16, 24, 40, 80, 112, 192)  # unscaled
  out_channels: tuple[int, ...] = (16, 24, 40, 80, 112, 192, 320)  # unscaled
  depthwise_padding: tuple[int, ...] = ()  # blocks padded evenly at stride 2
  strides: tuple[int, ...] = (1, 2, 2, 2, 1, 2, 1)  # first block of a stage
  num_block_repeats: tuple[int, ...] = (1, 2, 2, 3, 3, 4, 1)  # unscaled
  expand_ratios: tuple[int, ...] = (1, 6, 6, 6, 6, 6, 6)  # MBConv expansion
  squeeze_expansion_ratio: float = 0.25  # squeeze-excite width / block input
  hidden_act: str = "swish"  # activation everywhere but the SE gate
  hidden_dim: int = 2560  # the pooling window (a global pool when larger)
  pooling_type: str = "mean"  # "mean" or "max"
  initializer_range: float = 0.02  # std of the random init
  batch_norm_eps: float = 1e-3  # BatchNorm epsilon
  batch_norm_momentum: float = 0.99  # unused: statistics are frozen
  drop_connect_rate: float = 0.2  # unused: stochastic depth is training-only

  def __post_init__(self):
    vit.activation(self.hidden_act)
    lengths = {name: len(getattr(self, name)) for name in _STAGE_FIELDS}
    if len(set(lengths.values())) != 1:
      raise UserError(f"ALIGN vision config: the per-stage lists differ in "
                      f"length ({lengths}); give one entry per stage")
    if not set(self.strides) <= {1, 2}:
      raise UserError(f"ALIGN vision config: strides {self.strides} must be "
                      "1 or 2 (as in transformers)")
    if self.pooling_type not in ("mean", "max"):
      raise UserError(f"ALIGN vision config: pooling_type "
                      f"{self.pooling_type!r} is not 'mean' or 'max'")


@dataclasses.dataclass(frozen=True)
class AlignConfig:
  """transformers' ``AlignConfig``: both towers, projection, temperature."""

  MODEL_TYPE: ClassVar[str] = "align"

  text_config: AlignTextConfig = AlignTextConfig()
  vision_config: AlignVisionConfig = AlignVisionConfig()
  projection_dim: int = 640  # text projection width = image feature width
  temperature_init_value: float = 1.0  # initial temperature (random init)
  initializer_range: float = 0.02  # std of the random init

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "AlignConfig":
    """Reads an ALIGN ``config.json`` dict; unknown keys are ignored.

    Raises:
      UserError: a tower configuration the port does not support.
    """
    rest = {f.name: values[f.name] for f in dataclasses.fields(cls)
            if f.name in values and not f.name.endswith("_config")}
    return cls(
        text_config=AlignTextConfig.from_dict(values.get("text_config") or {}),
        vision_config=AlignVisionConfig.from_dict(
            values.get("vision_config") or {}), **rest)

  def to_dict(self) -> dict:
    """A ``config.json`` transformers loads."""
    tower = lambda c: {k: v for k, v in c.to_dict().items()
                       if k != "architectures"}
    return {"model_type": self.MODEL_TYPE, "architectures": ["AlignModel"],
            "text_config": tower(self.text_config),
            "vision_config": tower(self.vision_config),
            "projection_dim": self.projection_dim,
            "temperature_init_value": self.temperature_init_value,
            "initializer_range": self.initializer_range}


# ---------------------------------------------------------------- image tower


def round_filters(config: AlignVisionConfig, num_channels: int) -> int:
  """A stage's channels scaled by ``width_coefficient``, as transformers does.

  Rounded to the nearest multiple of ``depth_divisor`` (at least one), one
  multiple up when rounding lost more than 10%.
  """
  divisor = config.depth_divisor
  scaled = num_channels * config.width_coefficient
  rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * scaled:
    rounded += divisor
  return int(rounded)


def round_repeats(config: AlignVisionConfig, repeats: int) -> int:
  """A stage's block count scaled by ``depth_coefficient`` (rounded up)."""
  return int(math.ceil(config.depth_coefficient * repeats))


class BlockSpec(NamedTuple):
  """The geometry of one MBConv block (``encoder.blocks.N``)."""
  in_dim: int
  out_dim: int
  stride: int
  kernel_size: int
  expand_ratio: int
  residual: bool  # stride 1 and not the first block of its stage
  adjust_padding: bool  # at stride 2: pad one less on the top and left


def block_specs(config: AlignVisionConfig) -> list[BlockSpec]:
  """Every block of the encoder, in order."""
  specs = []
  for stage in range(len(config.in_channels)):
    out_dim = round_filters(config, config.out_channels[stage])
    for j in range(round_repeats(config, config.num_block_repeats[stage])):
      specs.append(BlockSpec(
          in_dim=(out_dim if j else
                  round_filters(config, config.in_channels[stage])),
          out_dim=out_dim, stride=1 if j else config.strides[stage],
          kernel_size=config.kernel_sizes[stage],
          expand_ratio=config.expand_ratios[stage], residual=j > 0,
          adjust_padding=len(specs) not in config.depthwise_padding))
  return specs


class BatchNorm(nnx.Module):
  """PyTorch's ``BatchNorm2d`` in inference mode (running statistics), NHWC."""

  def __init__(self, num_features: int, *, epsilon: float, dtype, param_dtype,
               rngs: nnx.Rngs):
    self.epsilon = epsilon
    self.dtype = dtype
    self.scale = layers.param(rngs, (num_features,), ("norm",),
                              init=nnx.initializers.ones,
                              param_dtype=param_dtype)
    self.bias = layers.param(rngs, (num_features,), ("norm",),
                             init=nnx.initializers.zeros,
                             param_dtype=param_dtype)
    self.running_mean = layers.batch_stat(
        jnp.zeros((num_features,), jnp.float32))
    self.running_var = layers.batch_stat(jnp.ones((num_features,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    inv_std = jax.lax.rsqrt(self.running_var[...] + self.epsilon)
    out = ((x.astype(jnp.float32) - self.running_mean[...]) * inv_std
           * self.scale[...].astype(jnp.float32) + self.bias[...])
    return out.astype(self.dtype)


def _conv1x1(in_dim: int, out_dim: int, *, use_bias: bool, **kw) -> nnx.Conv:
  return layers.conv(in_dim, out_dim, 1, padding=0, use_bias=use_bias, **kw)


class AlignVisionEmbeddings(nnx.Module):
  """The stem: pad right/bottom by one, 3x3 conv at stride 2, BN, act."""

  def __init__(self, config: AlignVisionConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    out_dim = round_filters(config, 32)
    self.dtype = dtype
    self.num_channels = config.num_channels
    self.act = vit.activation(config.hidden_act)
    self.convolution = layers.conv(config.num_channels, out_dim, 3, stride=2,
                                   padding=((0, 1), (0, 1)), use_bias=False,
                                   **kw)
    self.batchnorm = BatchNorm(out_dim, epsilon=config.batch_norm_eps, **kw)

  def __call__(self, pixel_values_bhwc: jax.Array) -> jax.Array:
    if pixel_values_bhwc.shape[-1] != self.num_channels:
      raise ValueError(f"expected {self.num_channels} channels (NHWC), got "
                       f"pixel values of shape {pixel_values_bhwc.shape}")
    x = self.convolution(pixel_values_bhwc.astype(self.dtype))
    return self.act(self.batchnorm(x))


class AlignVisionExpansionLayer(nnx.Module):
  """``expansion``: 1x1 conv to ``expand_ratio`` times the width, BN, act."""

  def __init__(self, config, in_dim: int, out_dim: int, **kw):
    self.act = vit.activation(config.hidden_act)
    self.expand_conv = _conv1x1(in_dim, out_dim, use_bias=False, **kw)
    self.expand_bn = BatchNorm(out_dim, epsilon=config.batch_norm_eps, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.act(self.expand_bn(self.expand_conv(x)))


def _depthwise_padding(spec: BlockSpec) -> tuple[tuple[int, int], ...]:
  """transformers' padding of a depthwise conv, per spatial axis.

  At stride 2 it zero-pads ``(k//2 - 1, k//2)`` (``adjust_padding``) or
  ``(k//2, k//2)``, then convolves without padding; at stride 1 PyTorch's
  ``padding="same"`` puts the odd pixel of ``k - 1`` after.
  """
  k = spec.kernel_size
  if spec.stride == 2:
    pad = (k // 2 - 1, k // 2) if spec.adjust_padding else (k // 2, k // 2)
  else:
    pad = ((k - 1) // 2, k - 1 - (k - 1) // 2)
  return (pad, pad)


class AlignVisionDepthwiseLayer(nnx.Module):
  """``depthwise_conv``: a per-channel k x k conv, BN, act."""

  def __init__(self, config, dim: int, spec: BlockSpec, *, dtype, param_dtype,
               rngs):
    self.act = vit.activation(config.hidden_act)
    self.depthwise_conv = layers.conv(
        dim, dim, spec.kernel_size, stride=spec.stride,
        padding=_depthwise_padding(spec), feature_group_count=dim,
        use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.depthwise_norm = BatchNorm(dim, epsilon=config.batch_norm_eps,
                                    dtype=dtype, param_dtype=param_dtype,
                                    rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.act(self.depthwise_norm(self.depthwise_conv(x)))


class AlignVisionSqueezeExciteLayer(nnx.Module):
  """``squeeze_excite``: channel gates from the spatial mean."""

  def __init__(self, config, dim: int, dim_se: int, **kw):
    self.act = vit.activation(config.hidden_act)
    self.reduce = _conv1x1(dim, dim_se, use_bias=True, **kw)
    self.expand = _conv1x1(dim_se, dim, use_bias=True, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    squeezed = jnp.mean(x, axis=(1, 2), keepdims=True)
    gate = jax.nn.sigmoid(self.expand(self.act(self.reduce(squeezed))))
    return x * gate


class AlignVisionFinalBlockLayer(nnx.Module):
  """``projection``: 1x1 conv back to ``out_dim``, BN, the residual."""

  def __init__(self, config, in_dim: int, spec: BlockSpec, **kw):
    self.residual = spec.residual
    self.project_conv = _conv1x1(in_dim, spec.out_dim, use_bias=False, **kw)
    self.project_bn = BatchNorm(spec.out_dim, epsilon=config.batch_norm_eps,
                                **kw)

  def __call__(self, block_input: jax.Array, x: jax.Array) -> jax.Array:
    x = self.project_bn(self.project_conv(x))
    return x + block_input if self.residual else x


class AlignVisionBlock(nnx.Module):
  """One MBConv block (``encoder.blocks.N``)."""

  def __init__(self, config: AlignVisionConfig, spec: BlockSpec, **kw):
    dim = spec.in_dim * spec.expand_ratio
    self.expansion = (AlignVisionExpansionLayer(config, spec.in_dim, dim, **kw)
                      if spec.expand_ratio != 1 else None)
    self.depthwise_conv = AlignVisionDepthwiseLayer(config, dim, spec, **kw)
    dim_se = max(1, int(spec.in_dim * config.squeeze_expansion_ratio))
    self.squeeze_excite = AlignVisionSqueezeExciteLayer(config, dim, dim_se,
                                                        **kw)
    self.projection = AlignVisionFinalBlockLayer(config, dim, spec, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x if self.expansion is None else self.expansion(x)
    h = self.squeeze_excite(self.depthwise_conv(h))
    return self.projection(x, h)


class AlignVisionEncoder(nnx.Module):
  """``encoder``: the blocks under ``blocks``."""

  def __init__(self, config: AlignVisionConfig, **kw):
    self.blocks = nnx.List([AlignVisionBlock(config, spec, **kw)
                            for spec in block_specs(config)])

  def __call__(self, x: jax.Array) -> jax.Array:
    for block in self.blocks:
      x = block(x)
    return x


class AlignVisionModel(nnx.Module):
  """transformers' ``AlignVisionModel``: the EfficientNet image tower."""

  def __init__(self, config: AlignVisionConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.pooling_type = config.pooling_type
    self.hidden_dim = config.hidden_dim
    self.embeddings = AlignVisionEmbeddings(config, **kw)
    self.encoder = AlignVisionEncoder(config, **kw)

  def __call__(self, pixel_values_bhwc: jax.Array
               ) -> tuple[jax.Array, jax.Array]:
    """``(last_hidden_state_bhwc, pooled_bc)``, pooled over space."""
    hidden = self.encoder(self.embeddings(pixel_values_bhwc))
    if max(hidden.shape[1:3]) > self.hidden_dim:
      raise ValueError(
          f"the last feature map is {hidden.shape[1]}x{hidden.shape[2]}, "
          f"larger than the pooling window hidden_dim={self.hidden_dim}: "
          "transformers cannot pool it either; use smaller images")
    pool = jnp.mean if self.pooling_type == "mean" else jnp.max
    return hidden, pool(hidden.astype(jnp.float32), axis=(1, 2))


# ----------------------------------------------------------------- text tower


class AlignTextEmbeddings(nnx.Module):
  """Word + token-type + absolute position embeddings, then LayerNorm."""

  def __init__(self, config: AlignTextConfig, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    d = config.hidden_size
    self.word_embeddings = layers.embed(config.vocab_size, d, **kw)
    self.position_embeddings = layers.embed(config.max_position_embeddings, d,
                                            **kw)
    self.token_type_embeddings = layers.embed(config.type_vocab_size, d, **kw)
    self.LayerNorm = layers.layer_norm(d, epsilon=config.layer_norm_eps, **kw)  # pylint: disable=invalid-name

  def __call__(self, input_ids_bt: jax.Array,
               token_type_ids_bt: jax.Array) -> jax.Array:
    length = input_ids_bt.shape[-1]
    table_len = self.position_embeddings.num_embeddings
    if length > table_len:
      raise ValueError(f"{length} tokens exceed the {table_len} positions of "
                       f"the ALIGN text model; tokenize with max_length="
                       f"{min(table_len, align_processor.MAX_LENGTH)}")
    x = (self.word_embeddings(input_ids_bt)
         + self.token_type_embeddings(token_type_ids_bt)
         + self.position_embeddings(jnp.arange(length)))
    return self.LayerNorm(x)


class _DenseNorm(nnx.Module):
  """BERT's ``output`` modules: ``LayerNorm(dense(x) + residual)``."""

  def __init__(self, config: AlignTextConfig, in_features: int, *, dtype,
               param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.dense = layers.linear(in_features, config.hidden_size,
                               axes=("mlp", "embed"), **kw)
    self.LayerNorm = layers.layer_norm(  # pylint: disable=invalid-name
        config.hidden_size, epsilon=config.layer_norm_eps, **kw)

  def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
    return self.LayerNorm(self.dense(x) + residual)


class AlignTextAttention(nnx.Module):
  """``attention``: ``self`` (query/key/value) and ``output``."""

  def __init__(self, config: AlignTextConfig, **kw):
    self.num_heads = config.num_attention_heads
    self.self = vit.SelfAttention(config, **kw)  # BERT's name
    self.output = _DenseNorm(config, config.hidden_size, **kw)

  def __call__(self, x_btd: jax.Array, keep_bt: jax.Array | None
               ) -> jax.Array:
    b, t, d = x_btd.shape
    qkv = self.self
    split = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    out_bthd = attention.dot_product_attention(
        split(qkv.query(x_btd)), split(qkv.key(x_btd)),
        split(qkv.value(x_btd)), key_mask_bk=keep_bt)
    return self.output(out_bthd.reshape(b, t, d), x_btd)


class AlignTextLayer(nnx.Module):
  """One post-norm BERT layer (``encoder.layer.N``)."""

  def __init__(self, config: AlignTextConfig, **kw):
    self.act = vit.activation(config.hidden_act)
    self.attention = AlignTextAttention(config, **kw)
    self.intermediate = vit.Dense(config.hidden_size, config.intermediate_size,
                                  ("embed", "mlp"), **kw)
    self.output = _DenseNorm(config, config.intermediate_size, **kw)

  def __call__(self, x_btd: jax.Array, keep_bt: jax.Array | None
               ) -> jax.Array:
    x_btd = self.attention(x_btd, keep_bt)
    return self.output(self.act(self.intermediate.dense(x_btd)), x_btd)


class AlignTextEncoder(nnx.Module):
  """``encoder``: the layers under ``layer``."""

  def __init__(self, config: AlignTextConfig, **kw):
    self.layer = nnx.List([AlignTextLayer(config, **kw)
                           for _ in range(config.num_hidden_layers)])


class AlignTextModel(nnx.Module):
  """transformers' ``AlignTextModel``: BERT with its tanh pooler."""

  def __init__(self, config: AlignTextConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embeddings = AlignTextEmbeddings(config, **kw)
    self.encoder = AlignTextEncoder(config, **kw)
    self.pooler = vit.Dense(config.hidden_size, config.hidden_size,
                            ("embed", "mlp"), **kw)

  def __call__(self, input_ids_bt: jax.Array,
               attention_mask_bt: jax.Array | None = None,
               token_type_ids_bt: jax.Array | None = None
               ) -> tuple[jax.Array, jax.Array]:
    """``(last_hidden_state_btd, pooler_output_bd)``.

    ``attention_mask_bt``: 1 for tokens, 0 for padding (keys at 0 are not
    attended to); None attends everywhere. ``token_type_ids_bt``: None is 0.
    """
    if token_type_ids_bt is None:
      token_type_ids_bt = jnp.zeros_like(input_ids_bt)
    keep = None if attention_mask_bt is None else attention_mask_bt.astype(bool)
    x_btd = self.embeddings(input_ids_bt, token_type_ids_bt)
    for layer in self.encoder.layer:
      x_btd = layer(x_btd, keep)
    return x_btd, jnp.tanh(self.pooler.dense(x_btd[:, 0]))


# ---------------------------------------------------------------- the model


class AlignModel(nnx.Module):
  """transformers' ``AlignModel``: BERT and EfficientNet towers, NHWC."""

  def __init__(self, config: AlignConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.config = config
    self.text_model = AlignTextModel(config.text_config, **kw)
    self.vision_model = AlignVisionModel(config.vision_config, **kw)
    self.text_projection = layers.linear(config.text_config.hidden_size,
                                         config.projection_dim, **kw)
    self.temperature = layers.param(
        rngs, (), (), param_dtype=param_dtype,
        init=nnx.initializers.constant(config.temperature_init_value))

  def get_image_features(self, pixel_values_bhwc: jax.Array) -> jax.Array:
    """Unnormalised image features ``(b, projection_dim)``, float32.

    transformers 5.23's ``get_image_features(...).pooler_output``: the last
    block's output averaged over space.

    Args:
      pixel_values_bhwc: ``AlignImageProcessor`` output (any size whose last
        feature map fits ``hidden_dim``; align-base: 289 px).
    """
    return self.vision_model(pixel_values_bhwc)[1]

  def get_text_features(self, input_ids_bt: jax.Array,
                        attention_mask_bt: jax.Array | None = None,
                        token_type_ids_bt: jax.Array | None = None
                        ) -> jax.Array:
    """Unnormalised text features ``(b, projection_dim)``.

    transformers 5.23's ``get_text_features(...).pooler_output``:
    ``text_projection`` of the last hidden state at ``[CLS]``.

    Args:
      input_ids_bt: token ids from ``tokenize``.
      attention_mask_bt: 1 for tokens, 0 for padding; None: no padding.
      token_type_ids_bt: segment ids; None: all 0.
    """
    hidden = self.text_model(input_ids_bt, attention_mask_bt,
                             token_type_ids_bt)[0]
    return self.text_projection(hidden[:, 0])

  def __call__(self, input_ids_bt: jax.Array, pixel_values_bhwc: jax.Array,
               attention_mask_bt: jax.Array | None = None) -> jax.Array:
    """``logits_per_image (b_images, b_texts)``: cosines / temperature."""
    image = self.get_image_features(pixel_values_bhwc)
    text = self.get_text_features(input_ids_bt, attention_mask_bt)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    return image @ text.T.astype(image.dtype) / self.temperature[...]

  @classmethod
  def from_pretrained(cls, path_or_hub_id: str | os.PathLike,
                      subfolder: str | None = None, *, dtype=jnp.float32,
                      param_dtype=jnp.float32, seed: int = 0) -> "AlignModel":
    """Loads a transformers ALIGN checkpoint; ``"tiny"``: random weights.

    Args:
      path_or_hub_id: a folder with ``config.json`` + ``model.safetensors``,
        a Hub id (``kakaobrain/align-base``), or ``"tiny"``
        (``presets.ALIGN_TINY`` with random weights from ``seed``).
      subfolder: a folder inside it.
      dtype: the compute dtype (BatchNorm and pooling run in float32).
      param_dtype: the dtype parameters are stored in (statistics: float32,
        loaded with the weights by ``checkpoint.load_params``).
      seed: the NumPy seed of ``"tiny"``.

    Raises:
      CheckpointError: the folder, config or weights cannot be loaded.
      UserError: a config the port does not support.
    """
    build = lambda config: cls(config, dtype=dtype, param_dtype=param_dtype,
                               rngs=checkpoint.shape_only_rngs())
    if str(path_or_hub_id) == presets.TINY:
      config = AlignConfig.from_dict(presets.ALIGN_TINY)
      model = checkpoint.build_random(lambda: build(config), seed, param_dtype)
      model.temperature.set_value(
          jnp.asarray(config.temperature_init_value, param_dtype))
      for path, var in checkpoint.iter_params(model, nnx.BatchStat):
        init = np.ones if str(path[-1]) == "running_var" else np.zeros
        var.set_value(jnp.asarray(init(var.get_value().shape, np.float32)))
      return model
    folder = checkpoint.resolve_pretrained(path_or_hub_id, subfolder)
    values = checkpoint.read_json(folder / "config.json")
    checkpoint.check_model_type(values, AlignConfig.MODEL_TYPE, cls.__name__,
                                folder / "config.json")
    config = AlignConfig.from_dict(values)
    tensors, source = checkpoint.read_weights(
        folder, checkpoint.TRANSFORMERS_WEIGHTS)
    return checkpoint.load_params(
        nnx.eval_shape(lambda: build(config)), tensors, source=source,
        param_dtype=param_dtype, ignore_unexpected=_BUFFER_KEYS,
        variables=_VARIABLES)

  def save_pretrained(self, folder: str | os.PathLike,
                      dtype=np.float32) -> Path:
    """Writes ``config.json`` + ``model.safetensors`` transformers loads.

    The BatchNorm statistics are saved with the weights, and each BatchNorm's
    ``num_batches_tracked`` as 0 (PyTorch reads it only when training with
    ``momentum=None``).
    """
    folder = Path(folder)
    stats = checkpoint.module_tensors(self, np.float32, nnx.BatchStat)
    tensors = {**checkpoint.module_tensors(self, dtype), **stats}
    for key in stats:
      tensors[key.rpartition(".")[0] + ".num_batches_tracked"] = np.zeros(
          (), np.int64)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint.write_safetensors(folder / checkpoint.TRANSFORMERS_WEIGHTS,
                                 tensors)
    (folder / "config.json").write_text(
        json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")
    return folder
