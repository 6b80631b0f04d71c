"""Rewards and scores for personalisation: similarity, lambda-Harmonic.

One place embeds images and prompts and scores them, for training rewards,
validation and evaluation alike:

  * the maths: cosine similarities, ALIGN-I / ALIGN-T, the lambda-Harmonic
    mean and the DINO reward, pure functions of embeddings. Given JAX arrays
    (or traced values) they run on the device in float32, jit- and
    grad-friendly; given NumPy arrays they run on the host in float64.
  * the DreamBench scores of a subject (DINO, CLIP-I, CLIP-T, H(lam)) and of
    its photos against each other, built on that maths, and the published
    protocols that measure them (``PROTOCOLS``: which DINO and CLIP, and
    whether CLIP-T counts a negative cosine).
  * ``Embedder``: DINO, CLIP or ALIGN embeddings of uint8 images (and CLIP's
    or ALIGN's of prompts, read without the unique token) on the host,
    batched and jitted. RPO's rewards and validation measure ALIGN-I and
    ALIGN-T with one of these, named by a config value
    (``IMAGE_TEXT_MODELS``, or a CLIP or ALIGN folder): ALIGN
    (``kakaobrain/align-base``), the RPO paper's choice, or a CLIP.
  * two ``nnx`` reward modules, differentiable end to end from images in
    [-1, 1]:
      ``HarmonicReward``: the lambda-Harmonic mean of an image-alignment
      score ALIGN-I (to the reference images) and a text-alignment score
      ALIGN-T (to the prompt), both cosine similarities mapped to [0, 1],
      measured with a CLIP (``CLIP_VARIANTS``).
      ``DinoReward``: ``r = -(1 - cos(dino(image), dino(reference)))``
      averaged over the references.
"""

import dataclasses
import functools
import itertools
import os
from pathlib import Path
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from personalize_jax.data import prompts as prompts_lib
from personalize_jax.errors import CheckpointError, UserError
from personalize_jax.models import (align_processor, checkpoint,
                                    image_processor, presets)
from personalize_jax.models import tokenizer as tokenizer_lib
from personalize_jax.models.align import AlignModel
from personalize_jax.models.clip import CLIPModel
from personalize_jax.models.vit import ViTModel

# The CLIP sizes a reward model can use, by config name.
CLIP_VARIANTS = {
    "b32": "openai/clip-vit-base-patch32",
    "b16": "openai/clip-vit-base-patch16",
    "l14": "openai/clip-vit-large-patch14",
}
DEFAULT_ALIGN = "kakaobrain/align-base"
# The image-text models ALIGN-I and ALIGN-T can be measured with, by config
# name: (family, folder or Hub id). "tiny" and "align-tiny" are random.
IMAGE_TEXT_MODELS = {
    **{name: ("clip", hub_id) for name, hub_id in CLIP_VARIANTS.items()},
    "align": ("align", DEFAULT_ALIGN),
    presets.TINY: ("clip", presets.TINY),
    "align-tiny": ("align", presets.TINY),
}
IMAGE_TEXT_FAMILIES = ("clip", "align")  # config.json model_type of each
DEFAULT_DINO = "facebook/dino-vits16"
_EPS = 1e-8
# Embeddings and scores: on the device (float32) or on the host (float64).
Array = jax.Array | np.ndarray


# ------------------------------------------------------------------ maths --

def normalize(x_bd: Array) -> Array:
  """Unit-norm rows: embeddings are compared by cosine.

  A JAX array (or a traced value) is normalised in float32 on the device;
  anything else is read as NumPy and normalised in float64 on the host. The
  scores below all start here, so they follow the kind of their inputs.
  """
  if isinstance(x_bd, jax.Array):
    xp, x_bd = jnp, x_bd.astype(jnp.float32)
  else:
    xp, x_bd = np, np.asarray(x_bd, np.float64)
  return x_bd / xp.maximum(xp.linalg.norm(x_bd, axis=-1, keepdims=True), _EPS)


