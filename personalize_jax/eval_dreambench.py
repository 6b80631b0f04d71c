"""DreamBench evaluation, by the DreamBooth paper's protocol or the RPO code's.

For each subject (30), each of its prompts (25) and N images per prompt (4,
so 3,000 images in all) the generated images are compared with the subject's
reference photos:

  DINO     mean cosine similarity of DINO ViT-S/16 CLS embeddings over all
           (generated, reference) pairs of the subject;
  CLIP-I   the same with CLIP image embeddings;
  CLIP-T   mean cosine similarity between each image's CLIP embedding and
           its prompt's, with the unique token removed from the prompt;
  H(lam)   the lambda-Harmonic score (``rewards.harmonic``) of each image
           from ALIGN-I = to_unit(its mean CLIP-I over the references) and
           ALIGN-T = to_unit(its CLIP-T cosine), averaged; lam = 0.3, 0.5,
           0.7.

``config.protocol`` says which published protocol (``rewards.PROTOCOLS``):

  dreambooth  the DreamBooth paper's (the default): CLIP ViT-B/32
              (openai/clip-vit-base-patch32);
  rpo_code    the RPO authors' code (github.com/andrew-miao/RPO,
              evaluation_metrics.py): CLIP ViT-B/16
              (openai/clip-vit-base-patch16), and CLIP-T as torchmetrics'
              clip_score / 100, each image's cosine counted as at least 0.

Both use DINO facebook/dino-vits16. ``config.dino_model`` and
``config.clip_model`` left "" use the protocol's models; set, they override
them (``metrics.md`` says so).

``rewards`` embeds the images and prompts (``rewards.Embedder``) and computes
these scores (``rewards.subject_metrics``, ``rewards.reference_metrics``), as
it does for RPO's rewards and the final evaluation of a training run.

The ``reference`` row compares the real photos with each other (all ordered
pairs of distinct photos of a subject): the ceiling DINO and CLIP-I can
reach. Overall numbers average the per-subject ones, each subject counting
once.

Generated images are read from a folder laid out as

  <images_dir>/<subject>/<prompt_idx:02d>_<k:02d>.png  (also .jpg)
  <images_dir>/prompts.json   optional, {"unique_token": "sks",
                              "subjects": {"dog": ["a sks dog ...", ...]}}

``prompt_idx`` indexes the subject's DreamBench prompt list (object or live)
and ``k`` counts images per prompt from 0. Without ``prompts.json`` the
prompts are the DreamBench templates filled with ``config.unique_token``;
with it, entry ``prompt_idx`` of the subject's list is the prompt used (and
its ``unique_token`` is the word removed for CLIP-T). ``write_generated`` and
``write_prompts_json`` write this layout; ``config.model`` runs write it
into ``<workdir>/images``.
"""

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image
from tqdm import tqdm

from personalize_jax import diffusion, grids
from personalize_jax import pipeline as pipeline_lib
from personalize_jax import rewards
from personalize_jax.data import dreambench
from personalize_jax.errors import UserError

PROMPTS_JSON = "prompts.json"
_NAMES = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
_IMAGE_NAME = re.compile(r"^(\d+)_(\d+)\.(png|jpg|jpeg)$", re.IGNORECASE)


# ---------------------------------------------------------------- metrics --

def average(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
  """The mean of each metric over rows (subjects count equally)."""
  return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}


# ----------------------------------------------------------------- images --

def parse_subjects(spec: str | Sequence[str]) -> list[str] | None:
  """``all`` -> None; ``"dog,cat"`` or a list -> the names."""
  if isinstance(spec, str):
    if spec.strip() in ("", "all"):
      return None
    spec = spec.split(",")
  names = [str(s).strip() for s in spec if str(s).strip()]
  return names or None


def dreambench_prompts(subjects: Sequence[dreambench.Subject],
                       templates: Mapping[str, Sequence[str]],
                       num_prompts: int, unique_token: str
                       ) -> dict[str, list[str]]:
  """The first ``num_prompts`` DreamBench prompts of each subject."""
  return {s.name: dreambench.subject_prompts(s, templates,
                                             unique_token)[:num_prompts]
          for s in subjects}


def write_prompts_json(images_dir: Path, prompts: Mapping[str, Sequence[str]],
                       unique_token: str) -> None:
  """Records the prompts (and token) used for the images in ``images_dir``."""
  payload = {"unique_token": unique_token,
             "subjects": {k: list(v) for k, v in prompts.items()}}
  (images_dir / PROMPTS_JSON).write_text(json.dumps(payload, indent=1) + "\n")


