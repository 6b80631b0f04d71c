"""Tests for the final evaluation: export against base, scores and reports."""

import json

import numpy as np
import pytest
from PIL import Image

from personalize_jax import grids, main as main_lib
from personalize_jax.data import images as images_lib
from personalize_jax.data import demo_subject
from personalize_jax.engine import config as config_lib
from personalize_jax.engine import final_eval, train
from personalize_jax.errors import UserError
from personalize_jax.pipeline import load_stable_diffusion

import recipes

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


def test_reports_and_the_comparison_are_written(evaluated):
  _, runs = evaluated
  workdir, results = runs["other"]
  folder = workdir / final_eval.FOLDER
  assert json.loads((folder / "metrics.json").read_text()) == json.loads(
      json.dumps(results))
  table = (folder / "metrics.md").read_text()
  assert "| fine-tuned (export/) |" in table and "| base (tiny) |" in table
  assert f"{results['finetuned']['dino']:.4f}" in table
  assert results["prompts"] == ["a sks mug in the snow",
                                "a sks mug on a cobblestone street"]
  assert sorted(p.name for p in folder.iterdir()) == [
      "comparison.png", "metrics.json", "metrics.md"]


def _tiles(picture, corners, thumb):
  return [picture[top:top + thumb, left:left + thumb] for top, left in corners]


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
    assert len(layout["photos"]) == len(images) == 3
    for tile, image in zip(_tiles(picture, layout["photos"], thumb), images):
      np.testing.assert_array_equal(tile, grids.thumbnail(image, thumb))


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
