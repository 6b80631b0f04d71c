"""The SD 1.x/2.x and SDXL U-Net: a port of diffusers' ``UNet2DConditionModel``.

Tensors are NHWC: ``unet(latents_bhwc, timesteps_b, text_btd)`` returns the
noise (or v) prediction as ``(b, h, w, out_channels)``; an SDXL U-Net also
takes its added conditioning, ``text_embeds=`` (the pooled text embedding) and
``time_ids=`` (original size, crop top-left, target size). Parameter paths are
diffusers' state-dict keys (see ``checkpoint``), so diffusers checkpoints load
and ``save_pretrained`` output loads back in diffusers.

The config covers every SD 1.x/2.x and SDXL checkpoint: per-block or shared
``attention_head_dim`` (which diffusers, for historical reasons, uses as the
number of heads), Linear or 1x1-conv transformer projections, 768/1024/2048-
wide text, ``upcast_attention``, per-block transformer depths, any number of
``CrossAttn``/plain down and up blocks, and SDXL's ``text_time`` added
embedding. Fields for other U-Nets (class labels, other added embeddings,
per-layer transformer depths, ...) are rejected with a ``UserError`` when set
to anything but their default.
"""

import dataclasses
import functools
import math
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from personalize_jax.errors import UserError
from personalize_jax.models import checkpoint, layers, presets
from personalize_jax.models import unet_blocks as blocks

Dtype = Any

_DOWN_BLOCKS = {"CrossAttnDownBlock2D": blocks.CrossAttnDownBlock2D,
                "DownBlock2D": blocks.DownBlock2D}
_UP_BLOCKS = {"CrossAttnUpBlock2D": blocks.CrossAttnUpBlock2D,
              "UpBlock2D": blocks.UpBlock2D}
_MID_BLOCKS = ("UNetMidBlock2DCrossAttn", None)

