"""ALIGN's preprocessing: ``AlignProcessor`` of transformers, NHWC.

  images   ``AlignImageProcessor`` (transformers' ``EfficientNetImageProcessor``):
           the evaluation path on uint8 images, bit for bit, and a
           differentiable reward path on decoded images in [-1, 1].
  prompts  BERT's tokenizer (``load_tokenizer``), padded and truncated to 64
           tokens with an attention mask (``tokenize``), as ``AlignProcessor``
           does.

``"tiny"`` gives the preprocessing of ``presets.ALIGN_TINY``: a 32 px crop and
a BERT vocabulary derived from the CLIP one this package ships, so it works
offline.
"""

import dataclasses
import functools
import json
import os
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from transformers import BertTokenizer

from personalize_jax.errors import UserError
from personalize_jax.models import checkpoint, image_processor, presets
from personalize_jax.models import tokenizer as tokenizer_lib

MAX_LENGTH = 64  # AlignProcessor pads and truncates prompts to 64 tokens

_PROCESSOR_TYPE = "EfficientNetImageProcessor"
# transformers' EfficientNetImageProcessor class attributes: what a
# preprocessor_config.json leaves out.
_PROCESSOR_DEFAULTS = {
    "do_resize": True, "size": {"height": 346, "width": 346}, "resample": 3,
    "do_center_crop": False, "crop_size": {"height": 289, "width": 289},
    "do_rescale": True, "rescale_factor": 1 / 255, "rescale_offset": False,
    "do_normalize": True, "image_mean": (0.5, 0.5, 0.5),
    "image_std": (0.5, 0.5, 0.5), "include_top": True,
}


@dataclasses.dataclass(frozen=True)
class AlignImageProcessor:
  """transformers' ``EfficientNetImageProcessor`` (its PIL backend), NHWC.

  Resize (Pillow's filters, ``ImageProcessor``'s exact 8-bit and
  differentiable paths), center crop, then ``x * rescale_factor`` (minus 1
  with ``rescale_offset``), ``(x - mean) / std`` if ``do_normalize``, and
  ``x / std`` again if ``include_top``. align-base: 346 px bilinear, 289 px
  crop, ``x / 127.5 - 1``, no normalisation.
  """

  resize: image_processor.ImageProcessor  # resize + crop, pixels in [0, 255]
  do_rescale: bool  # multiply by rescale_factor
  rescale_factor: float  # 1/127.5 for align-base
  rescale_offset: bool  # subtract 1 after rescaling: [-1, 1]
  do_normalize: bool  # subtract image_mean, divide by image_std
  image_mean: tuple[float, ...]  # per-channel mean (RGB)
  image_std: tuple[float, ...]  # per-channel std (RGB)
  include_top: bool  # divide by image_std once more (classification models)

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> "AlignImageProcessor":
    """Parses a ``preprocessor_config.json`` of an EfficientNet processor.

    Raises:
      UserError: another processor type, or an unsupported size or filter.
    """
    kind = (config.get("image_processor_type")
            or config.get("feature_extractor_type") or _PROCESSOR_TYPE)
    kind = kind.replace("FeatureExtractor", "ImageProcessor")
    if kind.removesuffix("Fast").removesuffix("Pil") != _PROCESSOR_TYPE:
      raise UserError(f"image processor type {kind!r} is not ALIGN's; expected "
                      f"{_PROCESSOR_TYPE} in {image_processor.CONFIG_NAME}")
    values = {**_PROCESSOR_DEFAULTS, **config}
    # ViT's processor reads sizes as EfficientNet's does (an int: a square).
    resize = image_processor.ImageProcessor.from_config({
        "image_processor_type": "ViTImageProcessor",
        **{k: values[k] for k in ("do_resize", "size", "resample",
                                  "do_center_crop", "crop_size")},
        "do_rescale": False, "do_normalize": False})
    return cls(
        resize=dataclasses.replace(resize, image_processor_type=kind),
        do_rescale=bool(values["do_rescale"]),
        rescale_factor=float(values["rescale_factor"]),
        rescale_offset=bool(values["rescale_offset"]),
        do_normalize=bool(values["do_normalize"]),
        image_mean=tuple(float(v) for v in values["image_mean"]),
        image_std=tuple(float(v) for v in values["image_std"]),
        include_top=bool(values["include_top"]))

  @classmethod
  def from_pretrained(cls, path_or_hub_id: str | os.PathLike,
                      subfolder: str | None = None) -> "AlignImageProcessor":
    """Reads a folder's ``preprocessor_config.json`` (absent: align-base's).

    ``"tiny"`` gives ``presets.ALIGN_TINY_PROCESSOR`` (40 px, 32 px crop).

    Raises:
      CheckpointError: the folder is missing or the file unreadable.
      UserError: the file describes another processor.
    """
    if str(path_or_hub_id) == presets.TINY:
      return cls.from_config(presets.ALIGN_TINY_PROCESSOR)
    folder = checkpoint.resolve_pretrained(path_or_hub_id, subfolder)
    path = folder / image_processor.CONFIG_NAME
    return cls.from_config(checkpoint.read_json(path) if path.is_file()
                           else presets.ALIGN_PROCESSOR)

  @functools.partial(jax.jit, static_argnames=("self",))
  def _rescale_normalize(self, pixels_bhwc: jax.Array) -> jax.Array:
    x = pixels_bhwc
    if self.do_rescale:
      x = x * self.rescale_factor
      if self.rescale_offset:
        x = x - 1.0
    std = jnp.asarray(self.image_std, jnp.float32)
    if self.do_normalize:
      x = (x - jnp.asarray(self.image_mean, jnp.float32)) / std
    if self.include_top:
      x = x / std
    return x

  def __call__(self, images: jax.Array | np.ndarray | Sequence[np.ndarray]
               ) -> jax.Array:
    """The evaluation path: transformers' pixel values, NHWC.

    Args:
      images: ``(b, h, w, 3)`` uint8 (resized with Pillow's integer
        arithmetic) or float in [0, 1]; or a list of ``(h, w, 3)`` images.

    Returns:
      ``(b, H, W, 3)`` float32 pixel values.

    Raises:
      UserError: images that are not RGB, or sizes that cannot be stacked.
    """
    return self._rescale_normalize(self.resize(images))

  def preprocess_decoded(self, images_bhwc: jax.Array) -> jax.Array:
    """The reward path: decoded images in [-1, 1] -> pixel values.

    Differentiable and jittable; each resize pass is a matmul with Pillow's
    weights, unrounded, so it differs from ``__call__`` on the same picture
    by about one 8-bit level. Values outside [-1, 1] are clipped.
    """
    return self._rescale_normalize(self.resize.preprocess_decoded(images_bhwc))


