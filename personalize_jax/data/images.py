"""Instance photos: reading them robustly, and turning them into training pixels.

Users bring 3-10 photos from phones, cameras and the web, so ``load_image``
accepts what such photos are in practice (EXIF-rotated JPEGs, CMYK JPEGs,
16-bit or transparent PNGs, grayscale, WebP, 8000 px sides) and returns plain
upright 8-bit RGB. Files that cannot be used (not an image, cut off, too
small) raise ``UserError`` with one line naming the file and the fix.

  images, names = load_instance_images("photos/")
  pixels = preprocess(images[0], 512)  # float32 (512, 512, 3) in [-1, 1]
"""

import contextlib
import io
import os
import struct
import threading
from pathlib import Path
from typing import Callable

import numpy as np
from absl import logging
from PIL import Image, ImageFile, ImageOps

from personalize_jax.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif",
                  ".tiff")
# PIL's own guard refuses anything over 179 MP and warns from 89 MP; a 48 MP
# phone photo is legitimate, a 200 MP one is almost surely a mistake.
MAX_PIXELS = 200_000_000
# Huge photos are decoded at a reduced scale that keeps the shorter side at
# least this long: more than any training resolution (SD tops out at 1024),
# at a fraction of the decoding time and memory.
KEEP_SIDE = 2048

_SKIP_HINT = "--config.data.skip_bad_images=true"
_DIR_HINT = ("put 3-10 photos of the subject (.jpg/.png/.webp) there, or point "
             "--config.data.instance_dir at such a folder")
# PIL's decoders signal a broken file with any of these.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
# PIL's size guard and truncation switch are module globals: changing them for
# one load must not race with another thread's load.
_PIL_SETTINGS_LOCK = threading.Lock()