# diffusers config fields this port does not implement, with the only value it
# accepts (diffusers' default). ``num_attention_heads`` must stay None:
# diffusers itself refuses it and reads ``attention_head_dim`` as the head
# count.
_UNSUPPORTED = {
    "num_attention_heads": None, "only_cross_attention": False,
    "mid_block_only_cross_attention": None, "dual_cross_attention": False,
    "class_embed_type": None, "num_class_embeds": None,
    "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "class_embeddings_concat": False, "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None,
    "time_cond_proj_dim": None, "attention_type": "default",
    "cross_attention_norm": None, "reverse_transformer_layers_per_block": None,
    "dropout": 0.0,
}
# addition_embed_type values this port implements: none (SD 1.x/2.x) and SDXL's.
_ADDITION_EMBED_TYPES = (None, "text_time")


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig:
  """A U-Net's ``config.json``: diffusers' names and defaults."""

  sample_size: int | None = None  # Latent side length (metadata only).
  in_channels: int = 4  # Latent channels in.
  out_channels: int = 4  # Prediction channels out.
  center_input_sample: bool = False  # Map the input x to 2x - 1 first.
  flip_sin_to_cos: bool = True  # Time embedding order: cos, sin (True).
  freq_shift: int = 0  # Time embedding frequency denominator shift.
  down_block_types: tuple[str, ...] = (
      "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
      "DownBlock2D")  # One per resolution, highest first.
  mid_block_type: str | None = "UNetMidBlock2DCrossAttn"  # Or None: no middle.
  up_block_types: tuple[str, ...] = (
      "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
      "CrossAttnUpBlock2D")  # One per resolution, lowest first.
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # Widths.
  layers_per_block: int | tuple[int, ...] = 2  # Resnets per down block.
  downsample_padding: int = 1  # Downsampler conv padding (0: bottom/right).
  mid_block_scale_factor: float = 1.0  # Divides the mid resnets' output.
  act_fn: str = "silu"  # Only silu (a.k.a. swish).
  norm_num_groups: int = 32  # GroupNorm groups everywhere.
  norm_eps: float = 1e-5  # GroupNorm epsilon of resnets and the output norm.
  cross_attention_dim: int | tuple[int, ...] = 1280  # Text width (768, 1024).
  transformer_layers_per_block: int | tuple[int, ...] = 1  # Per transformer.
  attention_head_dim: int | tuple[int, ...] = 8  # Heads (sic), per block.
  use_linear_projection: bool = False  # Linear (SD 2.x) / 1x1 conv proj_in.
  upcast_attention: bool = False  # float32 attention logits (SD 2.1 768).
  conv_in_kernel: int = 3  # Kernel of conv_in.
  conv_out_kernel: int = 3  # Kernel of conv_out.
  addition_embed_type: str | None = None  # "text_time": SDXL's added embedding.
  addition_time_embed_dim: int | None = None  # Sinusoid width per time id.
  projection_class_embeddings_input_dim: int | None = None  # Pooled + time ids.

  @classmethod
  def from_dict(cls, config: Mapping[str, Any]) -> "UNet2DConditionConfig":
    """Reads a diffusers ``config.json`` dict; unknown keys are ignored.

    Raises:
      UserError: a field this port does not implement is set, or the block
        lists do not fit together (one line naming the field).
    """
    for key, default in _UNSUPPORTED.items():
      value = config.get(key, default)
      if isinstance(value, (list, tuple)) and not any(value):
        value = default  # e.g. only_cross_attention: [false, false, ...]
      if value != default:
        raise UserError(
            f"UNet config field {key}={value!r} is not supported (only SD 1.x/"
            f"2.x and SDXL U-Nets are); expected {default!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: tuple(v) if isinstance(v, list) else v
              for k, v in config.items() if k in names}
    if kwargs.get("upcast_attention", False) is None:
      kwargs["upcast_attention"] = False  # SDXL writes null: diffusers' False.
    out = cls(**kwargs)
    out.validate()
    return out

  def to_dict(self) -> dict:
    """A ``config.json`` dict diffusers' ``UNet2DConditionModel`` loads."""
    out = {"_class_name": "UNet2DConditionModel"}
    for key, value in dataclasses.asdict(self).items():
      out[key] = list(value) if isinstance(value, tuple) else value
    return out

  def per_block(self, name: str) -> tuple:
    """Field ``name`` as one value per down block (ints are repeated)."""
    value = getattr(self, name)
    if isinstance(value, int):
      return (value,) * len(self.down_block_types)
    return tuple(value)

  def validate(self) -> None:
    """Raises ``UserError`` naming the first inconsistent field."""
    n = len(self.down_block_types)
    if len(self.up_block_types) != n or len(self.block_out_channels) != n:
      raise UserError(
          f"UNet config: down_block_types ({n}), up_block_types "
          f"({len(self.up_block_types)}) and block_out_channels "
          f"({len(self.block_out_channels)}) must have the same length")
    for name in ("layers_per_block", "cross_attention_dim",
                 "transformer_layers_per_block", "attention_head_dim"):
      value = getattr(self, name)
      values = (value,) if isinstance(value, int) else value
      if (not isinstance(values, tuple) or not values
          or not all(isinstance(v, int) for v in values)
          or len(self.per_block(name)) != n):
        raise UserError(f"UNet config: {name} must be an integer or one "
                        f"integer per down block ({n}), got {value!r}")
    for types, known in ((self.down_block_types, _DOWN_BLOCKS),
                         (self.up_block_types, _UP_BLOCKS),
                         ((self.mid_block_type,), _MID_BLOCKS)):
      for block_type in types:
        if block_type not in known:
          raise UserError(f"UNet config: block type {block_type!r} is not "
                          f"supported; use one of {sorted(map(str, known))}")
    if self.act_fn not in ("silu", "swish"):
      raise UserError(f"UNet config: act_fn={self.act_fn!r} is not supported; "
                      "SD U-Nets use 'silu'")
    if not isinstance(self.norm_num_groups, int):
      raise UserError("UNet config: norm_num_groups must be an integer, got "
                      f"{self.norm_num_groups!r}")
    if self.addition_embed_type not in _ADDITION_EMBED_TYPES:
      raise UserError(
          f"UNet config field addition_embed_type={self.addition_embed_type!r}"
          f" is not supported; expected one of {_ADDITION_EMBED_TYPES}")
    if self.addition_embed_type == "text_time" and not all(
        isinstance(v, int) and v > 0 for v in (
            self.addition_time_embed_dim,
            self.projection_class_embeddings_input_dim)):
      raise UserError(
          "UNet config: addition_embed_type='text_time' needs positive integer "
          "addition_time_embed_dim and projection_class_embeddings_input_dim "
          f"(SDXL: 256 and 2816), got {self.addition_time_embed_dim!r} and "
          f"{self.projection_class_embeddings_input_dim!r}")


