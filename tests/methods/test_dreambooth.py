"""DreamBooth: its loss fits a batch, the prior term, and the data order."""

import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from personalize_jax.errors import UserError
from personalize_jax.methods import common, dreambooth
from personalize_jax.pipeline import load_stable_diffusion

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "configs"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import dreambooth_tpu  # pylint: disable=g-import-not-at-top,wrong-import-position
import helpers  # pylint: disable=g-import-not-at-top,wrong-import-position
import xla_env  # pylint: disable=g-import-not-at-top,wrong-import-position

PRIOR_WEIGHT = 0.5
NUM_CLASS_IMAGES = 3


def _config(class_dir: Path, **dreambooth_overrides):
  c = dreambooth_tpu.get_config("tiny")
  c.dreambooth.num_class_images = NUM_CLASS_IMAGES
  c.dreambooth.class_images_dir = str(class_dir)
  c.dreambooth.prior_loss_weight = PRIOR_WEIGHT
  for key, value in dreambooth_overrides.items():
    c.dreambooth[key] = value
  return c


def _method(config, workdir: Path, pipeline):
  """``(method, params, frozen, data)``: the built method and its data."""
  method, params, frozen = helpers.build(dreambooth, config, workdir, pipeline)
  data = dreambooth.prepare(helpers.context(config, workdir, pipeline),
                            text_trains=False)
  return method, params, frozen, data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  """A prepared method (5 demo photos with flips, 3 class images) and its twin.

  The class images are written beforehand so that nothing is generated.
  """
  tmp = tmp_path_factory.mktemp("dreambooth")
  class_dir = tmp / "class_images"
  class_dir.mkdir()
  rng = np.random.default_rng(0)
  for i in range(NUM_CLASS_IMAGES):
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(
        class_dir / f"class_{i:05d}.png")
  pipeline = load_stable_diffusion("tiny", attention_impl="xla")
  config = _config(class_dir)
  return {
      "method": _method(config, tmp / "run", pipeline),
      "twin": _method(_config(class_dir), tmp / "run", pipeline),
      "no_prior": _method(_config(class_dir, prior_preservation=False),
                          tmp / "no_prior", pipeline),
  }


