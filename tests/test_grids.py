"""Tests for the labelled grids: every image whole at its corner, text beside."""

import numpy as np
import pytest
from PIL import ImageFont

from personalize_jax import grids

THUMB = 32


def _solids(count: int, side: int = 48, seed: int = 0) -> list[np.ndarray]:
  """Distinct solid colours (a thumbnail of one is that colour throughout)."""
  colours = np.random.default_rng(seed).choice(256, size=(count, 3),
                                               replace=False)
  return [np.full((side, side, 3), c, np.uint8) for c in colours]


def _tiles(picture, corners):
  return [picture[top:top + THUMB, left:left + THUMB] for top, left in corners]


@pytest.mark.parametrize("num_columns", [1, 2, 3])
def test_every_image_lands_whole_at_its_corner(num_columns):
  images = iter(_solids(3 + num_columns * 4))
  references = [next(images) for _ in range(3)]
  prompts = ["a sks mug in the snow", "a sks mug on a very long street "
             "with a city and the Eiffel Tower in the background"]
  columns = [grids.Column(title=f"model {c}",
                          scores={"dino": 0.5, "clip_i": 0.25, "clip_t": 0.1},
                          rows=[[next(images) for _ in range(2)]
                                for _ in prompts])
             for c in range(num_columns)]
  picture, layout = grids.labeled_grid(references, prompts, columns, THUMB)
  assert picture.dtype == np.uint8 and picture.shape[2] == 3
  expected = [("photos", layout["photos"], references)] + [
      (c, corners, [im for row in column.rows for im in row])
      for c, (corners, column) in enumerate(zip(layout["columns"], columns))]
  for key, corners, want in expected:
    assert len(corners) == len(want), key
    for tile, image in zip(_tiles(picture, corners), want):
      assert (tile == image[0, 0]).all(), key
  # Columns sit side by side in each prompt's row, left to right, apart.
  for row in zip(*layout["columns"]):
    assert len({top for top, _ in row}) == 1
    lefts = [left for _, left in row]
    assert all(b >= a + 2 * THUMB for a, b in zip(lefts, lefts[1:]))
  # Photos above every generated image; each prompt's row starts with its
  # text (dark pixels) left of the images; the long prompt's row is taller.
  first = layout["columns"][0]
  assert max(t for t, _ in layout["photos"]) + THUMB <= first[0][0]
  for top, left in first[::2]:
    assert picture[top:top + THUMB, :left].min() < 128
  second_row_top = first[2][0]
  assert picture.shape[0] - second_row_top > THUMB  # wrapped over 2+ lines
  assert picture.shape[1] >= layout["columns"][-1][-1][1] + THUMB


def test_a_narrow_column_is_widened_to_its_title_and_scores():
  """One 32 px image per prompt: the heading must not be cut or broken."""
  font = ImageFont.load_default(size=11)
  title = "dog: generated"
  column = grids.Column(title, {"dino": 0.25, "clip_i": 0.5, "clip_t": 0.75},
                        rows=[_solids(1)])
  picture, layout = grids.labeled_grid(_solids(2, seed=1), ["a sks dog"],
                                       [column], THUMB)
  (corner,) = layout["columns"][0]
  assert picture.shape[1] - corner[1] >= font.getlength(title)
  assert picture.shape[1] - corner[1] >= font.getlength("CLIP-I 0.500")


def test_rows_must_match_the_prompts():
  column = grids.Column("m", {}, rows=[_solids(1)])
  with pytest.raises(ValueError, match="one row of images per prompt"):
    grids.labeled_grid(_solids(1, seed=1), ["a", "b"], [column], THUMB)


def test_wrap_text_fits_the_width_and_keeps_every_word():
  font = ImageFont.load_default(size=12)
  text = "a sks mug on a cobblestone street with a city in the background"
  lines = grids.wrap_text(text, font, 80)
  assert len(lines) > 1
  assert all(font.getlength(line) <= 80 for line in lines)
  assert " ".join(lines) == text
  # A word wider than the width is split, not dropped.
  assert "".join(grids.wrap_text("x" * 60, font, 50)) == "x" * 60


def test_without_photos_the_picture_starts_at_the_column_heads():
  """No photos: no photo row and no rule; the rest moves up, unchanged."""
  images = _solids(5)
  column = grids.Column(title="tiny", scores={}, rows=[images[1:3],
                                                       images[3:5]])
  prompts = ["a mug", "a mug on the beach"]
  with_photo, with_layout = grids.labeled_grid(images[:1], prompts, [column],
                                               THUMB)
  without, layout = grids.labeled_grid([], prompts, [column], THUMB)
  assert layout["photos"] == []
  shift = with_layout["columns"][0][0][0] - layout["columns"][0][0][0]
  assert shift > THUMB  # the photo row, its label and the gap.
  assert [(t + shift, l) for t, l in layout["columns"][0]] == (
      with_layout["columns"][0])
  np.testing.assert_array_equal(without, with_photo[shift:])
  rule = lambda picture: (picture == 128).all(axis=(1, 2)).any()
  assert rule(with_photo) and not rule(without)
