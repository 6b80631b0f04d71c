"""Bad inputs through the command line: one line, exit 2, workdir untouched.

Each case builds its input here (photos with PIL, model folders), runs
``python -m personalize_jax.main`` on the tiny DreamBooth recipe and checks
that the run ends in exactly one line on stderr that names the problem (and
the file) and the fix, with exit code 2 and no traceback, before the workdir
is touched: a workdir that did not exist is not created, and one that holds an
earlier run's files keeps every byte and modification time. The cases run
many to a process (``tests/cli.py``: each would spend its time importing
jax).

Unusual but valid photos, ``skip_bad_images`` and prompt warnings need a
training run: they are in ``tests/test_faults.py``.
"""

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli

REPO = Path(__file__).resolve().parents[1]
TINY = "--config=configs/dreambooth_tpu.py:tiny"
DREAMBENCH_DOG = REPO.parent / "shared" / "dreambench" / "dataset" / "dog"
HUB_ID = "CompVis/stable-diffusion-v1-4"
# Cases that run on a workdir holding an earlier run's files (one per stage
# that can fail: config validation, the model check, the photo check); the
# others on a workdir that does not exist yet.
ON_EARLIER_RUN = ("empty_class_name", "not_a_diffusers_folder", "hub_offline",
                  "truncated_jpeg")
OLD_MTIME_NS = 1_000_000_000 * 10**9  # 2001: any rewrite shows.


def _noise(size=(128, 128), seed=0) -> Image.Image:
  return Image.fromarray(np.random.default_rng(seed).integers(
      0, 256, size[::-1] + (3,), np.uint8))


def _photo(path: Path, size=(128, 128), seed=0) -> Path:
  _noise(size, seed).save(path)
  return path


