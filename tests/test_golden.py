"""Golden values: the step-1 loss of every tiny recipe with its fixed seed.

A refactor that changes the maths (the noise, the data order, a loss term)
fails here loudly. The values were computed before the methods became values
the engine runs (issue 15), and the refactor kept them; the SDXL ones when
the methods first trained on SDXL (issue 17; tests/methods/test_sdxl.py
checks them against references).
"""

import jax
import pytest

from personalize_jax import methods
from personalize_jax.engine import config as config_lib
from personalize_jax.engine import state as state_lib, train

import recipes

# Seconds per recipe: each prepares its data and compiles its loss.
pytestmark = pytest.mark.slow

# recipe: {metric: value after step 1}, float32 on the CPU.
GOLDEN = {
    "dreambooth_tpu": {"loss": 3.253732919692993,
                       "loss/instance": 1.6549373865127563,
                       "loss/prior": 1.5987955331802368},
    "custom_diffusion_tpu": {"loss": 3.2076239585876465,
                             "loss/instance": 1.6333239078521729,
                             "loss/prior": 1.5743001699447632},
    "rpo_tpu": {"loss": 2.052119493484497,
                "loss/pref": 0.6931471824645996,
                "loss/sim": 1.3589723110198975},
    "lookforward_dreambooth_tpu": {"loss": 10.619841575622559,
                                   "loss/actor": 0.9913106560707092,
                                   "loss/critic": 6.374797344207764,
                                   "loss/instance": 1.6549373865127563,
                                   "loss/prior": 1.5987955331802368},
    "lookforward_custom_diffusion_tpu": {"loss": 10.43134880065918,
                                         "loss/actor": 0.9744345545768738,
                                         "loss/critic": 6.249289512634277,
                                         "loss/instance": 1.6333239078521729,
                                         "loss/prior": 1.5743001699447632},
    # On the tiny SDXL pipeline (issue 17): both text encoders' states, the
    # pooled text and each row's time ids condition the U-Net.
    "rpo_tpu:sdxl": {"loss": 1.9870784282684326,
                     "loss/pref": 0.6931472420692444,
                     "loss/sim": 1.293931245803833},
    "lookforward_dreambooth_tpu:sdxl": {"loss": 7.804656505584717,
                                        "loss/actor": 0.7495702505111694,
                                        "loss/critic": 4.344079971313477,
                                        "loss/instance": 1.3151745796203613,
                                        "loss/prior": 1.3958317041397095},
    "dino_reward_dreambooth_tpu:sdxl": {"loss": 2.8529679775238037,
                                        "loss/actor": 0.024932872503995895,
                                        "loss/critic": 0.1170293465256691,
                                        "loss/instance": 1.3151733875274658,
                                        "loss/prior": 1.3958323001861572},
    # The critic-free ablation (before issue 18 this recipe's default).
    "dino_reward_dreambooth_tpu:direct": {"loss": 3.4148168563842773,
                                   "loss/actor": 0.16108395159244537,
                                   "loss/instance": 1.6549373865127563,
                                   "loss/prior": 1.5987955331802368},
}


@pytest.mark.parametrize("recipe", sorted(GOLDEN))
def test_step_one_losses_are_pinned(recipe, tmp_path):
  name, _, variant = recipe.partition(":")
  config = recipes.load(name, ",".join(["tiny"] + ([variant] if variant
                                                     else [])))
  method = methods.get(config.method)
  config_lib.resolve(config, method)
  trainer = train.build_trainer(config, tmp_path, method)
  state = trainer.state
  batch = state_lib.shard_batch(trainer.method.batch(0), trainer.mesh)
  # Step 1's loss as the train step computes it (its key, its batch and the
  # state's parameters), without the gradients: the values were pinned from
  # the train step's metrics.
  loss, metrics = jax.jit(trainer.method.loss_fn)(
      state.params, trainer.frozen, batch,
      jax.random.fold_in(state.rng, state.step))
  got = {k: float(v) for k, v in jax.device_get(
      dict(metrics, loss=loss)).items() if k in GOLDEN[recipe]}
  # XLA's CPU code differs between processors (AVX2 or AVX-512 kernels
  # round sums differently) and between programs (with or without the
  # backward pass): the same step differs by a few 1e-6; a change of the
  # maths moves these values by far more.
  assert got == pytest.approx(GOLDEN[recipe], rel=2e-5, abs=0)