def pairwise_cosine(a_nd: Array, b_md: Array) -> Array:
  """``(n, m)`` cosine similarities between every row of ``a`` and of ``b``."""
  return normalize(a_nd) @ normalize(b_md).T


def paired_cosine(a_nd: Array, b_nd: Array) -> Array:
  """``(n,)`` cosine similarity of each row of ``a`` with the same row of ``b``."""
  return (normalize(a_nd) * normalize(b_nd)).sum(axis=-1)


def to_unit(cos: Array) -> Array:
  """Maps a cosine similarity from [-1, 1] onto [0, 1]: ``(s + 1) / 2``."""
  return (cos + 1.0) / 2.0


def harmonic(align_i: Array, align_t: Array, lam: float) -> Array:
  """The lambda-Harmonic mean ``1 / (lam / align_i + (1 - lam) / align_t)``.

  Being a harmonic mean, it is dominated by the worse of the two scores: an
  image that copies the references but ignores the prompt scores low.

  Args:
    align_i: ALIGN-I, image alignment in (0, 1].
    align_t: ALIGN-T, text alignment in (0, 1].
    lam: the weight of image alignment, in [0, 1].

  Returns:
    The score, shaped like the broadcast inputs.
  """
  return 1.0 / (lam / align_i + (1.0 - lam) / align_t)


def alignment_scores(image_emb_bd: Array, ref_emb_rd: Array,
                     text_emb_bd: Array) -> tuple[Array, Array]:
  """ALIGN-I and ALIGN-T of each image, in [0, 1].

  Args:
    image_emb_bd: embeddings of the images being scored.
    ref_emb_rd: embeddings of the subject's reference images.
    text_emb_bd: embedding of each image's prompt (same encoder as the images).

  Returns:
    ``(align_i_b, align_t_b)``: ALIGN-I averages the image's similarity over
    all reference images; ALIGN-T is its similarity to its prompt.
  """
  align_i = to_unit(pairwise_cosine(image_emb_bd, ref_emb_rd).mean(axis=-1))
  align_t = to_unit(paired_cosine(image_emb_bd, text_emb_bd))
  return align_i, align_t


def harmonic_reward(image_emb_bd: Array, ref_emb_rd: Array,
                    text_emb_bd: Array, lam: float) -> Array:
  """The lambda-Harmonic reward of each image, ``(b,)``."""
  return harmonic(*alignment_scores(image_emb_bd, ref_emb_rd, text_emb_bd), lam)


def dino_similarity_reward(image_emb_bd: Array, ref_emb_rd: Array) -> Array:
  """``-(1 - cos)`` between each image and the references, averaged: ``(b,)``."""
  return -(1.0 - pairwise_cosine(image_emb_bd, ref_emb_rd).mean(axis=-1))


# ------------------------------------------------------ DreamBench scores --

def harmonic_key(lam: float) -> str:
  """The score name of ``H(lam)``: ``harmonic_0.5``."""
  return f"harmonic_{lam:g}"


@dataclasses.dataclass(frozen=True)
class Protocol:
  """A published way of measuring the DreamBench scores.

  Attributes:
    name: its config value (``protocol``).
    source: whose protocol it is, in words, for reports.
    dino_model: the DINO ViT of the DINO score (a Hub id).
    clip_model: the CLIP of CLIP-I, CLIP-T and H(lam) (a Hub id).
    clip_t_at_least_zero: each image's CLIP-T cosine counts as at least 0
      before the mean, as in torchmetrics' ``clip_score``
      (``max(100 * cos, 0)``).
  """
  name: str
  source: str
  dino_model: str
  clip_model: str
  clip_t_at_least_zero: bool


