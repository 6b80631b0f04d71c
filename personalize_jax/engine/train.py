"""``train_and_evaluate``: one loop for every method.

Sections: config -> run directory -> mesh -> models -> method data -> state
-> checkpoint -> loop (step, log, samples, checkpoint, preemption) -> export.
"""

import contextlib
import dataclasses
import json
import os
import re
import shutil
import time
import types
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx
from jax.sharding import Mesh

from personalize_jax import diffusion
from personalize_jax.data import images as images_lib
from personalize_jax.data import prompts as prompts_lib
from personalize_jax.engine import checkpoints, metrics as metrics_lib
from personalize_jax.engine import config as config_lib
from personalize_jax.engine import distributed, ema as ema_lib, final_eval
from personalize_jax.engine import optim, rundir, sharding, state as state_lib
from personalize_jax.engine.best import Best
from personalize_jax.engine.method import Context, Method
from personalize_jax.errors import UserError
from personalize_jax.models import checkpoint
from personalize_jax.models import lora as lora_lib
from personalize_jax.models import lora_files
from personalize_jax import pipeline as pipeline_lib
from personalize_jax.pipeline import load_stable_diffusion


# The least fraction of trainable parameter bytes FSDP must shard.
MIN_FSDP_FRACTION = 0.5


class TrainingStopped(Exception):
  """The run stopped on purpose (NaN/Inf): one line says why and what remains."""


def compute_dtype(config) -> Any:
  return jnp.bfloat16 if config.mixed_precision == "bf16" else jnp.float32


@dataclasses.dataclass
class Summary:
  """What a finished (or stopped) run reports."""
  workdir: Path
  steps: int
  last_metrics: dict
  stopped_by: str | None = None
  final_eval: dict | None = None  # final_eval.run's results, when it ran.


# Keys a rerun on the same workdir may change: how a NaN is handled (the stop
# message suggests --config.nan_policy=skip), the evaluation after training
# and where metrics go besides metrics.jsonl.
RESUMABLE_CHANGES = ("overwrite", "nan_policy", "debug_nan_at_step",
                     "final_eval", "log")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       method: types.ModuleType) -> Summary:
  """Trains ``method`` (a module of ``personalize_jax.methods``) in ``workdir``.

  Resumes from the workdir's checkpoints. ``config`` is resolved in place
  (the method's convenience switches become ``config.trainable`` regexes)
  and checked before the workdir or any model is touched.
  """
  # ---------------------------------------------------------------- config
  config_lib.resolve(config, method)
  config_lib.validate(config, jax.device_count(), method)
  preflight(config)
  check_trainable(config, method.COMPONENTS)
  final_eval.check_models(config)
  workdir = Path(workdir).expanduser().resolve()
  with contextlib.ExitStack() as stack:
    # On a pod every process trains; process 0 alone owns the run directory
    # (lock, config.json, metrics, grids, export). Orbax coordinates the
    # checkpoint writes of all processes itself.
    refusal = None
    if is_chief():
      try:
        # Refused before the lock is taken: a refusal leaves the workdir
        # untouched.
        rundir.check_config(workdir, config, overwrite=config.overwrite,
                            ignore=RESUMABLE_CHANGES)
        stack.enter_context(rundir.WorkdirLock(workdir))
        rundir.check_or_write_config(workdir, config,
                                     overwrite=config.overwrite,
                                     ignore=RESUMABLE_CHANGES)
      except UserError as e:
        refusal = e
    # The others would otherwise wait forever for process 0 in the first
    # computation over all devices.
    if not distributed.chief_succeeded(refusal is None):
      raise refusal or UserError(
          "process 0 refused the run directory; its error line says why")
    return _finish(config, workdir, _run(config, workdir, method))


def _finish(config, workdir: Path, summary: Summary) -> Summary:
  """The final evaluation of the export, once training has ended.

  Runs after ``_run`` has returned, so the training state is freed first;
  skipped when a signal stopped the run (it resumes later).
  """
  if config.final_eval.enabled and summary.stopped_by is None:
    logging.info("final evaluation of %s against %s", workdir / "export",
                 config.model.pretrained)
    summary.final_eval = final_eval.run(config, workdir, write=is_chief())
  return summary


