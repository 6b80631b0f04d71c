"""Tests for metrics.jsonl, TensorBoard events, sample grids and progress."""

import json
import math
import time

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing import event_accumulator

from personalize_jax.engine import metrics

STEPS = {1: {"loss": 0.5, "lr": 1e-5}, 2: {"loss": float("nan"), "lr": 2e-5},
         3: {"loss": float("inf"), "lr": 3e-5}, 4: {"loss": 0.25, "lr": 4e-5},
         5: {"loss": -float("inf"), "lr": np.float32(5e-5)}}


def _write(workdir, steps, resume_step=None):
  with metrics.MetricsWriter(workdir, resume_step=resume_step) as writer:
    for step in steps:
      writer.write(step, STEPS[step])


def _same(a, b):
  return a == b or (math.isnan(a) and math.isnan(b))


def _load_scalars(path):
  """TensorBoard's own loading of ``path`` (an event file or a folder)."""
  accumulator = event_accumulator.EventAccumulator(
      str(path), size_guidance={event_accumulator.SCALARS: 0})
  accumulator.Reload()
  return {tag: accumulator.Scalars(tag)
          for tag in accumulator.Tags()[event_accumulator.SCALARS]}


def _tensorboard_view(path):
  """``{tag: [(step, value), ...]}`` as TensorBoard shows ``path``."""
  return {tag: [(s.step, s.value) for s in scalars]
          for tag, scalars in _load_scalars(path).items()}


def _expected_view(steps):
  # Event files store scalars as float32.
  return {tag: [(step, float(np.float32(STEPS[step][tag]))) for step in steps]
          for tag in ("loss", "lr")}


def test_jsonl_holds_every_write_as_strict_json(tmp_path):
  _write(tmp_path, [1, 2, 3, 4, 5])
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()

  def no_constants(name):
    raise AssertionError(f"non-standard JSON constant {name}")

  raw = [json.loads(line, parse_constant=no_constants) for line in lines]
  assert raw[1] == {"step": 2, "loss": "nan", "lr": 2e-5}
  assert raw[2]["loss"] == "inf" and raw[4]["loss"] == "-inf"
  records = metrics.read_metrics(tmp_path)
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
  for record in records:
    expected = STEPS[record["step"]]
    assert set(record) == {"step", *expected}
    assert all(_same(record[k], float(v)) for k, v in expected.items())


