"""The last stage of a run: DreamBench metrics of the export against the base.

After training, the exported pipeline (``<workdir>/export``, the best step
where the method tracks one) and the base model it started from each draw
``final_eval.num_images_per_prompt`` images for every ``final_eval.prompts``
prompt with the same seeds; DINO and CLIP embed them and the subject's own
photos, and the DreamBench scores follow (``rewards.subject_metrics``:
DINO, CLIP-I, CLIP-T and the lambda-Harmonic scores) by
``final_eval.protocol``: the DreamBooth paper's (``dreambooth``) or the RPO
authors' code's (``rpo_code``), see ``rewards.PROTOCOLS``, whose DINO and
CLIP are used unless ``final_eval.dino_model`` / ``clip_model`` name others.
Written to
``<workdir>/final_eval/``: ``metrics.json``, ``metrics.md`` (base, fine-tuned
and the photos against each other), ``comparison.png`` (the photos on top,
then a row per prompt: its text, the base model's images and the fine-tuned
model's from the same seeds, each model headed by its scores), so the effect
of the fine-tuning can be seen and read side by side.
"""

import functools
import io
import json
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from personalize_jax import diffusion, grids, rewards
from personalize_jax.data import images as images_lib
from personalize_jax.data import prompts as prompts_lib
from personalize_jax.engine import rundir
from personalize_jax.errors import CheckpointError, UserError
from personalize_jax.models import checkpoint, presets
from personalize_jax import pipeline as pipeline_lib

FOLDER = "final_eval"
MODELS = ("base", "finetuned")
TITLES = {"base": "base model", "finetuned": "fine-tuned (export/)"}


def protocol_and_models(fe: ml_collections.ConfigDict
                        ) -> tuple[rewards.Protocol, str, str]:
  """``(protocol, dino_model, clip_model)`` of ``config.final_eval``.

  Each model left "" is the protocol's; a set one overrides it.

  Raises:
    UserError: an unknown ``final_eval.protocol``.
  """
  protocol = rewards.get_protocol(fe.protocol, key="final_eval.protocol")
  return (protocol,
          *rewards.protocol_models(protocol, fe.dino_model, fe.clip_model))


def check_models(config: ml_collections.ConfigDict) -> None:
  """Checks the protocol and its DINO and CLIP models before the run starts.

  They are needed only at the end; a wrong name, a wrong path or a missing
  download should not surface after hours of training.

  Raises:
    UserError: an unknown protocol, a path that does not exist or a Hub id
      that cannot be fetched.
  """
  if not config.final_eval.enabled:
    return
  _, *names = protocol_and_models(config.final_eval)
  for key, name in zip(("dino_model", "clip_model"), names):
    if name != presets.TINY:
      try:
        checkpoint.resolve_pretrained(name)
      except CheckpointError as e:
        raise UserError(f"config.final_eval.{key}: {e} (or set "
                        "--config.final_eval.enabled=false)") from None


def instance_folder(config, workdir: Path) -> Path:
  """Where the run read its photos (the demo subject lives in the workdir)."""
  return (Path(config.data.instance_dir) if config.data.instance_dir
          else workdir / "instance_images")


