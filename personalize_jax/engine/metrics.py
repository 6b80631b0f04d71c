"""What a run reports: metrics.jsonl, TensorBoard events, grids, progress.

``metrics.jsonl`` is the record tools and tests read (one JSON object per
logged step). The same scalars also go to TensorBoard event files in
``tensorboard/``, written by tensorboardX (no TensorFlow needed), and with
``config.log.wandb`` to an offline Weights & Biases run in ``wandb/``
(``wandb sync`` uploads it later); wandb is imported only then.
"""

import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import tqdm
from PIL import Image, ImageDraw, ImageFont

from personalize_jax import grids
from personalize_jax.engine.rundir import atomic_write_bytes, atomic_write_text

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
# Non-finite floats are not valid JSON numbers; they are stored as these
# strings so every line stays parseable by strict readers (jq, pandas).
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


# --------------------------------------------------------------------------
# metrics.jsonl + TensorBoard.


def _json_value(value: float) -> float | str:
  if math.isnan(value):
    return "nan"
  if math.isinf(value):
    return "inf" if value > 0 else "-inf"
  return value


def _parse_lines(text: str) -> list[tuple[str, dict[str, Any] | None]]:
  """``(line, record)`` pairs; record is None for a line a crash cut short."""
  out = []
  for line in text.splitlines(keepends=True):
    try:
      record = json.loads(line) if line.endswith("\n") else None
    except ValueError:
      record = None
    out.append((line, record))
  return out


def _drop_after(path: Path, last_step: int) -> None:
  """Rewrites ``path`` without records past ``last_step`` (or cut short)."""
  if not path.exists():
    return
  lines = _parse_lines(path.read_text(encoding="utf-8"))
  kept = [line for line, record in lines
          if record is not None and record.get("step", 0) <= last_step]
  if len(kept) != len(lines):
    atomic_write_text(path, "".join(kept))


