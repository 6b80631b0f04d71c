"""Custom Diffusion: what trains, the new token, and the exported pipeline."""

import re

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from personalize_jax import diffusion
from personalize_jax.engine import config as config_lib
from personalize_jax.engine import train
from personalize_jax.errors import UserError
from personalize_jax.methods import custom_diffusion
from personalize_jax.models import checkpoint
from personalize_jax.pipeline import load_stable_diffusion

import recipes
from methods import helpers

NEW_ID = 49408  # the first id after CLIP's 49,408
KTN_ID = 42170  # the vocabulary piece "ktn" (as text it is "k" + "tn</w>")
KV = re.compile(r"attn2\.to_[kv]\.")
TABLE = "text_model.embeddings.token_embedding.weight"


def _config(**overrides):
  """``configs/custom_diffusion_tpu.py:tiny``, cut down to a few fast steps."""
  c = recipes.load("custom_diffusion_tpu", "tiny")
  c.num_steps = 2
  c.learning_rate = 1e-3  # big enough that every trained weight moves
  c.dreambooth.prior_preservation = False  # no class-image generation
  c.eval.prompts = ["a {token} {class_name}"]
  c.eval.num_inference_steps = 1
  return recipes.override(c, overrides)


def _built(config, workdir):
  """``(method, pipeline)``: the built method and the pipeline it grew."""
  pipe = load_stable_diffusion("tiny", seed=config.seed)
  method, _, _ = helpers.build(custom_diffusion, config, workdir, pipe)
  return method, pipe


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-step tiny run; its export folder and the base model's tensors."""
  config = _config()
  workdir = tmp_path_factory.mktemp("custom_diffusion")
  train.train_and_evaluate(config, str(workdir), custom_diffusion)
  base_pipe = load_stable_diffusion("tiny", seed=config.seed)
  tensors = {name: checkpoint.module_tensors(getattr(base_pipe, name))
             for name in ("unet", "vae", "text_encoder")}
  return workdir / "export", tensors


def _exported(folder, component):
  name = ("model.safetensors" if component == "text_encoder"
          else "diffusion_pytorch_model.safetensors")
  return checkpoint.read_safetensors_file(folder / component / name)


def test_config_trains_only_cross_attention_kv_and_the_token_table():
  c = _config()
  assert c.data.unique_token == c.custom_diffusion.modifier_token == "<new1>"
  assert "train_text_encoder" not in c.dreambooth
  block = "unet.down_blocks.0.attentions.0.transformer_blocks.0"
  names = [f"{block}.attn2.to_k.weight", f"{block}.attn2.to_v.weight",
           f"{block}.attn2.to_q.weight", f"{block}.attn1.to_k.weight",
           f"{block}.attn2.to_out.0.weight",
           "text_encoder.text_model.embeddings.token_embedding.weight",
           "text_encoder.text_model.embeddings.position_embedding.weight"]
  matched = [any(re.search(p, n) for p in c.trainable) for n in names]
  assert matched == [True, True, False, False, False, True, False]


def test_only_kv_and_the_new_row_changed(trained):
  folder, before = trained
  for component in ("unet", "vae"):
    after = _exported(folder, component)
    assert sorted(after) == sorted(before[component])
    moved = {k for k in after
             if not np.array_equal(after[k], before[component][k])}
    expected = {k for k in after if component == "unet" and KV.search(k)}
    assert expected or component == "vae"
    assert moved == expected, component
  after = _exported(folder, "text_encoder")
  assert sorted(after) == sorted(before["text_encoder"])
  for key, value in after.items():
    if key != TABLE:
      np.testing.assert_array_equal(value, before["text_encoder"][key])
  table, base_table = after[TABLE], before["text_encoder"][TABLE]
  assert table.shape == (NEW_ID + 1, base_table.shape[1])
  # Bit-identical despite weight decay 1e-2 on the table.
  np.testing.assert_array_equal(table[:NEW_ID], base_table)
  assert not np.array_equal(table[NEW_ID], base_table[KTN_ID])


