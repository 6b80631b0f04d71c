"""A drawn demo subject, so the default run needs no photos and no download.

The subject is one mug: red and white stripes that follow its curve, a yellow
handle and a dark inside. Each image shows it on a different background (a
wood table, a lawn, a blue wall, a beach, a tiled kitchen, a gingham cloth)
at a different place, size and slight tilt, like a handful of phone photos.
Everything is drawn with numpy and PIL and depends only on the seed.

  paths = write_demo_subject("/tmp/demo_mug")  # subject_00.png ... 04.png
"""

import os
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

DEMO_CLASS_NAME = "mug"

_RED = np.array([200, 28, 36], np.float32)
_WHITE = np.array([246, 244, 238], np.float32)
_YELLOW = (250, 196, 20)
_INSIDE = np.array([70, 32, 22], np.float32)  # coffee-brown shadow inside.
_STRIPES = 7


def _noise(rng: np.random.Generator, shape: tuple[int, int],
           blur: float) -> np.ndarray:
  """Smooth noise in about ``[-1, 1]``: blurred white noise, rescaled."""
  img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
  smooth = np.asarray(img.filter(ImageFilter.GaussianBlur(blur)), np.float32)
  smooth = smooth - smooth.mean()
  return smooth / (np.abs(smooth).max() + 1e-6)


def _vertical(s: int, top, bottom) -> np.ndarray:
  """A top-to-bottom colour gradient, ``float32 (s, s, 3)``."""
  t = np.linspace(0.0, 1.0, s, dtype=np.float32)[:, None, None]
  grad = (1 - t) * np.asarray(top, np.float32) + t * np.asarray(
      bottom, np.float32)
  return np.broadcast_to(grad, (s, s, 3)).copy()