is_chief = distributed.is_chief


def preflight(config) -> None:
  """Checks what the user pointed at before anything is written to the workdir.

  The model folder (or Hub id) and the instance photos are the inputs most
  often wrong; finding out after the run directory exists would leave a
  half-made run behind.
  """
  if config.model.pretrained not in pipeline_lib.TINY_PIPELINES:
    folder = checkpoint.resolve_pretrained(config.model.pretrained)
    if not (folder / "model_index.json").is_file():
      raise UserError(
          f"config.model.pretrained={config.model.pretrained!r} is not a "
          "diffusers pipeline folder (no model_index.json); pass the folder "
          "holding unet/, vae/, text_encoder/, tokenizer/ and scheduler/")
  if config.data.instance_dir:
    images_lib.load_instance_images(
        config.data.instance_dir, min_side=config.data.min_image_side,
        skip_bad_images=config.data.skip_bad_images, warn=logging.warning)


def check_trainable(config, components) -> None:
  """Every ``config.trainable`` regex names a parameter the method can train.

  Checked on the models' shapes (their ``config.json``), before any weight
  loads or the workdir exists.

  Args:
    config: the resolved config.
    components: the pipeline components the method can train
      (``method.COMPONENTS``).

  Raises:
    UserError: naming the first regex that matches no parameter.
  """
  states = {}
  present = pipeline_lib.model_components(config.model.pretrained)
  for name in (c for c in components if c in present):
    module = pipeline_lib.abstract_component(config.model.pretrained, name)
    states[name] = nnx.state(add_lora(config, name, module))
  _check_patterns(config, jax.tree.leaves(optim.param_names(states)),
                  sorted(states))


def add_lora(config, name: str, module: nnx.Module) -> nnx.Module:
  """Adds ``config.lora``'s adapters to component ``name`` when it is adapted.

  Concrete or abstract (``nnx.eval_shape``) modules alike; the others are
  returned unchanged. A target regex that matches no layer is a ``UserError``.
  """
  targets = config_lib.lora_targets(config).get(name)
  if targets and not lora_lib.has_adapters(module):
    lora_lib.add_adapters(module, targets, rank=config.lora.rank,
                          alpha=config_lib.lora_alpha(config),
                          init=config.lora.init, seed=config.seed,
                          component=name)
  return module


def _check_patterns(config, names: list[str], components) -> None:
  example = next((n for n in names if "attn2.to_k.weight" in n), names[0])
  for pattern in config.trainable:
    if not any(re.search(pattern, n) for n in names):
      raise UserError(
          f"config.trainable regex '{pattern}' matches no parameter of what "
          f"{config.method} can train ({', '.join(components)}); names look "
          f"like '{example}'")


@dataclasses.dataclass
class Trainer:
  """What ``build_trainer`` assembles: all a loop (or a benchmark) steps with."""
  mesh: Mesh
  pipeline: Any  # pipeline.StableDiffusion
  method: Method
  state: state_lib.TrainState
  frozen: dict  # {"modules": {name: state}, "constants": {name: array}}
  train_step: Callable  # jitted (state, frozen, batch) -> (state, metrics)


