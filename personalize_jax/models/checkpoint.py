"""Hugging Face checkpoint layouts: resolve, read and write, with NumPy only.

One convention makes every port loadable by the same code: an ``nnx`` module
mirrors the attribute names of its PyTorch reference, so the path of a
parameter in the module *is* the PyTorch state-dict key, up to the leaf name
and the layout of the array:

  ``kernel`` (Linear, in x out)       <-> ``weight`` (out x in)
  ``kernel`` (Conv, H x W x in x out) <-> ``weight`` (out x in x H x W)
  ``scale`` (norms), ``embedding``    <-> ``weight``
  anything else (``bias``, raw ``nn.Parameter``s) keeps its name and layout.

Reading ``*.safetensors`` is done here from the file format itself (a JSON
header and raw little-endian buffers), so bf16 checkpoints load without torch.
``load_pretrained`` is every port's ``from_pretrained``; a port says only what
is its own (config class, ``tiny`` preset, weights file, key fixes).
"""

import functools
import json
import math
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from personalize_jax.errors import CheckpointError
from personalize_jax.models import presets

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16,
    "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight"}

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS = "model.safetensors"


def resolve_pretrained(path_or_hub_id: str | os.PathLike,
                       subfolder: str | None = None) -> Path:
  """Returns the local folder holding a checkpoint (downloading hub ids).

  Args:
    path_or_hub_id: a local folder, or a Hugging Face Hub id such as
      ``CompVis/stable-diffusion-v1-4`` (fetched with ``huggingface_hub``, from
      its cache first).
    subfolder: a folder inside it (``unet``, ``vae``, ...).

  Raises:
    CheckpointError: the folder does not exist or the download failed.
  """
  text = str(path_or_hub_id)
  root = Path(text).expanduser()
  if not root.exists():
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
      raise CheckpointError(
          f"model path {text!r} does not exist; pass a local diffusers/"
          "transformers folder or a Hugging Face Hub id like "
          "'CompVis/stable-diffusion-v1-4'")
    root = _download(text, subfolder)
  folder = root / subfolder if subfolder else root
  if not folder.is_dir():
    raise CheckpointError(
        f"{folder} is not a folder; {root} does not look like a checkpoint "
        f"with a {subfolder!r} part (expected {root}/{subfolder}/config.json)")
  return folder


def read_model_index(path_or_hub_id: str | os.PathLike) -> dict:
  """A pipeline's ``model_index.json``, without its weights.

  A Hub id fetches that one file (from the cache first), once per process;
  a local folder is read each time.

  Raises:
    CheckpointError: the source does not exist, cannot be fetched, or has no
      readable ``model_index.json``.
  """
  text = str(path_or_hub_id)
  root = Path(text).expanduser()
  if root.exists() or not _HUB_ID.match(text):
    return read_json(resolve_pretrained(text) / "model_index.json")
  return dict(_hub_model_index(text))


@functools.lru_cache(maxsize=16)
def _hub_model_index(repo_id: str) -> dict:
  return read_json(_download(repo_id, None, ["model_index.json"])
                   / "model_index.json")


def _download(repo_id: str, subfolder: str | None,
              patterns: list[str] | None = None) -> Path:
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  if patterns is None:
    patterns = ["*.json", "*.txt", "*.safetensors"]
    if subfolder:
      patterns = ["model_index.json"] + [f"{subfolder}/{p}" for p in patterns]
  for local_only in (True, False):
    try:
      return Path(huggingface_hub.snapshot_download(
          repo_id, allow_patterns=patterns, local_files_only=local_only))
    except Exception as e:  # pylint: disable=broad-except
      reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
  raise CheckpointError(
      f"could not download weights for {repo_id!r} from the Hugging Face Hub "
      f"({reason}); with no network, download the model elsewhere (e.g. "
      f"`huggingface-cli download {repo_id}`) and pass the local folder instead")