def test_resume_drops_steps_after_checkpoint(tmp_path):
  _write(tmp_path / "straight", [1, 2, 3, 4, 5])
  _write(tmp_path / "resumed", [1, 2, 3, 4])
  # The crash also cut the last line short.
  with open(tmp_path / "resumed" / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "lo')
  assert len(metrics.read_metrics(tmp_path / "resumed")) == 4
  _write(tmp_path / "resumed", [3, 4, 5], resume_step=2)
  assert ((tmp_path / "resumed" / "metrics.jsonl").read_bytes()
          == (tmp_path / "straight" / "metrics.jsonl").read_bytes())


def test_fresh_run_clears_an_earlier_attempt(tmp_path):
  _write(tmp_path, [1, 2])
  _write(tmp_path, [1])
  assert [r["step"] for r in metrics.read_metrics(tmp_path)] == [1]
  np.testing.assert_equal(_tensorboard_view(tmp_path / "tensorboard"),
                          _expected_view([1]))


def test_step_is_reserved(tmp_path):
  with metrics.MetricsWriter(tmp_path) as writer:
    with pytest.raises(ValueError, match="reserved"):
      writer.write(1, {"step": 3.0})


def test_tensorboard_reads_back_every_step(tmp_path):
  before = time.time()
  _write(tmp_path, [1, 2, 3, 4, 5])
  after = time.time()
  # assert_equal counts NaN equal to NaN; everything else must match exactly.
  np.testing.assert_equal(_tensorboard_view(tmp_path / "tensorboard"),
                          _expected_view([1, 2, 3, 4, 5]))
  wall_times = [s.wall_time for scalars in
                _load_scalars(tmp_path / "tensorboard").values()
                for s in scalars]
  assert len(wall_times) == 10
  assert all(before <= t <= after for t in wall_times)


def test_each_write_reaches_the_event_file_before_close(tmp_path):
  with metrics.MetricsWriter(tmp_path) as writer:
    writer.write(1, STEPS[1])
    writer.write(2, STEPS[2])
    np.testing.assert_equal(_tensorboard_view(tmp_path / "tensorboard"),
                            _expected_view([1, 2]))


def test_resumed_run_adds_an_event_file_that_replaces_later_steps(tmp_path):
  _write(tmp_path, [1, 2, 3])  # crashed after step 3; checkpoint at step 1.
  _write(tmp_path, [2, 4], resume_step=1)
  first, second = sorted((tmp_path / "tensorboard").iterdir())
  np.testing.assert_equal(_tensorboard_view(first), _expected_view([1, 2, 3]))
  np.testing.assert_equal(_tensorboard_view(second), _expected_view([2, 4]))
  # Read in name order, the second file hides steps 2 and 3 of the first.
  np.testing.assert_equal(_tensorboard_view(tmp_path / "tensorboard"),
                          _expected_view([1, 2, 4]))


def _images(n, height=64, width=96):
  rng = np.random.default_rng(0)
  # Mid-grey noise: no pixel is as dark as caption text.
  return rng.integers(100, 200, (n, height, width, 3), dtype=np.uint8)


def test_grid_without_captions_is_the_tiles(tmp_path):
  images = _images(5)
  path = metrics.save_grid(images, tmp_path / "samples" / "grid.png", ncols=3)
  grid = np.asarray(Image.open(path))
  assert grid.shape == (2 * 64, 3 * 96, 3)
  np.testing.assert_array_equal(grid[64:128, 96:192], images[4])
  assert (grid[64:, 192:] == 255).all()  # the empty sixth cell.
  assert sorted(p.name for p in path.parent.iterdir()) == ["grid.png"]


def test_grid_captions_sit_under_their_image(tmp_path):
  images = _images(4)
  captions = ["a sks dog in the jungle with a very long caption that wraps",
              "", "a red sks dog", "x"]
  path = metrics.save_grid(images, tmp_path / "grid.png", captions=captions)
  grid = np.asarray(Image.open(path))
  cell = grid.shape[0] // 2
  assert grid.shape[1] == 2 * 96 and cell > 64
  bands = [grid[r * cell + 64:(r + 1) * cell, c * 96:(c + 1) * 96]
           for r in range(2) for c in range(2)]
  dark = [int((band.min(axis=-1) < 100).sum()) for band in bands]
  assert dark[0] > dark[2] > dark[3] > 0 and dark[1] == 0
  # The long caption wraps: ink on more than one line of the band.
  rows_with_ink = np.nonzero((bands[0].min(axis=-1) < 100).any(axis=1))[0]
  assert rows_with_ink.max() - rows_with_ink.min() > 20
  np.testing.assert_array_equal(grid[cell:cell + 64, 96:], images[3])


def test_grid_accepts_grey_and_rejects_floats(tmp_path):
  path = metrics.save_grid(_images(2)[..., :1], tmp_path / "g.png")
  assert Image.open(path).size == (2 * 96, 64)
  with pytest.raises(ValueError, match="uint8"):
    metrics.save_grid(np.zeros((1, 4, 4, 3), np.float32), tmp_path / "f.png")


def test_progress_shows_rate_and_postfix(capsys):
  bar = metrics.progress(10, initial=4, desc="dreambooth")
  bar.update(2)
  bar.set_postfix(loss=0.123)
  bar.close()
  err = capsys.readouterr().err
  assert "dreambooth" in err and "6/10" in err and "loss=0.123" in err
  assert "step/s" in err or "s/step" in err
