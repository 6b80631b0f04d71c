"""Custom Diffusion (Kumari et al. 2023): cross-attention K/V and one new token.

Only the key and value projections of the U-Net's cross-attention layers
(``attn2.to_k``, ``attn2.to_v``: the weights that read the text) train, plus
the embedding of a modifier token such as ``<new1>`` added to the tokenizer
and initialised from an existing token (``ktn`` in the authors' code). The
loss is DreamBooth's: denoising on the subject ("photo of a <new1> cat") plus,
optionally, prior preservation on class images the base model generated, so
this method reuses DreamBooth's data and loss and changes what trains.

As in diffusers' ``train_custom_diffusion.py``, the gradient of every other
row of the token table is zeroed before clipping; unlike it, weight decay does
not touch those rows either (``row_masks``), so they stay bit-identical. The
export is the whole pipeline, with the grown tokenizer and text encoder, not
diffusers' separate delta files.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from personalize_jax.engine import optim
from personalize_jax.errors import UserError
from personalize_jax.methods import dreambooth

# What trains, as ``config.trainable`` regexes: cross-attention K/V of the
# U-Net and the text encoder's token table (whose rows ``row_masks`` limits
# to the modifier token's).
TRAINABLE = (r"^unet\..*attn2\.to_[kv]\.",
             r"^text_encoder\.text_model\.embeddings\.token_embedding\.")
TOKEN_TABLE = "text_encoder.text_model.embeddings.token_embedding.weight"


def add_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Adds ``config.custom_diffusion`` and DreamBooth's class-image options.

  Prior preservation (class images, their prompt and weight) is configured in
  ``config.dreambooth``, the code it reuses; DreamBooth's switch to fine-tune
  the whole text encoder is removed, since here only one row of it trains.
  """
  dreambooth.add_config(c)
  del c.dreambooth.train_text_encoder
  d = ml_collections.ConfigDict()
  d.modifier_token = "<new1>"  # new word for the subject (= data.unique_token); "" = K/V only.
  d.initializer_token = "ktn"  # word or vocabulary piece whose embedding the new one copies.
  c.custom_diffusion = d
  return c


def initializer_id(tokenizer, word: str) -> int:
  """The one token id of ``word``: as text, else as a vocabulary piece.

  diffusers looks the word up as a vocabulary entry, so its default ``ktn``
  (a sub-word piece; as text it would be ``k`` + ``tn``) is accepted as such.

  Raises:
    UserError: ``word`` is neither one token nor a vocabulary entry.
  """
  ids = tokenizer.encode(word, add_special_tokens=False)
  if len(ids) == 1:
    return int(ids[0])
  vocab = tokenizer.get_vocab()
  if word in vocab:
    return int(vocab[word])
  raise UserError(
      f"config.custom_diffusion.initializer_token={word!r} is {len(ids)} "
      "tokens, not one; use a word the tokenizer keeps whole (e.g. the class "
      "noun) or a vocabulary piece such as 'ktn'")


def only_rows(state: nnx.State, component: str, name: str,
              rows: jax.Array) -> nnx.State:
  """``state`` whose parameter ``name`` lets gradients through ``rows`` only.

  Args:
    state: one component's parameters.
    component: its name (``text_encoder``), the prefix of ``name``.
    name: a ``component.torch.key`` name, as in ``config.trainable``.
    rows: bool ``(num_rows,)``.
  """

  def cut(leaf_name, x):
    if leaf_name != name:
      return x
    keep = rows.reshape(rows.shape + (1,) * (x.ndim - 1))
    return jnp.where(keep, x, jax.lax.stop_gradient(x))

  names = optim.param_names({component: state})[component]
  return jax.tree.map(cut, names, state)


class CustomDiffusion(dreambooth.DreamBooth):
  """DreamBooth's loss on cross-attention K/V and a new token's embedding."""

  token_id: int | None = None

  def prepare(self) -> None:
    if self.config.custom_diffusion.modifier_token:
      self.token_id = self.add_modifier_token()
    super().prepare()

  def trains_text_encoder(self) -> bool:
    """Only the modifier token's row of the text encoder trains."""
    return self.token_id is not None

  def add_modifier_token(self) -> int:
    """Adds the modifier token to the pipeline's tokenizer and text encoder.

    The tokenizer grows in place and ``pipeline.text_encoder`` is replaced by
    one with a row more, copied from the initializer token's; the engine
    trains and exports that pipeline, so both reach the export.

    Returns:
      The new token's id.
    """
    cfg, pipe = self.config, self.ctx.pipeline
    token = cfg.custom_diffusion.modifier_token
    if token != cfg.data.unique_token:
      raise UserError(
          f"config.custom_diffusion.modifier_token={token!r} differs from "
          f"config.data.unique_token={cfg.data.unique_token!r}; the prompts "
          "must name the subject with the new token, so set both to the same "
          "word")
    source_id = initializer_id(pipe.tokenizer,
                               cfg.custom_diffusion.initializer_token)
    if pipe.tokenizer.add_tokens(token) != 1:
      raise UserError(
          f"the tokenizer of {cfg.model.pretrained} already has {token!r}; "
          "pick a new word for config.custom_diffusion.modifier_token and "
          "config.data.unique_token, e.g. '<new2>'")
    token_id = pipe.tokenizer.convert_tokens_to_ids(token)
    encoder = pipe.text_encoder
    if token_id != encoder.config.vocab_size:
      raise ValueError(
          f"the new token got id {token_id} but the text encoder has "
          f"{encoder.config.vocab_size} rows; tokenizer and text encoder of "
          f"{cfg.model.pretrained} do not match")
    table = encoder.text_model.embeddings.token_embedding.embedding.get_value()
    pipe.text_encoder = encoder.with_added_tokens(table[source_id][None])
    return int(token_id)

  def new_rows(self) -> np.ndarray:
    """Bool ``(vocab_size,)``: the token-table rows that train."""
    size = self.ctx.pipeline.text_encoder.config.vocab_size
    return np.arange(size) == self.token_id

  def row_masks(self) -> dict:
    if self.token_id is None:
      return {}
    return {TOKEN_TABLE: self.new_rows()}

  def loss_fn(self, params, frozen, batch, rng):
    if self.token_id is not None:
      # Only the new row gets a gradient, so clipping and the reported
      # gradient norm see what trains (diffusers zeroes the other rows' too).
      params = dict(params, text_encoder=only_rows(
          params["text_encoder"], "text_encoder", TOKEN_TABLE,
          jnp.asarray(self.new_rows())))
    return super().loss_fn(params, frozen, batch, rng)
