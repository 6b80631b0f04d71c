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
from personalize_jax.engine.method import Context, Method
from personalize_jax.errors import UserError
from personalize_jax import pipeline as pipeline_lib
from personalize_jax.methods import dreambooth
from personalize_jax.models import tokenizer as tokenizer_lib

# The pipeline components config.trainable may name (text_encoder_2: SDXL's).
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# DreamBooth's loss, so DreamBooth's training options (engine/config.py).
TRAINING_OPTIONS = dreambooth.TRAINING_OPTIONS

# What trains, as ``config.trainable`` regexes: cross-attention K/V of the
# U-Net and the text encoder's token table (whose rows ``row_masks`` limits
# to the modifier token's).
TRAINABLE = (r"^unet\..*attn2\.to_[kv]\.",
             r"^text_encoder\.text_model\.embeddings\.token_embedding\.")
TOKEN_TABLE = "text_encoder.text_model.embeddings.token_embedding.weight"
# SDXL's second text encoder gets the token too; its row trains beside the
# first one's (resolve adds the regex on an SDXL model).
TRAINABLE_2 = r"^text_encoder_2\.text_model\.embeddings\.token_embedding\."
TOKEN_TABLE_2 = "text_encoder_2.text_model.embeddings.token_embedding.weight"
# (component, token table, tokenizer attribute) of each text encoder.
_ENCODERS = (("text_encoder", TOKEN_TABLE, "tokenizer"),
             ("text_encoder_2", TOKEN_TABLE_2, "tokenizer_2"))


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


def refuse_lora(config: ml_collections.ConfigDict) -> None:
  """Custom Diffusion trains a small subset already: no adapters on top."""
  if config.lora.rank:
    raise UserError(
        f"config.lora.rank={config.lora.rank!r} is invalid for Custom "
        "Diffusion: it already trains only the cross-attention K/V (and the "
        "new token), so set lora.rank=0, or train LoRA with the DreamBooth, "
        "RPO or Look Forward (DreamBooth) recipes")


def resolve(config: ml_collections.ConfigDict) -> None:
  """Without a modifier token the token tables have nothing to train; with
  one on SDXL the second encoder's row trains with the first's."""
  refuse_lora(config)
  patterns = [p for p in config.trainable if p != TRAINABLE_2]
  if not config.custom_diffusion.modifier_token:
    patterns = [p for p in patterns if p != TRAINABLE[1]]
  elif (TRAINABLE[1] in patterns
        and pipeline_lib.is_sdxl_source(config.model.pretrained)):
    patterns.append(TRAINABLE_2)
  config.trainable = tuple(patterns)


def base_tokenizers(config: ml_collections.ConfigDict) -> list:
  """The tokenizers of ``config.model.pretrained`` (files only, no model):
  one, or SDXL's two."""
  source = config.model.pretrained
  sdxl = pipeline_lib.is_sdxl_source(source)
  if source in pipeline_lib.TINY_PIPELINES:
    return list(pipeline_lib.tiny_tokenizers(sdxl).values())
  # A Hub id fetches the tokenizer files alone.
  return [tokenizer_lib.load_tokenizer(source, subfolder=name)
          for name in (("tokenizer", "tokenizer_2") if sdxl
                       else ("tokenizer",))]


def validate(config: ml_collections.ConfigDict) -> None:
  """One-line errors for the modifier and initializer tokens.

  Reads the base model's tokenizer files (not its weights) to check that the
  initializer is one token and the modifier token is new.
  """
  dreambooth.validate(config)
  refuse_lora(config)
  token = config.custom_diffusion.modifier_token
  if not token:
    return
  if token != config.data.unique_token:
    raise UserError(
        f"config.custom_diffusion.modifier_token={token!r} differs from "
        f"config.data.unique_token={config.data.unique_token!r}; the prompts "
        "must name the subject with the new token, so set both to the same "
        "word")
  for tokenizer in base_tokenizers(config):
    initializer_id(tokenizer, config.custom_diffusion.initializer_token)
    if token in tokenizer.get_vocab():
      raise UserError(
          f"the tokenizer of {config.model.pretrained} already has {token!r}; "
          "pick a new word for config.custom_diffusion.modifier_token and "
          "config.data.unique_token, e.g. '<new2>'")


