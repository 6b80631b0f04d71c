"""LoRA files written by other tools: read them, and fuse them into our weights.

A LoRA stores, per adapted layer, a ``down`` factor (``rank x in``; a conv's
is ``rank x in x kh x kw``) and an ``up`` factor (``out x rank``; a conv's is
``out x rank x 1 x 1``). Fusing it adds ``scale * up @ down`` to the layer's
PyTorch-layout weight, where ``scale`` is ``alpha / rank`` (or
``alpha / sqrt(rank)`` for rsLoRA).

Three key styles are read, all found in the wild for Stable Diffusion 1.x/2.x
and SDXL (whose second text encoder is ``text_encoder_2.``, kohya's
``lora_te2_``):

  PEFT (diffusers >= 0.24, ``save_lora_weights``):
    ``unet.<module>.lora_A.weight`` (down), ``unet.<module>.lora_B.weight``
    (up), ``text_encoder.<module>...``; alpha and rank in the safetensors
    metadata (``lora_adapter_metadata``: ``unet.lora_alpha``, ``unet.r``,
    ``unet.alpha_pattern``, ...), read as PEFT reads a ``LoraConfig``.
    Without metadata, alpha = rank (scale 1), as diffusers assumes.
  Older diffusers:
    ``<component>.<module>.lora.down.weight`` / ``.lora.up.weight``,
    ``.lora_linear_layer.down.weight`` / ``.up.weight``, and attention
    processors' ``attn1.processor.to_q_lora.down.weight`` (``to_out_lora`` is
    ``to_out.0`` in the U-Net; ``to_q_lora`` is ``q_proj`` in the text encoder).
  kohya-ss (sd-scripts, A1111):
    ``lora_unet_<module, dots as _>.lora_down.weight``, ``.lora_up.weight``
    and ``.alpha``; ``lora_te_`` (or ``lora_te1_``) for the text encoder. Conv
    layers may be adapted too: 1x1 (``proj_in``) and kxk (LoCon: ``down`` is a
    kxk conv ``in -> rank``, ``up`` a 1x1 conv ``rank -> out``).

A ``<component>.<module>.alpha`` key beside either diffusers style sets that
module's alpha, as kohya's ``.alpha`` does (diffusers itself refuses such
files). A module without an alpha has scale 1 (alpha = rank), kohya's rule;
diffusers would give it the most common alpha of the file instead.

Text-encoder modules are named as our ``CLIPTextModel`` names them
(``text_model.encoder...``); files from transformers-5 era tools omit the
``text_model.`` prefix and files from earlier ones have it: both are read.

kohya's names cannot be turned back into module paths by rule (``to_q`` and
``attn1`` hold underscores too), so they stay flattened in a ``LoraFile`` and
``fuse_lora`` resolves them exactly, against a table of the target module's
own layer names flattened the same way.
"""

import dataclasses
import json
import math
import numbers
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from personalize_jax.errors import CheckpointError, UserError
from personalize_jax.models import checkpoint

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
_METADATA_KEY = "lora_adapter_metadata"
_TEXT_PREFIX = "text_model."

# Diffusers-style keys: ``<component>.<module><ending>``. The attention
# processors' ``to_q_lora.down.weight`` keep ``_lora`` in the module name.
_DIFFUSERS_KEY = re.compile(
    r"^(?P<module>.+?)(?P<ending>\.lora_(?P<peft>[AB])\.weight"
    r"|\.lora(?:_linear_layer)?\.(?P<old>down|up)\.weight"
    r"|(?<=_lora)\.(?P<processor>down|up)\.weight|\.alpha)$")
_ROLES = {"A": "down", "B": "up", "down": "down", "up": "up"}
# Attention-processor names (``to_q_lora``) -> the projection they adapt.
_PROCESSOR_TARGETS = {
    "unet": {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v",
             "to_out": "to_out.0"},
    "text_encoder": {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj",
                     "to_out": "out_proj"},
}
_PROCESSOR_TARGETS["text_encoder_2"] = _PROCESSOR_TARGETS["text_encoder"]
_KOHYA_KEY = re.compile(
    r"^lora_(unet|te|te1|te2)_(\w+)"
    r"\.(lora_down\.weight|lora_up\.weight|alpha)$")
_KOHYA_PREFIX = re.compile(r"^lora_(unet|te\d?)_")
_KOHYA_ROLES = {"lora_down.weight": "down", "lora_up.weight": "up",
                "alpha": "alpha"}
