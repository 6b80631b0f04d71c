"""DreamBench evaluation: averaging, image layout, and the CLI end to end."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from personalize_jax import eval_dreambench as ev
from personalize_jax import grids
from personalize_jax.data import dreambench
from personalize_jax.errors import UserError

import recipes
import xla_env

ROOT = Path(__file__).resolve().parents[1]

_PROMPTS_TXT = """Classes

subject_name,class
dog,dog
teapot,teapot

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token),
'a wet {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a {0} {1} in the snow'.format(unique_token, class_token),
'a wet {0} {1}'.format(unique_token, class_token)
]
"""
# Subject -> sizes of its reference photos (mixed, as in DreamBench).
_REFS = {"dog": (40, 40, 48), "teapot": (48, 40)}
_PROMPTS = {"dog": ["a dog wearing a red hat", "a dog in the snow"],
            "teapot": ["a teapot in the jungle", "a red teapot"]}


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_average_counts_each_subject_once():
  assert ev.average([{"a": 1.0, "b": 0.5}, {"a": 4.0, "b": 0.0}]) == {
      "a": 2.5, "b": 0.25}


def test_layout_helpers(tmp_path):
  assert ev.parse_subjects("all") is None
  assert ev.parse_subjects("dog, cat") == ["dog", "cat"]
  assert ev.parse_subjects(("dog",)) == ["dog"]
  images = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
  ev.write_generated(tmp_path, "dog", 1, images)
  ev.write_generated(tmp_path, "dog", 0, images[::-1])
  rows = ev.read_generated(tmp_path, "dog", 2, 2)
  np.testing.assert_array_equal(rows[1][0], images[0])
  np.testing.assert_array_equal(rows[0][0], images[1])
  with pytest.raises(UserError, match="02_00.png is missing"):
    ev.read_generated(tmp_path, "dog", 3, 2)
  ev.write_prompts_json(tmp_path, {"dog": ["a zwx dog", "a wet zwx dog"]}, "zwx")
  assert ev.read_prompts_json(tmp_path, ["dog"], 1) == ({"dog": ["a zwx dog"]},
                                                         "zwx")
  with pytest.raises(UserError, match="fewer than num_prompts"):
    ev.read_prompts_json(tmp_path, ["dog"], 3)
  (tmp_path / "m" / "dog").mkdir(parents=True)
  (tmp_path / "m" / "dog" / "model_index.json").write_text("{}")
  models = tmp_path / "m"
  assert ev.model_for_subject(str(models), "dog") == str(models / "dog")
  assert ev.model_for_subject(str(models), "cat") == str(models)


def _write_inputs(root: Path):
  """A two-subject DreamBench folder and 2 prompts x 2 generated images each."""
  rng = np.random.default_rng(0)
  dataset, images = root / "dataset", root / "generated"
  dataset.mkdir()
  (dataset / "prompts_and_classes.txt").write_text(_PROMPTS_TXT)
  refs, generated = {}, {}
  for name, sizes in _REFS.items():
    (dataset / name).mkdir()
    refs[name] = []
    for i, size in enumerate(sizes):
      pixels = rng.integers(0, 256, (size, size, 3), np.uint8)
      path = dataset / name / f"{i:02d}.jpg"
      Image.fromarray(pixels).save(path, quality=95)
      refs[name].append(np.asarray(Image.open(path)))
    generated[name] = rng.integers(0, 256, (2, 2, 40, 40, 3), np.uint8)
    for p in range(2):
      ev.write_generated(images, name, p, generated[name][p])
  return dataset, images, refs, generated


def _expected_metrics(refs, generated):
  """The metrics computed directly: each image through processor and model."""
  # pylint: disable=g-import-not-at-top
  from personalize_jax.models.clip import CLIPModel
  from personalize_jax.models.image_processor import ImageProcessor
  from personalize_jax.models.tokenizer import load_tokenizer, tokenize
  from personalize_jax.models.vit import ViTModel
  # pylint: enable=g-import-not-at-top
  vit, clip = ViTModel.from_pretrained("tiny"), CLIPModel.from_pretrained("tiny")
  dino_proc = ImageProcessor.from_pretrained("tiny-dino")
  clip_proc = ImageProcessor.from_pretrained("tiny")
  tokenizer = load_tokenizer("tiny")

  dino_fn = nnx.jit(lambda model, px: model(px)[:, 0])
  clip_fn = nnx.jit(lambda model, px: model.get_image_features(px))

  def embed(images):
    dino = [np.asarray(dino_fn(vit, dino_proc(im[None]))[0]) for im in images]
    clip_i = [np.asarray(clip_fn(clip, clip_proc(im[None]))[0]) for im in images]
    return np.stack(dino), np.stack(clip_i)

  out = {}
  for name in _REFS:
    dino_r, clip_r = embed(refs[name])
    dino_g, clip_g = embed(list(generated[name].reshape(-1, 40, 40, 3)))
    text = np.asarray(clip.get_text_features(
        jnp.asarray(tokenize(tokenizer, _PROMPTS[name]))))
    text = np.repeat(text, 2, axis=0)  # images are [prompt][k]
    cos_i = _unit(clip_g) @ _unit(clip_r).T
    cos_t = np.sum(_unit(clip_g) * _unit(text), -1)
    ref_d, ref_c = _unit(dino_r) @ _unit(dino_r).T, _unit(clip_r) @ _unit(clip_r).T
    off = ~np.eye(len(refs[name]), dtype=bool)
    out[name] = {
        "dino": (_unit(dino_g) @ _unit(dino_r).T).mean(),
        "clip_i": cos_i.mean(), "clip_t": cos_t.mean(),
        **{f"harmonic_{lam}": np.mean(1 / (lam / ((cos_i.mean(1) + 1) / 2)
                                           + (1 - lam) / ((cos_t + 1) / 2)))
           for lam in (0.3, 0.5, 0.7)},
        "ref_dino": ref_d[off].mean(), "ref_clip_i": ref_c[off].mean()}
  return out


def test_cli_end_to_end(tmp_path):
  dataset, images, refs, generated = _write_inputs(tmp_path)
  workdir = tmp_path / "work"
  # XLA's LLVM optimisations take most of the CLI's CPU time on tiny models,
  # and the float results stay far inside the tolerance below.
  env = xla_env.env()
  cmd = [sys.executable, "-m", "personalize_jax.evaluate",
         "--config=configs/eval_dreambench.py:tiny",
         f"--config.dataset_dir={dataset}", f"--config.images_dir={images}",
         "--config.subjects=teapot,dog", f"--workdir={workdir}"]
  # The CLI runs while this process computes the expected values.
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  expected = _expected_metrics(refs, generated)
  stdout, stderr = proc.communicate(timeout=240)
  assert proc.returncode == 0, stderr[-3000:]
  assert "| dog |" in stdout

  results = json.loads((workdir / "metrics.json").read_text())
  assert sorted(results["subjects"]) == ["dog", "teapot"]
  for name, exp in expected.items():
    got, got_ref = results["subjects"][name], results["reference_subjects"][name]
    for key in ("dino", "clip_i", "clip_t", "harmonic_0.3", "harmonic_0.5",
                "harmonic_0.7"):
      assert got[key] == pytest.approx(exp[key], abs=2e-5), (name, key)
    assert got_ref["dino"] == pytest.approx(exp["ref_dino"], abs=2e-5)
    assert got_ref["clip_i"] == pytest.approx(exp["ref_clip_i"], abs=2e-5)
  for key in results["overall"]:
    assert results["overall"][key] == pytest.approx(
        np.mean([results["subjects"][n][key] for n in expected]), rel=1e-9)
  markdown = (workdir / "metrics.md").read_text()
  assert "| teapot |" in markdown and "**overall**" in markdown
  assert (results["protocol"], results["dino_model"],
          results["clip_model"]) == ("dreambooth", "tiny", "tiny")
  assert markdown.splitlines()[2] == (
      "Protocol: the DreamBooth paper's (DINO tiny, overriding the "
      "protocol's facebook/dino-vits16; CLIP tiny, overriding the "
      "protocol's openai/clip-vit-base-patch32).")
  # Each subject's grid: its photos, then its prompts with their images,
  # headed by its scores (tiny: 32 px thumbnails).
  prompts = ev.dreambench_prompts(
      dreambench.read_subjects(dataset, list(_REFS)),
      dreambench.read_prompt_templates(dataset), 2, "sks")
  for name in _REFS:
    column = grids.Column(f"{name}: generated", results["subjects"][name],
                          generated[name])
    expected_grid, _ = grids.labeled_grid(refs[name], prompts[name], [column],
                                          32)
    with Image.open(workdir / "grids" / f"{name}.png") as grid:
      np.testing.assert_array_equal(np.asarray(grid.convert("RGB")),
                                    expected_grid)


class _FakeEmbedder:
  """Stands in for ``rewards.Embedder``: embeddings read off the pixels, and
  one text vector for every prompt. No weights, so any model name works."""

  TEXT = np.array([1.0, -1.0, 0.5, 0.0])

  def images(self, images):
    return np.stack([_fake_embedding(im) for im in images])

  def texts(self, prompts, unique_token):
    del unique_token
    return np.tile(self.TEXT, (len(prompts), 1))


def _fake_embedding(image):
  return np.asarray(image, np.float64)[0, :2].reshape(-1)[:4] - 127.5


@pytest.mark.parametrize("protocol, dino_model, clip_model, line", [
    ("dreambooth", "", "", "the DreamBooth paper's (DINO facebook/dino-vits16;"
     " CLIP openai/clip-vit-base-patch32)"),
    ("rpo_code", "", "/my/clip", "the RPO code's (DINO facebook/dino-vits16; "
     "CLIP /my/clip, overriding the protocol's openai/clip-vit-base-patch16; "
     "CLIP-T of each image counted as at least 0)"),
], ids=["dreambooth", "rpo_code"])
def test_protocol_picks_the_models_and_clip_t_and_is_reported(
    tmp_path, monkeypatch, protocol, dino_model, clip_model, line):
  """Models left "" are the protocol's; rpo_code counts each image's CLIP-T
  as at least 0. Stand-in embedders: nothing is loaded or downloaded."""
  dataset, images, refs, generated = _write_inputs(tmp_path)
  loaded = []

  def fake_loader(kind):
    def load(name, chunk):
      del chunk
      loaded.append((kind, name))
      return _FakeEmbedder()
    return load

  monkeypatch.setattr(ev.rewards.Embedder, "dino", fake_loader("dino"))
  monkeypatch.setattr(ev.rewards.Embedder, "clip", fake_loader("clip"))
  monkeypatch.setattr(ev.dreambench, "load_reference_images",
                      lambda dataset_dir, data_dir, names: refs)
  config = _tiny_config()
  config.update(dict(dataset_dir=str(dataset), images_dir=str(images),
                     subjects="teapot,dog", protocol=protocol,
                     dino_model=dino_model, clip_model=clip_model))
  results = ev.evaluate(config, tmp_path / "work")

  dino_used = dino_model or "facebook/dino-vits16"
  clip_used = clip_model or "openai/clip-vit-base-patch32"
  assert loaded == [("dino", dino_used), ("clip", clip_used)]
  recorded = json.loads((tmp_path / "work" / "metrics.json").read_text())
  assert (recorded["protocol"], recorded["dino_model"],
          recorded["clip_model"]) == (protocol, dino_used, clip_used)
  markdown = (tmp_path / "work" / "metrics.md").read_text()
  assert f"\nProtocol: {line}.\n" in markdown
  negatives = 0
  for name in _REFS:
    gen = np.stack([_fake_embedding(im)
                    for im in generated[name].reshape(-1, 40, 40, 3)])
    cos_t = _unit(gen) @ _unit(_FakeEmbedder.TEXT)
    negatives += (cos_t < 0).sum()
    expected = np.maximum(cos_t, 0) if protocol == "rpo_code" else cos_t
    assert results["subjects"][name]["clip_t"] == pytest.approx(
        expected.mean(), rel=1e-9), name
  assert negatives >= 2  # so the floor changes the numbers


def test_an_unknown_protocol_is_refused_before_anything_is_written(tmp_path):
  dataset, images, _, _ = _write_inputs(tmp_path)
  config = _tiny_config()
  config.update(dict(dataset_dir=str(dataset), images_dir=str(images),
                     protocol="dreambench"))
  with pytest.raises(UserError) as raised:
    ev.evaluate(config, tmp_path / "work")
  assert str(raised.value) == ("config.protocol='dreambench' is unknown: use "
                               "one of dreambooth, rpo_code")
  assert not (tmp_path / "work").exists()


def test_a_bad_resolution_is_refused_before_anything_is_written(tmp_path):
  resolution = -1
  config = _tiny_config()
  config.update(dict(model="tiny-sdxl", resolution=resolution))
  with pytest.raises(UserError) as raised:
    ev.evaluate(config, tmp_path / "work")
  assert str(raised.value) == (
      f"resolution={resolution!r} is invalid: use 0 (the model's own size) "
      "or an image side in pixels, e.g. 1024")
  assert not (tmp_path / "work").exists()


def test_the_default_protocol_scores_with_the_dreambooth_papers_models():
  config = recipes.load("eval_dreambench", None)
  assert (config.protocol, config.dino_model, config.clip_model) == (
      "dreambooth", "", "")
  assert ev.rewards.protocol_models(ev.rewards.get_protocol(config.protocol),
                                    config.dino_model, config.clip_model) == (
      "facebook/dino-vits16", "openai/clip-vit-base-patch32")
  tiny = _tiny_config()
  assert (tiny.protocol, tiny.dino_model, tiny.clip_model) == (
      "dreambooth", "tiny", "tiny")


def test_cli_user_error(tmp_path):
  dataset, _, _, _ = _write_inputs(tmp_path)
  proc = subprocess.run(
      [sys.executable, "-m", "personalize_jax.evaluate",
       "--config=configs/eval_dreambench.py:tiny",
       f"--config.dataset_dir={dataset}",
       f"--config.images_dir={tmp_path / 'absent'}",
       "--config.subjects=dog", f"--workdir={tmp_path / 'work'}"],
      cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
      capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("error: images_dir") and "absent" in lines[-1]


def test_generate_images_wiring(tmp_path, monkeypatch):
  """The model branch: which pipeline, which prompts, where the images go.

  The pipeline and sampler are stand-ins here; the tiny end-to-end run of the
  real ones belongs with ``diffusion.generate``.
  """
  models = tmp_path / "models"
  (models / "dog").mkdir(parents=True)
  (models / "dog" / "model_index.json").write_text("{}")
  loaded, calls = [], []

  class Pipe:
    def __init__(self, source):
      self.source = source

  def fake_load(source):
    loaded.append(source)
    return Pipe(source)

  def fake_generate(pipe, prompts, *, rng, num_inference_steps, guidance_scale,
                    resolution):
    assert resolution == 96
    calls.append((pipe.source, list(prompts), num_inference_steps,
                  guidance_scale, np.asarray(jax.random.key_data(rng))))
    return np.full((len(prompts), 8, 8, 3), len(calls), np.uint8)

  monkeypatch.setattr(ev.pipeline_lib, "load_stable_diffusion", fake_load)
  monkeypatch.setattr(ev.diffusion, "generate", fake_generate, raising=False)
  config = _tiny_config()
  config.model = str(models)
  config.resolution = 96
  prompts = {"dog": ["a sks dog", "a wet sks dog"], "teapot": ["a sks teapot"]}
  ev.generate_images(config, prompts, tmp_path / "images")
  assert loaded == [str(models / "dog"), str(models)]
  assert [c[:4] for c in calls] == [
      (str(models / "dog"), ["a sks dog"] * 2, 2, 7.5),
      (str(models / "dog"), ["a wet sks dog"] * 2, 2, 7.5),
      (str(models), ["a sks teapot"] * 2, 2, 7.5)]
  assert len({c[4].tobytes() for c in calls}) == 3  # a distinct key per call
  rows = ev.read_generated(tmp_path / "images", "dog", 2, 2)
  assert rows[1][1].shape == (8, 8, 3) and (rows[1][1] == 2).all()
  assert ev.read_prompts_json(tmp_path / "images", ["dog", "teapot"], 1) == (
      {"dog": ["a sks dog"], "teapot": ["a sks teapot"]}, "sks")


def test_a_subject_folder_holding_a_lora_is_sampled_from_base_plus_lora(
    tmp_path, monkeypatch):
  """A LoRA sweep links each run's LoRA-only export under the subject name."""
  models = tmp_path / "models"
  for subject, base in (("cat", "tiny"), ("dog", "/base/sd14")):
    (models / subject).mkdir(parents=True)
    (models / subject / "pytorch_lora_weights.safetensors").write_bytes(b"")
    (models / subject / "train_config.json").write_text(json.dumps(
        {"model": {"pretrained": base}, "seed": 7}))
  loaded = []

  @dataclasses.dataclass
  class Pipe:
    source: str

  def fake_load(source, **kwargs):
    loaded.append((source, kwargs))
    return Pipe(source)

  monkeypatch.setattr(ev.pipeline_lib, "load_stable_diffusion", fake_load)
  monkeypatch.setattr(ev.diffusion, "generate", lambda pipe, prompts, **_: (
      np.zeros((len(prompts), 8, 8, 3), np.uint8)), raising=False)
  config = _tiny_config()
  config.model = str(models)
  ev.generate_images(config, {"cat": ["a sks cat"], "dog": ["a sks dog"]},
                     tmp_path / "images")
  assert loaded == [("tiny", {"lora": models / "cat", "seed": 7}),
                    ("/base/sd14", {"lora": models / "dog"})]
  config.base_model = "/other/base"  # named explicitly, it wins
  loaded.clear()
  ev.generate_images(config, {"dog": ["a sks dog"]}, tmp_path / "images2")
  assert loaded == [("/other/base", {"lora": models / "dog"})]


