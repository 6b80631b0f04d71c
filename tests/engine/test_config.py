"""Tests for the base config and its validation."""

import re
import sys
import types
from pathlib import Path

import pytest

from personalize_jax import methods
from personalize_jax.engine import config as config_lib
from personalize_jax.errors import UserError

import recipes


def _config(**overrides):
  """The tiny DreamBooth recipe with dotted-key ``overrides``."""
  return recipes.load("dreambooth_tpu", "tiny", **overrides)


@pytest.mark.parametrize("arg", [None, "tiny"])
def test_recipes_are_valid(arg):
  config_lib.validate(recipes.load("dreambooth_tpu", arg), num_devices=1)


def test_tiny_recipe_is_valid_on_eight_devices_with_a_divisible_batch():
  config_lib.validate(_config(batch_size=8, **{"mesh.fsdp": 4}),
                      num_devices=8)


def test_unknown_recipe_variant_is_refused():
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    recipes.load("dreambooth_tpu", "huge")


def test_every_base_field_has_a_comment():
  source = Path(config_lib.__file__).read_text()
  body = source[source.index("def base_config"):source.index("return c")]
  for line in body.splitlines():
    if re.match(r"\s+c\.[\w.]+ = (?!ml_collections)", line):
      assert "#" in line, line


@pytest.mark.parametrize("key, value", [
    ("num_steps", 0),
    ("num_steps", -5),
    ("num_steps", True),
    ("batch_size", 0),
    ("log_every_steps", 0),
    ("checkpoint_every_steps", -1),
    ("eval_every_steps", 0),
    ("keep_checkpoints", 0),
    ("data.resolution", 0),
    ("early_stopping_patience", -1),
    ("learning_rate", -1e-4),
    ("learning_rate", 0.0),
    ("mixed_precision", "fp8"),
    ("nan_policy", "ignore"),
    ("optimizer.schedule", "exponential"),
    ("model.attention_impl", "flash"),
    ("trainable", ["unet.("]),
    ("trainable", []),
    ("data.unique_token", " "),
    ("data.class_name", ""),
    ("data.instance_dir", "/does/not/exist"),
    ("mesh.data", 0),
    ("mesh.fsdp", -2),
    ("optimizer.b1", 1.0),
    ("optimizer.b2", -0.1),
    ("optimizer.eps", -1e-8),
    ("optimizer.weight_decay", -1.0),
    ("optimizer.clip_grad_norm", -1.0),
    ("optimizer.warmup_steps", 20),
    ("eval.num_inference_steps", 0),
    ("eval.seed", -1),
    ("eval.guidance_scale", -1.0),
    ("eval.prompts", []),
    ("data.min_image_side", 0),
    ("lora.rank", -1),
    ("lora.alpha", 0.0),
    ("lora.init", "zeros"),
    ("lora.unet_targets", ["to_q("]),
    ("lora.text_encoder_2_targets", ["q_proj("]),
    ("data.time_ids", "crop"),
    ("optimizer.name", "adam"),
    ("optimizer.power", 0.0),
    ("optimizer.momentum", 1.0),
    ("optimizer.momentum", -0.5),
    ("loss.snr_gamma", -5.0),
    ("loss.noise_offset", -0.1),
    ("ema.decay", 1.0),
    ("ema.decay", -0.5),
    ("ema.warmup", "linear"),
    ("ema.power", 0.0),
    ("gradient_accumulation_steps", 0),
    ("gradient_accumulation_steps", True),
    ("gradient_accumulation_steps", 2),  # batch_size 1 does not split in 2.
])
def test_bad_values_raise_one_line_naming_the_key(key, value):
  with pytest.raises(UserError) as error:
    config_lib.validate(_config(**{key: value}), num_devices=1)
  message = str(error.value)
  assert message.startswith(f"config.{key}=")
  assert len(message.splitlines()) == 1


@pytest.mark.parametrize("data, fsdp, devices", [
    (-1, -1, 8), (3, 1, 8), (2, 2, 8), (-1, 3, 8), (8, 1, 1),
])
def test_mesh_sizes_must_use_the_devices(data, fsdp, devices):
  config = _config(batch_size=8, **{"mesh.data": data, "mesh.fsdp": fsdp})
  with pytest.raises(UserError, match=r"^config\.mesh"):
    config_lib.validate(config, num_devices=devices)


def test_batch_must_divide_over_the_devices():
  with pytest.raises(UserError, match=r"^config\.batch_size=6 .*8 devices"):
    config_lib.validate(_config(batch_size=6), num_devices=8)


def test_an_existing_instance_folder_is_accepted(tmp_path):
  config_lib.validate(_config(**{"data.instance_dir": str(tmp_path)}),
                      num_devices=1)


def test_an_unknown_method_is_a_one_line_error():
  with pytest.raises(UserError, match=r"^config\.method='nope' is invalid: use "
                     "one of dreambooth, custom_diffusion, rpo, lookforward$"):
    methods.get("nope")


@pytest.mark.parametrize("recipe", ["dreambooth_tpu", "custom_diffusion_tpu",
                                    "rpo_tpu", "lookforward_dreambooth_tpu",
                                    "lookforward_custom_diffusion_tpu"])
def test_recipes_resolve_and_validate_with_their_method(recipe):
  config = recipes.load(recipe, "tiny")
  method = methods.get(config.method)
  config_lib.resolve(config, method)
  config_lib.validate(config, 1, method)
  assert isinstance(config.trainable, tuple)



