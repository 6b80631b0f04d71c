"""DreamBench, the DreamBooth evaluation set, as a tensorflow-datasets builder.

The source is a local copy of the ``dataset/`` folder of google/dreambooth:
one folder of JPEGs per subject (``<subject>/NN.jpg``) and
``prompts_and_classes.txt``, which lists each subject's class noun and the 25
object and 25 live-subject prompt templates. Nothing is downloaded.

The builder stores the original JPEG bytes untouched (no re-encoding, so the
images round-trip byte for byte) in ``array_record`` files, which
``tfds.data_source`` reads without TensorFlow. Records come back in shuffled
order: sort by ``(subject, file_name)`` when the order matters.

  builder = DreamBench(dataset_dir="dreambench/dataset", data_dir="/tmp/tfds")
  builder.download_and_prepare()
  source = builder.as_data_source(split="train")

Cite Ruiz et al., "DreamBooth", CVPR 2023, when you use the data (CC BY 4.0,
some images under the Unsplash licence: see the upstream
``references_and_licenses.txt``).
"""

import dataclasses
import inspect
import io
import os
import re
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from personalize_jax.errors import UserError

PROMPTS_FILE = "prompts_and_classes.txt"
SPLIT = "train"
# prompts_and_classes.txt does not say which subjects are "live"; upstream
# applies the live-subject prompts to its cats and dogs.
LIVE_CLASSES = ("cat", "dog")
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_TEMPLATE = re.compile(r"^'(.*)'\.format\(unique_token,\s*class_token\),?$")


@dataclasses.dataclass(frozen=True)
class Subject:
  """One DreamBench subject.

  Attributes:
    name: the folder name (``dog``, ``backpack_dog``, ...).
    class_noun: the class token used in prompts (``dog``, ``stuffed animal``).
    live: whether the live-subject prompt list applies (cats and dogs).
    image_files: the file names of its reference images, sorted.
  """
  name: str
  class_noun: str
  live: bool
  image_files: tuple[str, ...]

  @property
  def prompt_list(self) -> str:
    """``live`` or ``object``: which of the two prompt lists applies."""
    return "live" if self.live else "object"


def _read_prompts_file(dataset_dir: Path) -> str:
  path = Path(dataset_dir) / PROMPTS_FILE
  if not path.is_file():
    raise UserError(
        f"{path} is missing; dataset_dir must be a copy of the dataset/ folder "
        "of github.com/google/dreambooth (subject folders + "
        f"{PROMPTS_FILE})")
  return path.read_text()


def read_classes(dataset_dir: str | os.PathLike) -> dict[str, str]:
  """The class noun of every subject, from ``prompts_and_classes.txt``."""
  text = _read_prompts_file(Path(dataset_dir))
  classes, in_table = {}, False
  for line in text.splitlines():
    line = line.strip()
    if line == "subject_name,class":
      in_table = True
    elif in_table and "," in line:
      name, noun = line.split(",", 1)
      classes[name.strip()] = noun.strip()
    elif in_table and line == "Prompts":
      break
  if not classes:
    raise UserError(f"{Path(dataset_dir) / PROMPTS_FILE} has no "
                    "'subject_name,class' table; restore the upstream file")
  return classes


def read_prompt_templates(dataset_dir: str | os.PathLike) -> dict[str, list[str]]:
  """The ``object`` and ``live`` prompt templates (``{0}`` token, ``{1}`` class).

  Parsed from the Python lists in ``prompts_and_classes.txt``, in order; each
  list has 25 templates upstream.
  """
  text = _read_prompts_file(Path(dataset_dir))
  templates, current = {"object": [], "live": []}, None
  for line in text.splitlines():
    line = line.strip()
    if line == "Object Prompts":
      current = "object"
    elif line == "Live Subject Prompts":
      current = "live"
    elif current and (match := _TEMPLATE.match(line)):
      templates[current].append(match.group(1))
  if not templates["object"] or not templates["live"]:
    raise UserError(f"{Path(dataset_dir) / PROMPTS_FILE} lacks the object or "
                    "live prompt list; restore the upstream file")
  return templates


def read_subjects(dataset_dir: str | os.PathLike,
                  names: Iterable[str] | None = None) -> list[Subject]:
  """The subjects of a DreamBench folder, sorted by name.

  Args:
    dataset_dir: a copy of google/dreambooth's ``dataset/`` folder.
    names: a subset to return (all subjects if None).

  Raises:
    UserError: the folder, a subject folder or its images are missing, or a
      name is not a subject.
  """
  dataset_dir = Path(dataset_dir)
  if not dataset_dir.is_dir():
    raise UserError(f"DreamBench folder {dataset_dir} does not exist; point "
                    "dataset_dir at a copy of google/dreambooth's dataset/")
  classes = read_classes(dataset_dir)
  wanted = sorted(classes) if names is None else list(names)
  unknown = [n for n in wanted if n not in classes]
  if unknown:
    raise UserError(f"unknown DreamBench subject(s) {unknown}; choose from "
                    f"{sorted(classes)}")
  subjects = []
  for name in sorted(wanted):
    folder = dataset_dir / name
    files = (sorted(p.name for p in folder.iterdir()
                    if p.suffix.lower() in _IMAGE_SUFFIXES)
             if folder.is_dir() else [])
    if not files:
      raise UserError(f"{folder} has no images; the DreamBench copy in "
                      f"{dataset_dir} is incomplete")
    subjects.append(Subject(name=name, class_noun=classes[name],
                            live=classes[name] in LIVE_CLASSES,
                            image_files=tuple(files)))
  return subjects