def build_trainer(config: ml_collections.ConfigDict, workdir: Path,
                  method: types.ModuleType, pipeline: Any = None, *,
                  devices=None,
                  step_module: Callable[[str, nnx.Module], nnx.Module]
                  | None = None, abstract: bool = False) -> Trainer:
  """Mesh, models, the method's data, the sharded state and the jitted step.

  Everything a run does before its loop except the run directory's services
  (lock, checkpoints, metrics); ``train_and_evaluate`` and the benchmarks
  share it. Built abstract-first: the state's shapes and shardings come
  first (and are checked), then, unless ``abstract``, the arrays are placed.

  Args:
    config: a resolved, validated config.
    workdir: the run directory; the method caches its data in it.
    method: the method's module (``personalize_jax.methods.get``).
    pipeline: the models; loaded from ``config.model`` if None.
    devices: the devices of the step's mesh (default: all). Compile-only
      devices (a TPU topology on a CPU host) need ``abstract``: the method's
      data is then prepared on this host's devices.
    step_module: ``(name, module) -> module`` the step runs instead of the
      one the data was prepared with (full-size twins of small stand-ins).
    abstract: make the state and frozen inputs ``ShapeDtypeStruct``s with
      their shardings, nothing allocated: the step can be lowered, compiled
      and its memory read without reading a weight.
  """
  # ------------------------------------------------------------------ mesh
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp, devices)
  host_mesh = mesh if devices is None else sharding.create_mesh(-1, 1)
  dtype = compute_dtype(config)
  # ---------------------------------------------------------------- models
  if pipeline is None:
    pipeline = load_stable_diffusion(
        config.model.pretrained, dtype=dtype,
        attention_impl=config.model.attention_impl, remat=config.model.remat,
        seed=config.seed)
  for name in config_lib.lora_targets(config):
    add_lora(config, name, getattr(pipeline, name))
  # ------------------------------------------------------------------ data
  ctx = Context(config=config, workdir=workdir, pipeline=pipeline,
                mesh=host_mesh)
  if step_module is not None:
    # The step's twins carry the same adapters (abstract ones).
    ctx.step_module = lambda name, module: add_lora(
        config, name, step_module(name, module))
  method = method.build(ctx)
  # Evaluations run where the step runs.
  ctx.mesh = mesh
  # ---------------------------------------------------------------- shapes
  params, frozen_states = split_trainable(config, method, ctx.step_module)
  trainable = {name: method.trainable[name] for name in params}
  for name, module in method.frozen.items():
    frozen_states[name] = nnx.state(ctx.step_module(name, module))
  tx, schedule, labels = optim.make_optimizer(
      config, params, extra=method.extra_optimizers,
      row_masks=method.row_masks)
  # ------------------------------------------------------------- shardings
  use_ema = bool(config.ema.decay)
  abstract_state = state_lib.abstract_train_state(params, tx, mesh,
                                                  ema=use_ema)
  check_fsdp(abstract_state.params, mesh)
  frozen_dtype = dtype if config.mixed_precision == "bf16" else None
  replicated = sharding.replicated(mesh)
  # ---------------------------------------------------------------- shard
  if abstract:
    state = abstract_state
    frozen = {
        "modules": state_lib.abstract_params(frozen_states, mesh,
                                             frozen_dtype),
        "constants": state_lib.abstract_host(dict(method.constants),
                                             replicated),
    }
  else:
    state = state_lib.create_train_state(params, tx, config.seed, mesh,
                                         ema=use_ema)
    del params
    # The modules now hold the placed (sharded) arrays, so their unsharded
    # originals are freed: under FSDP they would otherwise stay whole on one
    # device beside the shards (3.4 GB for SD 1.4's U-Net). On one device the
    # placed arrays are the originals and nothing changes.
    for name, module in trainable.items():
      nnx.update(module, state.params[name])
    frozen = {
        "modules": state_lib.place_params(frozen_states, mesh, frozen_dtype),
        "constants": sharding.put(dict(method.constants), replicated),
    }
  del trainable
  # ---------------------------------------------------------------- update
  train_step = state_lib.make_train_step(
      method.loss_fn, tx, schedule, labels, nan_policy=config.nan_policy,
      debug_nan_at_step=config.debug_nan_at_step,
      state_shardings=state_lib.shardings_of(state),
      frozen_shardings=state_lib.shardings_of(frozen), mesh=mesh,
      post_update=method.post_update,
      accumulation_steps=config.gradient_accumulation_steps,
      ema_decay=ema_lib.decay_schedule(config))
  return Trainer(mesh=mesh, pipeline=pipeline, method=method, state=state,
                 frozen=frozen, train_step=train_step)


def check_fsdp(params, mesh: Mesh) -> None:
  """Refuses FSDP that shards too little of the trainable bytes (as maxtext).

  Raises:
    UserError: ``mesh.fsdp > 1`` splits under ``MIN_FSDP_FRACTION`` of them.
  """
  fraction = sharding.sharded_fraction(params, state_lib.shardings_of(params))
  logging.info("%.0f%% of trainable parameter bytes are sharded over the mesh",
               100 * fraction)
  size = mesh.shape[sharding.FSDP]
  if size > 1 and fraction < MIN_FSDP_FRACTION:
    raise UserError(
        f"config.mesh.fsdp={size} shards only {100 * fraction:.0f}% of the "
        f"trainable parameter bytes (at least {100 * MIN_FSDP_FRACTION:.0f}% "
        "expected): their dimensions do not divide by it; use a smaller "
        "mesh.fsdp (a divisor of the channel counts) or mesh.fsdp=1")