def run(config: ml_collections.ConfigDict, workdir: Path,
        write: bool = True) -> dict[str, Any]:
  """Evaluates ``<workdir>/export`` and the base model; returns the metrics.

  Args:
    config: the run's config (``final_eval``, ``data``, ``model``).
    workdir: the run directory holding ``export/``.
    write: write the reports (only process 0 of a pod does).
  """
  fe, data = config.final_eval, config.data
  references, _ = images_lib.load_instance_images(
      instance_folder(config, workdir), min_side=data.min_image_side,
      skip_bad_images=data.skip_bad_images, warn=logging.warning)
  prompts = [prompts_lib.format_prompt(p, token=data.unique_token,
                                       class_name=data.class_name)
             for p in fe.prompts]
  sources = {"base": str(config.model.pretrained),
             "finetuned": str(workdir / "export")}
  generated = {}
  for name in MODELS:
    # One pipeline at a time: on an accelerator only one is resident.
    # A LoRA run's export is the base with the adapters fused.
    load = (pipeline_lib.load_stable_diffusion if name == "base" else
            functools.partial(pipeline_lib.load_export,
                              base=config.model.pretrained))
    pipeline = load(sources[name], attention_impl=config.model.attention_impl,
                    seed=config.seed)
    images = diffusion.generate(
        pipeline, [p for p in prompts for _ in range(fe.num_images_per_prompt)],
        seed=fe.seed, num_inference_steps=fe.num_inference_steps,
        guidance_scale=fe.guidance_scale, resolution=data.resolution,
        batch_size=fe.batch_size, progress=True)
    del pipeline
    n = fe.num_images_per_prompt
    generated[name] = [list(images[i * n:(i + 1) * n])
                       for i in range(len(prompts))]

  protocol, dino_model, clip_model = protocol_and_models(fe)
  dino = rewards.Embedder.dino(dino_model, chunk=fe.batch_size)
  clip = rewards.Embedder.clip(clip_model, chunk=fe.batch_size)
  dino_ref, clip_ref = dino.images(references), clip.images(references)
  text = np.repeat(clip.texts(prompts, data.unique_token),
                   fe.num_images_per_prompt, axis=0)
  lams = tuple(fe.harmonic_lams)
  results: dict[str, Any] = {}
  for name in MODELS:
    flat = [im for row in generated[name] for im in row]
    results[name] = rewards.subject_metrics(
        dino.images(flat), dino_ref, clip.images(flat), clip_ref, text, lams,
        clip_t_at_least_zero=protocol.clip_t_at_least_zero)
  results["reference"] = rewards.reference_metrics(dino_ref, clip_ref)
  results.update(
      prompts=prompts, num_images_per_prompt=fe.num_images_per_prompt,
      num_photos=len(references), models=sources,
      protocol=protocol.name, dino_model=dino_model, clip_model=clip_model)
  if write:
    _write(workdir / FOLDER, results, references, generated,
           fe.grid_thumbnail)
  return results


def markdown(results: dict[str, Any]) -> str:
  """The scores of both models and of the photos, as a markdown table."""
  keys = [k for k in results["finetuned"]]
  header = "| model | " + " | ".join(keys) + " |"
  lines = [header, "|" + "---|" * (len(keys) + 1)]
  labels = {"base": f"base ({results['models']['base']})",
            "finetuned": "fine-tuned (export/)",
            "reference": "photos vs photos"}
  for name in (*MODELS, "reference"):
    row = results[name]
    lines.append(f"| {labels[name]} | " + " | ".join(
        f"{row[k]:.4f}" if k in row else "-" for k in keys) + " |")
  return "\n".join(lines) + "\n"


def summary_lines(results: dict[str, Any]) -> list[str]:
  """Two lines for the end-of-run summary: base and fine-tuned scores."""
  out = []
  for name, label in (("base", "base model"), ("finetuned", "fine-tuned")):
    row = results[name]
    out.append(f"  {label:<11} " + ", ".join(
        f"{k} {row[k]:.4f}" for k in ("dino", "clip_i", "clip_t")))
  return out


def comparison_image(references: list[np.ndarray],
                     generated: dict[str, list[list[np.ndarray]]],
                     results: dict[str, Any], thumb: int
                     ) -> tuple[np.ndarray, dict[str, list[tuple[int, int]]]]:
  """The photos, then per prompt its text and both models' images side by side.

  Args:
    references: the subject's photos.
    generated: per model in ``MODELS``, a list per prompt of its images.
    results: what ``run`` returns (``prompts`` and each model's scores).
    thumb: side of every image in the picture.

  Returns:
    ``(image_hwc_uint8, layout)``: ``layout`` maps ``"photos"`` and each model
    to the ``(top, left)`` corners of its images, row by row.
  """
  columns = [grids.Column(title=TITLES[name], scores=results[name],
                          rows=generated[name]) for name in MODELS]
  picture, layout = grids.labeled_grid(references, results["prompts"],
                                       columns, thumb)
  return picture, {"photos": layout["photos"],
                   **dict(zip(MODELS, layout["columns"]))}


def _write(folder: Path, results, references, generated, thumb: int) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  rundir.atomic_write_text(folder / "metrics.json",
                           json.dumps(results, indent=1) + "\n")
  text = (f"# Final evaluation\n\n{len(results['prompts'])} prompts x "
          f"{results['num_images_per_prompt']} images against "
          f"{results['num_photos']} photos of the subject.\n\nProtocol: "
          + rewards.describe_protocol(results["protocol"],
                                      results["dino_model"],
                                      results["clip_model"])
          + ".\n\n" + markdown(results))
  rundir.atomic_write_text(folder / "metrics.md", text)
  picture, _ = comparison_image(references, generated, results, thumb)
  png = io.BytesIO()
  Image.fromarray(picture).save(png, format="PNG")
  rundir.atomic_write_bytes(folder / "comparison.png", png.getvalue())
