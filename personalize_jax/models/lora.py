"""Low-rank adapters (LoRA) on a model's linear layers: add, disable, fuse, save.

A LoRA adds ``scale * B A`` to a frozen weight ``W`` (Hu et al. 2021), with
``A`` of shape ``rank x in`` and ``B`` of shape ``out x rank`` (PyTorch
layout) and ``scale = alpha / rank``. ``B`` starts at zero, so a model with
fresh adapters computes exactly what the base model computes.

The adapters live on ``layers.Linear`` modules as ``lora_A``/``lora_B``, the
names PEFT gives them, so parameter names follow diffusers' LoRA files:
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight``.
Reading LoRA files written by other tools is ``lora_files``'s job.
"""

import math
import re
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from personalize_jax.errors import UserError
from personalize_jax.models import checkpoint, layers

# Matches the name of every adapter parameter (after a component prefix).
LEAF_PATTERN = r"\.lora_[AB]\.weight$"
INITS = ("gaussian", "kaiming")


def linear_modules(module: nnx.Module) -> Iterable[tuple[str, layers.Linear]]:
  """``(torch module path, module)`` of every ``layers.Linear`` in ``module``."""
  for path, node in nnx.iter_graph(module):
    if isinstance(node, layers.Linear) and path and str(path[-1]) not in (
        "lora_A", "lora_B"):
      yield ".".join(str(p) for p in path), node


def _is_abstract(variable: nnx.Variable) -> bool:
  return isinstance(variable.get_value(), jax.ShapeDtypeStruct)


def _factor(in_features: int, out_features: int, axes, base: layers.Linear,
            value: np.ndarray | None) -> layers.Linear:
  """A bias-free ``layers.Linear`` computing in ``base``'s dtype."""
  factor = nnx.eval_shape(lambda: layers.linear(
      in_features, out_features, use_bias=False, dtype=base.dtype,
      param_dtype=base.param_dtype, axes=axes,
      rngs=checkpoint.shape_only_rngs()))
  if value is not None:
    factor.kernel.set_value(jnp.asarray(value, base.param_dtype))
  return factor


def add_adapters(module: nnx.Module, targets: Sequence[str], *, rank: int,
                 alpha: float, init: str = "gaussian", seed: int = 0,
                 component: str = "model") -> list[str]:
  """Adds a LoRA of ``rank`` to every linear layer whose name ``targets`` match.

  Args:
    module: the model (concrete, or abstract from ``nnx.eval_shape``: the
      adapters are then abstract too).
    targets: regexes searched in each linear layer's PyTorch module path
      (``...attn1.to_q``).
    rank: the adapters' rank.
    alpha: the scale is ``alpha / rank``.
    init: ``A``'s initialisation: ``gaussian`` (``N(0, 1/rank)``, diffusers'
      LoRA scripts) or ``kaiming`` (PEFT's default, ``U(+-1/sqrt(in))``).
    seed: NumPy seed of ``A``; each layer draws from its own stream.
    component: the model's name, for the error message.

  Returns:
    The module paths that got an adapter, in graph order.

  Raises:
    UserError: a target matches no linear layer (conv layers are not adapted).
  """
  compiled = [re.compile(p) for p in targets]
  chosen = [(name, m) for name, m in linear_modules(module)
            if any(p.search(name) for p in compiled)]
  for pattern in compiled:
    if not any(pattern.search(name) for name, _ in chosen):
      example = next(iter(linear_modules(module)), ("", None))[0]
      raise UserError(
          f"LoRA target regex '{pattern.pattern}' matches no linear layer of "
          f"the {component} (names look like '{example}'); fix "
          f"config.lora.{component}_targets")
  scale = alpha / rank
  for index, (name, linear) in enumerate(chosen):
    d_in, d_out = linear.in_features, linear.out_features
    a = b = None
    if not _is_abstract(linear.kernel):
      rng = np.random.default_rng([seed, index])
      if init == "gaussian":
        a = rng.normal(0.0, 1.0 / rank, (d_in, rank))
      else:
        bound = 1.0 / math.sqrt(d_in)
        a = rng.uniform(-bound, bound, (d_in, rank))
      b = np.zeros((rank, d_out))
    linear.lora_A = _factor(d_in, rank, ("embed", None), linear, a)
    linear.lora_B = _factor(rank, d_out, (None, "mlp"), linear, b)
    linear.lora_scale = scale
  return [name for name, _ in chosen]


def is_adapter_path(path: Sequence) -> bool:
  """Whether an nnx parameter path lies inside an adapter."""
  return any(str(p) in ("lora_A", "lora_B") for p in path)


def has_adapters(module: nnx.Module) -> bool:
  return any(m.lora_A is not None for _, m in linear_modules(module))


def disabled(state: nnx.State) -> nnx.State:
  """``state`` with every ``lora_B`` zero: the model then computes the base's.

  ``W x + scale * 0 (A x)`` adds exact zeros, so RPO's reference U-Net is the
  trained one with this state: no second copy of the base weights.
  """
  def zero(path, x):
    names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
    return jnp.zeros_like(x) if "lora_B" in names else x
  return jax.tree_util.tree_map_with_path(zero, state)


def adapter_tensors(module: nnx.Module, prefix: str = "",
                    strip: str = "") -> dict[str, np.ndarray]:
  """The adapters in PEFT/diffusers layout, the scale folded into ``B``.

  Args:
    module: a model with adapters.
    prefix: prepended to every key (``unet.``, ``text_encoder.``).
    strip: a leading module path to drop (``text_model.``: diffusers writes
      text-encoder LoRAs without it).

  Returns:
    ``{prefix + path + ".lora_A.weight": (rank, in), ... ".lora_B.weight":
    (out, rank)}`` in float32. With ``alpha / rank`` folded into ``B`` the file
    means the same to any loader, with or without metadata.
  """
  out = {}
  for name, linear in linear_modules(module):
    if linear.lora_A is None:
      continue
    key = prefix + (name[len(strip):] if strip and name.startswith(strip)
                    else name)
    a = np.asarray(jax.device_get(linear.lora_A.kernel.get_value()), np.float32)
    b = np.asarray(jax.device_get(linear.lora_B.kernel.get_value()), np.float32)
    out[f"{key}.lora_A.weight"] = np.ascontiguousarray(a.T)
    out[f"{key}.lora_B.weight"] = np.ascontiguousarray(
        (b * linear.lora_scale).T)
  return out


def fused(module: nnx.Module) -> nnx.Module:
  """A copy of ``module`` with every adapter merged into its weight and removed.

  ``W + scale * A B`` (our ``in x out`` layout), computed in float32 and
  stored in the weight's dtype; layers without an adapter are untouched.
  """
  graphdef, state = nnx.split(module)
  # New Variables over the same arrays: setting one leaves ``module`` alone.
  copy = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
  for _, linear in linear_modules(copy):
    if linear.lora_A is None:
      continue
    kernel = linear.kernel.get_value()
    a = jnp.asarray(linear.lora_A.kernel.get_value(), jnp.float32)
    b = jnp.asarray(linear.lora_B.kernel.get_value(), jnp.float32)
    merged = jnp.asarray(kernel, jnp.float32) + linear.lora_scale * (a @ b)
    linear.kernel.set_value(merged.astype(kernel.dtype))
    linear.lora_A = nnx.data(None)
    linear.lora_B = nnx.data(None)
    linear.lora_scale = 1.0
  return copy