def add_modifier_token(ctx: Context) -> dict[str, int]:
  """Adds the modifier token to the pipeline's tokenizers and text encoders.

  Each tokenizer grows in place and its text encoder is replaced by one with
  a row more, copied from the initializer token's (SDXL: in both encoders,
  as each has its own vocabulary table); the engine trains and exports that
  pipeline, so they reach the export.

  Returns:
    ``{component: the new token's id}`` per text encoder.
  """
  cfg, pipe = ctx.config, ctx.pipeline
  token = cfg.custom_diffusion.modifier_token
  ids = {}
  for component, _, tokenizer_name in _ENCODERS:
    encoder, tokenizer = getattr(pipe, component), getattr(pipe,
                                                           tokenizer_name)
    if encoder is None:
      continue
    source_id = initializer_id(tokenizer,
                               cfg.custom_diffusion.initializer_token)
    if tokenizer.add_tokens(token) != 1:
      raise UserError(
          f"the tokenizer of {cfg.model.pretrained} already has {token!r}; "
          "pick a new word for config.custom_diffusion.modifier_token and "
          "config.data.unique_token, e.g. '<new2>'")
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id != encoder.config.vocab_size:
      raise ValueError(
          f"the new token got id {token_id} but the {component} has "
          f"{encoder.config.vocab_size} rows; its tokenizer and it do not "
          f"match in {cfg.model.pretrained}")
    table = encoder.text_model.embeddings.token_embedding.embedding.get_value()
    setattr(pipe, component, encoder.with_added_tokens(table[source_id][None]))
    ids[component] = int(token_id)
  return ids


def new_rows(vocab_size: int, token_id: int) -> np.ndarray:
  """Bool ``(vocab_size,)``: the token-table rows that train."""
  return np.arange(vocab_size) == token_id


def restrict(params, rows: dict[str, np.ndarray]):
  """``params`` whose token tables pass gradients through their ``rows`` only.

  ``rows`` maps a token table's name (``TOKEN_TABLE``, SDXL's
  ``TOKEN_TABLE_2``) to its bool rows. Clipping and the reported gradient
  norm then see what trains (diffusers zeroes the other rows' gradients
  too); a table whose encoder does not train is left as it is.
  """
  out = dict(params)
  for component, table, _ in _ENCODERS:
    if table in rows and component in params:
      out[component] = only_rows(params[component], component, table,
                                 jnp.asarray(rows[table]))
  return out


def setup(ctx: Context) -> tuple[dict, dict[str, np.ndarray]]:
  """What trains: ``({name: module}, {token table: rows})``.

  Adds the modifier token first (when there is one), so that the grown text
  encoders are the ones that train and are exported. The rows are the
  engine's ``row_masks`` (empty without a modifier token).
  """
  token_ids = {}
  if ctx.config.custom_diffusion.modifier_token:
    token_ids = add_modifier_token(ctx)
  trainable = {"unet": ctx.pipeline.unet, **dreambooth.text_modules(ctx)}
  rows = {table: new_rows(trainable[component].config.vocab_size,
                          token_ids[component])
          for component, table, _ in _ENCODERS
          if component in token_ids and component in trainable}
  return trainable, rows


def build(ctx: Context) -> Method:
  """DreamBooth's loss on cross-attention K/V and the new token's row."""
  config = ctx.config
  trainable, rows = setup(ctx)
  data = dreambooth.prepare(ctx, text_trains="text_encoder" in trainable)
  graphs = ctx.graphs(trainable)

  def loss_fn(params, frozen, batch, rng):
    return dreambooth.denoising_loss(config, graphs, data,
                                     restrict(params, rows), frozen, batch, rng)

  return Method(
      trainable=trainable, loss_fn=loss_fn,
      batch=lambda step: dreambooth.make_batch(config, data, step),
      constants=dreambooth.constants(data),
      row_masks=rows)