def read_prompts_json(images_dir: Path, names: Sequence[str],
                      num_prompts: int) -> tuple[dict[str, list[str]], str] | None:
  """``(prompts by subject, unique token)`` from ``prompts.json``, if present."""
  path = images_dir / PROMPTS_JSON
  if not path.is_file():
    return None
  try:
    payload = json.loads(path.read_text())
    token, table = payload.get("unique_token"), payload["subjects"]
  except (json.JSONDecodeError, KeyError, AttributeError, TypeError) as e:
    raise UserError(f"{path} is not a valid prompts file ({e!r}); expected "
                    '{"unique_token": "sks", "subjects": {"dog": ["a sks dog '
                    '...", ...]}}') from None
  for name in names:
    if len(table.get(name, ())) < num_prompts:
      raise UserError(f"{path} lists {len(table.get(name, ()))} prompts for "
                      f"{name!r}, fewer than num_prompts={num_prompts}")
  return {n: [str(p) for p in table[n][:num_prompts]] for n in names}, token


def write_generated(images_dir: Path, subject: str, prompt_idx: int,
                    images: np.ndarray) -> None:
  """Saves ``(n, h, w, 3)`` uint8 images as ``<subject>/<prompt_idx>_<k>.png``."""
  folder = images_dir / subject
  folder.mkdir(parents=True, exist_ok=True)
  for k, image in enumerate(np.asarray(images)):
    Image.fromarray(image).save(folder / f"{prompt_idx:02d}_{k:02d}.png")


def read_generated(images_dir: Path, subject: str, num_prompts: int,
                   num_images: int) -> list[list[np.ndarray]]:
  """The generated images ``[prompt_idx][k]`` of a subject, uint8 RGB.

  Raises:
    UserError: the subject folder or one of the expected images is missing.
  """
  folder = images_dir / subject
  if not folder.is_dir():
    raise UserError(f"{folder} does not exist; images_dir must hold one "
                    "folder per subject with <prompt_idx>_<k>.png images")
  found = {}
  for path in folder.iterdir():
    if match := _IMAGE_NAME.match(path.name):
      found[(int(match.group(1)), int(match.group(2)))] = path
  rows = []
  for i in range(num_prompts):
    row = []
    for k in range(num_images):
      if (i, k) not in found:
        raise UserError(
            f"{folder / f'{i:02d}_{k:02d}.png'} is missing: expected "
            f"{num_prompts} prompts x {num_images} images per subject; lower "
            "num_prompts / num_images_per_prompt or generate the rest")
      with Image.open(found[(i, k)]) as image:
        row.append(np.asarray(image.convert("RGB")))
    rows.append(row)
  return rows


# ------------------------------------------------------------- generation --

def model_for_subject(model: str, subject: str) -> str:
  """``<model>/<subject>`` when it is a model folder, else ``model`` itself.

  DreamBooth fine-tunes one model per subject: a folder holding one pipeline
  (or one LoRA export) per subject name serves a whole run; a single
  pipeline (or ``tiny``) is used for every subject asked for.
  """
  candidate = Path(model) / subject
  if ((candidate / "model_index.json").is_file()
      or pipeline_lib.is_lora_folder(candidate)):
    return str(candidate)
  return model


def generate_images(config: ml_collections.ConfigDict,
                    prompts: Mapping[str, Sequence[str]],
                    images_dir: Path) -> None:
  """Generates ``num_images_per_prompt`` images per prompt into ``images_dir``."""
  rng = jax.random.key(config.seed)
  pipeline = None
  for s, (subject, subject_prompts) in enumerate(
      tqdm(sorted(prompts.items()), desc="generating", unit="subject")):
    source = model_for_subject(config.model, subject)
    if pipeline is None or pipeline.source != source:
      pipeline = pipeline_lib.load_export(source, base=config.base_model)
    for i, prompt in enumerate(subject_prompts):
      images = diffusion.generate(
          pipeline, [prompt] * config.num_images_per_prompt,
          rng=jax.random.fold_in(jax.random.fold_in(rng, s), i),
          num_inference_steps=config.num_inference_steps,
          guidance_scale=config.guidance_scale,
          resolution=config.get("resolution") or None)
      write_generated(images_dir, subject, i, np.asarray(images))
  write_prompts_json(images_dir, prompts, config.unique_token)


# ---------------------------------------------------------------- reports --

def _fmt(value: float | None) -> str:
  return "-" if value is None or np.isnan(value) else f"{value:.4f}"


def markdown_report(results: Mapping[str, Any]) -> str:
  """Per-subject and overall tables of ``results`` (as ``evaluate`` returns)."""
  keys = list(results["overall"])
  names = [_NAMES.get(k, k.replace("harmonic_", "H(") + ")") for k in keys]
  header = ["| subject | " + " | ".join(names) + " |",
            "|---" * (len(keys) + 1) + "|"]

  def row(label, values):
    return (f"| {label} | "
            + " | ".join(_fmt(values.get(k)) for k in keys) + " |")

  protocol = rewards.describe_protocol(
      results["protocol"], results["dino_model"], results["clip_model"])
  lines = [f"# DreamBench ({results['num_subjects']} subjects x "
           f"{results['num_prompts']} prompts x "
           f"{results['num_images_per_prompt']} images)", "",
           f"Protocol: {protocol}.", "", *header]
  lines += [row(n, v) for n, v in results["subjects"].items()]
  lines += [row("**overall**", results["overall"]),
            row("*reference images*", results["reference"]), "",
            "## Reference images (real vs real, distinct pairs)", "", *header]
  lines += [row(n, v) for n, v in results["reference_subjects"].items()]
  lines.append(row("**overall**", results["reference"]))
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------- evaluate --

