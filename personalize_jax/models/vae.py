"""The SD 1.x/2.x VAE: a port of diffusers' ``AutoencoderKL``, NHWC.

Attribute names mirror diffusers' module tree
(``encoder.down_blocks.0.resnets.0.norm1``,
``decoder.mid_block.attentions.0.to_q``, ...), so diffusers checkpoints load
and save through ``checkpoint`` with no key map. Older checkpoints (e.g.
the SD 1.4 Hub files) name the mid-block attention ``query``/``key``/``value``/
``proj_attn``, sometimes with 1x1-conv-shaped weights; both are mapped on load.

``encode`` returns the mean and log-variance of the latent Gaussian (what
diffusers wraps in ``DiagonalGaussianDistribution``); scaling latents by
``scaling_factor`` is left to the caller, as in diffusers.
"""

import dataclasses
import functools
import os
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from personalize_jax.errors import UserError
from personalize_jax.models import checkpoint, layers, presets
from personalize_jax.models.attention import dot_product_attention

_ACTIVATIONS = {
    "silu": jax.nn.silu, "swish": jax.nn.silu, "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
}
# diffusers builds every VAE norm with eps=1e-6 (not GroupNorm's 1e-5).
_EPS = 1e-6
_LEGACY_ATTENTION = re.compile(
    r"(\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_LEGACY_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v",
                 "proj_attn": "to_out.0"}