def subject_prompts(subject: Subject, templates: dict[str, Sequence[str]],
                    unique_token: str = "sks") -> list[str]:
  """The subject's prompts with its unique token: ``a sks dog in the jungle``."""
  return [t.format(unique_token, subject.class_noun)
          for t in templates[subject.prompt_list]]


def decode_image(data: bytes) -> np.ndarray:
  """Encoded image bytes -> ``(h, w, 3)`` uint8 RGB."""
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"))


class DreamBench(tfds.core.GeneratorBasedBuilder):
  """DreamBench: 30 subjects, 158 reference photos (google/dreambooth)."""

  name = "dreambench"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Original JPEGs of google/dreambooth dataset/."}

  # tfds finds the builder's source file through the `importlib_resources`
  # backport, which is not a dependency; the plain file path does the same.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))

  def __init__(self, *, dataset_dir: str | os.PathLike, **kwargs):
    """Builds from a local DreamBench folder.

    Args:
      dataset_dir: a copy of google/dreambooth's ``dataset/`` folder. Its
        contents are not part of the cache key: give each source its own
        ``data_dir``.
      **kwargs: ``tfds.core.GeneratorBasedBuilder`` arguments (``data_dir``);
        the file format is always ``array_record``.
    """
    self._dataset_dir = Path(dataset_dir)
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="DreamBooth's evaluation subjects: 4-6 photos each.",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3),
                                         encoding_format="jpeg"),
            "file_name": tfds.features.Text(),
            "subject": tfds.features.Text(),
            "class_noun": tfds.features.Text(),
            "live": tfds.features.Scalar(dtype=np.bool_),
        }),
        homepage="https://github.com/google/dreambooth",
        citation="@inproceedings{ruiz2023dreambooth, title={DreamBooth: Fine "
                 "Tuning Text-to-Image Diffusion Models for Subject-Driven "
                 "Generation}, author={Ruiz, Nataniel and Li, Yuanzhen and "
                 "Jampani, Varun and Pritch, Yael and Rubinstein, Michael and "
                 "Aberman, Kfir}, booktitle={CVPR}, year={2023}}",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data is local.
    return {SPLIT: self._generate_examples(read_subjects(self._dataset_dir))}

  def _generate_examples(self, subjects: list[Subject]):
    for subject in subjects:
      for file_name in subject.image_files:
        path = self._dataset_dir / subject.name / file_name
        with Image.open(path) as image:
          # Keep the original bytes when they already are an RGB JPEG (MPO is
          # a JPEG with extra frames from phone cameras; decoders read its
          # first frame); other images are handed to tfds as RGB pixels.
          if image.format in ("JPEG", "MPO") and image.mode == "RGB":
            data = path.read_bytes()
          else:
            data = image.convert("RGB")
        yield f"{subject.name}/{file_name}", {
            "image": data, "file_name": file_name, "subject": subject.name,
            "class_noun": subject.class_noun, "live": subject.live}


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def load_reference_images(dataset_dir: str | os.PathLike,
                          data_dir: str | os.PathLike,
                          subjects: Iterable[str] | None = None,
                          ) -> dict[str, list[np.ndarray]]:
  """Reference images per subject, through the tfds builder (prepared once).

  Args:
    dataset_dir: a copy of google/dreambooth's ``dataset/`` folder.
    data_dir: where the prepared ``array_record`` files live (built on first
      use).
    subjects: the subjects to decode (all if None).

  Returns:
    ``{subject: [uint8 (h, w, 3) images sorted by file name]}``.
  """
  builder = DreamBench(dataset_dir=dataset_dir, data_dir=str(data_dir))
  builder.download_and_prepare()
  # Skip decoding so that only the wanted subjects' JPEGs are decompressed.
  source = builder.as_data_source(
      split=SPLIT, decoders={"image": tfds.decode.SkipDecoding()})
  wanted = None if subjects is None else set(subjects)
  found: dict[str, list[tuple[str, bytes]]] = {}
  for i in range(len(source)):
    record = source[i]
    name = _text(record["subject"])
    if wanted is None or name in wanted:
      found.setdefault(name, []).append((_text(record["file_name"]),
                                         record["image"]))
  missing = sorted((wanted or set()) - set(found))
  if missing:
    raise UserError(f"subject(s) {missing} are not in the DreamBench data "
                    f"prepared in {data_dir}; delete that folder to rebuild it")
  return {name: [decode_image(data) for _, data in sorted(items)]
          for name, items in sorted(found.items())}