# The DreamBench protocols by config name. Both score the DINO ViT-S/16 CLS
# cosine over all (generated, reference) pairs. "dreambooth": the DreamBooth
# paper's, with CLIP ViT-B/32. "rpo_code": the RPO authors' code
# (github.com/andrew-miao/RPO, evaluation_metrics.py), with CLIP ViT-B/16 and
# CLIP-T from torchmetrics' clip_score divided by 100.
PROTOCOLS = {p.name: p for p in (
    Protocol("dreambooth", "the DreamBooth paper's", DEFAULT_DINO,
             CLIP_VARIANTS["b32"], clip_t_at_least_zero=False),
    Protocol("rpo_code", "the RPO code's", DEFAULT_DINO,
             CLIP_VARIANTS["b16"], clip_t_at_least_zero=True),
)}


def get_protocol(name: str, key: str = "protocol") -> Protocol:
  """The protocol of ``PROTOCOLS`` called ``name``.

  Args:
    name: its config value.
    key: the config key ``name`` was read from, for the error message.

  Raises:
    UserError: an unknown name.
  """
  if str(name) not in PROTOCOLS:
    raise UserError(f"config.{key}={name!r} is unknown: use one of "
                    f"{', '.join(PROTOCOLS)}")
  return PROTOCOLS[str(name)]


def protocol_models(protocol: Protocol, dino_model: str = "",
                    clip_model: str = "") -> tuple[str, str]:
  """The DINO and CLIP models to score with: ``(dino, clip)``.

  Args:
    protocol: the protocol followed.
    dino_model: "" for the protocol's, or a folder, Hub id or ``tiny``
      that overrides it.
    clip_model: the same for the CLIP.
  """
  return (str(dino_model) or protocol.dino_model,
          str(clip_model) or protocol.clip_model)


def describe_protocol(name: str, dino_model: str, clip_model: str) -> str:
  """The protocol and the models used, in words, for reports.

  ``the DreamBooth paper's (DINO facebook/dino-vits16; CLIP
  openai/clip-vit-base-patch32)``; a model other than the protocol's reads
  ``DINO tiny, overriding the protocol's facebook/dino-vits16``.
  """
  protocol = PROTOCOLS[name]
  parts = []
  for label, used, own in (("DINO", dino_model, protocol.dino_model),
                           ("CLIP", clip_model, protocol.clip_model)):
    overridden = "" if used == own else f", overriding the protocol's {own}"
    parts.append(f"{label} {used}{overridden}")
  if protocol.clip_t_at_least_zero:
    parts.append("CLIP-T of each image counted as at least 0")
  return f"{protocol.source} ({'; '.join(parts)})"


def subject_metrics(dino_gen: np.ndarray, dino_ref: np.ndarray,
                    clip_gen: np.ndarray, clip_ref: np.ndarray,
                    text: np.ndarray, lams: Sequence[float],
                    clip_t_at_least_zero: bool = False) -> dict[str, float]:
  """The DreamBench scores of one subject's generated images, on the host.

  Args:
    dino_gen: ``(n, d)`` DINO embeddings of the generated images.
    dino_ref: ``(m, d)`` DINO embeddings of the reference images.
    clip_gen: ``(n, e)`` CLIP image embeddings of the generated images.
    clip_ref: ``(m, e)`` CLIP image embeddings of the reference images.
    text: ``(n, e)`` CLIP text embedding of each generated image's prompt
      (unique token removed).
    lams: the lambda values of the harmonic scores.
    clip_t_at_least_zero: count each image's CLIP-T cosine as at least 0
      (``Protocol.clip_t_at_least_zero``); the harmonic scores read the
      cosine as it is.

  Returns:
    ``dino`` and ``clip_i``, the mean cosine over all (generated, reference)
    pairs; ``clip_t``, the mean cosine of each image with its prompt; and per
    lambda (``harmonic_key``) the mean lambda-Harmonic score of the images.
    All in float64.
  """
  dino_gen, dino_ref, clip_gen, clip_ref, text = (
      np.asarray(x) for x in (dino_gen, dino_ref, clip_gen, clip_ref, text))
  clip_t = paired_cosine(clip_gen, text)
  if clip_t_at_least_zero:
    clip_t = np.maximum(clip_t, 0.0)
  out = {"dino": float(pairwise_cosine(dino_gen, dino_ref).mean()),
         "clip_i": float(pairwise_cosine(clip_gen, clip_ref).mean()),
         "clip_t": float(clip_t.mean())}
  align_i, align_t = alignment_scores(clip_gen, clip_ref, text)
  for lam in lams:
    out[harmonic_key(lam)] = float(harmonic(align_i, align_t, lam).mean())
  return out