_ATTENTION_LINEAR = re.compile(
    r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")


def _tuple(value):
  return tuple(value) if isinstance(value, list) else value


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
  """diffusers' ``AutoencoderKL`` config (``vae/config.json``), same names."""
  in_channels: int = 3
  out_channels: int = 3
  down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
  up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
  block_out_channels: tuple[int, ...] = (64,)
  layers_per_block: int = 1
  act_fn: str = "silu"
  latent_channels: int = 4
  norm_num_groups: int = 32
  sample_size: Any = 32
  scaling_factor: float = 0.18215
  shift_factor: float | None = None
  latents_mean: tuple[float, ...] | None = None
  latents_std: tuple[float, ...] | None = None
  force_upcast: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @classmethod
  def from_dict(cls, config: dict) -> "AutoencoderKLConfig":
    """Reads ``config.json`` (unknown keys ignored, defaults filled in).

    Raises:
      UserError: a block type or activation this port does not implement, or
        channel counts that do not fit together.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    out = cls(**{k: _tuple(v) for k, v in config.items() if k in names})
    out.validate()
    return out

  def validate(self) -> None:
    """Raises UserError (one line) if this port cannot build the config."""
    bad = [t for t in self.down_block_types if t != "DownEncoderBlock2D"] + [
        t for t in self.up_block_types if t != "UpDecoderBlock2D"]
    if bad:
      raise UserError(f"VAE block type {bad[0]!r} is not supported; this port "
                      "implements DownEncoderBlock2D/UpDecoderBlock2D "
                      "(SD 1.x/2.x)")
    if self.act_fn.lower() not in _ACTIVATIONS:
      raise UserError(f"VAE act_fn {self.act_fn!r} is not one of "
                      f"{sorted(_ACTIVATIONS)}")
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise UserError(
          f"VAE config has {n} block_out_channels but "
          f"{len(self.down_block_types)} down and {len(self.up_block_types)} "
          "up block types; they must match")
    if any(c % self.norm_num_groups for c in self.block_out_channels):
      raise UserError(
          f"VAE block_out_channels {self.block_out_channels} are not all "
          f"divisible by norm_num_groups={self.norm_num_groups}")

  def to_dict(self) -> dict:
    """The ``config.json`` dict diffusers' ``AutoencoderKL`` loads."""
    out = {k: list(v) if isinstance(v, tuple) else v
           for k, v in dataclasses.asdict(self).items()}
    return {"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1",
            **out}


class _Parts:
  """Constructor arguments shared by every submodule, passed as one object."""

  def __init__(self, config, dtype, param_dtype, attention_impl, rngs):
    self.act = _ACTIVATIONS[config.act_fn.lower()]
    self.groups = config.norm_num_groups
    self.dtype, self.param_dtype = dtype, param_dtype
    self.attention_impl = attention_impl
    self.rngs = rngs

  @property
  def kw(self) -> dict:
    return dict(dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)

  def norm(self, channels: int) -> nnx.GroupNorm:
    return layers.group_norm(channels, self.groups, epsilon=_EPS, **self.kw)


class ResnetBlock2D(nnx.Module):
  """diffusers' ``ResnetBlock2D`` with no time embedding (pre-norm)."""

  def __init__(self, in_channels: int, out_channels: int, parts: _Parts):
    self.act = parts.act
    self.norm1 = parts.norm(in_channels)
    self.conv1 = layers.conv(in_channels, out_channels, 3, **parts.kw)
    self.norm2 = parts.norm(out_channels)
    self.conv2 = layers.conv(out_channels, out_channels, 3, **parts.kw)
    self.conv_shortcut = (layers.conv(in_channels, out_channels, 1, **parts.kw)
                          if in_channels != out_channels else None)

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    h = self.conv1(self.act(self.norm1(x_bhwc)))
    h = self.conv2(self.act(self.norm2(h)))
    if self.conv_shortcut is not None:
      x_bhwc = self.conv_shortcut(x_bhwc)
    return x_bhwc + h


class Attention(nnx.Module):
  """Single-head spatial self-attention with a GroupNorm and a residual."""

  def __init__(self, channels: int, parts: _Parts):
    self.impl = parts.attention_impl
    # diffusers passes attention_head_dim=channels: one head over all channels.
    self.heads = 1
    self.group_norm = parts.norm(channels)
    self.to_q = layers.linear(channels, channels, **parts.kw)
    self.to_k = layers.linear(channels, channels, **parts.kw)
    self.to_v = layers.linear(channels, channels, **parts.kw)
    self.to_out = nnx.List([layers.linear(channels, channels,
                                          axes=("mlp", "embed"), **parts.kw)])

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    b, h, w, c = x_bhwc.shape
    tokens = self.group_norm(x_bhwc).reshape(b, h * w, c)
    split = lambda t: t.reshape(b, h * w, self.heads, c // self.heads)
    out = dot_product_attention(
        split(self.to_q(tokens)), split(self.to_k(tokens)),
        split(self.to_v(tokens)), impl=self.impl, upcast=True)
    out = self.to_out[0](out.reshape(b, h * w, c))
    return out.reshape(b, h, w, c) + x_bhwc


class UNetMidBlock2D(nnx.Module):
  """resnet, then (attention, resnet) once: diffusers' ``UNetMidBlock2D``."""

  def __init__(self, channels: int, add_attention: bool, parts: _Parts):
    self.resnets = nnx.List([ResnetBlock2D(channels, channels, parts)
                             for _ in range(2)])
    self.attentions = nnx.List(
        [Attention(channels, parts)] if add_attention else [])

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    h = self.resnets[0](x_bhwc)
    for attention in self.attentions:
      h = attention(h)
    return self.resnets[1](h)


class Downsample2D(nnx.Module):
  """A stride-2 3x3 conv after padding only the bottom/right edge.

  This is diffusers' ``Downsample2D`` with ``padding=0``, as the VAE uses it.
  """

  def __init__(self, channels: int, parts: _Parts):
    self.conv = layers.conv(channels, channels, 3, stride=2, padding=0,
                            **parts.kw)

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    return self.conv(jnp.pad(x_bhwc, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample2D(nnx.Module):
  """Nearest-neighbour 2x upsampling then a 3x3 conv."""

  def __init__(self, channels: int, parts: _Parts):
    self.conv = layers.conv(channels, channels, 3, **parts.kw)

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x_bhwc, 2, axis=1), 2, axis=2))


class DownEncoderBlock2D(nnx.Module):

  def __init__(self, in_channels: int, out_channels: int, num_layers: int,
               add_downsample: bool, parts: _Parts):
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                      parts) for i in range(num_layers)])
    self.downsamplers = (nnx.List([Downsample2D(out_channels, parts)])
                         if add_downsample else None)

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x_bhwc = resnet(x_bhwc)
    return self.downsamplers[0](x_bhwc) if self.downsamplers else x_bhwc