_KOHYA_COMPONENTS = {"unet": "unet", "te": "text_encoder",
                     "te1": "text_encoder", "te2": "text_encoder_2"}
_DORA = ("dora_scale", "lora_magnitude_vector")
_FORMATS = ("<module>.lora_A/lora_B.weight, <module>.lora.down/up.weight, or "
            "kohya's lora_unet_*/lora_te_*.lora_down/lora_up.weight and .alpha")


class LoraWeights(NamedTuple):
  """One adapted layer of a LoRA file.

  Attributes:
    down: ``(rank, in)``, or ``(rank, in, kh, kw)`` for a conv.
    up: ``(out, rank)``, or ``(out, rank, 1, 1)`` for a conv.
    scale: the file's own multiplier, ``alpha / rank`` (1 without an alpha).
    key: the file's key of ``down``, for error messages.
  """
  down: np.ndarray
  up: np.ndarray
  scale: float
  key: str


@dataclasses.dataclass(frozen=True)
class LoraFile:
  """A LoRA file, normalised.

  Attributes:
    path: the ``.safetensors`` file.
    style: ``peft``, ``diffusers`` (older diffusers keys) or ``kohya``
      (joined with ``+`` if a file mixes them).
    components: ``{"unet" | "text_encoder": {module: LoraWeights}}``; a module
      is its PyTorch path in our naming (``down_blocks.0...attn1.to_q``,
      ``text_model.encoder.layers.0.self_attn.q_proj``), or for kohya files
      that path with dots flattened to ``_`` (resolved by ``fuse_lora``).
  """
  path: Path
  style: str
  components: dict[str, dict[str, LoraWeights]]


def read_lora(path_or_dir: str | os.PathLike) -> LoraFile:
  """Reads a LoRA ``.safetensors`` file in any of the styles the module reads.

  Args:
    path_or_dir: the file, or a folder holding
      ``pytorch_lora_weights.safetensors`` (or exactly one ``*.safetensors``
      file), e.g. what diffusers' ``save_lora_weights`` wrote.

  Returns:
    The file's layers by component and module, with their scales.

  Raises:
    CheckpointError: a missing or non-safetensors file, a key that is not a
      LoRA weight or is for no Stable Diffusion component, a layer without
      its other factor, or factors whose ranks disagree (one line naming the
      key).
  """
  path = _lora_path(path_or_dir)
  metadata = _adapter_metadata(path, _header(path))
  tensors = checkpoint.read_safetensors_file(path)
  if not tensors:
    raise CheckpointError(f"{path} holds no tensors; pass a LoRA file")
  parts: dict[tuple[str, str], dict[str, tuple[str, np.ndarray]]] = {}
  file_names: dict[tuple[str, str], str] = {}
  styles = set()
  for key in sorted(tensors):
    component, file_name, name, role, style = _parse_key(key, path)
    styles.add(style)
    roles = parts.setdefault((component, name), {})
    if role in roles:
      raise CheckpointError(
          f"{path}: keys {roles[role][0]!r} and {key!r} both adapt {component} "
          f"module {name!r}; the file merges two LoRAs or is corrupt: keep one")
    roles[role] = (key, tensors[key])
    file_names.setdefault((component, name), file_name)
  components: dict[str, dict[str, LoraWeights]] = {}
  for (component, name), roles in parts.items():
    components.setdefault(component, {})[name] = _layer(
        roles, metadata.get(component), file_names[component, name], path)
  return LoraFile(path=path, style="+".join(sorted(styles)),
                  components=components)


def fuse_lora(module: nnx.Module, layers: Mapping[str, LoraWeights],
              scale: float = 1.0, *, source: str = "LoRA") -> nnx.Module:
  """Adds ``scale * layer.scale * up @ down`` to each adapted layer's weight.

  The sum is taken in float32 on the host and stored in the parameter's
  dtype. Names are PyTorch module paths, or kohya's flattened form of them.

  Args:
    module: the model (``UNet2DConditionModel``, ``CLIPTextModel``), changed
      in place.
    layers: one component of ``LoraFile.components``.
    scale: the strength of the LoRA (0 leaves the weights as they are).
    source: where the layers came from, for error messages.

  Returns:
    ``module``.

  Raises:
    CheckpointError: a layer the module lacks, one whose name is ambiguous,
      or factors whose shapes do not fit the weight (one line naming the
      key); raised before any weight changes.
  """
  _apply(_resolve(module, layers, source), scale)
  return module