def _truncated_jpeg(path: Path, source: bytes | None = None) -> Path:
  """The first 40% of a JPEG (``source``, else a new one), as a cut copy."""
  if source is None:
    buf = io.BytesIO()
    _noise(seed=9).save(buf, "JPEG")
    source = buf.getvalue()
  path.write_bytes(source[:len(source) * 2 // 5])
  return path


def _photos(folder: Path, good: int = 3) -> Path:
  folder.mkdir(parents=True)
  for i in range(good):
    _photo(folder / f"good_{i}.png", seed=i)
  return folder


def _instance(folder: Path) -> list[str]:
  return [f"--config.data.instance_dir={folder}"]


# Each case gets a folder path (not yet created) for its inputs and returns
# (arguments, extra environment, fragments the error line must contain).


def _instance_dir_missing(f):
  return _instance(f), {}, [f"config.data.instance_dir='{f}'",
                            "does not exist"]


def _instance_dir_empty(f):
  _photos(f, good=0)
  return _instance(f), {}, [f"instance folder {f} has no images (it is empty",
                            "put 3-10 photos"]


def _instance_dir_without_image_files(f):
  _photos(f, good=0)
  (f / "notes.txt").write_text("photos of my dog\n")
  (f / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
  return _instance(f), {}, [f"instance folder {f} has no images (it holds "
                            "only notes.txt;"]


def _no_readable_image(f):
  _photos(f, good=0)
  (f / "a.jpg").write_text("not a jpeg\n")
  _truncated_jpeg(f / "b.jpg")
  return _instance(f), {}, [
      f"none of the 2 image files in the instance folder {f} can be used",
      f"{f / 'a.jpg'} is not an image"]


def _not_an_image(f):
  _photos(f)
  (f / "notes.jpg").write_text("shopping list: milk, eggs\n")
  return _instance(f), {}, [f"{f / 'notes.jpg'} is not an image",
                            "--config.data.skip_bad_images=true"]


def _truncated(f):
  _photos(f)
  _truncated_jpeg(f / "cut_off.jpg")
  return _instance(f), {}, [f"{f / 'cut_off.jpg'} could not be decoded",
                            "truncated or corrupt",
                            "--config.data.skip_bad_images=true"]


def _too_small(f):
  _photos(f)
  _photo(f / "thumbnail.png", size=(120, 90))
  return _instance(f) + ["--config.data.min_image_side=96"], {}, [
      f"{f / 'thumbnail.png'} is 120x90 px, smaller than the minimum side of "
      "96 px", "--config.data.min_image_side"]


def _empty_class_name(f):
  del f
  return ["--config.data.class_name="], {}, ["config.data.class_name=''",
                                             "e.g. 'dog'"]


def _empty_unique_token(f):
  del f
  return ["--config.data.unique_token="], {}, [
      "config.data.unique_token=''", "such as 'sks'"]


def _model_path_missing(f):
  return [f"--config.model.pretrained={f}"], {}, [
      f"model path '{f}' does not exist", "Hugging Face Hub id"]


def _not_a_diffusers_folder(f):
  (f / "unet").mkdir(parents=True)
  (f / "model.safetensors").write_bytes(b"")
  return [f"--config.model.pretrained={f}"], {}, [
      f"config.model.pretrained='{f}' is not a diffusers pipeline folder",
      "no model_index.json"]


def _hub_offline(f):
  f.mkdir()  # an empty Hugging Face cache: nothing was downloaded before.
  return [f"--config.model.pretrained={HUB_ID}"], {
      "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(f)}, [
          f"could not download weights for '{HUB_ID}'",
          "pass the local folder instead"]


def _dreambench_truncated(f):
  f.mkdir()
  for name in ("00.jpg", "01.jpg", "02.jpg"):
    (f / name).write_bytes((DREAMBENCH_DOG / name).read_bytes())
  _truncated_jpeg(f / "03.jpg", (DREAMBENCH_DOG / "03.jpg").read_bytes())
  return _instance(f), {}, [f"{f / '03.jpg'} could not be decoded"]


CASES = {
    "instance_dir_missing": _instance_dir_missing,
    "instance_dir_empty": _instance_dir_empty,
    "instance_dir_without_image_files": _instance_dir_without_image_files,
    "no_readable_image": _no_readable_image,
    "not_an_image": _not_an_image,
    "truncated_jpeg": _truncated,
    "too_small": _too_small,
    "empty_class_name": _empty_class_name,
    "empty_unique_token": _empty_unique_token,
    "model_path_missing": _model_path_missing,
    "not_a_diffusers_folder": _not_a_diffusers_folder,
    "hub_offline": _hub_offline,
}


def _earlier_run(workdir: Path) -> None:
  """Files a run leaves behind, all dated 2001."""
  files = {
      "config.json": "{}\n", ".lock": "12345\n",
      "metrics.jsonl": '{"step": 1, "loss": 1.0}\n',
      "checkpoints/1/commit_success.txt": "ok\n",
      "checkpoints/1/state/d/0123": "\0" * 64,
      "cache/instance_latents.npz": "\0" * 32,
  }
  for name, text in files.items():
    (workdir / name).parent.mkdir(parents=True, exist_ok=True)
    (workdir / name).write_text(text)
  for path in [*workdir.rglob("*"), workdir]:
    os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))


def _snapshot(folder: Path) -> dict:
  """Every file's bytes and every entry's modification time."""
  return {str(p.relative_to(folder)): (p.stat().st_mtime_ns,
                                       p.read_bytes() if p.is_file() else None)
          for p in sorted([folder, *folder.rglob("*")])}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  """``{case: (returncode, stdout, stderr, fragments, workdir, before)}``.

  ``before`` is the snapshot of a workdir with an earlier run's files, or
  None where the workdir did not exist. The cases run many to a process
  (``tests/cli.py``), one process per extra environment.
  """
  tmp = tmp_path_factory.mktemp("bad_inputs")
  cases = dict(CASES)
  if DREAMBENCH_DOG.is_dir():
    cases["dreambench_truncated"] = _dreambench_truncated
  by_env, details = {}, {}
  for name, make in cases.items():
    args, env, fragments = make(tmp / "inputs" / name)
    workdir = tmp / "runs" / name
    before = None
    if name in ON_EARLIER_RUN:
      _earlier_run(workdir)
      before = _snapshot(workdir)
    by_env.setdefault(tuple(sorted(env.items())), {})[name] = [
        TINY, f"--workdir={workdir}", *args]
    details[name] = (fragments, workdir, before)
  drivers = [cli.Cases(group, tmp / f"driver_{i}", **dict(env))
             for i, (env, group) in enumerate(by_env.items())]
  out = {}
  for driver in drivers:
    for name, result in driver.results().items():
      out[name] = (*result, *details[name])
  return out


def _check(result) -> None:
  returncode, stdout, stderr, fragments, workdir, before = result
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert len(lines) == 1, stderr
  assert lines[0].startswith("error: "), stderr
  for fragment in fragments:
    assert fragment in lines[0]
  assert returncode == 2
  assert not stdout
  if before is None:
    assert not workdir.exists()
  else:
    assert _snapshot(workdir) == before


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_the_workdir(results, case):
  _check(results[case])


def test_truncated_dreambench_photo_among_good_ones(results, shared_dir):
  del shared_dir  # skips when ../shared is absent.
  _check(results["dreambench_truncated"])