class UpDecoderBlock2D(nnx.Module):

  def __init__(self, in_channels: int, out_channels: int, num_layers: int,
               add_upsample: bool, parts: _Parts):
    self.resnets = nnx.List([
        ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels,
                      parts) for i in range(num_layers)])
    self.upsamplers = (nnx.List([Upsample2D(out_channels, parts)])
                       if add_upsample else None)

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    for resnet in self.resnets:
      x_bhwc = resnet(x_bhwc)
    return self.upsamplers[0](x_bhwc) if self.upsamplers else x_bhwc


def _run(block: nnx.Module, x: jax.Array, remat: bool) -> jax.Array:
  if remat:
    return layers.remat_call(block, x)
  return block(x)


class Encoder(nnx.Module):
  """Images -> the latent Gaussian's moments (mean, logvar), pre-quant_conv."""

  def __init__(self, config: AutoencoderKLConfig, parts: _Parts, remat: bool):
    self.remat = remat
    channels = config.block_out_channels
    self.conv_in = layers.conv(config.in_channels, channels[0], 3, **parts.kw)
    self.down_blocks = nnx.List([
        DownEncoderBlock2D(channels[max(i - 1, 0)], c, config.layers_per_block,
                           i < len(channels) - 1, parts)
        for i, c in enumerate(channels)])
    self.mid_block = UNetMidBlock2D(
        channels[-1], config.mid_block_add_attention, parts)
    self.conv_norm_out = parts.norm(channels[-1])
    self.conv_out = layers.conv(channels[-1], 2 * config.latent_channels, 3,
                                **parts.kw)

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    h = self.conv_in(x_bhwc)
    for block in self.down_blocks:
      h = _run(block, h, self.remat)
    h = _run(self.mid_block, h, self.remat)
    # diffusers hard-codes SiLU here whatever act_fn says.
    return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class Decoder(nnx.Module):
  """Latents -> images; each up block has ``layers_per_block + 1`` resnets."""

  def __init__(self, config: AutoencoderKLConfig, parts: _Parts, remat: bool):
    self.remat = remat
    channels = config.block_out_channels[::-1]
    self.conv_in = layers.conv(config.latent_channels, channels[0], 3,
                               **parts.kw)
    self.mid_block = UNetMidBlock2D(channels[0], config.mid_block_add_attention,
                                    parts)
    self.up_blocks = nnx.List([
        UpDecoderBlock2D(channels[max(i - 1, 0)], c,
                         config.layers_per_block + 1, i < len(channels) - 1,
                         parts)
        for i, c in enumerate(channels)])
    self.conv_norm_out = parts.norm(channels[-1])
    self.conv_out = layers.conv(channels[-1], config.out_channels, 3,
                                **parts.kw)

  def __call__(self, z_bhwc: jax.Array) -> jax.Array:
    h = _run(self.mid_block, self.conv_in(z_bhwc), self.remat)
    for block in self.up_blocks:
      h = _run(block, h, self.remat)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(h)))


