"""The blocks of the Stable Diffusion U-Net (NHWC), named as in diffusers.

Each class mirrors the diffusers module of the same name attribute for
attribute (``resnets``, ``attentions``, ``downsamplers``, ``to_out``,
``ff.net``, ...), so parameter paths are the PyTorch state-dict keys and
``checkpoint`` loads them without a key map. Only the configuration Stable
Diffusion 1.x/2.x uses is ported: GroupNorm resnets with an additive time
embedding, and ``Transformer2DModel`` with LayerNorm, self-attention,
cross-attention and a GEGLU feed-forward.

Rematerialisation (``remat=True``) is applied per ``ResnetBlock2D`` and per
``BasicTransformerBlock``: only their inputs are kept for the backward pass,
which is where the activations of a U-Net live (the attention logits and the
4x-wide feed-forward inside a transformer block dominate at 64x64 latents).
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from personalize_jax.models import layers
from personalize_jax.models.attention import dot_product_attention

Dtype = Any


def call_maybe_remat(module: nnx.Module, remat: bool, *args):
  """Calls ``module(*args)``, recomputed in the backward pass if ``remat``."""
  if not remat:
    return module(*args)
  return layers.remat_call(module, *args)


def upsample_nearest(x_bhwc: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Nearest-neighbour resize to ``size`` as ``F.interpolate(mode="nearest")``.

  Args:
    x_bhwc: the input.
    size: the output ``(height, width)``.

  Returns:
    ``(b, size[0], size[1], c)``.
  """
  b, h, w, c = x_bhwc.shape
  if size == (2 * h, 2 * w):
    # The common case as a broadcast + reshape, which XLA fuses (no gather).
    x = jnp.broadcast_to(x_bhwc[:, :, None, :, None, :], (b, h, 2, w, 2, c))
    return x.reshape(b, 2 * h, 2 * w, c)
  # Odd latent sizes: PyTorch picks source index floor(dst * in / out),
  # computed in float32.
  rows = np.minimum(np.floor(np.arange(size[0], dtype=np.float32)
                             * np.float32(h / size[0])).astype(int), h - 1)
  cols = np.minimum(np.floor(np.arange(size[1], dtype=np.float32)
                             * np.float32(w / size[1])).astype(int), w - 1)
  return x_bhwc[:, rows][:, :, cols]