def _mean_distinct_pairs(emb_md: np.ndarray) -> float:
  """The mean cosine over all pairs of distinct rows (i != j); NaN for one."""
  sims = pairwise_cosine(np.asarray(emb_md), np.asarray(emb_md))
  m = sims.shape[0]
  if m < 2:
    return float("nan")
  return float(sims[~np.eye(m, dtype=bool)].mean())


def reference_metrics(dino_ref: np.ndarray,
                      clip_ref: np.ndarray) -> dict[str, float]:
  """DINO and CLIP-I of real photos against each other (distinct pairs).

  The ceiling those scores can reach for the subject; pairs of a photo with
  itself (cosine 1) are left out.
  """
  return {"dino": _mean_distinct_pairs(dino_ref),
          "clip_i": _mean_distinct_pairs(clip_ref)}


# ---------------------------------------------------------- reward models --

def clip_model_id(variant: str) -> str:
  """``b32``/``b16``/``l14`` -> its Hub id; a folder, Hub id or ``tiny`` as is."""
  return CLIP_VARIANTS.get(variant, variant)


def image_text_model(name: str | os.PathLike) -> tuple[str, str]:
  """``(family, model)`` of an image-text model: ``clip`` or ``align``.

  Args:
    name: a name of ``IMAGE_TEXT_MODELS``, or a folder or Hub id (downloaded)
      whose ``config.json`` ``model_type`` says the family.

  Returns:
    The family and what its ``from_pretrained`` loads (a folder, a Hub id's
    local copy, or ``tiny``).

  Raises:
    CheckpointError: no such folder or Hub id, or a checkpoint of another
      family.
  """
  if str(name) in IMAGE_TEXT_MODELS:
    return IMAGE_TEXT_MODELS[str(name)]
  folder = checkpoint.resolve_pretrained(name)
  path = folder / "config.json"
  family = checkpoint.read_json(path).get("model_type")
  if family not in IMAGE_TEXT_FAMILIES:
    raise CheckpointError(
        f"{path} has model_type {family!r}: not an image-text model; pass a "
        f"transformers CLIP ('clip') or ALIGN ('align') checkpoint folder")
  return family, str(folder)


def is_image_text_model(name: str) -> bool:
  """Whether ``name`` can be an image-text model, judged without loading it.

  True for a name of ``IMAGE_TEXT_MODELS``, a CLIP or ALIGN folder, and a
  string shaped like a Hub id (``owner/name``, checked when it loads).

  Raises:
    CheckpointError: a folder of another family, or without ``config.json``.
  """
  if name in IMAGE_TEXT_MODELS:
    return True
  if Path(name).expanduser().is_dir():
    image_text_model(name)
    return True
  return name.count("/") == 1 and not name.startswith((".", "/", "~"))


def _load_dino(path_or_hub_id: str | os.PathLike, **kwargs
               ) -> tuple[ViTModel, image_processor.ImageProcessor]:
  """A DINO ViT and its processor (``tiny``: the random preset)."""
  tiny = str(path_or_hub_id) == presets.TINY
  processor = image_processor.ImageProcessor.from_pretrained(
      image_processor.TINY_DINO if tiny else path_or_hub_id)
  return ViTModel.from_pretrained(path_or_hub_id, **kwargs), processor