def _run(config, workdir: Path, method_module) -> Summary:
  trainer = build_trainer(config, workdir, method_module)
  mesh, pipeline, method = trainer.mesh, trainer.pipeline, trainer.method
  state, frozen, train_step = trainer.state, trainer.frozen, trainer.train_step
  # Dropped so that a restored state does not keep the initial one alive.
  del trainer
  # ------------------------------------------------------------ checkpoint
  manager = checkpoints.CheckpointManager(workdir / "checkpoints",
                                          keep=config.keep_checkpoints)
  start = manager.latest_step() or 0
  best = Best(method.best_metric, config.early_stopping_patience)
  if start:
    state, meta = manager.restore(start, state_lib.abstract_of(state))
    best.restore(meta)
    logging.info("resumed from step %d", start)
  # ------------------------------------------------------------------ loop
  writer = (metrics_lib.MetricsWriter(
      workdir, resume_step=start, run_config=config.to_dict(),
      wandb_project=config.log.wandb_project if config.log.wandb else None)
            if is_chief() else _NoWriter())
  bar = metrics_lib.progress(config.num_steps, initial=start,
                             desc=config.method)
  last, stopped_by = {}, None
  window_start, window_steps = time.perf_counter(), 0
  # Finite flags of dispatched steps not yet read: reading one waits for its
  # step, so a step's flag is read once the next step is queued behind it,
  # or before anything is written (logs, evaluations, checkpoints).
  unchecked: list[tuple[int, jax.Array]] = []

  def ensure_finite(keep: int = 0) -> None:
    """Stops at the first non-finite step of all unchecked but the last ``keep``."""
    if config.nan_policy != "stop":
      unchecked.clear()
      return
    while len(unchecked) > keep:
      bad_step, finite = unchecked.pop(0)
      if not bool(finite):
        # The previous step's save may still be in flight: let it commit, so
        # that the checkpoint named below is the newest good one.
        manager.close()
        writer.close()
        bar.close()
        good = manager.latest_step()
        where = (f"step {good} in {workdir / 'checkpoints' / str(good)}"
                 if good else "none (no checkpoint was written yet)")
        raise TrainingStopped(
            f"step {bad_step}: the loss or gradients are NaN/Inf, so training "
            f"stopped without saving that update; the last good checkpoint "
            f"is {where}; lower --config.learning_rate or set "
            "--config.nan_policy=skip")

  if jax.process_count() > 1 and start < config.num_steps:
    # Every process compiles the step, then all start it together: gloo sets
    # up a collective on its first use and gives up when one process arrives
    # 30 s after another (a slower compile on a loaded host does that).
    train_step = train_step.lower(
        state, frozen, state_lib.shard_batch(method.batch(start), mesh)
    ).compile()
    distributed.meet(f"train_step_compiled_{start}")
  every = method.refresh_every_steps if method.refresh else 0
  if every and start >= every:
    # The data of the last refresh at or before the restored step.
    method.refresh(start - start % every,
                   with_params(pipeline, state.params), start % every == 0)
  with checkpoints.PreemptionHandler() as preemption:
    for step in range(start, config.num_steps):
      if every and step > start and step % every == 0:
        # The policy being trained (not its EMA) renews the method's data.
        ensure_finite()
        scalars = method.refresh(step, with_params(pipeline, state.params),
                                 True)
        if scalars:
          writer.write(step, scalars)
          last.update(scalars)
        # Refreshing is not training time: the window restarts.
        window_start, window_steps = time.perf_counter(), 0
      batch = state_lib.shard_batch(method.batch(step), mesh)
      state, step_metrics = train_step(state, frozen, batch)
      done = step + 1
      window_steps += 1
      unchecked.append((done, step_metrics["finite"]))
      # One process reads a step's flag once the next step is queued, so the
      # host never waits for the device between steps. Several processes
      # read it at once: a step behind, they drifted a step apart and gloo's
      # connection to the next collective timed out on a loaded host.
      ensure_finite(keep=1 if jax.process_count() == 1 else 0)
      last_step = done == config.num_steps
      if done % config.log_every_steps == 0 or last_step:
        ensure_finite()
        elapsed = time.perf_counter() - window_start
        last = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
        last["perf/steps_per_sec"] = window_steps / elapsed
        last["perf/images_per_sec"] = (window_steps * config.batch_size
                                       / elapsed)
        writer.write(done, last)
        bar.set_postfix(loss=f"{last['loss']:.4f}")
        window_start, window_steps = time.perf_counter(), 0
      if done % config.eval_every_steps == 0 or last_step:
        ensure_finite()
        scalars = evaluate(config, mesh, method, pipeline, weights(state),
                           done, workdir)
        if scalars:
          writer.write(done, scalars)
          last.update(scalars)
        if best.update(done, scalars):
          export(mesh, pipeline, weights(state), workdir, config)
          if is_chief():
            best.write(workdir)
        # Evaluation time is not training time: the window restarts.
        window_start, window_steps = time.perf_counter(), 0
      bar.update(1)
      # A signal reaches each host at its own moment; all stop at one step.
      stop = distributed.any_process(preemption.stop_requested)
      early = best.exhausted
      if (done % config.checkpoint_every_steps == 0 or last_step or stop
          or early):
        ensure_finite()
        manager.save(done, state, {"step": done, "data_position": done,
                                   **best.state()})
      if stop:
        stopped_by = preemption.signal_name or "a signal to another process"
        break
      if early:
        logging.info("early stopping at step %d: no better %s for %d "
                     "evaluations", done, best.name, best.patience)
        break
  bar.close()
  manager.wait()
  manager.close()
  writer.close()
  steps = int(jax.device_get(state.step))
  if stopped_by is None and best.name is None:
    export(mesh, pipeline, weights(state), workdir, config)
  return Summary(workdir=workdir, steps=steps, last_metrics=last,
                 stopped_by=stopped_by)