def read_loras(lora: str | os.PathLike | Sequence[tuple[Any, float]],
               scale: float = 1.0) -> list[tuple[LoraFile, float]]:
  """Reads one LoRA or several, each with its strength.

  Args:
    lora: a file or folder (see ``read_lora``), or a list of
      ``(file_or_dir, scale)`` pairs.
    scale: multiplies every pair's scale (the strength of a single LoRA).

  Returns:
    ``[(LoraFile, strength)]``, for ``fuse_loras``.

  Raises:
    UserError: ``lora`` is neither a path nor a list of pairs.
    CheckpointError: see ``read_lora``.
  """
  if isinstance(lora, (str, os.PathLike)):
    return [(read_lora(lora), float(scale))]
  pairs = list(lora)
  for pair in pairs:
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
        or not isinstance(pair[0], (str, os.PathLike))
        or isinstance(pair[1], bool)
        or not isinstance(pair[1], numbers.Real)):
      raise UserError(
          f"lora entry {pair!r} is not a (file_or_dir, scale) pair; pass a "
          "LoRA file or folder, or a list of (file_or_dir, scale) pairs")
  return [(read_lora(path), float(scale) * float(weight))
          for path, weight in pairs]


def fuse_loras(models: Mapping[str, nnx.Module],
               loras: Iterable[tuple[LoraFile, float]]) -> None:
  """Fuses each ``(LoraFile, strength)`` into ``models`` (by component name).

  Args:
    models: ``{"unet": ..., "text_encoder": ...}``, changed in place.
    loras: what ``read_loras`` returns.

  Raises:
    CheckpointError: a file adapts a component ``models`` lacks, or see
      ``fuse_lora``; raised before any weight changes.
  """
  plans = []
  for lora, strength in loras:
    for component, layers in lora.components.items():
      if component not in models:
        key = next(iter(layers.values())).key
        hint = ("this LoRA is for SDXL" if component == "text_encoder_2"
                else "use a LoRA made for this model")
        raise CheckpointError(
            f"{lora.path}: key {key!r} adapts the {component}, which this "
            f"model lacks (it has {', '.join(sorted(models))}); {hint}")
      plans.append((_resolve(models[component], layers, str(lora.path)),
                    strength))
  for plan, strength in plans:
    _apply(plan, strength)


def _lora_path(path_or_dir: str | os.PathLike) -> Path:
  """The ``.safetensors`` file that ``path_or_dir`` names or holds."""
  path = Path(path_or_dir).expanduser()
  if path.is_dir():
    if (path / LORA_WEIGHTS_NAME).is_file():
      return path / LORA_WEIGHTS_NAME
    found = sorted(path.glob("*.safetensors"))
    if len(found) == 1:
      return found[0]
    if found:
      raise CheckpointError(
          f"{path} holds {len(found)} .safetensors files "
          f"({', '.join(p.name for p in found)}) and no {LORA_WEIGHTS_NAME}; "
          "pass the LoRA file itself")
    raise CheckpointError(
        f"{path} holds no .safetensors file; pass a LoRA .safetensors file or "
        f"a folder holding {LORA_WEIGHTS_NAME} (convert .bin/.pt LoRAs to "
        "safetensors first)")
  if not path.is_file():
    raise CheckpointError(
        f"LoRA {path} does not exist; pass a .safetensors file or a folder "
        f"holding {LORA_WEIGHTS_NAME}")
  if path.suffix != ".safetensors":
    raise CheckpointError(
        f"LoRA {path} is not a .safetensors file; pickled .bin/.pt/.ckpt "
        "LoRAs are not read: convert it with safetensors.torch.save_file")
  return path


def _header(path: Path) -> dict[str, Any]:
  """The file's safetensors header, checked before anything is read."""
  return checkpoint.read_safetensors_header(path, "re-download or re-save "
                                                  "the LoRA")[0]


