"""DreamBench: prompt parsing, subjects, and the tfds builder round trip."""

import io
import json

import numpy as np
import pytest
from PIL import Image

from personalize_jax.data import dreambench, prompts
from personalize_jax.errors import UserError

_PROMPTS_TXT = """Classes

subject_name,class
dog,dog
teapot,teapot
red_thing,stuffed animal

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a wet {0} {1}'.format(unique_token, class_token)
]
"""


def write_dataset(root, sizes=None):
  """A small DreamBench-like folder: 3 subjects, JPEGs and one PNG (RGBA)."""
  sizes = sizes or {"dog": 3, "teapot": 2, "red_thing": 2}
  rng = np.random.default_rng(0)
  root.mkdir(parents=True, exist_ok=True)
  (root / dreambench.PROMPTS_FILE).write_text(_PROMPTS_TXT)
  for name, count in sizes.items():
    (root / name).mkdir()
    for i in range(count):
      pixels = rng.integers(0, 256, (24 + 4 * i, 24 + 4 * i, 3), np.uint8)
      Image.fromarray(pixels).save(root / name / f"{i:02d}.jpg", quality=90)
  # Smooth, so that its lossy re-encoding stays close to the original.
  ramp = np.linspace(0, 255, 20).astype(np.uint8)
  rgba = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 128, 255),
                  -1).astype(np.uint8)
  Image.fromarray(rgba, "RGBA").save(root / "red_thing" / "09.png")
  return root


def test_read_subjects_and_prompts(tmp_path):
  root = write_dataset(tmp_path / "dataset")
  subjects = dreambench.read_subjects(root)
  assert [s.name for s in subjects] == ["dog", "red_thing", "teapot"]
  dog, red, teapot = subjects
  assert (dog.live, red.live, teapot.live) == (True, False, False)
  assert red.class_noun == "stuffed animal"
  assert red.image_files == ("00.jpg", "01.jpg", "09.png")
  templates = dreambench.read_prompt_templates(root)
  assert dreambench.subject_prompts(dog, templates, "sks") == [
      "a sks dog wearing a red hat", "a wet sks dog"]
  assert dreambench.subject_prompts(red, templates, "zwx") == [
      "a zwx stuffed animal in the jungle", "a red zwx stuffed animal"]
  # CLIP-T reads a DreamBench prompt without its token.
  assert prompts.without_token(
      dreambench.subject_prompts(red, templates, "zwx")[1], "zwx") == (
          "a red stuffed animal")
  assert [s.name for s in dreambench.read_subjects(root, ["teapot"])] == [
      "teapot"]


def test_user_errors(tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    dreambench.read_subjects(tmp_path / "absent")
  root = write_dataset(tmp_path / "dataset")
  with pytest.raises(UserError, match="unknown DreamBench subject"):
    dreambench.read_subjects(root, ["dog", "cat"])
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match="prompts_and_classes.txt is missing"):
    dreambench.read_subjects(tmp_path / "empty")


def test_builder_round_trips_records(tmp_path):
  root = write_dataset(tmp_path / "dataset")
  builder = dreambench.DreamBench(dataset_dir=root,
                                  data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare()
  assert list((tmp_path / "tfds").rglob("*.array_record*"))
  source = builder.as_data_source(split=dreambench.SPLIT)
  records = {}
  for i in range(len(source)):
    r = source[i]
    records[(r["subject"].decode(), r["file_name"].decode())] = r
  assert len(records) == 3 + 2 + 3
  for (subject, file_name), r in records.items():
    with Image.open(root / subject / file_name) as image:
      expected = np.asarray(image.convert("RGB"))
    # JPEGs are stored as their original bytes, so they decode identically;
    # the RGBA PNG is converted to RGB and re-encoded as JPEG (lossy).
    if file_name.endswith(".jpg"):
      np.testing.assert_array_equal(r["image"], expected)
    else:
      assert r["image"].shape == expected.shape
      assert np.abs(r["image"].astype(int) - expected).mean() < 3
    assert r["class_noun"].decode() == {"dog": "dog", "teapot": "teapot",
                                        "red_thing": "stuffed animal"}[subject]
    assert bool(r["live"]) == (subject == "dog")


def test_load_reference_images_sorted_subset(tmp_path):
  root = write_dataset(tmp_path / "dataset")
  refs = dreambench.load_reference_images(root, tmp_path / "tfds",
                                          ["teapot", "dog"])
  assert sorted(refs) == ["dog", "teapot"]
  for name, images in refs.items():
    files = sorted((root / name).glob("*.jpg"))
    assert len(images) == len(files)
    for image, path in zip(images, files):
      np.testing.assert_array_equal(image, np.asarray(Image.open(path)))


def test_real_dreambench_prompts_and_bytes(shared_dir, tmp_path):
  """The upstream file parses as prompts.json/subjects.json say; bytes survive."""
  root = shared_dir / "dreambench" / "dataset"
  templates = dreambench.read_prompt_templates(root)
  expected = json.loads((shared_dir / "dreambench" / "prompts.json").read_text())
  assert templates == {"object": expected["object"], "live": expected["live"]}
  info = json.loads((shared_dir / "dreambench" / "subjects.json").read_text())
  subjects = dreambench.read_subjects(root)
  assert [(s.name, s.class_noun, s.prompt_list, list(s.image_files))
          for s in subjects] == [
              (s["name"], s["class"], s["prompt_list"], s["images"])
              for s in info["subjects"]]
  builder = dreambench.DreamBench(dataset_dir=root,
                                  data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare()
  source = builder.as_data_source(
      split=dreambench.SPLIT,
      decoders={"image": dreambench.tfds.decode.SkipDecoding()})
  assert len(source) == info["num_images"] == 158
  for i in range(0, len(source), 10):
    r = source[i]
    path = root / r["subject"].decode() / r["file_name"].decode()
    assert r["image"] == path.read_bytes()
  # Phone-camera MPO files decode to their first frame, as PIL reads them.
  index = [i for i in range(len(source)) if source[i]["subject"] == b"candle"
           and source[i]["file_name"] == b"00.jpg"]
  assert len(index) == 1
  decoded = builder.as_data_source(split=dreambench.SPLIT)[index[0]]["image"]
  with Image.open(root / "candle" / "00.jpg") as image:
    assert image.format == "MPO"
    np.testing.assert_array_equal(decoded, np.asarray(image))


def test_decode_image_converts_to_rgb():
  buf = io.BytesIO()
  Image.fromarray(np.full((4, 5), 7, np.uint8), "L").save(buf, "PNG")
  image = dreambench.decode_image(buf.getvalue())
  assert image.shape == (4, 5, 3) and (image == 7).all()