class AutoencoderKL(nnx.Module):
  """The KL-regularised VAE of Stable Diffusion (diffusers' ``AutoencoderKL``).

  Attributes:
    config: the ``AutoencoderKLConfig`` it was built from.
  """

  def __init__(self, config: AutoencoderKLConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, attention_impl: str = "xla",
               remat: bool = False, rngs: nnx.Rngs):
    """Builds the model with random weights.

    Args:
      config: the architecture.
      dtype: the compute dtype.
      param_dtype: the dtype parameters are stored in.
      attention_impl: see ``personalize_jax.models.attention``.
      remat: rematerialise each down/mid/up block in the backward pass.
      rngs: the random initialisers.
    """
    config.validate()
    self.config = config
    parts = _Parts(config, dtype, param_dtype, attention_impl, rngs)
    self.encoder = Encoder(config, parts, remat)
    self.decoder = Decoder(config, parts, remat)
    moments = 2 * config.latent_channels
    self.quant_conv = (layers.conv(moments, moments, 1, **parts.kw)
                       if config.use_quant_conv else None)
    latent = config.latent_channels
    self.post_quant_conv = (layers.conv(latent, latent, 1, **parts.kw)
                            if config.use_post_quant_conv else None)

  @property
  def scaling_factor(self) -> float:
    """Latents are ``sample * scaling_factor`` before the U-Net sees them."""
    return self.config.scaling_factor

  def encode(self, images_bhwc: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Encodes images in [-1, 1] into the latent Gaussian.

    Args:
      images_bhwc: ``(batch, height, width, in_channels)``; height and width
        divisible by ``2 ** (len(block_out_channels) - 1)``.

    Returns:
      ``(mean, logvar)``, each ``(batch, height / f, width / f,
      latent_channels)`` in the compute dtype, logvar clipped to [-30, 20] as
      diffusers' ``DiagonalGaussianDistribution`` does.
    """
    moments = self.encoder(images_bhwc)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, latents_bhwc: jax.Array) -> jax.Array:
    """Decodes (unscaled) latents into images, roughly in [-1, 1]."""
    if self.post_quant_conv is not None:
      latents_bhwc = self.post_quant_conv(latents_bhwc)
    return self.decoder(latents_bhwc)

  @classmethod
  def from_pretrained(cls, path_or_hub_id: str | os.PathLike,
                      subfolder: str | None = None, *, dtype=jnp.float32,
                      param_dtype=jnp.float32, attention_impl: str = "xla",
                      remat: bool = False, seed: int = 0) -> "AutoencoderKL":
    """Loads a diffusers VAE folder or Hub id, or builds the ``tiny`` preset.

    Args:
      path_or_hub_id: a folder holding ``config.json`` and
        ``diffusion_pytorch_model.safetensors``, a Hub id, or ``tiny`` (random
        weights from ``seed``).
      subfolder: e.g. ``vae`` inside a pipeline folder.
      dtype: the compute dtype.
      param_dtype: the dtype parameters are stored in.
      attention_impl: see ``personalize_jax.models.attention``.
      remat: rematerialise blocks in the backward pass.
      seed: the random seed of the ``tiny`` preset.

    Raises:
      CheckpointError: the folder or weights do not match a VAE.
      UserError: the config names an architecture this port lacks.
    """
    return checkpoint.load_pretrained(
        path_or_hub_id, subfolder, read_config=AutoencoderKLConfig.from_dict,
        build=functools.partial(cls, dtype=dtype, param_dtype=param_dtype,
                                attention_impl=attention_impl, remat=remat),
        preset=presets.VAE, weights_name=checkpoint.DIFFUSERS_WEIGHTS,
        param_dtype=param_dtype, seed=seed,
        rename=legacy_key, transform=legacy_tensor)

  def save_pretrained(self, folder: str | os.PathLike) -> Path:
    """Writes ``config.json`` and fp32 weights that diffusers loads."""
    return checkpoint.save_pretrained(self, folder, self.config.to_dict(),
                                      checkpoint.DIFFUSERS_WEIGHTS)


def legacy_key(key: str) -> str:
  """Renames old attention keys (``query``/``key``/``value``/``proj_attn``)."""
  return _LEGACY_ATTENTION.sub(
      lambda m: f"{m[1]}.{_LEGACY_NAMES[m[2]]}.{m[3]}", key)


def legacy_tensor(key: str, value: np.ndarray) -> np.ndarray:
  """Squeezes 1x1-conv-shaped ``(out, in, 1, 1)`` attention weights."""
  if (value.ndim == 4 and value.shape[2:] == (1, 1)
      and _ATTENTION_LINEAR.search(key)):
    return value[:, :, 0, 0]
  return value