def _adapter_metadata(path: Path, header: Mapping[str, Any]
                      ) -> dict[str, dict[str, Any]]:
  """diffusers' ``lora_adapter_metadata`` by component (``{}`` if absent)."""
  raw = (header.get("__metadata__") or {}).get(_METADATA_KEY)
  if not raw:
    return {}
  try:
    flat = json.loads(raw)
  except json.JSONDecodeError as e:
    raise CheckpointError(
        f"{path}: the {_METADATA_KEY!r} metadata is not valid JSON ({e}); "
        "re-save the LoRA") from None
  out: dict[str, dict[str, Any]] = {}
  for key, value in flat.items():
    component, _, field = key.partition(".")
    out.setdefault(component, {})[field] = value
  return out


def _parse_key(key: str, path: Path) -> tuple[str, str, str, str, str]:
  """``(component, name in the file, name for us, role, style)`` of a key."""
  if any(part in key for part in _DORA):
    raise CheckpointError(
        f"{path}: key {key!r} belongs to a DoRA, which is not supported; "
        "merge it into the model with the tool that trained it, or use a LoRA")
  if _KOHYA_PREFIX.match(key):
    match = _KOHYA_KEY.match(key)
    if match is None:
      raise CheckpointError(
          f"{path}: key {key!r} is not a LoRA weight (LyCORIS LoHa/LoKr/"
          f"Tucker keys are not supported); expected {_FORMATS}")
    prefix, name, ending = match.groups()
    return _KOHYA_COMPONENTS[prefix], name, name, _KOHYA_ROLES[ending], "kohya"
  component, _, rest = key.partition(".")
  if component not in COMPONENTS:
    raise CheckpointError(
        f"{path}: key {key!r} is not for a Stable Diffusion component (keys "
        "start with unet., text_encoder., text_encoder_2., lora_unet_ or "
        "lora_te_); is this LoRA for another model?")
  match = _DIFFUSERS_KEY.match(rest)
  if match is None:
    raise CheckpointError(
        f"{path}: key {key!r} is not a LoRA weight (a full checkpoint?); "
        f"expected {_FORMATS}")
  factor = match["peft"] or match["old"] or match["processor"]
  role = _ROLES[factor] if factor else "alpha"
  style = "peft" if match["peft"] else "diffusers"
  file_name = match["module"]
  return component, file_name, _our_name(component, file_name), role, style


def _our_name(component: str, file_name: str) -> str:
  """A diffusers-style module name in our PyTorch naming."""
  parts = [p for p in file_name.split(".") if p != "processor"]
  if parts[-1].endswith("_lora"):  # attention processors: attn1.to_q_lora
    base = parts[-1][:-len("_lora")]
    parts[-1] = _PROCESSOR_TARGETS[component].get(base, base)
  name = ".".join(parts)
  if component != "unet" and not name.startswith(_TEXT_PREFIX):
    name = _TEXT_PREFIX + name
  return name


def _layer(roles: Mapping[str, tuple[str, np.ndarray]],
           metadata: Mapping[str, Any] | None, file_name: str,
           path: Path) -> LoraWeights:
  """One layer's factors and scale, checked."""
  any_key = next(iter(roles.values()))[0]
  for role, other in (("down", "up"), ("up", "down")):
    if role not in roles:
      raise CheckpointError(
          f"{path}: key {roles.get(other, (any_key,))[0]!r} has no matching "
          f"{role} factor; the LoRA file is incomplete (re-save it)")
  down_key, down = roles["down"]
  up_key, up = roles["up"]
  down, up = down.astype(np.float32), up.astype(np.float32)
  if (down.ndim not in (2, 4) or up.ndim != down.ndim
      or up.shape[1] != down.shape[0]):
    raise CheckpointError(
        f"{path}: key {down_key!r} has shape {down.shape} and {up_key!r} "
        f"{up.shape}; expected (rank, in[, kh, kw]) and (out, rank[, 1, 1])")
  rank = down.shape[0]
  if "alpha" in roles:
    alpha_key, alpha = roles["alpha"]
    if alpha.size != 1:
      raise CheckpointError(f"{path}: key {alpha_key!r} has shape "
                            f"{alpha.shape}; an alpha is one number")
    if metadata:
      raise CheckpointError(
          f"{path}: key {alpha_key!r} sets an alpha the file's "
          f"{_METADATA_KEY!r} metadata also sets; keep one of them")
    scale = float(alpha.reshape(())) / rank
  elif metadata:
    scale = _metadata_scale(metadata, file_name, rank, down_key, path)
  else:
    scale = 1.0
  return LoraWeights(down=down, up=up, scale=scale, key=down_key)