def _load_clip(variant: str, **kwargs
               ) -> tuple[CLIPModel, image_processor.ImageProcessor]:
  """A CLIP and its processor, by variant name, folder or Hub id."""
  model_id = clip_model_id(variant)
  return (CLIPModel.from_pretrained(model_id, **kwargs),
          image_processor.ImageProcessor.from_pretrained(model_id))


class DinoReward(nnx.Module):
  """The DINO reward of images in [-1, 1], differentiable end to end.

  ``r = -(1 - cos(dino(image), dino(reference)))`` averaged over references:
  0 for an image whose DINO CLS embedding points exactly like the
  references', down to -2.
  """

  def __init__(self, vit: ViTModel,
               processor: image_processor.ImageProcessor):
    """Wraps a ``ViTModel`` and its ``ImageProcessor``."""
    self.vit = vit
    self.processor = processor

  @classmethod
  def from_pretrained(cls, path_or_hub_id: str | os.PathLike = DEFAULT_DINO,
                      **kwargs) -> "DinoReward":
    """Loads a DINO ViT and its processor (``tiny``: the random preset).

    Args:
      path_or_hub_id: a transformers ViT folder, Hub id or ``tiny``.
      **kwargs: passed to ``ViTModel.from_pretrained`` (``dtype``, ...).
    """
    return cls(*_load_dino(path_or_hub_id, **kwargs))

  def embed(self, images_bhwc: jax.Array) -> jax.Array:
    """DINO CLS embeddings ``(b, d)`` of images in [-1, 1]."""
    return self.vit(self.processor.preprocess_decoded(images_bhwc))[:, 0]

  def __call__(self, images_bhwc: jax.Array, ref_emb_rd: jax.Array) -> jax.Array:
    """The reward ``(b,)`` of images in [-1, 1] given reference embeddings."""
    return dino_similarity_reward(self.embed(images_bhwc), ref_emb_rd)


class HarmonicReward(nnx.Module):
  """The lambda-Harmonic reward measured with a CLIP, differentiable.

  CLIP's image and text towers measure ALIGN-I and ALIGN-T. Which CLIP:
  ``b32`` (default, openai/clip-vit-base-patch32), ``b16`` or ``l14``.
  (RPO's host-side rewards may also use ALIGN: ``Embedder.image_text``.)
  """

  def __init__(self, clip: CLIPModel,
               processor: image_processor.ImageProcessor, lam: float = 0.5):
    """Wraps a ``CLIPModel``, its ``ImageProcessor`` and the weight ``lam``."""
    self.clip = clip
    self.processor = processor
    self.lam = float(lam)

  @classmethod
  def from_pretrained(cls, variant: str = "b32", lam: float = 0.5,
                      **kwargs) -> "HarmonicReward":
    """Loads a CLIP by variant name (``CLIP_VARIANTS``), folder or Hub id.

    Args:
      variant: ``b32``, ``b16``, ``l14``, a transformers CLIP folder, a Hub
        id, or ``tiny``.
      lam: the weight of image alignment.
      **kwargs: passed to ``CLIPModel.from_pretrained`` (``dtype``, ...).

    Use ``load_tokenizer(clip_model_id(variant), subfolder=None)`` from
    ``personalize_jax.models.tokenizer`` for the prompts' token ids.
    """
    return cls(*_load_clip(variant, **kwargs), lam)

  def embed_images(self, images_bhwc: jax.Array) -> jax.Array:
    """CLIP image embeddings ``(b, e)`` of images in [-1, 1]."""
    return self.clip.get_image_features(
        self.processor.preprocess_decoded(images_bhwc))

  def embed_text(self, input_ids_bt: jax.Array) -> jax.Array:
    """CLIP text embeddings ``(b, e)`` of token ids."""
    return self.clip.get_text_features(input_ids_bt)

  def __call__(self, images_bhwc: jax.Array, ref_emb_rd: jax.Array,
               text_emb_bd: jax.Array) -> jax.Array:
    """The reward ``(b,)`` of images in [-1, 1] against references and prompts."""
    return harmonic_reward(self.embed_images(images_bhwc), ref_emb_rd,
                           text_emb_bd, self.lam)


