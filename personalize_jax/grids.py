"""Labelled image grids: a subject's photos, then a row per prompt.

One picture answers "what did each model draw for each prompt, next to the
photos it learned from": the photos on top, then per prompt its text on the
left and one block of images per model (a column), each block headed by its
title and DreamBench scores. The final evaluation of a run writes it with the
base and the fine-tuned model side by side (same seeds); the DreamBench
evaluation writes one per subject.
"""

import dataclasses
from typing import Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

SCORE_NAMES = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}


def wrap_text(text: str, font, width: int) -> list[str]:
  """Greedy word wrap to ``width`` pixels; over-long words are split."""
  lines = []
  for paragraph in text.split("\n"):
    line = ""
    for word in paragraph.split():
      candidate = f"{line} {word}" if line else word
      if font.getlength(candidate) <= width:
        line = candidate
        continue
      if line:
        lines.append(line)
      while font.getlength(word) > width and len(word) > 1:
        cut = len(word) - 1
        while cut > 1 and font.getlength(word[:cut]) > width:
          cut -= 1
        lines.append(word[:cut])
        word = word[cut:]
      line = word
    lines.append(line)
  return lines


def thumbnail(image: np.ndarray, side: int) -> np.ndarray:
  """``image`` resized (bicubic) to ``side`` x ``side``, uint8 RGB."""
  return np.asarray(Image.fromarray(image).convert("RGB").resize(
      (side, side), Image.Resampling.BICUBIC))


def _score_items(scores: Mapping[str, float]) -> list[str]:
  return [f"{name} {scores[key]:.3f}" for key, name in SCORE_NAMES.items()
          if key in scores]


@dataclasses.dataclass(frozen=True)
class Column:
  """One model's block: its title, its scores, and per prompt its images."""

  title: str
  scores: Mapping[str, float]  # keys of SCORE_NAMES that are shown
  rows: Sequence[Sequence[np.ndarray]]


def labeled_grid(references: Sequence[np.ndarray], prompts: Sequence[str],
                 columns: Sequence[Column], thumb: int
                 ) -> tuple[np.ndarray, dict[str, list]]:
  """The photos, then per prompt its text and every column's images.

  Args:
    references: the subject's photos (none: no photo row).
    prompts: one text per row of every column.
    columns: the models, left to right.
    thumb: side of every image in the picture.

  Returns:
    ``(image_hwc_uint8, layout)``: ``layout["photos"]`` lists the ``(top,
    left)`` corner of each photo, ``layout["columns"][i]`` those of column
    ``i``'s images, row by row.
  """
  if any(len(c.rows) != len(prompts) for c in columns):
    raise ValueError("every column needs one row of images per prompt")
  font = ImageFont.load_default(size=max(11, thumb // 10))
  pad, gap = 6, 16
  line = font.getbbox("Hg")[3] + 3
  per_prompt = max(len(row) for c in columns for row in c.rows)
  label_w = max(2 * thumb, 160)
  # A column is as wide as its images, or as its title and one score.
  widest = max(font.getlength(text) for c in columns
               for text in (c.title, *_score_items(c.scores)))
  block_w = max(per_prompt * thumb, int(np.ceil(widest)) + 2 * pad)
  lefts = [label_w + i * (block_w + gap) for i in range(len(columns))]
  width = lefts[-1] + block_w

  def text_lines(text: str, w: int) -> list[str]:
    return wrap_text(text, font, w - 2 * pad)

  def text_h(lines: list[str]) -> int:
    return len(lines) * line + 2 * pad

  def score_lines(scores: Mapping[str, float]) -> list[str]:
    # Greedy, one score never split over two lines.
    lines = []
    for item in _score_items(scores):
      joined = f"{lines[-1]} | {item}" if lines else item
      if lines and font.getlength(joined) <= block_w - 2 * pad:
        lines[-1] = joined
      else:
        lines.append(item)
    return lines

  # Rows, top to bottom: the photos and a rule (none without photos), each
  # column's title and scores, then one row per prompt.
  per_row = max(1, (width - label_w) // thumb)
  photo_label = text_lines(f"subject photos ({len(references)})", label_w)
  photos_h = max(-(-len(references) // per_row) * thumb, text_h(photo_label))
  heads = [text_lines(c.title, block_w) + score_lines(c.scores)
           for c in columns]
  heads_top = photos_h + gap if len(references) else 0
  top = heads_top + max(text_h(h) for h in heads)
  prompt_labels = [text_lines(p, label_w) for p in prompts]
  row_h = [max(thumb, text_h(lab)) for lab in prompt_labels]

  canvas = Image.new("RGB", (width, top + sum(row_h)), "white")
  draw = ImageDraw.Draw(canvas)
  layout = {"photos": [], "columns": [[] for _ in columns]}

  def paste(image, corner_top, corner_left):
    canvas.paste(Image.fromarray(thumbnail(image, thumb)),
                 (corner_left, corner_top))
    return corner_top, corner_left

  def label(lines, label_top, label_left):
    for j, text in enumerate(lines):
      draw.text((label_left + pad, label_top + pad + j * line), text,
                fill="black", font=font)

  if len(references):
    label(photo_label, 0, 0)
    draw.line([(0, photos_h + gap // 2), (width, photos_h + gap // 2)],
              fill="gray")
  for i, image in enumerate(references):
    row, col = divmod(i, per_row)
    layout["photos"].append(paste(image, row * thumb, label_w + col * thumb))
  for head, left in zip(heads, lefts):
    label(head, heads_top, left)
  for p, lines in enumerate(prompt_labels):
    label(lines, top, 0)
    for c, column in enumerate(columns):
      for j, image in enumerate(column.rows[p]):
        layout["columns"][c].append(paste(image, top, lefts[c] + j * thumb))
    top += row_h[p]
  return np.asarray(canvas), layout