def read_json(path: Path) -> dict:
  """Reads a JSON config file, with a one-line error if missing or malformed."""
  if not path.is_file():
    raise CheckpointError(
        f"{path} is missing; a Hugging Face checkpoint folder needs it "
        "(save models with save_pretrained)")
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}); re-save the model "
                          "or restore the file") from None


def check_model_type(config: Mapping, expected: str, cls_name: str,
                     path: Path, classes: str = "") -> None:
  """Raises a one-line error when ``config.json`` is for another model family.

  Args:
    config: the contents of ``config.json``.
    expected: the ``model_type`` the class loads.
    cls_name: the class, for the message.
    path: the ``config.json`` file, for the message.
    classes: the sibling classes, to point at the right one (optional).
  """
  found = config.get("model_type")
  if found is not None and found != expected:
    siblings = f" ({classes})" if classes else ""
    raise CheckpointError(
        f"{path} has model_type {found!r}, but {cls_name} loads {expected!r} "
        f"checkpoints; use the class for {found!r}{siblings} or another folder")


def read_safetensors_header(path: Path, hint: str = "re-download or re-save it"
                            ) -> tuple[dict[str, Any], int]:
  """A ``.safetensors`` file's JSON header and where its data starts.

  Raises:
    CheckpointError: the file is unreadable or not safetensors (``hint``
      says what to do).
  """
  try:
    with open(path, "rb") as f:
      (header_len,) = struct.unpack("<Q", f.read(8))
      if header_len > os.path.getsize(path) - 8:
        raise ValueError(f"its header would be {header_len} bytes long")
      header = json.loads(f.read(header_len))
    if not isinstance(header, dict):
      raise ValueError("its header is not a JSON object")
  except (OSError, struct.error, ValueError) as e:  # JSONDecodeError too
    raise CheckpointError(f"{path} is not a readable safetensors file ({e}); "
                          f"{hint}") from None
  return header, 8 + header_len


def read_safetensors_file(path: Path) -> dict[str, np.ndarray]:
  """Reads one ``.safetensors`` file into NumPy arrays (bf16 via ml_dtypes)."""
  header, start = read_safetensors_header(path)
  try:
    with open(path, "rb") as f:
      f.seek(start)
      data = memoryview(f.read())
  except OSError as e:
    raise CheckpointError(f"{path} is not a readable safetensors file ({e}); "
                          "re-download or re-save it") from None
  out = {}
  for key, info in header.items():
    if key == "__metadata__":
      continue
    start, end = info["data_offsets"]
    dtype = _ST_DTYPES.get(info["dtype"])
    if dtype is None:
      raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype "
                            f"{info['dtype']}; convert the checkpoint to fp32/fp16")
    if end > len(data):
      raise CheckpointError(f"{path} is truncated (tensor {key!r} runs past the "
                            "end of the file); re-download it")
    out[key] = np.frombuffer(data[start:end], dtype=dtype).reshape(info["shape"])
  return out


def read_weights(folder: Path, weights_name: str) -> tuple[dict[str, np.ndarray], str]:
  """Reads ``weights_name`` or its sharded form (``<name>.index.json``).

  Returns:
    The tensors by key, and a description of where they came from for errors.
  """
  single = folder / weights_name
  index = folder / f"{weights_name}.index.json"
  if single.is_file():
    return read_safetensors_file(single), str(single)
  if index.is_file():
    shards = sorted(set(read_json(index)["weight_map"].values()))
    tensors = {}
    for shard in shards:
      tensors.update(read_safetensors_file(folder / shard))
    return tensors, str(index)
  found = sorted(p.name for p in folder.glob("*"))
  hint = (" (only PyTorch .bin weights found: convert them to safetensors)"
          if any(n.endswith(".bin") for n in found) else "")
  raise CheckpointError(f"no {weights_name} in {folder}{hint}; expected a "
                        "folder written by save_pretrained")