# --------------------------------------------------------- host embeddings --

@functools.partial(jax.jit, static_argnums=(0, 1))
def _features(fn, graphdef, state, inputs):
  return fn(nnx.merge(graphdef, state), inputs)


def _dino_cls(vit: ViTModel, pixels_bhwc: jax.Array) -> jax.Array:
  return vit(pixels_bhwc)[:, 0]


def _clip_image(clip: CLIPModel, pixels_bhwc: jax.Array) -> jax.Array:
  return clip.get_image_features(pixels_bhwc)


def _clip_text(clip: CLIPModel, ids_bt: jax.Array) -> jax.Array:
  return clip.get_text_features(ids_bt)


def _align_image(align: AlignModel, pixels_bhwc: jax.Array) -> jax.Array:
  return align.get_image_features(pixels_bhwc)


def _align_tokenize(tokenizer, prompts: Sequence[str]) -> np.ndarray:
  """``(n, 2, 64)``: ALIGN's token ids and attention mask, stacked so that
  ``Embedder._run`` pads and chunks them together."""
  return np.stack(align_processor.tokenize(tokenizer, prompts), axis=1)


def _align_text(align: AlignModel, ids_and_mask_b2t: jax.Array) -> jax.Array:
  return align.get_text_features(ids_and_mask_b2t[:, 0],
                                 ids_and_mask_b2t[:, 1])