def timestep_embedding(timesteps_b: jax.Array, dim: int, *,
                       flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
  """The sinusoidal timestep features of DDPM, as diffusers computes them.

  Args:
    timesteps_b: ``(b,)`` timesteps, int or float.
    dim: feature width.
    flip_sin_to_cos: put the cosines first.
    freq_shift: subtracted from ``dim // 2`` in the frequency denominator.
    max_period: the lowest frequency's period.

  Returns:
    ``(b, dim)`` float32 features.
  """
  half = dim // 2
  exponent = (-math.log(max_period) * jnp.arange(half, dtype=jnp.float32)
              / (half - freq_shift))
  angles = timesteps_b.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nnx.Module):
  """Linear -> SiLU -> Linear on the sinusoidal features."""

  def __init__(self, in_channels: int, time_embed_dim: int, *, dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    self.linear_1 = layers.linear(in_channels, time_embed_dim, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    self.linear_2 = layers.linear(time_embed_dim, time_embed_dim,
                                  axes=("mlp", "embed"), dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_bd: jax.Array) -> jax.Array:
    return self.linear_2(nnx.silu(self.linear_1(x_bd)))


class UNet2DConditionModel(nnx.Module):
  """The text-conditioned denoising U-Net of Stable Diffusion (NHWC).

  ``remat=True`` rematerialises every ``ResnetBlock2D`` and every
  ``BasicTransformerBlock`` in the backward pass (see ``unet_blocks``).
  The constructor initialises eagerly (one XLA kernel per parameter shape,
  slow); ``from_pretrained`` never does.
  """

  def __init__(self, config: UNet2DConditionConfig, *,
               dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
               attention_impl: str = "xla", remat: bool = False,
               rngs: nnx.Rngs):
    """Builds the model with random parameters.

    Args:
      config: the architecture.
      dtype: compute dtype (activations, matmuls); the output has this dtype.
      param_dtype: storage dtype of the parameters.
      attention_impl: see ``attention.IMPLEMENTATIONS``.
      remat: rematerialise resnets and transformer blocks (saves memory).
      rngs: initialisation randomness.
    """
    config.validate()
    self.config = config
    self.dtype = dtype
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    channels = config.block_out_channels
    n = len(channels)
    heads = config.per_block("attention_head_dim")
    layers_per_block = config.per_block("layers_per_block")
    cross_dim = config.per_block("cross_attention_dim")
    transformer_layers = config.per_block("transformer_layers_per_block")
    time_embed_dim = 4 * channels[0]

    def args(i):
      return blocks.BlockArgs(
          temb_channels=time_embed_dim, eps=config.norm_eps,
          groups=config.norm_num_groups, cross_attention_dim=cross_dim[i],
          heads=heads[i], transformer_layers=transformer_layers[i],
          use_linear_projection=config.use_linear_projection,
          upcast_attention=config.upcast_attention,
          attention_impl=attention_impl, remat=remat, **kw)

    self.conv_in = layers.conv(config.in_channels, channels[0],
                               config.conv_in_kernel, **kw)
    self.time_embedding = TimestepEmbedding(channels[0], time_embed_dim, **kw)
    # SDXL: pooled text + sinusoids of the time ids, added to the time
    # embedding (diffusers' ``add_time_proj`` has no parameters).
    self.add_embedding = (
        TimestepEmbedding(config.projection_class_embeddings_input_dim,
                          time_embed_dim, **kw)
        if config.addition_embed_type == "text_time" else None)

    down = []
    for i, block_type in enumerate(config.down_block_types):
      down.append(_DOWN_BLOCKS[block_type](
          channels[max(i - 1, 0)], channels[i], num_layers=layers_per_block[i],
          add_downsample=i < n - 1,
          downsample_padding=config.downsample_padding, args=args(i)))
    self.down_blocks = nnx.List(down)

    self.mid_block = (blocks.UNetMidBlock2DCrossAttn(
        channels[-1], output_scale_factor=config.mid_block_scale_factor,
        args=args(n - 1)) if config.mid_block_type is not None else None)

    # Up blocks run from the lowest resolution up, with the per-block lists
    # reversed; each has one more resnet than its down block (it also eats the
    # downsampler's skip).
    up = []
    for i, block_type in enumerate(config.up_block_types):
      j = n - 1 - i
      up.append(_UP_BLOCKS[block_type](
          channels[max(j - 1, 0)], channels[min(j + 1, n - 1)], channels[j],
          num_layers=layers_per_block[j] + 1, add_upsample=i < n - 1,
          args=args(j)))
    self.up_blocks = nnx.List(up)

    self.conv_norm_out = layers.group_norm(channels[0], config.norm_num_groups,
                                           epsilon=config.norm_eps, **kw)
    self.conv_out = layers.conv(channels[0], config.out_channels,
                                config.conv_out_kernel, **kw)

  def __call__(self, sample_bhwc: jax.Array, timesteps_b: jax.Array | float,
               encoder_hidden_states_btd: jax.Array, *,
               text_embeds: jax.Array | None = None,
               time_ids: jax.Array | None = None) -> jax.Array:
    """Predicts the noise (or v) for noisy latents.

    Args:
      sample_bhwc: noisy latents ``(b, h, w, in_channels)``; any ``h, w``
        (sizes not divisible by the total downsampling are handled as in
        diffusers).
      timesteps_b: a scalar or ``(b,)`` timesteps, int or float.
      encoder_hidden_states_btd: text features ``(b, t, cross_attention_dim)``.
      text_embeds: SDXL only (``addition_embed_type="text_time"``): the pooled
        (projected) text embedding ``(b, d)``.
      time_ids: SDXL only: ``(b, 6)`` (or one row for all) original height and
        width, crop top and left, target height and width, in pixels.

    Returns:
      ``(b, h, w, out_channels)`` in the compute dtype.

    Raises:
      ValueError: ``text_embeds``/``time_ids`` missing for an SDXL U-Net,
        given to one without an added embedding, or of the wrong width.
    """
    config = self.config
    x = sample_bhwc.astype(self.dtype)
    if config.center_input_sample:
      x = 2 * x - 1.0
    context = encoder_hidden_states_btd.astype(self.dtype)
    timesteps_b = jnp.broadcast_to(jnp.asarray(timesteps_b), x.shape[:1])
    t_emb = timestep_embedding(
        timesteps_b, config.block_out_channels[0],
        flip_sin_to_cos=config.flip_sin_to_cos, freq_shift=config.freq_shift)
    temb = self.time_embedding(t_emb.astype(self.dtype))
    if self.add_embedding is not None:
      temb = temb + self.add_embedding(
          self._added_features(text_embeds, time_ids).astype(self.dtype))
    elif text_embeds is not None or time_ids is not None:
      raise ValueError("text_embeds/time_ids were given, but this U-Net has no "
                       "added embedding (its addition_embed_type is None)")

    # Activations stay split by batch under a sharded step (no-ops otherwise).
    x = layers.constrain_batch(self.conv_in(x))
    skips = [x]
    for block in self.down_blocks:
      x, block_skips = block(x, temb, context)
      x = layers.constrain_batch(x)
      skips.extend(block_skips)

    if self.mid_block is not None:
      x = layers.constrain_batch(self.mid_block(x, temb, context))

    for block in self.up_blocks:
      num = len(block.resnets)
      block_skips, skips = skips[-num:], skips[:-num]
      # Upsample to the next skip's size: 2x, or the odd size it came from.
      size = tuple(skips[-1].shape[1:3]) if skips else None
      x = layers.constrain_batch(block(x, block_skips, temb, context, size))

    x = nnx.silu(self.conv_norm_out(x))
    return self.conv_out(x)

  def _added_features(self, text_embeds_bd: jax.Array | None,
                      time_ids_bk: jax.Array | None) -> jax.Array:
    """``[pooled text, sinusoids of each time id]``: ``add_embedding``'s input.

    The time ids use the time embedding's ``flip_sin_to_cos``/``freq_shift``,
    as diffusers' ``add_time_proj`` does.
    """
    config = self.config
    if text_embeds_bd is None or time_ids_bk is None:
      raise ValueError(
          "this SDXL U-Net (addition_embed_type='text_time') needs "
          "text_embeds=(b, d) pooled text embeddings and time_ids=(b, 6) "
          "(original size, crop top-left, target size)")
    text_embeds_bd = jnp.asarray(text_embeds_bd, jnp.float32)
    b = text_embeds_bd.shape[0]
    time_ids_bk = jnp.asarray(time_ids_bk)
    time_ids_bk = jnp.broadcast_to(time_ids_bk, (b, time_ids_bk.shape[-1]))
    width = config.addition_time_embed_dim
    time_features = timestep_embedding(
        time_ids_bk.reshape(-1), width, flip_sin_to_cos=config.flip_sin_to_cos,
        freq_shift=config.freq_shift).reshape(b, -1)
    features = jnp.concatenate([text_embeds_bd, time_features], axis=-1)
    if features.shape[-1] != config.projection_class_embeddings_input_dim:
      raise ValueError(
          f"text_embeds ({text_embeds_bd.shape[-1]} wide) and "
          f"{time_ids_bk.shape[-1]} time ids x {width} make "
          f"{features.shape[-1]} features, but this U-Net's "
          "projection_class_embeddings_input_dim is "
          f"{config.projection_class_embeddings_input_dim}")
    return features

  @classmethod
  def from_pretrained(cls, path_or_hub_id: str | os.PathLike,
                      subfolder: str | None = None, *,
                      dtype: Dtype = jnp.float32,
                      param_dtype: Dtype = jnp.float32,
                      attention_impl: str = "xla", remat: bool = False,
                      seed: int = 0) -> "UNet2DConditionModel":
    """Loads a diffusers U-Net folder or Hub id, or builds ``"tiny"``.

    Args:
      path_or_hub_id: a local diffusers folder, a Hub id such as
        ``CompVis/stable-diffusion-v1-4`` (with ``subfolder="unet"``), or
        ``"tiny"``: ``presets.UNET`` with random weights from ``seed``.
      subfolder: the U-Net's folder inside the checkpoint (``unet``).
      dtype: compute dtype.
      param_dtype: storage dtype of the parameters.
      attention_impl: see ``attention.IMPLEMENTATIONS``.
      remat: rematerialise blocks in the backward pass.
      seed: initialisation seed of ``"tiny"``.

    Raises:
      CheckpointError: missing files, or weights that do not match the config.
      UserError: a config this port does not support.
    """
    return checkpoint.load_pretrained(
        path_or_hub_id, subfolder, read_config=UNet2DConditionConfig.from_dict,
        build=functools.partial(cls, dtype=dtype, param_dtype=param_dtype,
                                attention_impl=attention_impl, remat=remat),
        preset=presets.UNET, weights_name=checkpoint.DIFFUSERS_WEIGHTS,
        param_dtype=param_dtype, seed=seed)

  def save_pretrained(self, folder: str | os.PathLike) -> Path:
    """Writes ``config.json`` + fp32 safetensors that diffusers loads."""
    return checkpoint.save_pretrained(self, folder, self.config.to_dict(),
                                      checkpoint.DIFFUSERS_WEIGHTS)
