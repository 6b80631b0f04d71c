"""Rewards for personalisation: similarity scores, lambda-Harmonic, Bradley-Terry.

Everything here is a pure JAX function of embeddings (jit- and grad-friendly),
plus two small ``nnx`` modules that turn images into those embeddings:

  * ``HarmonicReward`` (RPO): the lambda-Harmonic mean of an image-alignment
    score ALIGN-I (to the reference images) and a text-alignment score
    ALIGN-T (to the prompt), both cosine similarities mapped to [0, 1].
    The RPO paper measures them with Google's ALIGN model, which has no Flax
    port (or public weights in a supported layout); CLIP stands in for it,
    its size chosen by a config value (``CLIP_VARIANTS``).
  * ``DinoReward``: ``r = -(1 - cos(dino(image), dino(reference)))`` averaged
    over the references, differentiable end to end from images in [-1, 1].

Preferences between a reference image and a generated one follow the
Bradley-Terry model: ``P(reference preferred) = sigmoid(r_ref - r_gen)``.
"""

import os

import jax
import jax.numpy as jnp
from flax import nnx

from personalize_jax.models import image_processor, presets
from personalize_jax.models.clip import CLIPModel
from personalize_jax.models.vit import ViTModel

# The CLIP sizes a reward model can use, by config name.
CLIP_VARIANTS = {
    "b32": "openai/clip-vit-base-patch32",
    "b16": "openai/clip-vit-base-patch16",
    "l14": "openai/clip-vit-large-patch14",
}
DEFAULT_DINO = "facebook/dino-vits16"
_EPS = 1e-8


def normalize(x_bd: jax.Array) -> jax.Array:
  """Unit-norm rows (embeddings are compared by cosine, in float32)."""
  x_bd = x_bd.astype(jnp.float32)
  return x_bd / jnp.maximum(jnp.linalg.norm(x_bd, axis=-1, keepdims=True), _EPS)


def pairwise_cosine(a_nd: jax.Array, b_md: jax.Array) -> jax.Array:
  """``(n, m)`` cosine similarities between every row of ``a`` and of ``b``."""
  return normalize(a_nd) @ normalize(b_md).T


def paired_cosine(a_nd: jax.Array, b_nd: jax.Array) -> jax.Array:
  """``(n,)`` cosine similarity of each row of ``a`` with the same row of ``b``."""
  return jnp.sum(normalize(a_nd) * normalize(b_nd), axis=-1)


def to_unit(cos: jax.Array) -> jax.Array:
  """Maps a cosine similarity from [-1, 1] onto [0, 1]: ``(s + 1) / 2``."""
  return (cos + 1.0) / 2.0


def harmonic(align_i: jax.Array, align_t: jax.Array, lam: float) -> jax.Array:
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


def alignment_scores(image_emb_bd: jax.Array, ref_emb_rd: jax.Array,
                     text_emb_bd: jax.Array) -> tuple[jax.Array, jax.Array]:
  """ALIGN-I and ALIGN-T of each image, in [0, 1].

  Args:
    image_emb_bd: embeddings of the images being scored.
    ref_emb_rd: embeddings of the subject's reference images.
    text_emb_bd: embedding of each image's prompt (same encoder as the images).

  Returns:
    ``(align_i_b, align_t_b)``: ALIGN-I averages the image's similarity over
    all reference images; ALIGN-T is its similarity to its prompt.
  """
  align_i = to_unit(jnp.mean(pairwise_cosine(image_emb_bd, ref_emb_rd), axis=-1))
  align_t = to_unit(paired_cosine(image_emb_bd, text_emb_bd))
  return align_i, align_t


def harmonic_reward(image_emb_bd: jax.Array, ref_emb_rd: jax.Array,
                    text_emb_bd: jax.Array, lam: float) -> jax.Array:
  """The lambda-Harmonic reward of each image, ``(b,)``."""
  return harmonic(*alignment_scores(image_emb_bd, ref_emb_rd, text_emb_bd), lam)


def dino_similarity_reward(image_emb_bd: jax.Array,
                           ref_emb_rd: jax.Array) -> jax.Array:
  """``-(1 - cos)`` between each image and the references, averaged: ``(b,)``."""
  return -(1.0 - jnp.mean(pairwise_cosine(image_emb_bd, ref_emb_rd), axis=-1))


def bradley_terry_prob(r_ref: jax.Array, r_gen: jax.Array) -> jax.Array:
  """P(reference preferred) = ``exp(r_ref) / (exp(r_ref) + exp(r_gen))``.

  Computed as ``sigmoid(r_ref - r_gen)``, which does not overflow.
  """
  return jax.nn.sigmoid(jnp.asarray(r_ref, jnp.float32)
                        - jnp.asarray(r_gen, jnp.float32))


def sample_preference_labels(rng: jax.Array, r_ref: jax.Array,
                             r_gen: jax.Array) -> jax.Array:
  """Samples Bradley-Terry preferences: 1.0 where the reference wins, else 0.0.

  Args:
    rng: a PRNG key.
    r_ref: rewards of the reference images.
    r_gen: rewards of the generated images (broadcastable with ``r_ref``).

  Returns:
    float32 labels with the broadcast shape, each 1 with probability
    ``bradley_terry_prob(r_ref, r_gen)``.
  """
  p = bradley_terry_prob(r_ref, r_gen)
  return jax.random.bernoulli(rng, p).astype(jnp.float32)


def clip_model_id(variant: str) -> str:
  """``b32``/``b16``/``l14`` -> its Hub id; a folder, Hub id or ``tiny`` as is."""
  return CLIP_VARIANTS.get(variant, variant)


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
    tiny = str(path_or_hub_id) == presets.TINY
    processor = image_processor.ImageProcessor.from_pretrained(
        image_processor.TINY_DINO if tiny else path_or_hub_id)
    return cls(ViTModel.from_pretrained(path_or_hub_id, **kwargs), processor)

  def embed(self, images_bhwc: jax.Array) -> jax.Array:
    """DINO CLS embeddings ``(b, d)`` of images in [-1, 1]."""
    return self.vit(self.processor.preprocess_decoded(images_bhwc))[:, 0]

  def __call__(self, images_bhwc: jax.Array, ref_emb_rd: jax.Array) -> jax.Array:
    """The reward ``(b,)`` of images in [-1, 1] given reference embeddings."""
    return dino_similarity_reward(self.embed(images_bhwc), ref_emb_rd)


class HarmonicReward(nnx.Module):
  """The lambda-Harmonic reward with CLIP standing in for ALIGN.

  RPO scores images with Google's ALIGN model; ALIGN has no Flax port and no
  weights in a layout this package loads, so CLIP's image and text towers
  measure ALIGN-I and ALIGN-T instead. Which CLIP is a config choice:
  ``b32`` (default, openai/clip-vit-base-patch32), ``b16`` or ``l14``.
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
    model_id = clip_model_id(variant)
    return cls(CLIPModel.from_pretrained(model_id, **kwargs),
               image_processor.ImageProcessor.from_pretrained(model_id), lam)

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
