"""The CLIP / DINO image processors of transformers, in JAX and differentiable.

``preprocessor_config.json`` of ``CLIPImageProcessor`` and
``BitImageProcessor`` (DINOv2): resize the shortest edge, center crop;
``ViTImageProcessor`` (DINO): resize to a fixed size. Then rescale to [0, 1]
and normalise with the mean and std.

The reference is transformers' PIL backend (``CLIPImageProcessorPil``, ...:
what ``AutoImageProcessor.from_pretrained`` returns when torchvision is not
installed, and with ``backend="pil"``): Pillow's resampling filters,
antialiased when shrinking. With torchvision installed, transformers 5
defaults to its torchvision backend, whose resize differs from Pillow's by
about a grey level; pass ``backend="pil"`` there to compare.

Two entry points:
  ``__call__``            the evaluation path, images as stored (uint8, or
                          float in [0, 1]). uint8 images are resized with
                          Pillow's own integer arithmetic, so the pixel
                          values equal transformers' to float precision.
  ``preprocess_decoded``  the reward path: decoded images in [-1, 1] inside
                          ``jax.jit``. Each resize pass is a matmul with
                          Pillow's weights, clipped to [0, 255] but not
                          rounded: differentiable, cheap on accelerators.
"""

import dataclasses
import functools
import math
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from personalize_jax.errors import UserError
from personalize_jax.models import checkpoint, presets

TINY_DINO = "tiny-dino"
CONFIG_NAME = "preprocessor_config.json"

_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_SHORTEST_EDGE_DEFAULTS = dict(
    size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
    do_center_crop=True, resample=3, image_mean=_OPENAI_CLIP_MEAN,
    image_std=_OPENAI_CLIP_STD)
# transformers' class attributes: what a preprocessor_config.json leaves out.
_CLASS_DEFAULTS = {
    "CLIPImageProcessor": _SHORTEST_EDGE_DEFAULTS,
    "BitImageProcessor": _SHORTEST_EDGE_DEFAULTS,
    "ViTImageProcessor": dict(
        size={"height": 224, "width": 224}, crop_size=None,
        do_center_crop=False, resample=2, image_mean=(0.5, 0.5, 0.5),
        image_std=(0.5, 0.5, 0.5)),
}
# An int size means a square for ViT and the shortest edge for CLIP/BiT.
_SQUARE_SIZE = {"ViTImageProcessor"}


def _sinc(x: float) -> float:
  return 1.0 if x == 0.0 else math.sin(math.pi * x) / (math.pi * x)


def _hamming(x: float) -> float:
  x = abs(x)
  if x == 0.0:
    return 1.0
  if x >= 1.0:
    return 0.0
  # Pillow writes these constants as C floats.
  return _sinc(x) * (float(np.float32(0.54))
                     + float(np.float32(0.46)) * math.cos(math.pi * x))


def _bicubic(x: float) -> float:
  a, x = -0.5, abs(x)  # Pillow's a=-0.5 (torch's bicubic uses -0.75)
  if x < 1.0:
    return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  if x < 2.0:
    return (((x - 5.0) * x + 8.0) * x - 4.0) * a
  return 0.0


# PIL.Image.Resampling value -> (filter, support), as in Pillow's Resample.c.
_FILTERS = {
    1: (lambda x: _sinc(x) * _sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0, 3.0),
    2: (lambda x: max(0.0, 1.0 - abs(x)), 1.0),
    3: (_bicubic, 2.0),
    4: (lambda x: 1.0 if -0.5 < x <= 0.5 else 0.0, 0.5),
    5: (_hamming, 1.0),
}


_PRECISION_BITS = 22  # Pillow's fixed-point coefficients for 8-bit images


@functools.lru_cache(maxsize=64)
def pil_coefficients(in_size: int, out_size: int, resample: int
                     ) -> tuple[np.ndarray, np.ndarray]:
  """The taps of one Pillow resize pass (``Image.resize``, Resample.c).

  Pillow widens the filter by the shrink factor (antialiasing), truncates its
  support to whole pixels inside the image and normalises each output's
  weights to sum 1.

  Returns:
    ``first``: ``(out,)`` the first input index of each output, and
    ``weights``: ``(out, taps)`` float64, zero past the support.
  """
  kernel, support = _FILTERS[resample]
  scale = in_size / out_size
  filterscale = max(scale, 1.0)
  support *= filterscale
  taps = math.ceil(support) * 2 + 1
  first = np.zeros(out_size, np.int64)
  weights = np.zeros((out_size, taps), np.float64)
  for i in range(out_size):
    center = (i + 0.5) * scale
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    row = np.array([kernel((x - center + 0.5) * (1.0 / filterscale))
                    for x in range(lo, hi)])
    if row.sum() != 0.0:
      row /= row.sum()
    first[i] = lo
    weights[i, :hi - lo] = row
  return first, weights