class Embedder:
  """Embeddings of uint8 images (and, with CLIP or ALIGN, of prompts) on the
  host.

  Inputs go through the model ``chunk`` at a time, the last chunk padded to
  full size, so one compilation serves every call whatever the count; the
  embeddings come back in input order as float32 NumPy ``(n, d)``, ready for
  the host scores above (which normalise them). ``Embedder.dino``,
  ``Embedder.clip``, ``Embedder.align`` and ``Embedder.image_text`` (CLIP or
  ALIGN by name or folder) load one.
  """

  def __init__(self, model: nnx.Module,
               processor: (image_processor.ImageProcessor
                           | align_processor.AlignImageProcessor),
               image_features: Callable[[nnx.Module, jax.Array], jax.Array],
               chunk: int = 8, tokenizer=None,
               tokenize: Callable[..., np.ndarray] = tokenizer_lib.tokenize,
               text_features: Callable[[nnx.Module, jax.Array], jax.Array]
               = _clip_text):
    """Wraps a model, the function of it that embeds pixel values, and its
    processor. ``tokenizer`` enables ``texts``: ``tokenize(tokenizer,
    prompts)`` makes the inputs of ``text_features(model, inputs)`` (CLIP's
    by default)."""
    self._graphdef, self._state = nnx.split(model)
    self.processor = processor
    self._image_features = image_features
    self.chunk = chunk
    self.tokenizer = tokenizer
    self._tokenize = tokenize
    self._text_features = text_features

  @classmethod
  def dino(cls, path_or_hub_id: str | os.PathLike = DEFAULT_DINO,
           chunk: int = 8, **kwargs) -> "Embedder":
    """DINO CLS embeddings of images.

    Args:
      path_or_hub_id: a transformers ViT folder, Hub id or ``tiny``.
      chunk: images per model call.
      **kwargs: passed to ``ViTModel.from_pretrained`` (``dtype``, ...).
    """
    vit, processor = _load_dino(path_or_hub_id, **kwargs)
    return cls(vit, processor, _dino_cls, chunk)

  @classmethod
  def clip(cls, variant: str = "b32", chunk: int = 8,
           **kwargs) -> "Embedder":
    """CLIP image and text embeddings.

    Args:
      variant: ``b32``, ``b16``, ``l14`` (``CLIP_VARIANTS``), a transformers
        CLIP folder, a Hub id, or ``tiny``.
      chunk: images or prompts per model call.
      **kwargs: passed to ``CLIPModel.from_pretrained`` (``dtype``, ...).
    """
    clip, processor = _load_clip(variant, **kwargs)
    tokenizer = tokenizer_lib.load_tokenizer(clip_model_id(variant),
                                             subfolder=None)
    return cls(clip, processor, _clip_image, chunk, tokenizer)

  @classmethod
  def align(cls, path_or_hub_id: str | os.PathLike = DEFAULT_ALIGN,
            chunk: int = 8, **kwargs) -> "Embedder":
    """ALIGN image and text embeddings: transformers' ``AlignModel``
    ``get_image_features`` / ``get_text_features`` on what ``AlignProcessor``
    makes (EfficientNet preprocessing, BERT ids padded to 64 tokens).

    Args:
      path_or_hub_id: a transformers ALIGN folder (with its BERT tokenizer),
        a Hub id, or ``tiny`` (random ``presets.ALIGN_TINY``).
      chunk: images or prompts per model call.
      **kwargs: passed to ``AlignModel.from_pretrained`` (``dtype``, ...).
    """
    return cls(AlignModel.from_pretrained(path_or_hub_id, **kwargs),
               align_processor.AlignImageProcessor.from_pretrained(
                   path_or_hub_id),
               _align_image, chunk,
               align_processor.load_tokenizer(path_or_hub_id),
               tokenize=_align_tokenize, text_features=_align_text)

  @classmethod
  def image_text(cls, name: str | os.PathLike, chunk: int = 8,
                 **kwargs) -> "Embedder":
    """A CLIP or ALIGN embedder, by config name, folder or Hub id.

    Args:
      name: a name of ``IMAGE_TEXT_MODELS`` (``b32``, ``b16``, ``l14``,
        ``align``, ``tiny``, ``align-tiny``), or a transformers CLIP or ALIGN
        folder or Hub id (its ``config.json`` ``model_type`` says which).
      chunk: images or prompts per model call.
      **kwargs: passed to the model's ``from_pretrained``.

    Raises:
      CheckpointError: no such model, or one of another family.
    """
    family, model = image_text_model(name)
    load = cls.align if family == "align" else cls.clip
    return load(model, chunk, **kwargs)

  def _run(self, fn, inputs: jax.Array) -> np.ndarray:
    n, chunk = inputs.shape[0], self.chunk
    pad = -n % chunk
    inputs = jnp.pad(inputs, [(0, pad)] + [(0, 0)] * (inputs.ndim - 1))
    outs = [_features(fn, self._graphdef, self._state, inputs[i:i + chunk])
            for i in range(0, n + pad, chunk)]
    return np.asarray(jnp.concatenate(outs)[:n], np.float32)

  def images(self, images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """``(n, d)`` embeddings of uint8 ``(h, w, 3)`` images (a list or a batch).

    Images of different sizes are welcome: each size is preprocessed as one
    batch, and the embeddings are put back in the order given.
    """
    images = [np.asarray(image) for image in images]
    order = sorted(range(len(images)), key=lambda i: images[i].shape)
    pixels = [self.processor(np.stack([images[i] for i in group]))
              for _, group in itertools.groupby(
                  order, key=lambda i: images[i].shape)]
    embeddings = self._run(self._image_features, jnp.concatenate(pixels))
    return embeddings[np.argsort(order)]

  def texts(self, prompts: Sequence[str], unique_token: str) -> np.ndarray:
    """``(n, e)`` CLIP or ALIGN embeddings of prompts, read without the
    unique token.

    The model does not know the token, so each prompt is scored for what it
    says about the class (``prompts.without_token``).

    Raises:
      ValueError: a DINO embedder, which has no text tower.
    """
    if self.tokenizer is None:
      raise ValueError("texts needs a CLIP or ALIGN embedder "
                       "(Embedder.image_text)")
    inputs = self._tokenize(self.tokenizer, [
        prompts_lib.without_token(p, unique_token) for p in prompts])
    return self._run(self._text_features, jnp.asarray(inputs))
