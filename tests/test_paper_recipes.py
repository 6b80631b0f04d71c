"""The recipes that reproduce a paper: configs/rpo_paper.py, Look Forward's
``released`` variant and the DINO-reward row. Configs only: nothing trains
here."""

import re

import pytest

from personalize_jax import methods
from personalize_jax.engine import config as config_lib
from personalize_jax.methods import common, rpo

import recipes


def _validated(config, num_devices=1):
  method = methods.get(config.method)
  config_lib.resolve(config, method)
  config_lib.validate(config, num_devices, method)
  return config


# -------------------------------------------------------------- RPO paper

def test_rpo_paper_recipe_has_the_papers_settings():
  c = recipes.load("rpo_paper", None)
  assert c.method == "rpo"
  assert c.rpo.reward_model == "align"
  assert c.model.pretrained == "stabilityai/stable-diffusion-2-1"
  assert c.data.resolution == 512
  assert c.batch_size == 1
  assert c.learning_rate == 5e-6
  assert c.num_steps == 400
  assert c.rpo.lambda_val == 0.5
  assert c.rpo.ref_prompt == "instance"  # the code's L_pre reference prompt
  assert c.eval_every_steps == 40
  assert c.rpo.val_on_training_prompts  # as the authors' code validates
  assert c.lora.rank == 0


def test_rpo_paper_recipe_validates_on_one_device():
  # Batch 1 needs a single device; the full recipe's config checks pass.
  _validated(recipes.load("rpo_paper", None), num_devices=1)


def test_rpo_paper_tiny_keeps_the_align_family_and_validates():
  c = _validated(recipes.load("rpo_paper", "tiny"))
  assert c.model.pretrained == "tiny"
  assert c.rpo.reward_model == "align-tiny"
  assert c.rpo.val_on_training_prompts
  assert c.rpo.lambda_val == 0.5


def test_rpo_paper_tiny_lora_validates():
  c = _validated(recipes.load("rpo_paper", "tiny,lora"))
  assert c.lora.rank == 32 and c.learning_rate == 1e-4
  assert all("lora_" in pattern for pattern in c.trainable)


def _table_rows(doc):
  """The body rows of the docstring's markdown table (no header, no rule)."""
  rows = [line for line in doc.splitlines() if line.startswith("|")]
  return [row for row in rows[2:] if not re.fullmatch(r"[|\- ]+", row)]


@pytest.mark.parametrize("recipe", ["rpo_paper", "lookforward_dreambooth_tpu",
                                    "dino_reward_dreambooth_tpu"])
def test_paper_recipe_docstring_names_a_switch_on_each_difference(recipe):
  module = config_lib.load_recipe(recipes.REPO / "configs" / f"{recipe}.py")
  rows = _table_rows(module.__doc__)
  assert rows, f"{recipe}.py's docstring has no table of differences"
  for row in rows:
    switch = row.strip("|").split("|")[-1]
    assert "--config." in switch, row
    # Every switch names a key the recipe has.
    for key in re.findall(r"--config\.([\w.]+)=", switch):
      config = module.get_config()
      for part in key.split("."):
        assert part in config, (recipe, key)
        config = config[part]


@pytest.mark.parametrize("class_name, live_set", [("dog", True),
                                                   ("backpack", False)])
def test_rpo_paper_validates_on_the_subjects_own_training_prompts(
    class_name, live_set):
  c = recipes.load("rpo_paper", None, **{"data.class_name": class_name})
  prompts = rpo.validation_prompts(c)
  assert prompts == rpo.training_prompts(c)
  templates = c.rpo.live_prompts if live_set else c.rpo.object_prompts
  assert prompts == common.format_prompts(c, templates)
  assert all(class_name in prompt for prompt in prompts)


def test_rpo_validates_on_held_out_prompts_by_default():
  c = recipes.load("rpo_tpu", None)
  assert not c.rpo.val_on_training_prompts
  assert not set(rpo.validation_prompts(c)) & set(rpo.training_prompts(c))


# ------------------------------------------------------ Look Forward released

def test_lookforward_released_sets_the_public_codes_values_only():
  default = recipes.load("lookforward_dreambooth_tpu", None).to_dict()
  released = recipes.load("lookforward_dreambooth_tpu", "released").to_dict()
  assert released["lookforward"]["instance_loss_weight"] == 0.0
  assert released["lookforward"]["critic_clip_grad_norm"] == 0.0
  assert default["lookforward"]["instance_loss_weight"] == 1.0
  assert default["lookforward"]["critic_clip_grad_norm"] == 1.0
  for key in ("instance_loss_weight", "critic_clip_grad_norm"):
    del default["lookforward"][key], released["lookforward"][key]
  assert released == default


@pytest.mark.parametrize("variant", ["tiny,released", "released,tiny",
                                     "tiny,lora,released"])
def test_lookforward_released_combines_with_the_other_variants(variant):
  names = config_lib.variants(variant)
  base = recipes.load("lookforward_dreambooth_tpu",
                      ",".join(n for n in names if n != "released"))
  c = _validated(recipes.load("lookforward_dreambooth_tpu", variant))
  assert c.model.pretrained == "tiny"
  assert c.lookforward.instance_loss_weight == 0.0
  assert c.lookforward.critic_clip_grad_norm == 0.0
  _validated(base)
  expected = base.to_dict()
  expected["lookforward"].update(instance_loss_weight=0.0,
                                 critic_clip_grad_norm=0.0)
  assert c.to_dict() == expected


def test_lookforward_unknown_variant_is_still_refused():
  with pytest.raises(ValueError, match="unknown variant 'huge'"):
    recipes.load("lookforward_dreambooth_tpu", "released,huge")


# ---------------------------------------------------------- DINO reward

@pytest.mark.parametrize("variant", [None, "tiny", "tiny,lora",
                                     "tiny,released"])
def test_dino_reward_recipe_is_the_papers_form_through_a_critic(variant):
  """Table 1's DINO-reward row: the DINO reward learnt by a Q-network, with
  DreamBooth's epsilon-losses; otherwise Look Forward's recipe."""
  c = recipes.load("dino_reward_dreambooth_tpu", variant)
  lookforward = recipes.load("lookforward_dreambooth_tpu", variant)
  assert c.lookforward.reward == "dino" and c.lookforward.critic
  assert c.lookforward.instance_loss_weight == (
      0.0 if variant and "released" in variant else 1.0)
  expected = lookforward.to_dict()
  expected["lookforward"]["reward"] = "dino"
  assert c.to_dict() == expected
  if variant:
    _validated(c)


@pytest.mark.parametrize("variant", ["direct", "tiny,direct", "direct,tiny"])
def test_dino_reward_direct_variant_drops_only_the_critic(variant):
  c = recipes.load("dino_reward_dreambooth_tpu", variant)
  paper = recipes.load("dino_reward_dreambooth_tpu", ",".join(
      n for n in config_lib.variants(variant) if n != "direct") or None)
  assert not c.lookforward.critic
  expected = paper.to_dict()
  expected["lookforward"]["critic"] = False
  assert c.to_dict() == expected