def evaluate(config: ml_collections.ConfigDict,
             workdir: str | os.PathLike) -> dict[str, Any]:
  """Runs the DreamBench evaluation and writes its reports into ``workdir``.

  Writes ``metrics.json`` (what this returns), ``metrics.md`` and
  ``grids/<subject>.png``; with ``config.model`` the images are generated
  first into ``<workdir>/images``.

  Raises:
    UserError: missing or incomplete inputs, or inconsistent config values
      (an unknown ``protocol``: before anything is written).
  """
  workdir = Path(workdir)
  if config.num_prompts < 1 or config.num_images_per_prompt < 1:
    raise UserError("num_prompts and num_images_per_prompt must be >= 1")
  resolution = config.get("resolution", 0)
  if (not isinstance(resolution, int) or isinstance(resolution, bool)
      or resolution < 0):
    raise UserError(f"resolution={resolution!r} is invalid: use 0 (the "
                    "model's own size) or an image side in pixels, e.g. 1024")
  if bool(config.model) == bool(config.images_dir):
    raise UserError("set exactly one of --config.images_dir (a folder of "
                    "generated images) and --config.model (a pipeline to "
                    "generate them with)")
  protocol = rewards.get_protocol(config.protocol)
  dino_model, clip_model = rewards.protocol_models(
      protocol, config.dino_model, config.clip_model)
  subjects = dreambench.read_subjects(config.dataset_dir,
                                      parse_subjects(config.subjects))
  names = [s.name for s in subjects]
  templates = dreambench.read_prompt_templates(config.dataset_dir)
  if config.num_prompts > min(len(templates[s.prompt_list]) for s in subjects):
    raise UserError(f"num_prompts={config.num_prompts} exceeds the "
                    "DreamBench prompt lists (25)")
  prompts = dreambench_prompts(subjects, templates, config.num_prompts,
                               config.unique_token)
  workdir.mkdir(parents=True, exist_ok=True)

  # Generation (when a model is given) writes the same layout as images_dir.
  if config.model:
    images_dir = workdir / "images"
    generate_images(config, prompts, images_dir)
  else:
    images_dir = Path(config.images_dir)
    if not images_dir.is_dir():
      raise UserError(f"images_dir {images_dir} does not exist")
  token = config.unique_token
  recorded = read_prompts_json(images_dir, names, config.num_prompts)
  if recorded is not None:
    prompts, token = recorded[0], recorded[1] or token

  references = dreambench.load_reference_images(
      config.dataset_dir, config.tfds_data_dir or workdir / "tfds", names)
  dino = rewards.Embedder.dino(dino_model, chunk=config.batch_size)
  clip = rewards.Embedder.clip(clip_model, chunk=config.batch_size)
  lams = tuple(config.harmonic_lams)
  (workdir / "grids").mkdir(exist_ok=True)
  per_subject, per_subject_ref = {}, {}
  for name in tqdm(names, desc="evaluating", unit="subject"):
    generated = read_generated(images_dir, name, config.num_prompts,
                               config.num_images_per_prompt)
    flat = [im for row in generated for im in row]
    refs = references[name]
    dino_ref, clip_ref = dino.images(refs), clip.images(refs)
    text = np.repeat(clip.texts(prompts[name], token),
                     config.num_images_per_prompt, axis=0)
    per_subject[name] = rewards.subject_metrics(
        dino.images(flat), dino_ref, clip.images(flat), clip_ref, text, lams,
        clip_t_at_least_zero=protocol.clip_t_at_least_zero)
    per_subject_ref[name] = rewards.reference_metrics(dino_ref, clip_ref)
    column = grids.Column(title=f"{name}: generated", rows=generated,
                          scores=per_subject[name])
    picture, _ = grids.labeled_grid(references[name], prompts[name],
                                    [column], config.grid_thumbnail)
    Image.fromarray(picture).save(workdir / "grids" / f"{name}.png")

  results = {
      "overall": average(list(per_subject.values())),
      "reference": average(list(per_subject_ref.values())),
      "subjects": per_subject,
      "reference_subjects": per_subject_ref,
      "num_subjects": len(names),
      "num_prompts": config.num_prompts,
      "num_images_per_prompt": config.num_images_per_prompt,
      "images_dir": str(images_dir),
      "protocol": protocol.name,
      "dino_model": dino_model,
      "clip_model": clip_model,
  }
  (workdir / "metrics.json").write_text(json.dumps(results, indent=1) + "\n")
  (workdir / "metrics.md").write_text(markdown_report(results))
  return results