# ------------------------------------------------------------------- LoRA

def _resolved(recipe="dreambooth_tpu", variant="tiny,lora", **overrides):
  config = recipes.load(recipe, variant, **overrides)
  method = methods.get(config.method)
  config_lib.resolve(config, method)
  config_lib.validate(config, 1, method)
  return config


def test_variants_combine_in_one_argument():
  config = recipes.load("dreambooth_tpu", "tiny,lora")
  assert config.model.pretrained == "tiny" and config.lora.rank == 4
  assert config.learning_rate == 1e-4
  assert recipes.load("rpo_tpu", "lora").lora.rank == 32
  assert recipes.load("dreambooth_tpu", "tiny").lora.rank == 0
  with pytest.raises(ValueError, match="unknown variant 'lora'"):
    recipes.load("custom_diffusion_tpu", "tiny,lora")


@pytest.mark.parametrize("train_text_encoder, components", [
    (None, ("unet",)), (False, ("unet",)), (True, ("unet", "text_encoder"))])
def test_lora_resolves_trainable_to_the_adapters_of_trained_components(
    train_text_encoder, components):
  config = _resolved(**{"dreambooth.train_text_encoder": train_text_encoder})
  assert config.trainable == tuple(
      rf"^{c}\..*\.lora_[AB]\.weight$" for c in components)
  assert tuple(config_lib.lora_targets(config)) == components
  # Resolving again changes nothing (a resumed run resolves its config too).
  again = config.copy_and_resolve_references()
  config_lib.resolve(again, methods.get(config.method))
  assert again.trainable == config.trainable


def test_full_fine_tuning_adapts_nothing():
  config = _resolved(variant="tiny")
  assert config_lib.lora_targets(config) == {}
  assert config.trainable == (r"^unet\.",)


def test_lora_alpha_defaults_to_the_rank():
  assert config_lib.lora_alpha(_resolved()) == 4.0
  assert config_lib.lora_alpha(_resolved(**{"lora.alpha": 16.0})) == 16.0


def test_lora_with_a_regex_for_part_of_a_component_is_a_one_line_error():
  with pytest.raises(UserError) as error:
    _resolved(trainable=(r"^unet\.down_blocks\.",))
  assert "'^unet\\.down_blocks\\.' selects part of a component" in str(
      error.value)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("recipe", ["custom_diffusion_tpu",
                                    "lookforward_custom_diffusion_tpu"])
def test_custom_diffusion_refuses_lora(recipe):
  with pytest.raises(UserError, match=r"^config\.lora\.rank=4 is invalid for "
                     "Custom Diffusion"):
    _resolved(recipe, "tiny", **{"lora.rank": 4})


# ------------------------------------------------------- training options


def test_training_options_are_valid_where_the_method_implements_them():
  config = _config(batch_size=4, gradient_accumulation_steps=2, **{
      "loss.snr_gamma": 5.0, "loss.noise_offset": 0.1,
      "optimizer.name": "lion", "optimizer.schedule": "polynomial",
      "ema.decay": 0.999})
  config_lib.validate(config, 2, methods.get("dreambooth"))


def test_accumulation_needs_micro_batches_that_split_over_the_devices():
  # 6 rows on 2 devices, but not 2 micro-batches of 2 devices' rows each.
  with pytest.raises(UserError, match=r"^config\.gradient_accumulation_steps="
                     r"2 is invalid: batch_size=6 .* 4 divides$"):
    config_lib.validate(_config(batch_size=6, gradient_accumulation_steps=2),
                        num_devices=2)


@pytest.mark.parametrize("recipe", ["custom_diffusion_tpu", "rpo_tpu",
                                    "lookforward_dreambooth_tpu"])
def test_every_method_takes_the_loss_options(recipe):
  config = recipes.load(recipe, "tiny", batch_size=2, **{
      "gradient_accumulation_steps": 2, "loss.snr_gamma": 5.0,
      "loss.noise_offset": 0.1})
  method = methods.get(config.method)
  config_lib.resolve(config, method)
  config_lib.validate(config, 1, method)


@pytest.mark.parametrize("key, value", [
    ("gradient_accumulation_steps", 2), ("loss.snr_gamma", 5.0),
    ("loss.noise_offset", 0.1)])
def test_a_method_that_does_not_implement_an_option_refuses_it(key, value):
  """A method module without ``TRAINING_OPTIONS`` (its randomness and loss
  its own) refuses them in one line."""
  config = recipes.load("dreambooth_tpu", "tiny", batch_size=2,
                        **{key: value})
  dreambooth = methods.get("dreambooth")
  method = types.SimpleNamespace(validate=dreambooth.validate)
  with pytest.raises(UserError) as error:
    config_lib.validate(config, 1, method)
  message = str(error.value)
  assert message.startswith(f"config.{key}={value!r} is invalid: method "
                            f"{config.method} does not implement it")
  assert "\n" not in message


def test_missing_wandb_is_a_one_line_error(monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now fails.
  config_lib.validate(_config(), num_devices=1)  # off: not needed.
  with pytest.raises(UserError) as error:
    config_lib.validate(_config(**{"log.wandb": True}), num_devices=1)
  assert str(error.value) == (
      "config.log.wandb=True is invalid: the wandb package is not installed: "
      'pip install -e ".[wandb]", or set log.wandb=false')


def test_wandb_on_is_valid_where_wandb_imports(monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", types.ModuleType("wandb"))
  config_lib.validate(_config(**{"log.wandb": True}), num_devices=1)