@functools.lru_cache(maxsize=64)
def pil_resize_matrix(in_size: int, out_size: int, resample: int) -> np.ndarray:
  """``(out, in)`` float weights of one Pillow resize pass."""
  first, weights = pil_coefficients(in_size, out_size, resample)
  matrix = np.zeros((out_size, in_size), np.float64)
  for i, (lo, row) in enumerate(zip(first, weights)):
    n = min(len(row), in_size - lo)
    matrix[i, lo:lo + n] = row[:n]
  return matrix


def _resize_axis(x: jax.Array, out_size: int, axis: int,
                 resample: int) -> jax.Array:
  """One resize pass on float pixels: a matmul, differentiable.

  The result is clipped to [0, 255] as Pillow's 8-bit images are: the
  negative lobes of bicubic and Lanczos overshoot at sharp edges.
  """
  if x.shape[axis] == out_size:
    return x
  weights = jnp.asarray(pil_resize_matrix(x.shape[axis], out_size, resample),
                        jnp.float32)
  # HIGHEST: TF32/bf16 matmuls would cost a quarter of a grey level here.
  out = jnp.tensordot(x, weights, axes=[[axis], [1]],
                      precision=jax.lax.Precision.HIGHEST)
  return jnp.clip(jnp.moveaxis(out, -1, axis), 0.0, 255.0)


def _resize_axis_8bit(x: jax.Array, out_size: int, axis: int,
                      resample: int) -> jax.Array:
  """One resize pass on int32 0..255 pixels, with Pillow's integer arithmetic.

  Pillow rounds the weights to 22-bit fixed point and each pass to uint8;
  float weights with rounding still miss it on about 0.1% of a photo's
  pixels, hence this exact version for evaluation. It is a sum over the
  (few) taps, not a matmul, to stay cheap on big photos.
  """
  in_size = x.shape[axis]
  if in_size == out_size:
    return x
  first, weights = pil_coefficients(in_size, out_size, resample)
  fixed = np.trunc(weights * (1 << _PRECISION_BITS)
                   + np.where(weights < 0, -0.5, 0.5)).astype(np.int32)
  index = jnp.asarray(np.minimum(first[None] + np.arange(fixed.shape[1])[:, None],
                                 in_size - 1), jnp.int32)  # (taps, out)
  fixed = jnp.asarray(fixed.T)  # (taps, out); zero past each support
  # The resized axis goes first, so that each tap gathers whole rows.
  x = jnp.moveaxis(x, axis, 0)
  to_rows = (slice(None),) + (None,) * (x.ndim - 1)

  # A loop, not an unrolled sum: shrinking 2048 px to 32 takes 257 taps.
  def add_tap(k, acc):
    return acc + jnp.take(x, index[k], axis=0) * fixed[k][to_rows]

  acc = jnp.full((out_size,) + x.shape[1:], 1 << (_PRECISION_BITS - 1),
                 jnp.int32)
  acc = jax.lax.fori_loop(0, fixed.shape[0], add_tap, acc)
  out = jnp.clip(acc >> _PRECISION_BITS, 0, 255)
  return jnp.moveaxis(out, 0, axis)