def write_safetensors(path: Path, tensors: Mapping[str, np.ndarray]) -> None:
  """Writes NumPy arrays as a ``.safetensors`` file PyTorch can read."""
  header, offset, buffers = {"__metadata__": {"format": "pt"}}, 0, []
  for key in sorted(tensors):
    arr = np.asarray(tensors[key], order="C")
    raw = arr.tobytes()
    header[key] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                   "data_offsets": [offset, offset + len(raw)]}
    buffers.append(raw)
    offset += len(raw)
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for raw in buffers:
      f.write(raw)
  os.replace(tmp, path)


def torch_key(path: tuple) -> str:
  """The PyTorch state-dict key for an nnx parameter path."""
  *parents, leaf = (str(p) for p in path)
  return ".".join(parents + [_LEAF_TO_TORCH.get(leaf, leaf)])


def to_torch_layout(path: tuple, value: np.ndarray) -> np.ndarray:
  if str(path[-1]) == "kernel":
    if value.ndim == 2:
      return value.T
    if value.ndim == 4:
      return value.transpose(3, 2, 0, 1)
  return value


def from_torch_layout(path: tuple, value: np.ndarray) -> np.ndarray:
  if str(path[-1]) == "kernel":
    if value.ndim == 2:
      return value.T
    if value.ndim == 4:
      return value.transpose(2, 3, 1, 0)
  return value


# The variable types a checkpoint holds: parameters, unless a port says more
# (ALIGN's BatchNorm statistics are ``nnx.BatchStat``).
Variables = type | tuple[type, ...]


def iter_params(module: nnx.Module, variables: Variables = nnx.Param
                ) -> Iterable[tuple[tuple, nnx.Variable]]:
  """Yields ``(path, variable)`` for every variable of the ``variables``
  type(s) in the module (every ``nnx.Param`` by default)."""
  for path, node in nnx.iter_graph(module):
    if isinstance(node, variables):
      yield path, node


def count_params(module: nnx.Module) -> int:
  """The number of parameter scalars (works on abstract modules too)."""
  return sum(int(np.prod(v.get_value().shape)) for _, v in iter_params(module))


def load_params(module: nnx.Module, tensors: Mapping[str, np.ndarray], *,
                source: str, param_dtype=jnp.float32,
                ignore_unexpected: Iterable[str] = (),
                variables: Variables = nnx.Param) -> nnx.Module:
  """Fills every parameter of ``module`` (abstract or not) from ``tensors``.

  Args:
    module: a module built with the checkpoint's config, typically under
      ``nnx.eval_shape`` so no random weights are ever materialised.
    tensors: PyTorch-layout arrays by state-dict key.
    source: the file the tensors came from, for error messages.
    param_dtype: the dtype parameters are stored in.
    ignore_unexpected: regexes of checkpoint keys the port deliberately has no
      parameter for (a pooler, non-persistent buffers).
    variables: the variable type(s) to fill (``iter_params``); those that
      are not ``nnx.Param`` keep the dtype they were built with.

  Returns:
    The same module, filled.

  Raises:
    CheckpointError: a missing, unexpected or mis-shaped key (one line naming
      the key and the file).
  """
  used = set()
  for path, var in iter_params(module, variables):
    key = torch_key(path)
    if key not in tensors:
      raise CheckpointError(
          f"{source}: missing key {key!r} (the config says the model has it); "
          "the weights do not match config.json")
    value = from_torch_layout(path, tensors[key])
    expected = tuple(var.get_value().shape)
    if tuple(value.shape) != expected:
      raise CheckpointError(
          f"{source}: key {key!r} has shape {tuple(tensors[key].shape)}, the "
          f"config implies {tuple(to_torch_layout(path, np.empty(expected)).shape)}; "
          "the weights do not match config.json")
    dtype = (param_dtype if isinstance(var, nnx.Param)
             else var.get_value().dtype)
    var.set_value(jnp.asarray(value, dtype=dtype))
    used.add(key)
  ignore = [re.compile(p) for p in ignore_unexpected]
  for key in sorted(set(tensors) - used):
    if not any(p.search(key) for p in ignore):
      raise CheckpointError(
          f"{source}: unexpected key {key!r} that this model has no parameter "
          "for; the weights do not match config.json")
  return module