def test_export_loads_in_diffusers_and_here(trained):
  folder, _ = trained
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
  assert pipe.tokenizer.convert_tokens_to_ids("<new1>") == NEW_ID
  assert pipe.text_encoder.config.vocab_size == NEW_ID + 1
  prompt = "a photo of a <new1> mug"
  ids = pipe.tokenizer(prompt, padding="max_length", max_length=77,
                       return_tensors="pt").input_ids
  assert NEW_ID in ids[0].tolist()
  with torch.no_grad():
    theirs = pipe.text_encoder(ids)[0].numpy()
  ours_pipe = load_stable_diffusion(folder)
  assert ours_pipe.tokenizer.convert_tokens_to_ids("<new1>") == NEW_ID
  ours = np.asarray(diffusion.encode_prompts(ours_pipe, [prompt]))
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_new_row_starts_as_the_initializer_token(tmp_path):
  before = np.asarray(
      load_stable_diffusion("tiny", seed=_config().seed).text_encoder
      .text_model.embeddings.token_embedding.embedding.get_value())
  method, pipe = _built(_config(), tmp_path)
  assert pipe.tokenizer.convert_tokens_to_ids("<new1>") == NEW_ID
  assert NEW_ID == len(pipe.tokenizer) - 1
  table = np.asarray(
      pipe.text_encoder.text_model.embeddings.token_embedding.embedding
      .get_value())
  np.testing.assert_array_equal(table[:NEW_ID], before)
  np.testing.assert_array_equal(table[NEW_ID], before[KTN_ID])
  assert pipe.text_encoder.config.vocab_size == NEW_ID + 1
  assert NEW_ID in method.constants["ids"][0]
  assert set(method.trainable) == {"unet", "text_encoder"}
  rows = method.row_masks[custom_diffusion.TOKEN_TABLE]
  assert rows.sum() == 1 and rows[NEW_ID]


def test_without_modifier_token_only_the_unet_trains(tmp_path):
  config = _config(**{"custom_diffusion.modifier_token": "",
                      "data.unique_token": "sks"})
  method, pipe = _built(config, tmp_path)
  # The token-table regex is dropped from config.trainable when resolved.
  assert config.trainable == (custom_diffusion.TRAINABLE[0],)
  assert not method.row_masks
  assert set(method.trainable) == {"unet"}
  assert len(pipe.tokenizer) == NEW_ID
  assert method.constants["emb"].shape[0] == 1


def test_initializer_id():
  tok = load_stable_diffusion("tiny").tokenizer
  assert custom_diffusion.initializer_id(tok, "ktn") == KTN_ID
  mug = tok.encode("mug", add_special_tokens=False)
  assert custom_diffusion.initializer_id(tok, "mug") == mug[0]
  with pytest.raises(UserError, match="initializer_token='zqxv ktn'"):
    custom_diffusion.initializer_id(tok, "zqxv ktn")


def test_modifier_token_must_be_the_unique_token():
  config = _config(**{"data.unique_token": "sks"})
  with pytest.raises(UserError, match="differs from config.data.unique_token"):
    config_lib.validate(config, 1, custom_diffusion)


def test_modifier_token_must_be_new_and_initializer_one_token():
  config = _config(**{"data.unique_token": "dog",
                      "custom_diffusion.modifier_token": "dog"})
  with pytest.raises(UserError, match="already has 'dog'"):
    custom_diffusion.validate(config)
  config = _config(**{"custom_diffusion.initializer_token": "zqxv ktn"})
  with pytest.raises(UserError, match="initializer_token='zqxv ktn'"):
    custom_diffusion.validate(config)


def test_only_rows_passes_gradients_through_selected_rows():
  state = {"a": {"weight": jnp.ones((4, 3))}, "b": {"weight": jnp.ones((4, 3))}}
  rows = jnp.asarray([False, True, False, False])
  grads = jax.grad(lambda s: sum(jnp.sum(x ** 2) for x in jax.tree.leaves(
      custom_diffusion.only_rows(s, "c", "c.a.weight", rows))))(state)
  np.testing.assert_array_equal(grads["a"]["weight"][:, 0], [0, 2, 0, 0])
  np.testing.assert_array_equal(grads["b"]["weight"], 2 * np.ones((4, 3)))
