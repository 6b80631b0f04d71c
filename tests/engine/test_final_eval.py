"""Tests for the final evaluation: export against base, scores and reports."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from personalize_jax import eval_dreambench, main as main_lib
from personalize_jax.data import images as images_lib
from personalize_jax.data import demo_subject
from personalize_jax.engine import config as config_lib
from personalize_jax.engine import final_eval, train
from personalize_jax.errors import UserError
from personalize_jax.models.pipeline import load_stable_diffusion

import recipes

REPO = Path(__file__).resolve().parents[2]
SCORES = ("dino", "clip_i", "clip_t", "harmonic_0.3", "harmonic_0.5")


def _config():
  return recipes.load("dreambooth_tpu", "tiny", **{"final_eval.enabled": True})


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
  """Two runs: an export equal to the base model, and one that differs."""
  config = _config()
  out = {}
  for name, export_seed in (("same", config.seed), ("other", config.seed + 7)):
    workdir = tmp_path_factory.mktemp(name)
    demo_subject.write_demo_subject(workdir / "instance_images", num_images=3,
                                    size=96, seed=0)
    load_stable_diffusion("tiny", seed=export_seed).save_pretrained(
        workdir / "export")
    out[name] = (workdir, final_eval.run(config, workdir))
  return config, out


def test_an_export_equal_to_the_base_scores_exactly_the_same(evaluated):
  _, runs = evaluated
  _, results = runs["same"]
  # Same weights and the same seeds: the same images, the same scores.
  for key in SCORES:
    assert results["finetuned"][key] == results["base"][key], key


def test_another_export_scores_differently_against_the_same_base(evaluated):
  _, runs = evaluated
  same, other = runs["same"][1], runs["other"][1]
  for key in SCORES:
    assert other["base"][key] == same["base"][key], key
  assert other["finetuned"]["dino"] != other["base"]["dino"]
  assert other["finetuned"]["clip_i"] != other["base"]["clip_i"]


def test_scores_are_cosines_and_harmonics_in_range(evaluated):
  _, runs = evaluated
  results = runs["other"][1]
  for name in ("base", "finetuned"):
    row = results[name]
    assert set(row) == set(SCORES)
    for key in ("dino", "clip_i", "clip_t"):
      assert -1.0 <= row[key] <= 1.0, (name, key)
    for key in ("harmonic_0.3", "harmonic_0.5"):
      assert 0.0 <= row[key] <= 1.0, (name, key)
  assert set(results["reference"]) == {"dino", "clip_i"}


def test_reports_and_grids_are_written(evaluated):
  config, runs = evaluated
  workdir, results = runs["other"]
  folder = workdir / final_eval.FOLDER
  assert json.loads((folder / "metrics.json").read_text()) == json.loads(
      json.dumps(results))
  table = (folder / "metrics.md").read_text()
  assert "| fine-tuned (export/) |" in table and "| base (tiny) |" in table
  assert f"{results['finetuned']['dino']:.4f}" in table
  fe = config.final_eval
  assert results["prompts"] == ["a sks mug in the snow",
                                "a sks mug on a cobblestone street"]
  for name in final_eval.MODELS:
    grid = np.asarray(Image.open(folder / f"grid_{name}.png"))
    # The 3 photos on top, then one row of 2 images per prompt; 8 px gap.
    thumb = fe.grid_thumbnail
    assert grid.shape == ((1 + len(fe.prompts)) * thumb + 8, 3 * thumb, 3)


def _tiles(picture, corners, thumb):
  return [picture[top:top + thumb, left:left + thumb] for top, left in corners]


def test_comparison_places_every_image_at_its_corner():
  """Solid colours in: each one comes out whole at the corner the layout
  gives, base and fine-tuned side by side in their prompt's row."""
  thumb = 32
  rng = np.random.default_rng(0)
  colours = iter(rng.choice(256, size=(20, 3), replace=False).astype(np.uint8))

  def solid(side=48):
    return np.broadcast_to(next(colours), (side, side, 3)).copy()

  references = [solid(60) for _ in range(3)]
  generated = {name: [[solid() for _ in range(2)] for _ in range(2)]
               for name in final_eval.MODELS}
  results = {"prompts": ["a sks mug in the snow", "a sks mug on a street"],
             **{name: {"dino": 0.5, "clip_i": 0.25, "clip_t": 0.125}
                for name in final_eval.MODELS}}
  picture, layout = final_eval.comparison_image(references, generated,
                                                results, thumb)
  assert picture.dtype == np.uint8 and picture.shape[2] == 3
  expected = {"photos": references,
              **{name: [im for row in generated[name] for im in row]
                 for name in final_eval.MODELS}}
  for key, images in expected.items():
    assert len(layout[key]) == len(images), key
    for tile, image in zip(_tiles(picture, layout[key], thumb), images):
      assert (tile == image[0, 0]).all(), key
  for (b_top, b_left), (f_top, f_left) in zip(layout["base"],
                                              layout["finetuned"]):
    assert b_top == f_top and b_left + 2 * thumb < f_left
  # Each prompt's row has its text (dark pixels) left of the images.
  first_image = min(left for _, left in layout["base"])
  for top, _ in layout["base"][::2]:
    assert picture[top:top + thumb, :first_image].min() < 128
  assert max(top for top, _ in layout["photos"]) < min(
      top for top, _ in layout["base"])