def _wood(rng, s):
  horizon = int(s * rng.uniform(0.35, 0.45))
  img = _vertical(s, (226, 214, 196), (200, 186, 166))
  rows = np.arange(s - horizon, dtype=np.float32)[:, None]
  cols = np.arange(s, dtype=np.float32)[None, :]
  plank = (rows // (s * 0.11)).astype(int)
  tone = rng.uniform(0.85, 1.1, size=int(plank.max()) + 1)[plank]
  grain = np.sin(cols * 0.05 + 6 * _noise(rng, (s - horizon, s), s / 40)
                 + rows * 0.4)
  base = np.array([150, 96, 54], np.float32)
  table = base * (tone * (0.9 + 0.08 * grain))[..., None]
  seams = (rows % (s * 0.11)) < max(1, s // 200)
  table[np.broadcast_to(seams, table.shape[:2])] *= 0.6
  img[horizon:] = table
  return img, horizon


def _lawn(rng, s):
  horizon = int(s * rng.uniform(0.3, 0.42))
  img = _vertical(s, (120, 170, 230), (200, 225, 245))
  img[horizon:] = _vertical(s, (70, 140, 50), (40, 100, 30))[horizon:]
  out = Image.fromarray(img.astype(np.uint8))
  draw = ImageDraw.Draw(out)
  for _ in range(s * 6):  # short blades, more and longer towards the viewer.
    x, y = rng.uniform(0, s), rng.uniform(horizon, s)
    length = s * 0.01 + (y - horizon) / s * s * 0.04
    green = tuple(int(c) for c in rng.uniform((40, 110, 20), (110, 190, 60)))
    draw.line([(x, y), (x + rng.normal(0, length * 0.3), y - length)],
              fill=green, width=max(1, s // 256))
  return np.asarray(out, np.float32), horizon


def _blue_wall(rng, s):
  horizon = int(s * rng.uniform(0.55, 0.65))
  wall = np.array([60, 110, 190], np.float32) * (
      1 + 0.06 * _noise(rng, (s, s), s / 60))[..., None]
  img = wall * np.linspace(1.05, 0.9, s, dtype=np.float32)[None, :, None]
  img[horizon:] = _vertical(s, (232, 232, 226), (205, 205, 198))[horizon:]
  img[horizon:horizon + max(2, s // 100)] = (180, 180, 172)  # shelf edge.
  return img, horizon


def _beach(rng, s):
  sea, horizon = int(s * 0.3), int(s * rng.uniform(0.42, 0.5))
  img = _vertical(s, (90, 160, 235), (190, 220, 245))
  img[sea:horizon] = _vertical(s, (30, 110, 160), (60, 160, 190))[sea:horizon]
  sand = np.array([226, 204, 160], np.float32) * (
      1 + 0.05 * _noise(rng, (s, s), 1.5))[..., None]
  img[horizon:] = sand[horizon:]
  img[horizon:horizon + max(2, s // 80)] = (240, 245, 245)  # surf line.
  return img, horizon


def _kitchen(rng, s):
  horizon = int(s * rng.uniform(0.5, 0.6))
  tile = max(8, s // 9)
  y, x = np.mgrid[0:s, 0:s]
  grout = ((y % tile) < max(1, s // 170)) | ((x % tile) < max(1, s // 170))
  img = np.full((s, s, 3), 238, np.float32)
  img[grout] = (170, 170, 168)
  veins = _noise(rng, (s, s), s / 30)
  counter = np.array([120, 120, 124], np.float32) * (
      1 + 0.15 * np.abs(veins))[..., None]
  img[horizon:] = counter[horizon:]
  return img, horizon


def _gingham(rng, s):
  horizon = int(s * rng.uniform(0.25, 0.35))
  img = _vertical(s, (236, 226, 206), (214, 200, 176))
  check = max(6, s // 14)
  y, x = np.mgrid[0:s, 0:s]
  bands = ((y // check) % 2).astype(np.float32) + ((x // check) % 2)
  cloth = np.array([250, 250, 250], np.float32) - bands[..., None] * np.array(
      [50, 30, 5], np.float32)
  img[horizon:] = cloth[horizon:]
  return img, horizon


_BACKGROUNDS: tuple[Callable, ...] = (_wood, _lawn, _blue_wall, _beach,
                                      _kitchen, _gingham)


def _mug(height: int) -> Image.Image:
  """The mug, upright and lit from the left, on a transparent RGBA layer."""
  h = height
  w = int(h * 1.25)
  r, e = h * 0.32, h * 0.08  # body half-width, ellipse half-height (tilt).
  cx, top, bottom = r + 2, e + 2, h - e - 2
  layer = Image.new("RGBA", (w, h), (0, 0, 0, 0))
  # The handle first: the body drawn over it hides its inner end.
  draw = ImageDraw.Draw(layer)
  hw = max(2, int(h * 0.07))
  box = [cx + r * 0.55, top + (bottom - top) * 0.2,
         cx + r * 1.62, top + (bottom - top) * 0.75]
  draw.ellipse(box, outline=(*_YELLOW, 255), width=hw)
  draw.ellipse([box[0] + hw * 0.7, box[1] + hw * 0.7, box[2] - hw * 0.2,
                box[3] - hw * 0.2], outline=(255, 226, 120, 255),
               width=max(1, hw // 4))  # a highlight along the handle.
  y, x = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
  u = (x - cx) / r  # -1 .. 1 across the body.
  inside_u = np.abs(u) <= 1
  arc = e * np.sqrt(np.clip(1 - u * u, 0, 1))  # front edge of an ellipse.
  body = inside_u & (y >= top) & (y <= bottom + arc)
  stripe = np.floor((y - top - arc) / (bottom - top) * _STRIPES).astype(int)
  colour = np.where((stripe % 2 == 0)[..., None], _RED, _WHITE)
  # Cylinder shading with a highlight left of centre.
  light = 0.62 + 0.38 * np.sqrt(np.clip(1 - (u + 0.25) ** 2 / 1.6, 0, 1))
  light = light + 0.25 * np.exp(-((u + 0.45) / 0.12) ** 2)
  colour = np.clip(colour * light[..., None], 0, 255)
  rim = ((x - cx) / r) ** 2 + ((y - top) / e) ** 2 <= 1
  hole = ((x - cx) / (r * 0.9)) ** 2 + ((y - top - e * 0.08) /
                                        (e * 0.8)) ** 2 <= 1
  colour[rim] = _WHITE * 0.92
  colour[hole] = _INSIDE * (0.7 + 0.3 * (y[hole] - top + e) / (2 * e))[:, None]
  rgba = np.asarray(layer, np.float32).copy()
  solid = body | rim
  rgba[solid, :3] = colour[solid]
  rgba[solid, 3] = 255
  return Image.fromarray(rgba.astype(np.uint8), "RGBA")


def _draw_one(rng: np.random.Generator, background: Callable,
              size: int) -> np.ndarray:
  """One image: the mug on ``background``, placed by ``rng``."""
  s = size * 2  # drawn at twice the size, then downsampled: smooth edges.
  scene, horizon = background(rng, s)
  mug = _mug(int(s * rng.uniform(0.38, 0.58)))
  if rng.random() < 0.35:  # seen from the other side: handle on the left.
    mug = mug.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  mug = mug.rotate(rng.uniform(-7, 7), Image.Resampling.BICUBIC, expand=True)
  mw, mh = mug.size
  base_y = rng.uniform(max(horizon + s * 0.12, mh * 0.95), s * 0.97)
  left = int(rng.uniform(s * 0.08, max(s * 0.08, s * 0.92 - mw)))
  top = int(base_y - mh * 0.95)
  # A soft contact shadow under the mug darkens the surface.
  shadow = Image.new("L", (s, s), 0)
  ImageDraw.Draw(shadow).ellipse(
      [left + mw * 0.05, base_y - mh * 0.1, left + mw * 0.95,
       base_y + mh * 0.08], fill=150)
  shadow = shadow.filter(ImageFilter.GaussianBlur(s / 60))
  dark = 1 - 0.55 * np.asarray(shadow, np.float32)[..., None] / 255
  out = Image.fromarray(np.clip(scene * dark, 0, 255).astype(np.uint8))
  out.paste(mug, (left, top), mug)
  return np.asarray(out.resize((size, size), Image.Resampling.LANCZOS))


def draw_subject(num_images: int = 5, size: int = 256,
                 seed: int = 0) -> list[np.ndarray]:
  """Draws the demo mug in ``num_images`` different scenes.

  Args:
    num_images: how many images; backgrounds repeat after six.
    size: the side of each square image, in pixels.
    seed: the same seed gives the same images.

  Returns:
    ``num_images`` arrays, ``uint8 (size, size, 3)``.
  """
  order = np.random.default_rng(seed).permutation(len(_BACKGROUNDS))
  return [_draw_one(np.random.default_rng((seed, i)),
                    _BACKGROUNDS[order[i % len(order)]], size)
          for i in range(num_images)]


def write_demo_subject(folder: str | os.PathLike, num_images: int = 5,
                       size: int = 256, seed: int = 0) -> list[Path]:
  """Writes ``draw_subject``'s images as ``subject_00.png``, ... in ``folder``.

  Args:
    folder: created if missing; files of the same names are overwritten.
    num_images: passed to ``draw_subject``.
    size: passed to ``draw_subject``.
    seed: passed to ``draw_subject``.

  Returns:
    The paths written, in order.
  """
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  paths = []
  for i, image in enumerate(draw_subject(num_images, size, seed)):
    path = folder / f"subject_{i:02d}.png"
    Image.fromarray(image).save(path)
    paths.append(path)
  return paths
