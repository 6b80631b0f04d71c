"""Tests for models/lora.py: adapters that start at the base, fuse and save exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from personalize_jax.engine import optim
from personalize_jax.errors import UserError
from personalize_jax.models import checkpoint, lora, presets
from personalize_jax.models.clip import CLIPTextModel

TARGETS = (r"\.(q_proj|v_proj)$",)
IDS = np.array([[49406, 320, 1929, 537, 49407, 49407, 49407]])


def _model(seed=0):
  return CLIPTextModel.from_pretrained(presets.TINY, seed=seed)


def _forward(model):
  graph, state = nnx.split(model)
  return np.asarray(jax.jit(
      lambda s, ids: nnx.merge(graph, s)(ids))(state, jnp.asarray(IDS)))


def _with_adapters(rank=4, alpha=8.0, init="gaussian", seed=0):
  model = _model()
  names = lora.add_adapters(model, TARGETS, rank=rank, alpha=alpha,
                            init=init, seed=seed, component="text_encoder")
  return model, names


def _perturb_b(model, seed=1):
  """Moves every ``lora_B`` off zero, as training would."""
  rng = np.random.default_rng(seed)
  for _, linear in lora.linear_modules(model):
    if linear.lora_B is not None:
      shape = linear.lora_B.kernel.get_value().shape
      linear.lora_B.kernel.set_value(jnp.asarray(
          0.1 * rng.standard_normal(shape), jnp.float32))
  return model


@pytest.fixture(scope="module")
def base_output():
  return _forward(_model())


def test_adapters_go_on_the_targeted_layers_with_peft_names():
  model, names = _with_adapters()
  layers = presets.CLIP_TEXT["num_hidden_layers"]
  assert len(names) == 2 * layers
  assert all(n.endswith((".q_proj", ".v_proj")) for n in names)
  params = optim.param_names({"text_encoder": nnx.state(model)})
  adapter = [n for n in jax.tree.leaves(params) if ".lora_" in n]
  assert len(adapter) == 4 * layers
  assert ("text_encoder.text_model.encoder.layers.0.self_attn.q_proj."
          "lora_A.weight") in adapter
  tensors = checkpoint.module_tensors(model)
  key = "text_model.encoder.layers.0.self_attn.q_proj"
  hidden = presets.CLIP_TEXT["hidden_size"]
  assert tensors[f"{key}.lora_A.weight"].shape == (4, hidden)  # rank x in
  assert tensors[f"{key}.lora_B.weight"].shape == (hidden, 4)  # out x rank


def test_fresh_adapters_compute_exactly_the_base(base_output):
  model, _ = _with_adapters()
  np.testing.assert_array_equal(_forward(model), base_output)


def test_trained_adapters_change_the_output_and_disabled_restores_it(
    base_output):
  model = _perturb_b(_with_adapters()[0])
  assert np.abs(_forward(model) - base_output).max() > 1e-3
  graph, state = nnx.split(model)
  off = nnx.merge(graph, lora.disabled(state))
  np.testing.assert_array_equal(_forward(off), base_output)


def test_fused_model_equals_the_adapted_one_and_changes_only_targets():
  model = _perturb_b(_with_adapters(alpha=8.0)[0])
  fused = lora.fused(model)
  assert not lora.has_adapters(fused) and lora.has_adapters(model)
  adapted = _forward(model)
  np.testing.assert_allclose(_forward(fused), adapted, rtol=1e-5,
                             atol=1e-5 * np.abs(adapted).max())
  base, merged = (checkpoint.module_tensors(_model()),
                  checkpoint.module_tensors(fused))
  assert base.keys() == merged.keys()
  changed = {k for k in base if not np.array_equal(base[k], merged[k])}
  layers = presets.CLIP_TEXT["num_hidden_layers"]
  assert len(changed) == 2 * layers
  assert all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def test_saved_adapters_fold_the_scale_into_b():
  model = _perturb_b(_with_adapters(rank=4, alpha=8.0)[0])
  tensors = lora.adapter_tensors(model, prefix="text_encoder.",
                                 strip="text_model.")
  key = "text_encoder.encoder.layers.1.self_attn.v_proj"
  linear = model.text_model.encoder.layers[1].self_attn.v_proj
  b = np.asarray(linear.lora_B.kernel.get_value())
  a = np.asarray(linear.lora_A.kernel.get_value())
  np.testing.assert_array_equal(tensors[f"{key}.lora_B.weight"], 2.0 * b.T)
  np.testing.assert_array_equal(tensors[f"{key}.lora_A.weight"], a.T)
  assert len(tensors) == 4 * presets.CLIP_TEXT["num_hidden_layers"]


@pytest.mark.parametrize("init", ["gaussian", "kaiming"])
def test_a_is_initialised_as_named_and_b_is_zero(init):
  model, _ = _with_adapters(rank=8, init=init)
  linear = model.text_model.encoder.layers[0].self_attn.q_proj
  a = np.asarray(linear.lora_A.kernel.get_value())
  hidden = presets.CLIP_TEXT["hidden_size"]
  if init == "gaussian":
    assert abs(a.std() - 1 / 8) < 0.03
  else:
    assert np.abs(a).max() <= 1 / np.sqrt(hidden) and a.std() > 0
  assert not np.any(np.asarray(linear.lora_B.kernel.get_value()))


def test_seed_changes_a_and_each_layer_draws_its_own():
  one, _ = _with_adapters(seed=0)
  two, _ = _with_adapters(seed=1)
  get = lambda m, i: np.asarray(
      m.text_model.encoder.layers[i].self_attn.q_proj.lora_A.kernel.get_value())
  assert not np.array_equal(get(one, 0), get(two, 0))
  assert not np.array_equal(get(one, 0), get(one, 1))


def test_abstract_models_get_abstract_adapters():
  model = nnx.eval_shape(lambda: CLIPTextModel(
      CLIPTextModel.config_class.from_dict(presets.CLIP_TEXT),
      rngs=checkpoint.shape_only_rngs()))
  lora.add_adapters(model, TARGETS, rank=4, alpha=4.0)
  linear = model.text_model.encoder.layers[0].self_attn.q_proj
  assert isinstance(linear.lora_A.kernel.get_value(), jax.ShapeDtypeStruct)


def test_a_target_matching_no_linear_layer_is_a_one_line_error():
  with pytest.raises(UserError) as e:
    lora.add_adapters(_model(), (r"\.to_q$",), rank=4, alpha=4.0,
                      component="text_encoder")
  assert "'\\.to_q$'" in str(e.value) and "\n" not in str(e.value)
  assert "config.lora.text_encoder_targets" in str(e.value)