def _pattern_value(patterns: Mapping[str, Any] | None, name: str,
                   default: Any) -> Any:
  """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: first suffix match."""
  for pattern, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({pattern})$", name):
      return value
  return default


def _metadata_scale(metadata: Mapping[str, Any], file_name: str, rank: int,
                    key: str, path: Path) -> float:
  """``lora_alpha / r`` as PEFT derives both for module ``file_name``."""
  if metadata.get("use_dora"):
    raise CheckpointError(
        f"{path}: the metadata of {key!r} says it is a DoRA, which is not "
        "supported; merge it into the model with the tool that trained it")
  r = _pattern_value(metadata.get("rank_pattern"), file_name,
                     metadata.get("r", rank))
  alpha = _pattern_value(metadata.get("alpha_pattern"), file_name,
                         metadata.get("lora_alpha", r))
  if r != rank:
    raise CheckpointError(
        f"{path}: key {key!r} has rank {rank}, but the file's metadata says "
        f"{r}; the LoRA file is inconsistent (re-save it)")
  if metadata.get("use_rslora"):
    return float(alpha) / math.sqrt(rank)
  return float(alpha) / rank


def _targets(module: nnx.Module) -> dict[str, list[tuple[tuple, nnx.Param]]]:
  """Every Linear/Conv weight by module path and by its kohya-flattened path."""
  table: dict[str, list[tuple[tuple, nnx.Param]]] = {}
  for path, var in checkpoint.iter_params(module):
    names = [str(p) for p in path]
    if names[-1] != "kernel" or {"lora_A", "lora_B"} & set(names):
      continue
    dotted = ".".join(names[:-1])
    for name in {dotted, dotted.replace(".", "_")}:
      table.setdefault(name, []).append((path, var))
  return table


def _resolve(module: nnx.Module, layers: Mapping[str, LoraWeights],
             source: str) -> list[tuple[LoraWeights, tuple, nnx.Param]]:
  """``(layer, parameter path, parameter)`` of each layer, all checked."""
  targets = _targets(module)
  kind = type(module).__name__
  plan = []
  for name, layer in layers.items():
    found = targets.get(name, [])
    if not found:
      raise CheckpointError(
          f"{source}: key {layer.key!r} adapts {name!r}, but our {kind} has no "
          f"module {name!r}; is this LoRA for another model (SDXL?)")
    if len(found) > 1:
      candidates = ", ".join(repr(".".join(map(str, p[:-1]))) for p, _ in found)
      raise CheckpointError(
          f"{source}: key {layer.key!r} names {name!r}, which could be any of "
          f"{candidates} in our {kind}; rename the key to the module's dotted "
          "PyTorch path")
    path, var = found[0]
    torch_shape = checkpoint.to_torch_layout(
        path, np.broadcast_to(np.float32(0), var.get_value().shape)).shape
    _check_fits(layer, torch_shape, name, source)
    plan.append((layer, path, var))
  return plan


def _apply(plan: Iterable[tuple[LoraWeights, tuple, nnx.Param]],
           scale: float) -> None:
  """``W += scale * layer.scale * up @ down``, in float32, in our layout."""
  for layer, path, var in plan:
    weight = var.get_value()
    delta = np.tensordot(layer.up.reshape(layer.up.shape[:2]), layer.down,
                         axes=(1, 0))  # (out, in[, kh, kw])
    fused = (np.asarray(jax.device_get(weight), np.float32)
             + np.float32(scale * layer.scale)
             * checkpoint.from_torch_layout(path, delta))
    var.set_value(jnp.asarray(fused, dtype=weight.dtype))


def _check_fits(layer: LoraWeights, torch_shape: tuple, name: str,
                source: str) -> None:
  """Raises unless ``up @ down`` has the weight's PyTorch shape."""
  down, up = layer.down, layer.up
  out_features, in_features, *kernel = torch_shape
  fits = (down.ndim == len(torch_shape) and up.shape[0] == out_features
          and down.shape[1:] == (in_features, *kernel)
          and up.shape[2:] == (1,) * len(kernel))
  if not fits:
    raise CheckpointError(
        f"{source}: key {layer.key!r} has shape {down.shape} (up: {up.shape}), "
        f"which does not fit {name!r} of shape {tuple(torch_shape)}; is this "
        "LoRA for another model (SDXL, or SD 1.x vs 2.x)?")
