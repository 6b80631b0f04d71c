"""CLIP text and vision towers (transformers' ``CLIPTextModel``/``CLIPModel``).

``CLIPTextModelWithProjection`` is SDXL's second text encoder (OpenCLIP
bigG): the text tower plus a bias-free projection of the pooled state. Text
models also return every layer's hidden state on request (SDXL conditions on
the penultimate one).

Attribute names mirror the transformers 4.x module tree, which is the layout of
every published checkpoint: a Stable Diffusion ``text_encoder/`` stores
``text_model.embeddings...``, an ``openai/clip-vit-*`` checkpoint stores
``text_model.*``, ``vision_model.*``, ``visual_projection``, ``text_projection``
and ``logit_scale``. transformers 5 saves the single-tower models without the
``text_model.``/``vision_model.`` prefix; loading adds it back, and our
``save_pretrained`` writes the prefixed layout, which both versions read.

Images are NHWC. Text attention is causal and unpadded, as in Stable Diffusion
pipelines (no attention mask).
"""

import dataclasses
import functools
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from personalize_jax.errors import UserError
from personalize_jax.models import attention, checkpoint, layers, presets

_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}
# Non-persistent buffers that old checkpoints (transformers < 4.31) still hold.
_IGNORED_KEYS = (r"(^|\.)position_ids$",)


def _hashable(value: Any) -> Any:
  # Module attributes are static jit metadata, so configs must hash.
  return tuple(value) if isinstance(value, list) else value


class _Config:
  """``from_dict``/``to_dict`` for the flat configs below."""

  model_type: ClassVar[str]
  architecture: ClassVar[str]

  @classmethod
  def from_dict(cls, config: dict) -> "_Config":
    """Reads a transformers ``config.json`` dict (unknown keys ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _hashable(v) for k, v in config.items()
                  if k in names and v is not None})

  def fields_dict(self) -> dict:
    """The fields and ``model_type``: a tower's entry in a CLIP config.json."""
    out = {k: list(v) if isinstance(v, tuple) else v
           for k, v in dataclasses.asdict(self).items()}
    return {"model_type": self.model_type, **out}

  def to_dict(self) -> dict:
    """A ``config.json`` transformers loads."""
    return {**self.fields_dict(), "architectures": [self.architecture]}

  def _check(self):
    if self.hidden_size % self.num_attention_heads:
      raise UserError(
          f"{self.model_type} config: hidden_size {self.hidden_size} is not a "
          f"multiple of num_attention_heads {self.num_attention_heads}")
    if self.hidden_act not in _ACTIVATIONS:
      raise UserError(
          f"{self.model_type} config: hidden_act {self.hidden_act!r} is not "
          f"one of {sorted(_ACTIVATIONS)}")


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig(_Config):
  """transformers' ``CLIPTextConfig`` fields and defaults (ViT-B/32 text)."""
  model_type: ClassVar[str] = "clip_text_model"
  architecture: ClassVar[str] = "CLIPTextModel"

  vocab_size: int = 49408
  hidden_size: int = 512
  intermediate_size: int = 2048
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 8
  max_position_embeddings: int = 77
  hidden_act: str = "quick_gelu"  # SD 1.x; SD 2.x uses "gelu"
  layer_norm_eps: float = 1e-5
  attention_dropout: float = 0.0  # kept for the config; 0 in every release
  initializer_range: float = 0.02
  initializer_factor: float = 1.0
  pad_token_id: int = 1
  bos_token_id: int = 49406
  eos_token_id: int = 49407  # 2 in old SD 1.x configs: see _eos_positions

  def __post_init__(self):
    self._check()


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig(_Config):
  """transformers' ``CLIPVisionConfig`` fields and defaults (ViT-B/32)."""
  model_type: ClassVar[str] = "clip_vision_model"
  architecture: ClassVar[str] = "CLIPVisionModel"

  hidden_size: int = 768
  intermediate_size: int = 3072
  projection_dim: int = 512
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  num_channels: int = 3
  image_size: int = 224
  patch_size: int = 32
  hidden_act: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  attention_dropout: float = 0.0
  initializer_range: float = 0.02
  initializer_factor: float = 1.0

  def __post_init__(self):
    self._check()


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """transformers' ``CLIPConfig``: both towers and the shared projection."""
  model_type: ClassVar[str] = "clip"

  text_config: CLIPTextConfig = CLIPTextConfig()
  vision_config: CLIPVisionConfig = CLIPVisionConfig()
  projection_dim: int = 512
  logit_scale_init_value: float = 2.6592
  initializer_factor: float = 1.0

  @classmethod
  def from_dict(cls, config: dict) -> "CLIPConfig":
    """Reads a CLIP ``config.json``, including the legacy ``*_config_dict``."""
    towers = {}
    for name, sub in (("text", CLIPTextConfig), ("vision", CLIPVisionConfig)):
      # Old checkpoints (e.g. clip-vit-large-patch14) also carry
      # `<tower>_config_dict`; as in transformers, it then replaces
      # `<tower>_config`, with defaults for the fields it leaves out.
      legacy = config.get(f"{name}_config_dict")
      towers[f"{name}_config"] = sub.from_dict(
          legacy if legacy is not None else config.get(f"{name}_config") or {})
    rest = {f.name: config[f.name] for f in dataclasses.fields(cls)
            if f.name in config and f.name not in towers
            and config[f.name] is not None}
    return cls(**towers, **rest)

  def to_dict(self) -> dict:
    """A ``config.json`` transformers loads."""
    return {"model_type": self.model_type, "architectures": ["CLIPModel"],
            "text_config": self.text_config.fields_dict(),
            "vision_config": self.vision_config.fields_dict(),
            "projection_dim": self.projection_dim,
            "logit_scale_init_value": self.logit_scale_init_value,
            "initializer_factor": self.initializer_factor}