@contextlib.contextmanager
def _strict_pil():
  """Full decodes only (no silent grey fill of cut files); our own size guard."""
  with _PIL_SETTINGS_LOCK:
    saved = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    # Another library may have turned truncated loading on for everyone.
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    Image.MAX_IMAGE_PIXELS = None  # checked against MAX_PIXELS in _decode.
    try:
      yield
    finally:
      ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def _decode(path: Path, data: bytes) -> Image.Image:
  """Opens, size-checks and fully decodes the first frame of ``data``."""
  try:
    image = Image.open(io.BytesIO(data))
  except Image.UnidentifiedImageError:
    raise UserError(f"{path} is not an image PIL can read (JPEG, PNG, WebP, "
                    "...); replace it with a photo or remove it") from None
  w, h = image.size
  if w * h > MAX_PIXELS:
    raise UserError(
        f"{path} is {w}x{h} ({w * h / 1e6:.0f} MP), over the "
        f"{MAX_PIXELS // 1_000_000} MP limit; downscale it (a 2048 px shorter "
        "side is plenty)")
  if min(w, h) >= 2 * KEEP_SIDE and image.format in ("JPEG", "MPO"):
    # The JPEG decoder can skip detail (DCT scaling by 1/2, 1/4, 1/8).
    factor = min(w, h) // KEEP_SIDE
    image.draft(None, (w // factor, h // factor))
  image.load()
  return image


def _to_rgb(image: Image.Image) -> np.ndarray:
  """8-bit RGB of any PIL mode; transparency is composited on white."""
  if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or values.max(initial=0) > 255:
      values = values / 257.0  # 65535 -> 255: scale the 16-bit range, not clip.
    elif image.mode == "F" and values.max(initial=0) <= 1.0:
      values = values * 255.0  # float images usually hold [0, 1].
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  has_alpha = ("A" in image.mode or "a" in image.mode
               or "transparency" in image.info)
  if not has_alpha:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
  rgba = np.asarray(image.convert("RGBA"), dtype=np.float32)
  alpha = rgba[..., 3:] / 255.0
  rgb = rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)
  return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def _upright(image: Image.Image) -> Image.Image:
  """Applies the EXIF orientation; a malformed EXIF block leaves it as is."""
  try:
    return ImageOps.exif_transpose(image)
  except (*_DECODE_ERRORS, KeyError, TypeError):
    # The pixels decoded fine; unreadable metadata is no reason to reject them.
    return image


def load_image(path: str | os.PathLike, *, min_side: int = 64) -> np.ndarray:
  """Reads one photo as upright 8-bit RGB.

  Grayscale, palette, CMYK and 16-bit images are converted (16-bit values are
  scaled, 65535 -> 255); transparent pixels are composited on white; the EXIF
  orientation is applied. Animated files give their first frame. Images whose
  shorter side is at least ``2 * KEEP_SIDE`` come back reduced by an integer
  factor that keeps that side at least ``KEEP_SIDE`` pixels.

  Args:
    path: the image file.
    min_side: the smallest allowed width and height, in pixels, after the EXIF
      rotation (``config.data.min_image_side``).

  Returns:
    ``uint8 (h, w, 3)``.

  Raises:
    UserError: the file is missing, not an image, truncated or corrupt, over
      ``MAX_PIXELS``, or smaller than ``min_side`` on a side.
  """
  path = Path(path)
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    raise UserError(f"{path} does not exist; check the path") from None
  except OSError as e:
    raise UserError(f"{path} cannot be read ({_first_line(e)}); check that it "
                    "is a readable file") from None
  try:
    with _strict_pil():
      image = _decode(path, data)
    image = _upright(image)
    w, h = image.size
    if min(w, h) < min_side:
      raise UserError(
          f"{path} is {w}x{h} px, smaller than the minimum side of {min_side} "
          "px (config data.min_image_side); use a larger photo or lower "
          "--config.data.min_image_side")
    rgb = _to_rgb(image)
  except _DECODE_ERRORS as e:
    raise UserError(
        f"{path} could not be decoded ({_first_line(e)}): it may be truncated "
        "or corrupt; re-copy or re-export it (e.g. as JPEG), or remove it"
    ) from None
  factor = min(w, h) // KEEP_SIDE
  if factor >= 2:  # not a JPEG, or DCT scaling could not reduce it enough.
    rgb = np.asarray(Image.fromarray(rgb).reduce(factor))
  return rgb


def _image_files(folder: Path) -> list[Path]:
  """The folder's image files by name; hidden files and other types skipped."""
  try:
    entries = sorted(folder.iterdir(), key=lambda p: p.name)
  except OSError as e:
    raise UserError(f"the instance folder {folder} cannot be listed "
                    f"({_first_line(e)}); check its permissions") from None
  files = [p for p in entries
           if p.suffix.lower() in IMAGE_SUFFIXES
           and not p.name.startswith(".") and p.is_file()]
  if not files:
    others = [p.name for p in entries if not p.name.startswith(".")]
    held = (f"it holds only {', '.join(others[:5])}"
            f"{' ...' if len(others) > 5 else ''}" if others else "it is empty")
    raise UserError(
        f"the instance folder {folder} has no images ({held}; image types: "
        f"{' '.join(IMAGE_SUFFIXES)}); {_DIR_HINT}")
  return files


def load_instance_images(
    folder: str | os.PathLike, *, min_side: int = 64,
    skip_bad_images: bool = False,
    warn: Callable[[str], None] = logging.warning,
) -> tuple[list[np.ndarray], list[str]]:
  """Reads every photo of the subject in ``folder`` (not its subfolders).

  Args:
    folder: ``config.data.instance_dir``.
    min_side: passed to ``load_image`` (``config.data.min_image_side``).
    skip_bad_images: warn about files that ``load_image`` rejects and go on
      without them (``config.data.skip_bad_images``), instead of failing.
    warn: called with a one-line message per skipped file.

  Returns:
    ``(images, file_names)``: ``uint8 (h, w, 3)`` arrays and their file names,
    sorted by file name. Files with a name starting with ``.`` or a suffix not
    in ``IMAGE_SUFFIXES`` (captions, ``.DS_Store``, ...) are ignored.

  Raises:
    UserError: the folder is missing, not a folder, or has no usable image; or
      a file is unusable and ``skip_bad_images`` is off.
  """
  folder = Path(folder)
  if not folder.exists():
    raise UserError(f"the instance folder {folder} does not exist; {_DIR_HINT}")
  if not folder.is_dir():
    raise UserError(f"the instance folder {folder} is a file, not a folder; "
                    f"{_DIR_HINT}")
  files = _image_files(folder)
  images, names, errors = [], [], []
  for path in files:
    try:
      images.append(load_image(path, min_side=min_side))
      names.append(path.name)
    except UserError as e:
      errors.append(str(e))
  if not images:
    raise UserError(
        f"none of the {len(files)} image files in the instance folder {folder}"
        f" can be used (first: {errors[0]}); {_DIR_HINT}")
  if errors and not skip_bad_images:
    more = (f" ({len(errors) - 1} more unusable file(s) in {folder})"
            if len(errors) > 1 else "")
    raise UserError(f"{errors[0]}{more}; or pass {_SKIP_HINT} to train on the "
                    "usable images only")
  for error in errors:
    warn(f"skipping an instance image: {error}")
  return images, names


def preprocess(image: np.ndarray, resolution: int, *,
               center_crop: bool = True) -> np.ndarray:
  """Training pixels as diffusers' DreamBooth script makes them.

  With ``center_crop`` the shorter side is resized to ``resolution`` and the
  middle square is cut out (``torchvision`` ``Resize`` + ``CenterCrop``
  geometry); without it the whole image is resized to a square, which
  squashes non-square photos but keeps all of the subject.

  Args:
    image: ``uint8 (h, w, 3)``, as ``load_image`` returns.
    resolution: the side of the output square.
    center_crop: ``config.data.center_crop``.

  Returns:
    ``float32 (resolution, resolution, 3)`` in ``[-1, 1]``.
  """
  pil = Image.fromarray(np.asarray(image, dtype=np.uint8))
  size, (top, left) = _resized(pil.size[1], pil.size[0], resolution,
                               center_crop)
  # PIL's bilinear filter widens its support when shrinking: antialiased.
  pil = pil.resize(size, Image.Resampling.BILINEAR)
  pixels = np.asarray(pil, dtype=np.float32)
  pixels = pixels[top:top + resolution, left:left + resolution]
  return pixels / 127.5 - 1.0


def _resized(h: int, w: int, resolution: int, center_crop: bool
             ) -> tuple[tuple[int, int], tuple[int, int]]:
  """``preprocess``'s geometry: the resized ``(w, h)`` and the crop's ``(top, left)``."""
  if not center_crop:
    return (resolution, resolution), (0, 0)
  if w <= h:  # torchvision truncates the longer side's length.
    size = (resolution, int(resolution * h / w))
  else:
    size = (int(resolution * w / h), resolution)
  return size, (int(round((size[1] - resolution) / 2.0)),
                int(round((size[0] - resolution) / 2.0)))


def crop_geometry(image: np.ndarray, resolution: int, *,
                  center_crop: bool = True, flipped: bool = False
                  ) -> tuple[int, int, int, int]:
  """``(original_h, original_w, crop_top, crop_left)`` of ``preprocess``'s pixels.

  What SDXL's micro-conditioning records of a training image, as diffusers'
  ``train_dreambooth_lora_sdxl.py`` computes it: the photo's size before any
  resizing, and the top-left corner of the crop in the resized photo. A
  ``flipped`` copy (``flip`` of the pixels) is the crop of the mirrored
  photo, whose left edge is measured from the other side.
  """
  h, w = image.shape[:2]
  size, (top, left) = _resized(h, w, resolution, center_crop)
  if flipped:
    left = size[0] - left - resolution
  return h, w, top, left


def flip(image: np.ndarray) -> np.ndarray:
  """Mirrors ``(..., h, w, c)`` images left to right."""
  return np.flip(image, axis=-2)