def _center_crop(x_bhwc: jax.Array, crop_hw: tuple[int, int]) -> jax.Array:
  """transformers' center crop, zero-padding sides smaller than the crop."""
  pads, starts = [(0, 0)], []
  for n, c in zip(x_bhwc.shape[1:3], crop_hw):
    before = math.ceil(max(c - n, 0) / 2)
    pads.append((before, max(c - n, 0) - before))
    starts.append((n - c) // 2 + before)
  x_bhwc = jnp.pad(x_bhwc, pads + [(0, 0)])
  (top, left), (h, w) = starts, crop_hw
  return x_bhwc[:, top:top + h, left:left + w]


def _as_hw(size: Any, square: bool, what: str) -> dict:
  """transformers' ``get_size_dict`` for the size forms found in the wild."""
  if isinstance(size, Mapping):
    return dict(size)
  if isinstance(size, int):
    return ({"height": size, "width": size} if square
            else {"shortest_edge": size})
  if isinstance(size, (list, tuple)) and len(size) == 2:
    return {"height": int(size[0]), "width": int(size[1])}
  raise UserError(f"{what}={size!r} in {CONFIG_NAME} is not an int, "
                  "[height, width] or a dict; fix the file")


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
  """A CLIP / BiT / ViT image processor of transformers (resize, crop, normalise).

  Build it with ``from_pretrained`` or ``from_config``; the fields are the
  parsed ``preprocessor_config.json``.
  """

  image_processor_type: str  # CLIP-, Bit- or ViTImageProcessor
  do_resize: bool  # resize before cropping
  shortest_edge: int | None  # resize the short side to this, keeping aspect
  resize_hw: tuple[int, int] | None  # or resize to exactly (height, width)
  resample: int  # PIL.Image.Resampling value (2 bilinear, 3 bicubic, ...)
  do_center_crop: bool  # crop the center after resizing
  crop_hw: tuple[int, int] | None  # (height, width) of the crop
  do_rescale: bool  # multiply 0..255 pixel values by rescale_factor
  rescale_factor: float  # usually 1/255
  do_normalize: bool  # subtract image_mean, divide by image_std
  image_mean: tuple[float, ...]  # per-channel mean (RGB)
  image_std: tuple[float, ...]  # per-channel std (RGB)

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> "ImageProcessor":
    """Parses the contents of a ``preprocessor_config.json``.

    Raises:
      UserError: an unsupported processor type, size form or resampling filter.
    """
    kind = config.get("image_processor_type") or config.get(
        "feature_extractor_type", "")
    kind = kind.replace("FeatureExtractor", "ImageProcessor")
    kind = kind.removesuffix("Fast").removesuffix("Pil")
    if kind not in _CLASS_DEFAULTS:
      raise UserError(
          f"image processor type {kind!r} is not supported; expected one of "
          f"{sorted(_CLASS_DEFAULTS)} in {CONFIG_NAME}")
    values = {**_CLASS_DEFAULTS[kind], **config}
    square = kind in _SQUARE_SIZE
    size = _as_hw(values["size"], square, "size")
    if set(size) == {"shortest_edge"}:
      shortest_edge, resize_hw = int(size["shortest_edge"]), None
    elif set(size) == {"height", "width"}:
      shortest_edge, resize_hw = None, (int(size["height"]), int(size["width"]))
    else:
      raise UserError(f"size={size} in {CONFIG_NAME} is not supported; use "
                      "{'shortest_edge': n} or {'height': h, 'width': w}")
    crop = values.get("crop_size")
    crop_hw = None
    if values["do_center_crop"]:
      crop = _as_hw(crop, True, "crop_size")
      if set(crop) != {"height", "width"}:
        raise UserError(f"crop_size={crop} in {CONFIG_NAME} needs 'height' "
                        "and 'width'")
      crop_hw = (int(crop["height"]), int(crop["width"]))
    resample = int(values["resample"])
    if resample not in _FILTERS:
      raise UserError(f"resample={resample} in {CONFIG_NAME} is not supported; "
                      f"use one of {sorted(_FILTERS)} (PIL.Image.Resampling)")
    return cls(
        image_processor_type=kind, do_resize=bool(values.get("do_resize", True)),
        shortest_edge=shortest_edge, resize_hw=resize_hw, resample=resample,
        do_center_crop=bool(values["do_center_crop"]), crop_hw=crop_hw,
        do_rescale=bool(values.get("do_rescale", True)),
        rescale_factor=float(values.get("rescale_factor", 1 / 255)),
        do_normalize=bool(values.get("do_normalize", True)),
        image_mean=tuple(float(v) for v in values["image_mean"]),
        image_std=tuple(float(v) for v in values["image_std"]))

  @classmethod
  def from_pretrained(cls, path_or_hub_id: str | os.PathLike,
                      subfolder: str | None = None) -> "ImageProcessor":
    """Reads ``preprocessor_config.json`` from a folder or Hub id.

    ``"tiny"`` gives the tiny CLIP processor (``presets.CLIP_PROCESSOR``),
    ``"tiny-dino"`` the tiny DINO one (``presets.DINO_PROCESSOR``).

    Raises:
      CheckpointError: the folder or file is missing or unreadable.
      UserError: the file describes an unsupported processor.
    """
    if str(path_or_hub_id) == presets.TINY:
      return cls.from_config(presets.CLIP_PROCESSOR)
    if str(path_or_hub_id) == TINY_DINO:
      return cls.from_config(presets.DINO_PROCESSOR)
    folder = checkpoint.resolve_pretrained(path_or_hub_id, subfolder)
    return cls.from_config(checkpoint.read_json(folder / CONFIG_NAME))

  def resized_hw(self, height: int, width: int) -> tuple[int, int]:
    """The size transformers resizes a ``height x width`` image to."""
    if not self.do_resize:
      return height, width
    if self.resize_hw is not None:
      return self.resize_hw
    # transformers' get_resize_output_image_size (truncating, like torchvision)
    short, long = (width, height) if width <= height else (height, width)
    new_short = self.shortest_edge
    new_long = int(new_short * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)

  def output_hw(self, height: int, width: int) -> tuple[int, int]:
    """The ``(height, width)`` of the pixel values for an input size."""
    return self.crop_hw if self.do_center_crop else self.resized_hw(height, width)

  # One compiled program per input size: eagerly, each of the many small ops
  # would be compiled on its own for every new photo size.
  @functools.partial(jax.jit, static_argnames=("self", "exact_8bit"))
  def _process(self, pixels_bhwc: jax.Array, exact_8bit: bool) -> jax.Array:
    """Resize, crop, rescale, normalise pixels in [0, 255].

    ``exact_8bit``: the pixels are uint8 and the resize follows Pillow's
    8-bit arithmetic exactly (not differentiable); otherwise they are float.
    """
    if exact_8bit:
      pixels_bhwc = pixels_bhwc.astype(jnp.int32)
    in_h, in_w = pixels_bhwc.shape[1:3]
    out_h, out_w = self.resized_hw(in_h, in_w)
    resize = _resize_axis_8bit if exact_8bit else _resize_axis
    # Pillow rounds to uint8 between its two passes, so their order shows in
    # the last bit: width first, unless the height shrinks by more than twice
    # as many pixels as the width (Pillow >= 13; older Pillow: always width).
    if out_h < in_h and in_h - out_h > 2 * (in_w - out_w):
      x = resize(resize(pixels_bhwc, out_h, 1, self.resample), out_w, 2,
                 self.resample)
    else:
      x = resize(resize(pixels_bhwc, out_w, 2, self.resample), out_h, 1,
                 self.resample)
    x = x.astype(jnp.float32)
    if self.do_center_crop:
      x = _center_crop(x, self.crop_hw)
    if self.do_rescale:
      x = x * self.rescale_factor
    if self.do_normalize:
      mean = jnp.asarray(self.image_mean, jnp.float32)
      std = jnp.asarray(self.image_std, jnp.float32)
      x = (x - mean) / std
    return x

  def __call__(self, images: jax.Array | np.ndarray | Sequence[np.ndarray]
               ) -> jax.Array:
    """The evaluation path: the pixel values transformers would compute.

    Args:
      images: ``(b, h, w, 3)`` uint8, or float in [0, 1]; or a list of
        ``(h, w, 3)`` images of different sizes (each resized on its own).

    Returns:
      ``(b, H, W, 3)`` float32 pixel values (NHWC).

    Raises:
      UserError: images that are not RGB, or sizes that cannot be stacked.
    """
    if isinstance(images, (list, tuple)):
      outs = [self(np.asarray(image)[None]) for image in images]
      shapes = {o.shape[1:] for o in outs}
      if len(shapes) > 1:
        raise UserError(f"images of different sizes give pixel values of "
                        f"shapes {sorted(shapes)} without a center crop; "
                        "process them one at a time")
      return jnp.concatenate(outs)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise UserError(f"expected RGB images (batch, height, width, 3), got "
                      f"shape {tuple(images.shape)}")
    if images.dtype == np.uint8:
      return self._process(jnp.asarray(images), exact_8bit=True)
    if not jnp.issubdtype(images.dtype, jnp.floating):
      raise UserError(f"images must be uint8 or float in [0, 1], got "
                      f"{images.dtype}")
    return self._process(jnp.asarray(images, jnp.float32) * 255.0,
                         exact_8bit=False)

  def preprocess_decoded(self, images_bhwc: jax.Array) -> jax.Array:
    """The reward path: decoded images in [-1, 1] -> pixel values, differentiably.

    Values outside [-1, 1] are clipped (as converting to an image would), so
    they get no gradient. Works under ``jax.jit`` and ``jax.grad``.

    Args:
      images_bhwc: ``(b, h, w, 3)`` float, e.g. a VAE decoder's output.

    Returns:
      ``(b, H, W, 3)`` float32 pixel values (NHWC).
    """
    x01 = jnp.clip((images_bhwc.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
    return self._process(x01 * 255.0, exact_8bit=False)