def _tiny_config():
  return recipes.load("eval_dreambench", "tiny")


@pytest.mark.parametrize("model, resolution, side", [
    ("tiny", 0, 64),  # the model's own size
    ("tiny-sdxl", 96, 96),  # SDXL, its time ids those of the size asked for
])
def test_generate_images_with_the_tiny_pipeline(tmp_path, model, resolution,
                                                side):
  """The model branch with the real loader and sampler: the files written are
  the images ``diffusion.generate`` makes for each prompt's key."""
  # pylint: disable=g-import-not-at-top
  from personalize_jax import diffusion
  from personalize_jax.pipeline import load_stable_diffusion
  config = _tiny_config()
  config.model = model
  config.resolution = resolution
  prompts = {"dog": ["a sks dog", "a wet sks dog"]}
  ev.generate_images(config, prompts, tmp_path / "images")
  rows = ev.read_generated(tmp_path / "images", "dog", 2, 2)
  pipeline = load_stable_diffusion(model)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 0), 1)
  expected = diffusion.generate(pipeline, ["a wet sks dog"] * 2, rng=key,
                                num_inference_steps=config.num_inference_steps,
                                guidance_scale=config.guidance_scale,
                                resolution=side)
  assert expected.shape == (2, side, side, 3)
  np.testing.assert_array_equal(np.stack(rows[1]), expected)
  assert not np.array_equal(rows[0][0], rows[1][0])  # prompts differ