@pytest.fixture(scope="module")
def overfit(setup):
  """Instance and prior losses over 20 Adam steps on one batch and one key."""
  method, params, frozen, _ = setup["method"]
  batch = method.batch(0)
  rng = jax.random.key(0)
  tx = optax.adam(1e-3)

  @jax.jit
  def step(params, opt_state):
    (loss, metrics), grads = jax.value_and_grad(method.loss_fn, has_aux=True)(
        params, frozen, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, dict(metrics,
                                                                 loss=loss)

  step = step.lower(params, tx.init(params)).compile(xla_env.FAST_COMPILE)
  opt_state, history = tx.init(params), []
  for _ in range(20):
    params, opt_state, metrics = step(params, opt_state)
    history.append({k: float(v) for k, v in metrics.items()})
  return history


def test_instance_loss_falls_when_fitting_one_batch(overfit):
  first, last = overfit[0]["loss/instance"], overfit[-1]["loss/instance"]
  assert np.isfinite(first) and first > 0
  assert last < 0.25 * first


def test_prior_loss_is_weighted_into_the_loss(overfit):
  for metrics in (overfit[0], overfit[-1]):
    assert metrics["loss/prior"] > 0
    assert metrics["loss"] == pytest.approx(
        metrics["loss/instance"] + PRIOR_WEIGHT * metrics["loss/prior"],
        rel=1e-6)


def test_without_prior_preservation_there_is_no_class_half(setup):
  method, params, frozen, _ = setup["no_prior"]
  batch = method.batch(0)
  assert set(batch) == {"instance_mean", "instance_std"}
  loss, metrics = jax.eval_shape(method.loss_fn, params, frozen, batch,
                                 jax.random.key(0))
  assert loss.shape == () and set(metrics) == {"loss/instance"}
  assert {"class_mean", "class_std"} <= set(setup["method"][0].batch(0))


def test_batch_is_a_pure_function_of_the_step(setup):
  method, twin = setup["method"][0], setup["twin"][0]
  for step in (0, 7, 123):
    a, b, c = method.batch(step), method.batch(step), twin.batch(step)
    assert a.keys() == b.keys() == c.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
      np.testing.assert_array_equal(a[key], c[key])
  assert not np.array_equal(method.batch(0)["instance_mean"],
                            method.batch(1)["instance_mean"])


def _row_index(rows: np.ndarray, row: np.ndarray) -> int:
  (index,) = [i for i in range(len(rows)) if np.array_equal(rows[i], row)]
  return index


def test_each_epoch_shows_every_photo_and_class_image_once(setup):
  method, _, _, data = setup["method"]
  means = data.instance["mean"]
  photos = len(means) // 2  # 5 photos, then their flips.
  assert photos == 5
  flipped = set()
  for epoch in range(3):
    seen = []
    for step in range(epoch * photos, (epoch + 1) * photos):
      index = _row_index(means, method.batch(step)["instance_mean"][0])
      seen.append(index % photos)
      flipped.add(index >= photos)
    assert sorted(seen) == list(range(photos)), epoch
  assert flipped == {False, True}
  classes = data.klass["mean"]
  for epoch in range(2):
    seen = [_row_index(classes, method.batch(step)["class_mean"][0])
            for step in range(epoch * NUM_CLASS_IMAGES,
                              (epoch + 1) * NUM_CLASS_IMAGES)]
    assert sorted(seen) == list(range(NUM_CLASS_IMAGES))


@pytest.mark.parametrize("batch_size, n", [(1, 4), (3, 4), (4, 10)])
def test_epoch_indices_are_permutations_across_batches(batch_size, n):
  steps = 3 * n  # positions for 3 * batch_size epochs.
  flat = np.concatenate([common.epoch_indices(0, s, batch_size, n)
                         for s in range(steps)])
  epochs = flat.reshape(-1, n)
  for order in epochs:
    assert sorted(order) == list(range(n))
  assert len({tuple(order) for order in epochs}) > 1  # reshuffled per epoch.


def test_loss_from_errors_weights_the_prior_half():
  err = np.array([1.0, 3.0, 10.0, 20.0], np.float32)
  loss, metrics = dreambooth.loss_from_errors(err, 2, prior_loss_weight=0.5)
  assert float(metrics["loss/instance"]) == 2.0
  assert float(metrics["loss/prior"]) == 15.0
  assert float(loss) == 2.0 + 0.5 * 15.0
  loss, metrics = dreambooth.loss_from_errors(err[:2], 2,
                                              prior_loss_weight=None,
                                              instance_loss_weight=3.0)
  assert float(loss) == 6.0 and set(metrics) == {"loss/instance"}


# ------------------------------------------------- what trains, end to end


@pytest.fixture(scope="module")
def text_encoder_run(tmp_path_factory):
  """Two steps with ``train_text_encoder`` true; the export and the base.

  (The switch off, exported byte for byte as the base: the one-device run of
  tests/engine/test_train.py.)
  """
  from personalize_jax.engine import metrics as metrics_lib, train  # pylint: disable=g-import-not-at-top
  from personalize_jax.models import checkpoint  # pylint: disable=g-import-not-at-top
  config = dreambooth_tpu.get_config("tiny")
  config.num_steps = 2
  config.learning_rate = 1e-3
  config.log_every_steps = 1
  config.dreambooth.prior_preservation = False
  config.dreambooth.train_text_encoder = True
  config.eval.prompts = ["a {token} {class_name}"]
  config.eval.num_inference_steps = 1
  workdir = tmp_path_factory.mktemp("text_encoder")
  train.train_and_evaluate(config, str(workdir), dreambooth)
  base = load_stable_diffusion("tiny", seed=0)
  export = load_stable_diffusion(workdir / "export")
  return {"trainable": tuple(config.trainable),
          "metrics": metrics_lib.read_metrics(workdir),
          **{kind: {name: checkpoint.module_tensors(getattr(pipe, name))
                    for name in ("unet", "text_encoder", "vae")}
             for kind, pipe in (("export", export), ("base", base))}}


def _changed(a: dict, b: dict) -> set:
  assert sorted(a) == sorted(b)
  return {k for k in a if not np.array_equal(a[k], b[k])}


def test_train_text_encoder_true_trains_and_exports_the_text_encoder(
    text_encoder_run):
  run, base = text_encoder_run, text_encoder_run["base"]
  assert run["trainable"] == (r"^unet\.", dreambooth.TEXT_ENCODER)
  assert _changed(run["export"]["text_encoder"], base["text_encoder"])
  assert _changed(run["export"]["unet"], base["unet"])
  assert not _changed(run["export"]["vae"], base["vae"])
  logged = [r for r in run["metrics"] if "loss" in r]
  assert logged and all(r["update_norm/text_encoder"] > 0
                        and r["update_norm/unet"] > 0 for r in logged)


def test_the_switch_adds_or_removes_its_regex_and_none_leaves_it():
  config = dreambooth_tpu.get_config("tiny")
  config.trainable = (r"^unet\.", dreambooth.TEXT_ENCODER)
  config.dreambooth.train_text_encoder = None
  dreambooth.resolve(config)
  assert config.trainable == (r"^unet\.", dreambooth.TEXT_ENCODER)
  config.dreambooth.train_text_encoder = False
  dreambooth.resolve(config)
  assert config.trainable == (r"^unet\.",)
  config.dreambooth.train_text_encoder = True
  dreambooth.resolve(config)
  dreambooth.resolve(config)  # idempotent
  assert config.trainable == (r"^unet\.", dreambooth.TEXT_ENCODER)


@pytest.mark.parametrize("key,value,match", [
    ("num_class_images", -1, "num_class_images=-1"),
    ("num_class_images", 0, "num_class_images=0"),
    ("class_inference_steps", 0, "class_inference_steps=0"),
    ("prior_loss_weight", -0.5, "prior_loss_weight=-0.5"),
    ("class_prompt", " ", "class_prompt"),
])
def test_bad_dreambooth_values_are_one_line_errors(key, value, match):
  config = dreambooth_tpu.get_config("tiny")
  config.dreambooth[key] = value
  with pytest.raises(UserError, match=match):
    dreambooth.validate(config)
