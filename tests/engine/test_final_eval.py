"""Tests for the final evaluation: export against base, scores and reports."""

import json

import numpy as np
import pytest
from PIL import Image

from personalize_jax import grids, main as main_lib, rewards
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
  """Two runs by the RPO code's protocol: an export equal to the base model,
  and one that differs. ``scored`` holds what ``subject_metrics`` was given."""
  config = _config()
  config.final_eval.protocol = "rpo_code"
  out, scored = {}, []

  def spy(*args, **kwargs):
    scored.append((args, kwargs))
    return subject_metrics(*args, **kwargs)

  subject_metrics = rewards.subject_metrics
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(rewards, "subject_metrics", spy)
    for name, export_seed in (("same", config.seed),
                              ("other", config.seed + 7)):
      workdir = tmp_path_factory.mktemp(name)
      demo_subject.write_demo_subject(workdir / "instance_images",
                                      num_images=3, size=96, seed=0)
      load_stable_diffusion("tiny", seed=export_seed).save_pretrained(
          workdir / "export")
      out[name] = (workdir, final_eval.run(config, workdir))
  return config, out, scored


def test_an_export_equal_to_the_base_scores_exactly_the_same(evaluated):
  _, runs, _ = evaluated
  _, results = runs["same"]
  # Same weights and the same seeds: the same images, the same scores.
  for key in SCORES:
    assert results["finetuned"][key] == results["base"][key], key


def test_another_export_scores_differently_against_the_same_base(evaluated):
  _, runs, _ = evaluated
  same, other = runs["same"][1], runs["other"][1]
  for key in SCORES:
    assert other["base"][key] == same["base"][key], key
  assert other["finetuned"]["dino"] != other["base"]["dino"]
  assert other["finetuned"]["clip_i"] != other["base"]["clip_i"]


def test_scores_are_cosines_and_harmonics_in_range(evaluated):
  _, runs, _ = evaluated
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
  _, runs, _ = evaluated
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


def test_the_protocol_is_followed_and_reported(evaluated):
  _, runs, scored = evaluated
  workdir, results = runs["other"]
  assert (results["protocol"], results["dino_model"],
          results["clip_model"]) == ("rpo_code", "tiny", "tiny")
  assert json.loads((workdir / final_eval.FOLDER / "metrics.json").read_text(
      ))["protocol"] == "rpo_code"
  assert (workdir / final_eval.FOLDER / "metrics.md").read_text().splitlines(
      )[4] == ("Protocol: the RPO code's (DINO tiny, overriding the "
               "protocol's facebook/dino-vits16; CLIP tiny, overriding the "
               "protocol's openai/clip-vit-base-patch16; CLIP-T of each image "
               "counted as at least 0).")
  # Both models of both runs: CLIP-T is the mean of max(cos, 0).
  assert len(scored) == 4
  clip_t = [r[m]["clip_t"] for _, r in runs.values() for m in final_eval.MODELS]
  for (args, kwargs), got in zip(scored, clip_t):
    assert kwargs == {"clip_t_at_least_zero": True}
    _, _, clip_gen, _, text, _ = args
    cos = np.sum(_unit(clip_gen) * _unit(text), -1)
    assert got == pytest.approx(np.maximum(cos, 0).mean(), rel=1e-6)


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_final_eval_models_are_the_protocols_unless_set():
  fe = recipes.load("dreambooth_tpu", None).final_eval
  assert (fe.protocol, fe.dino_model, fe.clip_model) == ("dreambooth", "", "")
  protocol, dino, clip = final_eval.protocol_and_models(fe)
  assert (protocol.name, dino, clip) == (
      "dreambooth", "facebook/dino-vits16", "openai/clip-vit-base-patch32")
  fe.protocol, fe.clip_model = "rpo_code", "/my/clip"
  protocol, dino, clip = final_eval.protocol_and_models(fe)
  assert (protocol.name, dino, clip) == (
      "rpo_code", "facebook/dino-vits16", "/my/clip")
  tiny = _config().final_eval
  assert (tiny.protocol, tiny.dino_model, tiny.clip_model) == (
      "dreambooth", "tiny", "tiny")


def _tiles(picture, corners, thumb):
  return [picture[top:top + thumb, left:left + thumb] for top, left in corners]


def test_comparison_png_shows_both_models_from_the_same_seeds(evaluated):
  config, runs, _ = evaluated
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
  _, runs, _ = evaluated
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


def test_an_unknown_protocol_is_refused_before_the_run():
  config = _config()
  config.final_eval.protocol = "rpo"
  with pytest.raises(UserError) as raised:
    final_eval.check_models(config)
  assert str(raised.value) == ("config.final_eval.protocol='rpo' is unknown: "
                               "use one of dreambooth, rpo_code")
  config.final_eval.enabled = False
  final_eval.check_models(config)  # off: not checked


@pytest.mark.parametrize("key, value", [
    ("num_images_per_prompt", 0), ("num_inference_steps", -1),
    ("prompts", []), ("batch_size", 0)])
def test_bad_final_eval_values_are_one_line_errors(key, value):
  config = _config()
  config.final_eval[key] = value
  with pytest.raises(UserError, match=f"config.final_eval.{key}"):
    config_lib.validate(config, 1)