def module_tensors(module: nnx.Module, dtype=np.float32,
                   variables: Variables = nnx.Param) -> dict[str, np.ndarray]:
  """Every parameter (every variable of the ``variables`` type(s)) of
  ``module`` in PyTorch layout, by state-dict key."""
  return {
      # np.asarray(order="C"), not ascontiguousarray: keeps 0-d arrays 0-d.
      torch_key(path): np.asarray(
          to_torch_layout(path, np.asarray(jax.device_get(var.get_value()),
                                           dtype=dtype)), order="C")
      for path, var in iter_params(module, variables)
  }


def save_pretrained(module: nnx.Module, folder: str | os.PathLike,
                    config: Mapping, weights_name: str,
                    dtype=np.float32) -> Path:
  """Writes ``config.json`` + weights in the Hugging Face layout."""
  folder = Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  write_safetensors(folder / weights_name, module_tensors(module, dtype))
  (folder / "config.json").write_text(json.dumps(dict(config), indent=2,
                                                 sort_keys=True) + "\n")
  return folder


def build_and_load(build: Callable[[], nnx.Module], folder: Path,
                   weights_name: str, *, param_dtype=jnp.float32,
                   ignore_unexpected: Iterable[str] = (),
                   rename: Callable[[str], str] | None = None,
                   transform: Callable[[str, np.ndarray], np.ndarray] | None = None
                   ) -> nnx.Module:
  """Builds ``build()`` abstractly and fills it from ``folder/weights_name``.

  Args:
    build: constructs the module (random init); only its shapes are used.
    folder: the checkpoint folder.
    weights_name: ``diffusion_pytorch_model.safetensors`` or ``model.safetensors``.
    param_dtype: the dtype to store the parameters in.
    ignore_unexpected: see ``load_params``.
    rename: maps legacy checkpoint keys onto current ones (e.g. old VAE
      attention names), applied before matching.
    transform: maps ``(key, tensor)`` (after ``rename``) onto the tensor to
      load, for legacy layouts (e.g. 1x1-conv-shaped linear weights).
  """
  tensors, source = read_weights(folder, weights_name)
  if rename is not None:
    tensors = {rename(k): v for k, v in tensors.items()}
  if transform is not None:
    tensors = {k: transform(k, v) for k, v in tensors.items()}
  module = nnx.eval_shape(build)
  return load_params(module, tensors, source=source, param_dtype=param_dtype,
                     ignore_unexpected=ignore_unexpected)


def shape_only_rngs() -> nnx.Rngs:
  """``nnx.Rngs`` for building a module under ``nnx.eval_shape`` only.

  Each draw increments the stream's counter; traced, that counter is a tracer
  whose every update makes flax probe ``tracer.sharding``, an error path that
  walks the whole jaxpr built so far: quadratic in the number of parameters
  (15 s for SD 1.4's 686 tensors). A host NumPy counter keeps it concrete. The
  keys it yields are valid but must not be used for real initialisation.
  """
  rngs = nnx.Rngs(0)
  rngs.default.count.set_value(np.zeros((), np.uint32))
  return rngs


# Raw parameters (PyTorch nn.Parameter) whose neutral value is not small noise.
_RAW_INIT = {"logit_scale": math.log(1 / 0.07), "lambda1": 1.0}