class ResnetBlock2D(nnx.Module):
  """GroupNorm -> SiLU -> conv, plus the projected time embedding, twice."""

  def __init__(self, in_channels: int, out_channels: int, temb_channels: int,
               *, groups: int, eps: float, output_scale_factor: float = 1.0,
               dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.output_scale_factor = output_scale_factor
    self.norm1 = layers.group_norm(in_channels, groups, epsilon=eps, **kw)
    self.conv1 = layers.conv(in_channels, out_channels, 3, **kw)
    self.time_emb_proj = layers.linear(temb_channels, out_channels, **kw)
    self.norm2 = layers.group_norm(out_channels, groups, epsilon=eps, **kw)
    self.conv2 = layers.conv(out_channels, out_channels, 3, **kw)
    self.conv_shortcut = (layers.conv(in_channels, out_channels, 1, **kw)
                          if in_channels != out_channels else None)

  def __call__(self, x_bhwc: jax.Array, temb_bd: jax.Array) -> jax.Array:
    h = self.conv1(nnx.silu(self.norm1(x_bhwc)))
    h = h + self.time_emb_proj(nnx.silu(temb_bd))[:, None, None, :]
    h = self.conv2(nnx.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x_bhwc = self.conv_shortcut(x_bhwc)
    out = x_bhwc + h
    if self.output_scale_factor != 1.0:
      out = out / self.output_scale_factor
    return out


class Downsample2D(nnx.Module):
  """A stride-2 3x3 convolution (``padding=0`` pads only bottom/right, by 1)."""

  def __init__(self, channels: int, *, padding: int, dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    pad = ((0, 1), (0, 1)) if padding == 0 else padding
    self.conv = layers.conv(channels, channels, 3, stride=2, padding=pad,
                            dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_bhwc: jax.Array) -> jax.Array:
    return self.conv(x_bhwc)


class Upsample2D(nnx.Module):
  """Nearest-neighbour upsampling followed by a 3x3 convolution."""

  def __init__(self, channels: int, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    self.conv = layers.conv(channels, channels, 3, dtype=dtype,
                            param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x_bhwc: jax.Array, size: tuple[int, int]) -> jax.Array:
    return self.conv(upsample_nearest(x_bhwc, size))


class Attention(nnx.Module):
  """Multi-head attention with bias-free q/k/v (diffusers ``Attention``)."""

  def __init__(self, query_dim: int, *, heads: int, dim_head: int,
               cross_attention_dim: int | None = None,
               upcast_attention: bool = False, attention_impl: str = "xla",
               dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    inner = heads * dim_head
    context_dim = cross_attention_dim or query_dim
    self.heads = heads
    self.upcast_attention = upcast_attention
    self.attention_impl = attention_impl
    self.to_q = layers.linear(query_dim, inner, use_bias=False, **kw)
    self.to_k = layers.linear(context_dim, inner, use_bias=False, **kw)
    self.to_v = layers.linear(context_dim, inner, use_bias=False, **kw)
    # ``to_out.1`` is a parameter-free Dropout in diffusers.
    self.to_out = nnx.List([layers.linear(inner, query_dim,
                                          axes=("mlp", "embed"), **kw)])

  def __call__(self, x_btd: jax.Array,
               context_bsd: jax.Array | None = None) -> jax.Array:
    context_bsd = x_btd if context_bsd is None else context_bsd
    b, t, _ = x_btd.shape
    # Batch-parallel attention (not split by heads as the sharded weights
    # would suggest): see layers.batch_sharded_activations.
    split = lambda y: layers.constrain_batch(
        y.reshape(y.shape[0], y.shape[1], self.heads, -1))
    out = dot_product_attention(
        split(self.to_q(x_btd)), split(self.to_k(context_bsd)),
        split(self.to_v(context_bsd)), impl=self.attention_impl,
        upcast=self.upcast_attention)
    return self.to_out[0](out.reshape(b, t, -1))


class GEGLU(nnx.Module):
  """One projection to twice the width, split into value * gelu(gate)."""

  def __init__(self, dim_in: int, dim_out: int, *, dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    self.proj = layers.linear(dim_in, 2 * dim_out, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    value, gate = jnp.split(self.proj(x), 2, axis=-1)
    return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
  """``net = [GEGLU, Dropout, Linear]`` with a 4x inner width."""

  def __init__(self, dim: int, *, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    inner = 4 * dim
    # None holds the place of diffusers' parameter-free Dropout so that the
    # output projection keeps the key ``ff.net.2``.
    self.net = nnx.List([
        GEGLU(dim, inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs),
        None,
        layers.linear(inner, dim, axes=("mlp", "embed"), dtype=dtype,
                      param_dtype=param_dtype, rngs=rngs),
    ])

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.net[2](self.net[0](x))


class BasicTransformerBlock(nnx.Module):
  """Pre-LayerNorm self-attention, cross-attention and feed-forward."""

  def __init__(self, dim: int, *, heads: int, dim_head: int,
               cross_attention_dim: int, upcast_attention: bool,
               attention_impl: str, dtype: Dtype, param_dtype: Dtype,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    attn = dict(heads=heads, dim_head=dim_head,
                upcast_attention=upcast_attention,
                attention_impl=attention_impl, **kw)
    self.norm1 = layers.layer_norm(dim, **kw)
    self.attn1 = Attention(dim, **attn)
    self.norm2 = layers.layer_norm(dim, **kw)
    self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **attn)
    self.norm3 = layers.layer_norm(dim, **kw)
    self.ff = FeedForward(dim, **kw)

  def __call__(self, x_btd: jax.Array, context_bsd: jax.Array) -> jax.Array:
    x_btd = x_btd + self.attn1(self.norm1(x_btd))
    x_btd = x_btd + self.attn2(self.norm2(x_btd), context_bsd)
    return x_btd + self.ff(self.norm3(x_btd))


class Transformer2DModel(nnx.Module):
  """GroupNorm, proj_in, transformer blocks over pixels, proj_out, residual.

  ``use_linear_projection`` picks ``nn.Linear`` (SD 2.x) or a 1x1 ``nn.Conv2d``
  (SD 1.x) for ``proj_in``/``proj_out``; on NHWC input both act on the channel
  axis, so the two differ only in their parameter layout.
  """

  def __init__(self, heads: int, dim_head: int, *, in_channels: int,
               num_layers: int, cross_attention_dim: int, norm_num_groups: int,
               use_linear_projection: bool, upcast_attention: bool,
               attention_impl: str, remat: bool, dtype: Dtype,
               param_dtype: Dtype, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    inner = heads * dim_head
    self.remat = remat
    self.norm = layers.group_norm(in_channels, norm_num_groups, epsilon=1e-6,
                                  **kw)
    if use_linear_projection:
      self.proj_in = layers.linear(in_channels, inner, **kw)
      self.proj_out = layers.linear(inner, in_channels, axes=("mlp", "embed"),
                                    **kw)
    else:
      self.proj_in = layers.conv(in_channels, inner, 1, **kw)
      self.proj_out = layers.conv(inner, in_channels, 1, **kw)
    self.transformer_blocks = nnx.List([
        BasicTransformerBlock(
            inner, heads=heads, dim_head=dim_head,
            cross_attention_dim=cross_attention_dim,
            upcast_attention=upcast_attention, attention_impl=attention_impl,
            **kw)
        for _ in range(num_layers)
    ])

  def __call__(self, x_bhwc: jax.Array, context_bsd: jax.Array) -> jax.Array:
    b, h, w, _ = x_bhwc.shape
    hidden = self.proj_in(self.norm(x_bhwc))
    hidden = hidden.reshape(b, h * w, hidden.shape[-1])
    for block in self.transformer_blocks:
      hidden = call_maybe_remat(block, self.remat, hidden, context_bsd)
    hidden = hidden.reshape(b, h, w, hidden.shape[-1])
    return self.proj_out(hidden) + x_bhwc


@dataclasses.dataclass
class BlockArgs:
  """The settings the U-Net passes unchanged to every block it builds.

  Attributes:
    temb_channels: width of the time embedding.
    eps: GroupNorm epsilon of the resnets.
    groups: GroupNorm groups (resnets and transformer input norms).
    cross_attention_dim: width of the text conditioning.
    heads: attention heads of this block's transformers.
    transformer_layers: ``BasicTransformerBlock``s per transformer.
    use_linear_projection: Linear (True) or 1x1 conv ``proj_in``/``proj_out``.
    upcast_attention: float32 attention logits.
    attention_impl: see ``attention.IMPLEMENTATIONS``.
    remat: rematerialise resnets and transformer blocks.
    dtype: compute dtype.
    param_dtype: storage dtype.
    rngs: initialisation randomness.
  """
  temb_channels: int
  eps: float
  groups: int
  cross_attention_dim: int
  heads: int
  transformer_layers: int
  use_linear_projection: bool
  upcast_attention: bool
  attention_impl: str
  remat: bool
  dtype: Dtype
  param_dtype: Dtype
  rngs: nnx.Rngs

  @property
  def common(self) -> dict:
    """The ``dtype``/``param_dtype``/``rngs`` keyword arguments of any layer."""
    return dict(dtype=self.dtype, param_dtype=self.param_dtype, rngs=self.rngs)

  def resnet_block(self, in_channels: int, out_channels: int,
                   output_scale_factor: float = 1.0) -> ResnetBlock2D:
    """A ``ResnetBlock2D`` with these settings."""
    return ResnetBlock2D(
        in_channels, out_channels, self.temb_channels, groups=self.groups,
        eps=self.eps, output_scale_factor=output_scale_factor, **self.common)

  def transformer_block(self, channels: int) -> Transformer2DModel:
    """A ``Transformer2DModel`` over ``channels`` with these settings."""
    return Transformer2DModel(
        self.heads, channels // self.heads, in_channels=channels,
        num_layers=self.transformer_layers,
        cross_attention_dim=self.cross_attention_dim,
        norm_num_groups=self.groups,
        use_linear_projection=self.use_linear_projection,
        upcast_attention=self.upcast_attention,
        attention_impl=self.attention_impl, remat=self.remat, **self.common)


class _DownBlock(nnx.Module):
  """Resnets (each followed by a transformer if ``cross_attention``), then an
  optional stride-2 downsampler."""

  def __init__(self, in_channels: int, out_channels: int, *, num_layers: int,
               add_downsample: bool, downsample_padding: int, args: BlockArgs,
               cross_attention: bool):
    self.remat = args.remat
    self.resnets = nnx.List([
        args.resnet_block(in_channels if i == 0 else out_channels, out_channels)
        for i in range(num_layers)
    ])
    self.attentions = (nnx.List([args.transformer_block(out_channels)
                                 for _ in range(num_layers)])
                       if cross_attention else None)
    self.downsamplers = (nnx.List([Downsample2D(
        out_channels, padding=downsample_padding, **args.common)])
                         if add_downsample else None)

  def __call__(self, x_bhwc: jax.Array, temb_bd: jax.Array,
               context_bsd: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
    """Returns the output and the skips: one per layer (+ the downsampled)."""
    skips = []
    for i, resnet in enumerate(self.resnets):
      x_bhwc = call_maybe_remat(resnet, self.remat, x_bhwc, temb_bd)
      if self.attentions is not None:
        x_bhwc = self.attentions[i](x_bhwc, context_bsd)
      skips.append(x_bhwc)
    if self.downsamplers is not None:
      x_bhwc = self.downsamplers[0](x_bhwc)
      skips.append(x_bhwc)
    return x_bhwc, skips


class DownBlock2D(_DownBlock):
  """``num_layers`` resnets, then an optional stride-2 downsampler."""

  def __init__(self, in_channels: int, out_channels: int, **kwargs):
    super().__init__(in_channels, out_channels, cross_attention=False, **kwargs)


class CrossAttnDownBlock2D(_DownBlock):
  """``DownBlock2D`` with a ``Transformer2DModel`` after each resnet."""

  def __init__(self, in_channels: int, out_channels: int, **kwargs):
    super().__init__(in_channels, out_channels, cross_attention=True, **kwargs)


class _UpBlock(nnx.Module):
  """Resnets over [input, skip] concatenations (each followed by a transformer
  if ``cross_attention``), then an optional upsampler."""

  def __init__(self, in_channels: int, prev_output_channel: int,
               out_channels: int, *, num_layers: int, add_upsample: bool,
               args: BlockArgs, cross_attention: bool):
    self.remat = args.remat
    resnets = []
    for i in range(num_layers):
      skip_channels = in_channels if i == num_layers - 1 else out_channels
      own_channels = prev_output_channel if i == 0 else out_channels
      resnets.append(args.resnet_block(own_channels + skip_channels,
                                       out_channels))
    self.resnets = nnx.List(resnets)
    self.attentions = (nnx.List([args.transformer_block(out_channels)
                                 for _ in range(num_layers)])
                       if cross_attention else None)
    self.upsamplers = (nnx.List([Upsample2D(out_channels, **args.common)])
                       if add_upsample else None)

  def __call__(self, x_bhwc: jax.Array, skips: list[jax.Array],
               temb_bd: jax.Array, context_bsd: jax.Array,
               upsample_size: tuple[int, int] | None) -> jax.Array:
    """Consumes ``skips`` from the end; upsamples to ``upsample_size``."""
    skips = list(skips)
    for i, resnet in enumerate(self.resnets):
      x_bhwc = jnp.concatenate([x_bhwc, skips.pop()], axis=-1)
      x_bhwc = call_maybe_remat(resnet, self.remat, x_bhwc, temb_bd)
      if self.attentions is not None:
        x_bhwc = self.attentions[i](x_bhwc, context_bsd)
    if self.upsamplers is not None:
      x_bhwc = self.upsamplers[0](x_bhwc, upsample_size)
    return x_bhwc


class UpBlock2D(_UpBlock):
  """Resnets over [input, skip] concatenations, then an optional upsampler."""

  def __init__(self, in_channels: int, prev_output_channel: int,
               out_channels: int, **kwargs):
    super().__init__(in_channels, prev_output_channel, out_channels,
                     cross_attention=False, **kwargs)


class CrossAttnUpBlock2D(_UpBlock):
  """``UpBlock2D`` with a ``Transformer2DModel`` after each resnet."""

  def __init__(self, in_channels: int, prev_output_channel: int,
               out_channels: int, **kwargs):
    super().__init__(in_channels, prev_output_channel, out_channels,
                     cross_attention=True, **kwargs)


class UNetMidBlock2DCrossAttn(nnx.Module):
  """resnet, then (transformer, resnet) once, at the lowest resolution."""

  def __init__(self, channels: int, *, output_scale_factor: float,
               args: BlockArgs):
    self.remat = args.remat
    self.resnets = nnx.List([
        args.resnet_block(channels, channels,
                          output_scale_factor=output_scale_factor)
        for _ in range(2)
    ])
    self.attentions = nnx.List([args.transformer_block(channels)])

  def __call__(self, x_bhwc, temb_bd, context_bsd):
    x_bhwc = call_maybe_remat(self.resnets[0], self.remat, x_bhwc, temb_bd)
    x_bhwc = self.attentions[0](x_bhwc, context_bsd)
    return call_maybe_remat(self.resnets[1], self.remat, x_bhwc, temb_bd)