def weights(state: state_lib.TrainState) -> Any:
  """What samples, validation and the export use: the EMA when it is on."""
  return state.params if state.ema is None else state.ema


class _NoWriter:
  """Stands in for ``MetricsWriter`` on processes other than 0."""

  def write(self, step, scalars):
    del step, scalars

  def close(self):
    pass


def split_trainable(config, method: Method,
                    step_module: Callable[[str, nnx.Module], nnx.Module]
                    = lambda name, module: module) -> tuple[dict, dict]:
  """Splits the method's trainable modules into trained and frozen leaves.

  Returns ``(params, frozen)``: ``{name: state}`` of the leaves that train
  (by ``config.trainable`` or one of the method's own optimizers), for every
  component with at least one, and ``{name: state}`` of all other leaves of
  those modules (a component with no trained leaf is frozen whole). Frozen
  leaves never enter the optimizer state and travel with the frozen modules:
  with LoRA the base weights are frozen, the adapters alone are ``params``.

  Args:
    config: the resolved config.
    method: the method value.
    step_module: see ``Context.step_module``; the states are its modules'.

  Raises:
    UserError: a ``config.trainable`` regex names no parameter of the
      components the method can train.
  """
  states = {name: nnx.state(step_module(name, module))
            for name, module in method.trainable.items()}
  _check_patterns(config, jax.tree.leaves(optim.param_names(states)),
                  sorted(states))
  label = optim.labeler(config.trainable,
                        {k: v[0] for k, v in method.extra_optimizers.items()})
  params, frozen = {}, {}
  for name, state in states.items():
    trains = lambda path, _, name=name: label(
        f"{name}.{checkpoint.torch_key(path)}") != optim.FREEZE
    trained, rest = nnx.split_state(state, trains, ...)
    if jax.tree.leaves(trained):
      params[name] = trained
    if jax.tree.leaves(rest):
      frozen[name] = rest
  return params, frozen