class CLIPAttention(nnx.Module):
  """Multi-head self-attention with q/k/v/out projections."""

  def __init__(self, config, *, causal, dtype, param_dtype, attention_impl,
               rngs):
    d = config.hidden_size
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.num_heads = config.num_attention_heads
    self.causal = causal
    self.attention_impl = attention_impl
    self.k_proj = layers.linear(d, d, **kw)
    self.v_proj = layers.linear(d, d, **kw)
    self.q_proj = layers.linear(d, d, **kw)
    self.out_proj = layers.linear(d, d, axes=("mlp", "embed"), **kw)

  def __call__(self, x_btd):
    b, t, _ = x_btd.shape
    heads = lambda y: y.reshape(b, t, self.num_heads, -1)
    out_bthd = attention.dot_product_attention(
        heads(self.q_proj(x_btd)), heads(self.k_proj(x_btd)),
        heads(self.v_proj(x_btd)), impl=self.attention_impl,
        causal=self.causal)
    return self.out_proj(out_bthd.reshape(b, t, -1))


class CLIPMLP(nnx.Module):

  def __init__(self, config, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.hidden_act = config.hidden_act
    self.fc1 = layers.linear(config.hidden_size, config.intermediate_size, **kw)
    self.fc2 = layers.linear(config.intermediate_size, config.hidden_size,
                             axes=("mlp", "embed"), **kw)

  def __call__(self, x):
    return self.fc2(_ACTIVATIONS[self.hidden_act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
  """Pre-norm transformer block."""

  def __init__(self, config, *, causal, dtype, param_dtype, attention_impl,
               rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.self_attn = CLIPAttention(config, causal=causal,
                                   attention_impl=attention_impl, **kw)
    self.layer_norm1 = layers.layer_norm(
        config.hidden_size, epsilon=config.layer_norm_eps, **kw)
    self.mlp = CLIPMLP(config, **kw)
    self.layer_norm2 = layers.layer_norm(
        config.hidden_size, epsilon=config.layer_norm_eps, **kw)

  def __call__(self, x):
    x = x + self.self_attn(self.layer_norm1(x))
    return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):

  def __init__(self, config, *, causal, remat, **kw):
    self.remat = remat
    self.layers = nnx.List([CLIPEncoderLayer(config, causal=causal, **kw)
                            for _ in range(config.num_hidden_layers)])

  def __call__(self, x, output_hidden_states=False):
    """The last layer's output; with ``output_hidden_states`` also the tuple
    (input, each layer's output), as transformers returns it."""
    states = [x]
    for layer in self.layers:
      x = layers.remat_call(layer, x) if self.remat else layer(x)
      states.append(x)
    return (x, tuple(states)) if output_hidden_states else x


class CLIPTextEmbeddings(nnx.Module):

  def __init__(self, config, *, dtype, param_dtype, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.token_embedding = layers.embed(config.vocab_size, config.hidden_size,
                                        **kw)
    self.position_embedding = layers.embed(config.max_position_embeddings,
                                           config.hidden_size, **kw)

  def __call__(self, input_ids_bt):
    length = input_ids_bt.shape[-1]
    table_len = self.position_embedding.num_embeddings
    if length > table_len:
      raise ValueError(f"{length} tokens exceed the {table_len} positions of "
                       "the text encoder; tokenize with max_length="
                       f"{table_len}")
    return (self.token_embedding(input_ids_bt)
            + self.position_embedding(jnp.arange(length)))


def _eos_positions(input_ids_bt, eos_token_id):
  """Where each sequence's pooled (end-of-text) state is read (transformers 5).

  Configs written before transformers 4.31 say ``eos_token_id=2``; for those
  the end token is taken to be the largest id (``<|endoftext|>`` is the last
  vocabulary entry). Otherwise it is the first ``eos_token_id``, which stays
  right when padding uses the same token. Both rules find the end token under
  either padding of Stable Diffusion tokenizers: with ``<|endoftext|>`` (SD
  1.x, SDXL's first) or with ``!`` (id 0: SD 2.x, SDXL's second).
  """
  if eos_token_id == 2:
    return jnp.argmax(input_ids_bt, axis=-1)
  return jnp.argmax((input_ids_bt == eos_token_id).astype(jnp.int32), axis=-1)


class CLIPTextTransformer(nnx.Module):
  """The text tower: embeddings, causal encoder, final layer norm."""

  def __init__(self, config: CLIPTextConfig, *, dtype, param_dtype,
               attention_impl, remat, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.eos_token_id = config.eos_token_id
    self.embeddings = CLIPTextEmbeddings(config, **kw)
    self.encoder = CLIPEncoder(config, causal=True, remat=remat,
                               attention_impl=attention_impl, **kw)
    self.final_layer_norm = layers.layer_norm(
        config.hidden_size, epsilon=config.layer_norm_eps, **kw)

  def __call__(self, input_ids_bt, output_hidden_states=False):
    """``(last_hidden_state_btd, pooled_bd)``, and with ``output_hidden_states``
    the encoder's ``hidden_states`` (before the final layer norm) third."""
    hidden, states = self.embeddings(input_ids_bt), None
    if output_hidden_states:
      hidden, states = self.encoder(hidden, output_hidden_states=True)
    else:
      hidden = self.encoder(hidden)
    hidden = self.final_layer_norm(hidden)
    pooled = hidden[jnp.arange(hidden.shape[0]),
                    _eos_positions(input_ids_bt, self.eos_token_id)]
    return (hidden, pooled) if states is None else (hidden, pooled, states)


class CLIPVisionEmbeddings(nnx.Module):

  def __init__(self, config: CLIPVisionConfig, *, dtype, param_dtype, rngs):
    d, p = config.hidden_size, config.patch_size
    self.dtype = dtype
    self.image_size = config.image_size
    self.class_embedding = layers.param(
        rngs, (d,), ("embed",), init=nnx.initializers.normal(d**-0.5),
        param_dtype=param_dtype)
    self.patch_embedding = layers.conv(
        config.num_channels, d, p, stride=p, padding=0, use_bias=False,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    num_positions = (config.image_size // p)**2 + 1
    self.position_embedding = layers.embed(
        num_positions, d, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, pixel_values_bhwc):
    b, h, w, _ = pixel_values_bhwc.shape
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(f"images are {h}x{w}, the CLIP vision model takes "
                       f"{self.image_size}x{self.image_size}")
    patches = self.patch_embedding(pixel_values_bhwc.astype(self.dtype))
    patches_bnd = patches.reshape(b, -1, patches.shape[-1])
    cls_b1d = jnp.broadcast_to(
        self.class_embedding.get_value().astype(patches_bnd.dtype),
        (b, 1, patches_bnd.shape[-1]))
    tokens = jnp.concatenate([cls_b1d, patches_bnd], axis=1)
    return tokens + self.position_embedding(jnp.arange(tokens.shape[1]))


class CLIPVisionTransformer(nnx.Module):
  """The vision tower: patch embeddings, ``pre_layrnorm``, encoder, pooling."""

  def __init__(self, config: CLIPVisionConfig, *, dtype, param_dtype,
               attention_impl, remat, rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    eps = config.layer_norm_eps
    self.embeddings = CLIPVisionEmbeddings(config, **kw)
    # "layrnorm" (sic) is the name in every checkpoint.
    self.pre_layrnorm = layers.layer_norm(config.hidden_size, epsilon=eps,
                                          **kw)
    self.encoder = CLIPEncoder(config, causal=False, remat=remat,
                               attention_impl=attention_impl, **kw)
    self.post_layernorm = layers.layer_norm(config.hidden_size, epsilon=eps,
                                            **kw)

  def __call__(self, pixel_values_bhwc):
    """Returns ``(last_hidden_state_btd, pooled_bd)`` (pooled: normed CLS)."""
    hidden = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values_bhwc)))
    return hidden, self.post_layernorm(hidden[:, 0])


class _Pretrained:
  """``from_pretrained``/``save_pretrained`` shared by the model classes."""

  config_class: ClassVar[type]
  preset: ClassVar[dict]
  prefix: ClassVar[str | None] = None

  @classmethod
  def from_pretrained(cls, path_or_hub_id: str | os.PathLike,
                      subfolder: str | None = None, *, dtype=jnp.float32,
                      param_dtype=jnp.float32, attention_impl: str = "xla",
                      remat: bool = False, seed: int = 0):
    """Loads a transformers checkpoint folder or Hub id; ``"tiny"``: random.

    Args:
      path_or_hub_id: a folder with ``config.json`` + ``model.safetensors``, a
        Hub id, or ``"tiny"`` (the preset with random weights from ``seed``).
      subfolder: e.g. ``text_encoder`` inside a Stable Diffusion pipeline.
      dtype: the compute dtype.
      param_dtype: the dtype parameters are stored in.
      attention_impl: see ``attention.IMPLEMENTATIONS``.
      remat: rematerialise each encoder layer in the backward pass.
      seed: the init seed for ``"tiny"``.

    Raises:
      CheckpointError: the folder, config or weights do not fit this model.
    """
    # transformers 5 saves single towers without the `text_model.` prefix.
    prefix = cls.prefix
    rename = None if prefix is None else (
        lambda k: k if k.startswith(prefix) else prefix + k)
    return checkpoint.load_pretrained(
        path_or_hub_id, subfolder, read_config=cls.config_class.from_dict,
        build=functools.partial(cls, dtype=dtype, param_dtype=param_dtype,
                                attention_impl=attention_impl, remat=remat),
        preset=cls.preset, weights_name=checkpoint.TRANSFORMERS_WEIGHTS,
        param_dtype=param_dtype, seed=seed,
        model_type=cls.config_class.model_type, cls_name=cls.__name__,
        classes=("CLIPTextModel, CLIPTextModelWithProjection, "
                 "CLIPVisionModel or CLIPModel"),
        ignore_unexpected=_IGNORED_KEYS, rename=rename)

  def save_pretrained(self, folder: str | os.PathLike, dtype=np.float32):
    """Writes ``config.json`` + ``model.safetensors`` transformers can load."""
    config = {**self.config.to_dict(), "architectures": [type(self).__name__]}
    return checkpoint.save_pretrained(self, folder, config,
                                      checkpoint.TRANSFORMERS_WEIGHTS, dtype)


class CLIPTextModel(_Pretrained, nnx.Module):
  """transformers' ``CLIPTextModel``: the Stable Diffusion text encoder."""

  config_class = CLIPTextConfig
  preset = presets.CLIP_TEXT
  prefix = "text_model."

  def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, attention_impl: str = "xla",
               remat: bool = False, rngs: nnx.Rngs):
    self.config = config
    self.text_model = CLIPTextTransformer(
        config, dtype=dtype, param_dtype=param_dtype,
        attention_impl=attention_impl, remat=remat, rngs=rngs)

  def __call__(self, input_ids_bt: jax.Array) -> jax.Array:
    """The last hidden state after the final layer norm, ``(b, t, d)``."""
    return self.text_model(input_ids_bt)[0]

  def encode(self, input_ids_bt: jax.Array, *,
             output_hidden_states: bool = False) -> tuple:
    """``(last_hidden_state (b, t, d), pooled (b, d))`` [+ ``hidden_states``].

    ``pooled`` is the state at each sequence's end-of-text token
    (transformers' ``pooler_output``).

    Args:
      input_ids_bt: token ids.
      output_hidden_states: also return, third, transformers'
        ``hidden_states``: a tuple of ``num_hidden_layers + 1`` arrays
        ``(b, t, d)``, the embeddings then each layer's output, without the
        final layer norm (SDXL reads ``hidden_states[-2]``).
    """
    return self.text_model(input_ids_bt, output_hidden_states)

  def with_added_tokens(self, rows_nd) -> "CLIPTextModel":
    """A copy whose token table has ``rows_nd`` appended as new token ids.

    For tokens added to the tokenizer (``tokenizer.add_tokens``): row ``i``
    becomes the embedding of id ``vocab_size + i``. The other parameters are
    shared with this model, and ``config.vocab_size`` grows, so
    ``save_pretrained`` writes a checkpoint transformers loads as is.

    Args:
      rows_nd: ``(num_new, hidden_size)`` initial embeddings of the new ids.
    """
    old = self.text_model.embeddings.token_embedding
    rows_nd = jnp.asarray(rows_nd, old.param_dtype)
    if rows_nd.ndim != 2 or rows_nd.shape[1] != self.config.hidden_size:
      raise ValueError(f"new token rows have shape {rows_nd.shape}, expected "
                       f"(num_new, {self.config.hidden_size})")
    config = dataclasses.replace(
        self.config, vocab_size=self.config.vocab_size + rows_nd.shape[0])
    # Abstract, then filled: no random table of the new size is ever drawn.
    table = nnx.eval_shape(lambda: layers.embed(
        config.vocab_size, config.hidden_size, dtype=old.dtype,
        param_dtype=old.param_dtype, rngs=checkpoint.shape_only_rngs()))
    table.embedding.set_value(
        jnp.concatenate([old.embedding.get_value(), rows_nd]))
    grown = nnx.clone(self)
    grown.config = config
    grown.text_model.embeddings.token_embedding = table
    return grown


class CLIPTextModelWithProjection(CLIPTextModel):
  """transformers' ``CLIPTextModelWithProjection``: SDXL's second encoder.

  The text tower and ``text_projection``, a bias-free linear map of the
  pooled state to ``projection_dim``. Both transformers 4 and 5 store the
  tower under ``text_model.``, so keys load unrenamed.
  """

  preset = presets.TINY_SDXL_TEXT_2
  prefix = None

  def __init__(self, config: CLIPTextConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, attention_impl: str = "xla",
               remat: bool = False, rngs: nnx.Rngs):
    super().__init__(config, dtype=dtype, param_dtype=param_dtype,
                     attention_impl=attention_impl, remat=remat, rngs=rngs)
    self.text_projection = layers.linear(
        config.hidden_size, config.projection_dim, use_bias=False, dtype=dtype,
        param_dtype=param_dtype, rngs=rngs)

  def encode(self, input_ids_bt: jax.Array, *,
             output_hidden_states: bool = False) -> tuple:
    """``(last_hidden_state (b, t, d), text_embeds (b, projection_dim))``.

    ``text_embeds`` is the projected pooled state (transformers'
    ``text_embeds``); ``output_hidden_states`` adds ``hidden_states`` third,
    as ``CLIPTextModel.encode`` does.
    """
    hidden, pooled, *states = self.text_model(input_ids_bt,
                                              output_hidden_states)
    return (hidden, self.text_projection(pooled), *states)


class CLIPVisionModel(_Pretrained, nnx.Module):
  """transformers' ``CLIPVisionModel`` on NHWC images."""

  config_class = CLIPVisionConfig
  preset = presets.CLIP_VISION
  prefix = "vision_model."

  def __init__(self, config: CLIPVisionConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, attention_impl: str = "xla",
               remat: bool = False, rngs: nnx.Rngs):
    self.config = config
    self.vision_model = CLIPVisionTransformer(
        config, dtype=dtype, param_dtype=param_dtype,
        attention_impl=attention_impl, remat=remat, rngs=rngs)

  def __call__(self, pixel_values_bhwc: jax.Array) -> jax.Array:
    """The last hidden state ``(b, 1 + patches, d)`` (no final norm)."""
    return self.vision_model(pixel_values_bhwc)[0]

  def encode(self, pixel_values_bhwc: jax.Array
             ) -> tuple[jax.Array, jax.Array]:
    """``(last_hidden_state, pooled)``; pooled is the normed CLS state."""
    return self.vision_model(pixel_values_bhwc)


class CLIPModel(_Pretrained, nnx.Module):
  """transformers' ``CLIPModel``: both towers, projections, ``logit_scale``."""

  config_class = CLIPConfig
  preset = presets.CLIP

  def __init__(self, config: CLIPConfig, *, dtype=jnp.float32,
               param_dtype=jnp.float32, attention_impl: str = "xla",
               remat: bool = False, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    towers = dict(attention_impl=attention_impl, remat=remat, **kw)
    self.config = config
    self.text_model = CLIPTextTransformer(config.text_config, **towers)
    self.vision_model = CLIPVisionTransformer(config.vision_config, **towers)
    self.visual_projection = layers.linear(
        config.vision_config.hidden_size, config.projection_dim,
        use_bias=False, **kw)
    self.text_projection = layers.linear(
        config.text_config.hidden_size, config.projection_dim, use_bias=False,
        **kw)
    self.logit_scale = layers.param(
        rngs, (), (), param_dtype=param_dtype,
        init=nnx.initializers.constant(config.logit_scale_init_value))

  def get_image_features(self, pixel_values_bhwc: jax.Array) -> jax.Array:
    """Projected, unnormalised image embeddings ``(b, projection_dim)``.

    transformers 5 returns these as ``get_image_features(...).pooler_output``.
    """
    return self.visual_projection(self.vision_model(pixel_values_bhwc)[1])

  def get_text_features(self, input_ids_bt: jax.Array) -> jax.Array:
    """Projected, unnormalised text embeddings ``(b, projection_dim)``."""
    return self.text_projection(self.text_model(input_ids_bt)[1])

  def __call__(self, input_ids_bt: jax.Array,
               pixel_values_bhwc: jax.Array) -> jax.Array:
    """``logits_per_image (b_images, b_texts)``: scaled cosine similarities."""
    image = self.get_image_features(pixel_values_bhwc)
    text = self.get_text_features(input_ids_bt)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    return jnp.exp(self.logit_scale.get_value()) * image @ text.T