def test_comparison_png_shows_both_models_from_the_same_seeds(evaluated):
  config, runs = evaluated
  thumb = config.final_eval.grid_thumbnail
  for name, same in (("same", True), ("other", False)):
    workdir, results = runs[name]
    picture = np.asarray(Image.open(
        workdir / final_eval.FOLDER / "comparison.png").convert("RGB"))
    # The layout depends only on the counts, the prompts and the scores.
    n = results["num_images_per_prompt"]
    blank = np.zeros((8, 8, 3), np.uint8)
    dummy = {m: [[blank] * n for _ in results["prompts"]]
             for m in final_eval.MODELS}
    photos = [blank] * results["num_photos"]
    empty, layout = final_eval.comparison_image(photos, dummy, results, thumb)
    assert picture.shape == empty.shape
    base = _tiles(picture, layout["base"], thumb)
    tuned = _tiles(picture, layout["finetuned"], thumb)
    assert all((a == b).all() for a, b in zip(base, tuned)) == same, name
    images, _ = images_lib.load_instance_images(workdir / "instance_images")
    for tile, image in zip(_tiles(picture, layout["photos"], thumb), images):
      np.testing.assert_array_equal(tile, eval_dreambench.thumbnail(image,
                                                                    thumb))


def test_summary_prints_both_models(evaluated):
  _, runs = evaluated
  workdir, results = runs["other"]
  summary = train.Summary(workdir=workdir, steps=3, last_metrics={"loss": 1.0},
                          final_eval=results)
  text = main_lib.summary_text(summary, _config(), "configs/demo_cpu.py")
  assert f"dino {results['base']['dino']:.4f}" in text
  assert str(workdir / final_eval.FOLDER / "comparison.png") in text
  assert f"dino {results['finetuned']['dino']:.4f}" in text
  assert "--config=configs/rpo_tpu.py" in text


def test_a_missing_evaluation_model_is_refused_before_the_run(tmp_path):
  config = _config()
  config.final_eval.dino_model = str(tmp_path / "no_dino_here")
  with pytest.raises(UserError, match="config.final_eval.dino_model"):
    final_eval.check_models(config)
  config.final_eval.enabled = False
  final_eval.check_models(config)  # off: nothing is looked up


@pytest.mark.parametrize("key, value", [
    ("num_images_per_prompt", 0), ("num_inference_steps", -1),
    ("prompts", []), ("batch_size", 0)])
def test_bad_final_eval_values_are_one_line_errors(key, value):
  config = _config()
  config.final_eval[key] = value
  with pytest.raises(UserError, match=f"config.final_eval.{key}"):
    config_lib.validate(config, 1)