def with_params(pipeline, params) -> Any:
  """A shallow copy of ``pipeline`` whose trained leaves are ``params``.

  The frozen leaves of a partly trained component are the pipeline's own
  (full precision, never the bf16 copies the step computes with).
  """
  replaced = {}
  for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
    if name in params:
      graphdef, state = nnx.split(getattr(pipeline, name))
      replaced[name] = nnx.merge(graphdef,
                                 nnx.merge_state(state, params[name]))
  return dataclasses.replace(pipeline, **replaced)


def evaluate(config, mesh: Mesh, method: Method, pipeline, params, step: int,
             workdir: Path) -> dict:
  """Sample grid of the eval prompts (fixed seed) and the method's own scores."""
  current = with_params(pipeline, params)
  data = config.data
  prompts = [prompts_lib.format_prompt(p, token=data.unique_token,
                                       class_name=data.class_name)
             for p in config.eval.prompts]
  images = diffusion.generate(
      current, prompts, seed=config.eval.seed,
      num_inference_steps=config.eval.num_inference_steps,
      guidance_scale=config.eval.guidance_scale,
      resolution=config.data.resolution,
      batch_size=max(len(mesh.devices.flat), len(prompts)),
      batch_sharding=sharding.batch_sharding(mesh))
  if is_chief():
    metrics_lib.save_grid(images, workdir / "samples" / f"step_{step:06d}.png",
                          captions=prompts)
  if method.evaluate is None:
    return {}
  return method.evaluate(step, current)


def write_export(pipeline, folder: Path, config) -> None:
  """The fine-tuned model in diffusers' formats.

  Full fine-tuning writes the whole pipeline. A LoRA run writes
  ``pytorch_lora_weights.safetensors`` as diffusers' ``save_lora_weights``
  does (``unet.<module>.lora_A.weight``, ``text_encoder.<module>...``,
  SDXL's ``text_encoder_2.<module>...``, the scale alpha/rank folded into
  ``lora_B``), which ``StableDiffusionPipeline.load_lora_weights`` (and
  ``StableDiffusionXLPipeline``'s) reads; with
  ``lora.export_fused`` the pipeline with the adapters merged is written
  beside it.
  """
  adapted = config_lib.lora_targets(config)
  if not adapted:
    pipeline.save_pretrained(folder)
    return
  tensors = {}
  for name in adapted:
    # Keys as diffusers' scripts write them with transformers 5: the first
    # text encoder (CLIPTextModel) has no ``text_model.`` tower there, SDXL's
    # second (CLIPTextModelWithProjection) keeps it.
    tensors.update(lora_lib.adapter_tensors(
        getattr(pipeline, name), prefix=f"{name}.",
        strip="text_model." if name == "text_encoder" else ""))
  checkpoint.write_safetensors(folder / lora_files.LORA_WEIGHTS_NAME, tensors)
  if config.lora.export_fused:
    dataclasses.replace(pipeline, **{
        name: lora_lib.fused(getattr(pipeline, name)) for name in adapted
    }).save_pretrained(folder)


def export(mesh: Mesh, pipeline, params, workdir: Path, config) -> Path:
  """Writes the fine-tuned model (diffusers formats) to ``<workdir>/export``.

  Written into a temporary folder that then replaces ``export/``: a run
  killed while exporting leaves the previous export whole, never a new
  ``unet/`` beside an old text encoder.
  """
  folder = workdir / "export"
  # A replicated copy: every process can then read whole arrays (on a pod no
  # process can read a sharded one), and process 0 writes them.
  params = jax.jit(lambda p: p, out_shardings=sharding.replicated(mesh))(
      params)
  if is_chief():
    staging, old = workdir / ".export.tmp", workdir / ".export.old"
    shutil.rmtree(staging, ignore_errors=True)
    write_export(with_params(pipeline, params), staging, config)
    # Not config.json: that name belongs to the components in diffusers
    # layouts.
    rundir.atomic_write_text(staging / "train_config.json",
                             json.dumps(config.to_dict(), indent=2,
                                        sort_keys=True, default=str) + "\n")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
      os.rename(folder, old)
    os.rename(staging, folder)
    shutil.rmtree(old, ignore_errors=True)
    logging.info("exported the fine-tuned pipeline to %s", folder)
  # The final evaluation of every process reads the export.
  distributed.barrier("export")
  return folder
