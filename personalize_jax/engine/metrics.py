"""What a run reports: metrics.jsonl, TensorBoard events, grids, progress.

``metrics.jsonl`` is the record tools and tests read (one JSON object per
logged step). The same scalars also go to TensorBoard event files, written
here without TensorFlow: an event file is a sequence of length-prefixed,
crc32c-checked records, each an ``Event`` protobuf that we encode by hand
(only the handful of fields scalars need).
"""

import io
import json
import math
import os
import socket
import struct
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
_FILE_VERSION = b"brain.Event:2"
# Non-finite floats are not valid JSON numbers; they are stored as these
# strings so every line stays parseable by strict readers (jq, pandas).
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


# --------------------------------------------------------------------------
# crc32c and the TFRecord framing of event files.


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    table.append(crc)
  return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli), the checksum TFRecord files use."""
  crc = 0xFFFFFFFF
  table = _CRC32C_TABLE
  for byte in data:
    crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The rotated and offset crc TFRecords store (a crc of crcs stays useful)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _record(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data
          + struct.pack("<I", masked_crc32c(data)))


# --------------------------------------------------------------------------
# Protobuf wire format for Event{wall_time=1, step=2, file_version=3,
# summary=5}, Summary{value=1}, Summary.Value{tag=1, simple_value=2}.

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # int64 negatives are 10-byte two's complement.
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
  return _varint(field << 3 | wire_type)


def _length_delimited(field: int, payload: bytes) -> bytes:
  return _key(field, _BYTES) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: bytes | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
  out = _key(1, _FIXED64) + struct.pack("<d", wall_time)
  out += _key(2, _VARINT) + _varint(step)
  if file_version is not None:
    out += _length_delimited(3, file_version)
  if scalars:
    summary = b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode("utf-8"))
                          + _key(2, _FIXED32) + struct.pack("<f", value))
        for tag, value in scalars.items())
    out += _length_delimited(5, summary)
  return out


def _fields(data: bytes):
  """Yields ``(field, value)`` of a protobuf message; bytes stay undecoded."""
  pos = 0
  while pos < len(data):
    key, pos = _read_varint(data, pos)
    field, wire_type = key >> 3, key & 7
    if wire_type == _VARINT:
      value, pos = _read_varint(data, pos)
    elif wire_type == _FIXED64:
      value, pos = data[pos:pos + 8], pos + 8
    elif wire_type == _FIXED32:
      value, pos = data[pos:pos + 4], pos + 4
    elif wire_type == _BYTES:
      size, pos = _read_varint(data, pos)
      value, pos = data[pos:pos + size], pos + size
    else:
      raise ValueError(f"unsupported protobuf wire type {wire_type}")
    yield field, value


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = data[pos]
    pos += 1
    value |= (byte & 0x7F) << shift
    shift += 7
    if not byte & 0x80:
      return value, pos


def read_events(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Decodes an event file written by ``MetricsWriter``, checking every crc.

  Args:
    path: one ``events.out.tfevents.*`` file.

  Returns:
    One dict per event: ``wall_time``, ``step``, ``file_version`` (or None)
    and ``scalars`` (tag -> float).

  Raises:
    ValueError: a crc does not match or the file ends inside a record.
  """
  data = Path(path).read_bytes()
  events, pos = [], 0
  while pos < len(data):
    if pos + 12 > len(data):
      raise ValueError(f"{path}: truncated record header at byte {pos}")
    header = data[pos:pos + 8]
    (size,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    payload = data[pos + 12:pos + 12 + size]
    if header_crc != masked_crc32c(header) or len(payload) != size:
      raise ValueError(f"{path}: corrupt record header at byte {pos}")
    (payload_crc,) = struct.unpack("<I", data[pos + 12 + size:pos + 16 + size])
    if payload_crc != masked_crc32c(payload):
      raise ValueError(f"{path}: crc mismatch in record at byte {pos}")
    pos += 16 + size
    event = {"wall_time": None, "step": 0, "file_version": None, "scalars": {}}
    for field, value in _fields(payload):
      if field == 1:
        (event["wall_time"],) = struct.unpack("<d", value)
      elif field == 2:
        event["step"] = value - (1 << 64) if value >= 1 << 63 else value
      elif field == 3:
        event["file_version"] = value.decode("utf-8")
      elif field == 5:
        for _, summary_value in _fields(value):
          parts = dict(_fields(summary_value))
          tag = parts[1].decode("utf-8")
          (event["scalars"][tag],) = struct.unpack("<f", parts[2])
    events.append(event)
  return events


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
  event file per writer (its loader reads them in name order).

  Args:
    workdir: the run directory; created if missing.
    resume_step: the step of the checkpoint the run restarts from, or None
      for a fresh run (then lines left by an earlier attempt are all dropped).
  """

  _count = 0  # writers opened by this process, for unique event file names.

  def __init__(self, workdir: str | os.PathLike, *,
               resume_step: int | None = None):
    self.workdir = Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.path = self.workdir / METRICS_FILE
    _drop_after(self.path, -1 if resume_step is None else resume_step)
    self._jsonl = open(self.path, "a", encoding="utf-8")
    tb_dir = self.workdir / TENSORBOARD_DIR
    tb_dir.mkdir(exist_ok=True)
    # Seconds, host and pid as TensorFlow names them; the counter keeps two
    # writers of one process in one second apart and in creation order.
    MetricsWriter._count += 1
    self.event_path = tb_dir / (
        f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}"
        f".{os.getpid()}.{MetricsWriter._count:04d}")
    self._events = open(self.event_path, "wb")
    self._events.write(_record(_event(time.time(), 0,
                                      file_version=_FILE_VERSION)))
    self._events.flush()

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
    self._events.write(_record(_event(time.time(), int(step), scalars=values)))
    self._events.flush()

  def close(self) -> None:
    """Closes both files; further writes fail."""
    self._jsonl.close()
    self._events.close()

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