def _tiny_vocab() -> dict[str, int]:
  """A BERT vocabulary for the ``tiny`` ALIGN, built offline.

  BERT's special tokens, every character WordPiece may continue a word with
  (``##a``), ASCII punctuation (BERT splits it off), then whole lowercase
  words of the shipped CLIP vocabulary in its order (frequent words first),
  up to ``presets.ALIGN_TINY``'s ``vocab_size``.
  """
  size = presets.ALIGN_TINY["text_config"]["vocab_size"]
  chars = "abcdefghijklmnopqrstuvwxyz0123456789"
  tokens = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            + [f"##{c}" for c in chars]
            + list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"))
  clip = json.loads((tokenizer_lib.ASSETS / "vocab.json").read_text(
      encoding="utf-8"))
  words = (t[:-len("</w>")] for t in sorted(clip, key=clip.get)
           if re.fullmatch(r"[a-z0-9]+</w>", t))
  vocab = dict.fromkeys(tokens)
  for word in words:
    if len(vocab) == size:
      break
    vocab.setdefault(word)
  return {token: i for i, token in enumerate(vocab)}


def load_tokenizer(path_or_hub_id: str | os.PathLike,
                   subfolder: str | None = None) -> BertTokenizer:
  """The BERT tokenizer of an ALIGN checkpoint (``transformers.BertTokenizer``).

  Args:
    path_or_hub_id: the checkpoint folder or Hub id, holding
      ``tokenizer.json`` or ``vocab.txt``; or ``"tiny"`` (``_tiny_vocab``).
    subfolder: a folder inside it.

  Raises:
    CheckpointError: the folder has no tokenizer files, or they do not load.
  """
  if str(path_or_hub_id) == presets.TINY:
    return BertTokenizer(vocab=_tiny_vocab(), model_max_length=MAX_LENGTH)
  return tokenizer_lib.load_from_folder(
      BertTokenizer, checkpoint.resolve_pretrained(path_or_hub_id, subfolder),
      (("tokenizer.json",), ("vocab.txt",)), kind="BERT",
      hint="pass the ALIGN checkpoint folder (kakaobrain/align-base has them)")


def tokenize(tokenizer: BertTokenizer, prompts: str | Sequence[str],
             max_length: int = MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
  """Token ids and attention mask as ``AlignProcessor`` makes them.

  Padded and truncated to ``max_length`` (64, as align-base was trained).

  Returns:
    ``(input_ids, attention_mask)``, each ``(batch, max_length)`` int32.
  """
  prompts = [prompts] if isinstance(prompts, str) else list(prompts)
  out = tokenizer(prompts, padding="max_length", max_length=max_length,
                  truncation=True)
  as_array = lambda key: np.asarray(out[key], np.int32).reshape(-1, max_length)
  return as_array("input_ids"), as_array("attention_mask")