class MetricsWriter:
  """Appends scalars to ``metrics.jsonl`` and to TensorBoard event files.

  Each ``write`` is flushed and fsynced, so after a crash the file holds every
  step the run reported. ``resume_step`` makes a resumed run's file equal to
  that of an uninterrupted run: lines past the step the run restarts from are
  dropped, since the run will log those steps again. TensorBoard gets a new
  event file per writer (its loader reads them in name order) that opens with
  a restart marker, so TensorBoard likewise hides the dropped steps that
  earlier files hold.

  Args:
    workdir: the run directory; created if missing.
    resume_step: the step of the checkpoint the run restarts from, or None
      for a fresh run (then lines left by an earlier attempt are all dropped).
    wandb_project: also log to an offline W&B run of this project (a new
      run per writer, its files in ``<workdir>/wandb``); None: no W&B.
    run_config: the run's config, recorded in the W&B run.
  """

  _count = 0  # writers opened by this process, for unique event file names.

  def __init__(self, workdir: str | os.PathLike, *,
               resume_step: int | None = None,
               wandb_project: str | None = None,
               run_config: Mapping[str, Any] | None = None):
    self.workdir = Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.path = self.workdir / METRICS_FILE
    last_kept_step = -1 if resume_step is None else resume_step
    _drop_after(self.path, last_kept_step)
    self._jsonl = open(self.path, "a", encoding="utf-8")
    tb_dir = self.workdir / TENSORBOARD_DIR
    tb_dir.mkdir(exist_ok=True)
    # tensorboardX names the file by seconds and host; pid and counter keep
    # two writers of one second apart and in creation order. Its
    # SummaryWriter is not used: it writes from a queue, so its flush() can
    # return before the last scalars reach the file.
    MetricsWriter._count += 1
    # Imported here, not at the top: tensorboardX's package imports torch
    # where it is installed (seconds), which a command that stops at a
    # mistake in its config never needs.
    # pylint: disable=g-import-not-at-top
    from tensorboardX import event_file_writer, summary
    from tensorboardX.proto import event_pb2
    # pylint: enable=g-import-not-at-top
    self._event, self._scalar = event_pb2.Event, summary.scalar
    self._events = event_file_writer.EventsWriter(
        str(tb_dir / "events"),
        filename_suffix=f".{os.getpid()}.{MetricsWriter._count:04d}")
    # TensorBoard drops the steps from here on that earlier files logged.
    self._events.write_event(self._event(
        wall_time=time.time(), step=last_kept_step + 1,
        session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    self._events.flush()
    self._wandb = None
    if wandb_project is not None:
      import wandb  # pylint: disable=g-import-not-at-top
      self._wandb = wandb.init(project=wandb_project, dir=str(self.workdir),
                               mode="offline", config=dict(run_config or {}))

  def write(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Records ``scalars`` (anything ``float()`` accepts) at ``step``."""
    if "step" in scalars:
      raise ValueError("'step' is reserved for the step number in metrics")
    values = {name: float(value) for name, value in scalars.items()}
    record = {"step": int(step)}
    record.update({name: _json_value(v) for name, v in values.items()})
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    self._jsonl.flush()
    os.fsync(self._jsonl.fileno())
    wall_time = time.time()
    for name, value in values.items():
      self._events.write_event(self._event(
          wall_time=wall_time, step=int(step),
          summary=self._scalar(name, value)))
    self._events.flush()  # fsyncs too.
    if self._wandb is not None:
      self._wandb.log(values, step=int(step))

  def close(self) -> None:
    """Closes both files (and the W&B run); further writes fail."""
    self._jsonl.close()
    self._events.close()
    if self._wandb is not None:
      self._wandb.finish()

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of ``<workdir>/metrics.jsonl``, non-finite values as floats.

  A last line that a crash cut short is skipped; [] when there is no file.
  """
  path = Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  lines = _parse_lines(path.read_text(encoding="utf-8"))
  records = []
  for i, (line, record) in enumerate(lines):
    if record is None:
      if i == len(lines) - 1 and not line.endswith("\n"):
        continue
      raise ValueError(f"{path}: line {i + 1} is not JSON: {line!r}")
    records.append({k: _NON_FINITE.get(v, v) if isinstance(v, str) else v
                    for k, v in record.items()})
  return records


# --------------------------------------------------------------------------
# Sample grids and the progress bar.


def save_grid(images_uint8_nhwc: Any, path: str | os.PathLike, *,
              captions: Sequence[str] | None = None,
              ncols: int | None = None) -> Path:
  """Writes images as one PNG grid, each with an optional caption beneath.

  Args:
    images_uint8_nhwc: ``[N, H, W, C]`` uint8 with C in {1, 3, 4} (alpha is
      dropped).
    path: the PNG to write (atomically); its folder is created.
    captions: N strings, wrapped to the tile width, or None for no captions.
    ncols: tiles per row; about a square grid by default.

  Returns:
    ``path`` as a ``Path``.
  """
  images = np.asarray(images_uint8_nhwc)
  if images.ndim != 4 or images.dtype != np.uint8 or images.shape[0] == 0:
    raise ValueError("save_grid wants a non-empty [N, H, W, C] uint8 array, "
                     f"got {images.dtype} {images.shape}")
  n, height, width, channels = images.shape
  if channels == 1:
    images = np.repeat(images, 3, axis=-1)
  elif channels in (3, 4):
    images = images[..., :3]
  else:
    raise ValueError(f"save_grid wants 1, 3 or 4 channels, got {channels}")
  if captions is not None and len(captions) != n:
    raise ValueError(f"{len(captions)} captions for {n} images")
  ncols = min(ncols or math.ceil(math.sqrt(n)), n)
  nrows = math.ceil(n / ncols)

  font = ImageFont.load_default()
  pad = 4
  wrapped = [grids.wrap_text(c, font, width - 2 * pad) for c in captions or []]
  line_height = font.getbbox("Hg")[3] + 2
  caption_height = (max(len(w) for w in wrapped) * line_height + 2 * pad
                    if wrapped else 0)
  cell_height = height + caption_height

  canvas = Image.new("RGB", (ncols * width, nrows * cell_height), "white")
  draw = ImageDraw.Draw(canvas)
  for i, image in enumerate(images):
    row, col = divmod(i, ncols)
    x, y = col * width, row * cell_height
    canvas.paste(Image.fromarray(image), (x, y))
    for j, line in enumerate(wrapped[i] if wrapped else []):
      draw.text((x + pad, y + height + pad + j * line_height), line,
                fill="black", font=font)
  buffer = io.BytesIO()
  canvas.save(buffer, format="PNG")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  return atomic_write_bytes(path, buffer.getvalue())


def progress(total: int, *, initial: int = 0, desc: str) -> tqdm.tqdm:
  """A step progress bar with rate and ETA on stderr.

  Call ``.update(n)`` per step and ``.set_postfix(loss=...)`` to show the
  loss; ``.close()`` at the end.

  Args:
    total: the step the run ends at.
    initial: the step it starts from (non-zero when resuming).
    desc: a short label, e.g. the method name.
  """
  # Redrawing ten times a second floods log files; on a terminal it is fine.
  interactive = sys.stderr.isatty()
  return tqdm.tqdm(total=total, initial=initial, desc=desc, unit="step",
                   file=sys.stderr, dynamic_ncols=True,
                   mininterval=0.1 if interactive else 30.0)