def random_init(module: nnx.Module, seed: int,
                param_dtype=jnp.float32) -> nnx.Module:
  """Fills an abstract module's parameters with NumPy random values.

  Kernels are ``N(0, 1/fan_in)``, biases 0, norm scales 1, embeddings and
  other raw parameters ``N(0, 0.02)`` (``logit_scale`` and layer-scale
  ``lambda1`` get their usual constants). Drawn on the host because eager JAX
  initialisation of a few hundred differently shaped tensors compiles one
  kernel per shape: tens of seconds even for tiny models on a CPU.

  Args:
    module: a module built under ``nnx.eval_shape``.
    seed: NumPy seed.
    param_dtype: the dtype parameters are stored in.

  Returns:
    The same module, filled.
  """
  rng = np.random.default_rng(seed)
  for path, var in iter_params(module):
    shape = tuple(var.get_value().shape)
    leaf = str(path[-1])
    if leaf == "kernel":
      value = rng.standard_normal(shape) / math.sqrt(np.prod(shape[:-1]))
    elif leaf == "scale":
      value = np.ones(shape)
    elif leaf == "bias":
      value = np.zeros(shape)
    elif leaf in _RAW_INIT:
      value = np.full(shape, _RAW_INIT[leaf])
    else:
      value = 0.02 * rng.standard_normal(shape)
    var.set_value(jnp.asarray(value, dtype=param_dtype))
  return module


def build_random(build: Callable[[], nnx.Module], seed: int,
                 param_dtype=jnp.float32) -> nnx.Module:
  """``build()`` (which should use ``shape_only_rngs()``) with random weights."""
  return random_init(nnx.eval_shape(build), seed, param_dtype)


def load_pretrained(path_or_hub_id: str | os.PathLike,
                    subfolder: str | None, *,
                    read_config: Callable[[Mapping], Any],
                    build: Callable[..., nnx.Module],
                    preset: Mapping, weights_name: str,
                    param_dtype=jnp.float32, seed: int = 0,
                    model_type: str | None = None, cls_name: str = "",
                    classes: str = "",
                    ignore_unexpected: Iterable[str] = (),
                    rename: Callable[[str], str] | None = None,
                    transform: Callable[[str, np.ndarray], np.ndarray] | None = None
                    ) -> nnx.Module:
  """``from_pretrained`` of every model family: a folder, a Hub id or ``tiny``.

  Resolves the folder (downloading Hub ids), reads ``config.json``, builds the
  module abstractly and fills it from the safetensors weights; ``tiny`` builds
  ``preset`` with random weights from ``seed`` instead.

  Args:
    path_or_hub_id: a local folder, a Hub id, or ``presets.TINY``.
    subfolder: the model's folder inside the checkpoint (``unet``, ...).
    read_config: the family's config class's ``from_dict``.
    build: ``build(config, rngs=...)`` constructs the module (the class with
      its dtypes and options bound); only its shapes are used.
    preset: the ``config.json`` values of the ``tiny`` model.
    weights_name: ``DIFFUSERS_WEIGHTS`` or ``TRANSFORMERS_WEIGHTS``.
    param_dtype: the dtype to store the parameters in.
    seed: the NumPy seed of the ``tiny`` weights.
    model_type: refuse a ``config.json`` of another ``model_type``
      (transformers families; diffusers configs have none).
    cls_name: the class being loaded, named in that refusal.
    classes: the family's classes, named in that refusal (optional).
    ignore_unexpected: see ``load_params``.
    rename: see ``build_and_load``.
    transform: see ``build_and_load``.

  Raises:
    CheckpointError: missing files, a config of another family, or weights
      that do not match the config (one line each).
    UserError: a config the port does not support.
  """
  if str(path_or_hub_id) == presets.TINY:
    config = read_config(preset)
    return build_random(lambda: build(config, rngs=shape_only_rngs()), seed,
                        param_dtype)
  folder = resolve_pretrained(path_or_hub_id, subfolder)
  values = read_json(folder / "config.json")
  if model_type is not None:
    check_model_type(values, model_type, cls_name, folder / "config.json",
                     classes)
  config = read_config(values)
  return build_and_load(lambda: build(config, rngs=shape_only_rngs()), folder,
                        weights_name, param_dtype=param_dtype,
                        ignore_unexpected=ignore_unexpected, rename=rename,
                        transform=transform)
