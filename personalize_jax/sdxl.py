"""What Stable Diffusion XL conditions on: two text encoders and time ids.

Where SD 1.x/2.x condition the U-Net on one sequence of text states, SDXL
(diffusers' ``StableDiffusionXLPipeline``) gives it three inputs:

- the penultimate hidden states of both text encoders (CLIP ViT-L and
  OpenCLIP bigG), side by side: ``(b, 77, 768 + 1280)``;
- ``text_embeds=``: the second encoder's projected pooled output,
  ``(b, 1280)``;
- ``time_ids=``: micro-conditioning on the original size, the crop's
  top-left corner and the target size, in pixels, ``(b, 6)``.

``diffusion.encode_prompts`` returns the first two as a pair and
``diffusion.ddim_sample`` takes that pair with the time ids. Classifier-free
guidance conditions an empty negative prompt on zeros (both the states and
the pooled text) when the pipeline's ``force_zeros_for_empty_prompt`` is set,
as diffusers does.
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def time_ids(resolution: int) -> np.ndarray:
  """``(1, 6)`` float32 time ids of a square image generated whole.

  ``(original_size, crops_coords_top_left, target_size)`` as diffusers builds
  them by default: both sizes ``(resolution, resolution)``, the crop at
  ``(0, 0)``.
  """
  return np.array([[resolution, resolution, 0, 0, resolution, resolution]],
                  np.float32)


def row_time_ids(geometry: Sequence[Sequence[int]],
                 resolution: int) -> np.ndarray:
  """``(n, 6)`` float32 time ids of training images, one row each.

  Args:
    geometry: per image ``(original_h, original_w, crop_top, crop_left)``
      (``images.crop_geometry``).
    resolution: the side of the training square (the target size).
  """
  rows = [[h, w, top, left, resolution, resolution]
          for h, w, top, left in geometry]
  return np.asarray(rows, np.float32).reshape(-1, 6)


def prompt_cond(states_btd: Any, pooled_bd: Any) -> dict:
  """SDXL's conditioning of prompts, before the time ids of their rows."""
  return {"states": states_btd, "text_embeds": pooled_bd}


def with_time_ids(cond: Any, time_ids: Any) -> Any:
  """A prompt conditioning with its rows' time ids (SDXL); SD's is unchanged.

  Args:
    cond: text states (SD 1.x/2.x: returned as they are), or
      ``prompt_cond``'s dict.
    time_ids: ``(b, 6)``, one row per row of ``cond``; None for SD.
  """
  if not isinstance(cond, dict):
    return cond
  return dict(cond, time_ids=jnp.asarray(time_ids, jnp.float32))


def encode_ids(first: nnx.Module, second: nnx.Module, ids_bt: jax.Array,
               ids_2_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(states_btd, pooled_bd)`` from both tokenizers' ids (traceable).

  Both encoders' penultimate hidden states side by side, and the second
  one's projected pooled output: what ``encode_prompts`` computes, for a
  loss that trains the text encoders.
  """
  _, _, hidden = first.encode(ids_bt, output_hidden_states=True)
  _, pooled, hidden_2 = second.encode(ids_2_bt, output_hidden_states=True)
  return jnp.concatenate([hidden[-2], hidden_2[-2]], axis=-1), pooled


def tokenize(pipeline: Any, prompts: str | Sequence[str]
             ) -> tuple[np.ndarray, np.ndarray]:
  """Both tokenizers' ``(b, 77)`` ids of prompts (the second pads with "!")."""
  from personalize_jax.models import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  return tuple(np.asarray(tokenizer_lib.tokenize(tokenizer, prompts))
               for tokenizer in (pipeline.tokenizer, pipeline.tokenizer_2))


def encode_prompts(pipeline: Any, prompts: str | Sequence[str]
                   ) -> tuple[jax.Array, jax.Array]:
  """``(states_btd, pooled_bd)``: SDXL's text conditioning of prompts.

  Equals the first and third outputs of diffusers'
  ``StableDiffusionXLPipeline.encode_prompt(prompts,
  do_classifier_free_guidance=False)``: each tokenizer pads to 77 tokens (the
  second with "!"), ``states_btd`` is both encoders' ``hidden_states[-2]``
  concatenated on the last axis, ``pooled_bd`` the second encoder's
  ``text_embeds``.

  Args:
    pipeline: an SDXL ``pipeline.StableDiffusion``.
    prompts: one prompt or a list.
  """
  ids = [jnp.asarray(i) for i in tokenize(pipeline, prompts)]
  first_def, first = nnx.split(pipeline.text_encoder)
  second_def, second = nnx.split(pipeline.text_encoder_2)
  return _encode((first_def, second_def), (first, second), *ids)


def negative_conditioning(pipeline: Any, negative_prompt: str = ""
                          ) -> tuple[jax.Array, jax.Array]:
  """The unconditional ``(states_1td, pooled_1d)`` of classifier-free guidance.

  Zeros for an empty ``negative_prompt`` when the pipeline's
  ``force_zeros_for_empty_prompt`` is set (diffusers' default for SDXL),
  else the encoded ``negative_prompt``.
  """
  cond = encode_prompts(pipeline, [negative_prompt])
  if pipeline.force_zeros_for_empty_prompt and not negative_prompt:
    return jax.tree.map(jnp.zeros_like, cond)
  return cond


@functools.partial(jax.jit, static_argnames=("defs",))
def _encode(defs, states, ids_bt, ids_2_bt):
  first, second = (nnx.merge(d, s) for d, s in zip(defs, states))
  return encode_ids(first, second, ids_bt, ids_2_bt)


def unet_inputs(cond: Any, time_ids: Any) -> tuple[jax.Array, dict | None]:
  """``(states_btd, added_cond)``: what the U-Net takes of a conditioning.

  Args:
    cond: ``(b, t, d)`` text states (SD 1.x/2.x), or the pair
      ``(states_btd, pooled_bd)`` of ``encode_prompts`` (SDXL).
    time_ids: ``(6,)``, ``(1, 6)`` or ``(b, 6)``, required with a pair.

  Returns:
    The states, and with a pair the U-Net's ``text_embeds``/``time_ids``
    keywords (``time_ids`` as rows; None for plain states).

  Raises:
    ValueError: a pair without ``time_ids``.
  """
  if not isinstance(cond, tuple):
    return cond, None
  if time_ids is None:
    raise ValueError("SDXL conditioning (states, pooled) needs time_ids: "
                     "(original size, crop top-left, target size), e.g. "
                     "sdxl.time_ids(resolution)")
  states_btd, pooled_bd = cond
  return states_btd, {"text_embeds": pooled_bd, "time_ids": jnp.atleast_2d(
      jnp.asarray(time_ids, jnp.float32))}
