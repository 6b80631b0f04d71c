"""The methods on Stable Diffusion XL: each row's conditioning, and LoRA.

SDXL conditions its U-Net on the text states of both encoders, the pooled
text of the second and six time ids per image (its original size, the crop's
top-left corner, the target size). Training rows carry the time ids of their
own image, as diffusers' ``train_dreambooth_lora_sdxl.py`` computes them.
The tiny SDXL pipeline (``tiny-sdxl``) stands in for SDXL base 1.0.
"""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from personalize_jax import diffusion, sdxl
from personalize_jax.data import images as images_lib
from personalize_jax.methods import common, dreambooth
from personalize_jax.pipeline import load_stable_diffusion

sys.path.insert(0, str(Path(__file__).resolve().parent))
import helpers  # pylint: disable=g-import-not-at-top,wrong-import-position
import recipes  # pylint: disable=g-import-not-at-top,wrong-import-position

RESOLUTION = 64
# Photos of three shapes (h, w) and their rows of time ids at 64 px, written
# out by hand from the script's arithmetic: the shorter side resized to 64
# (the other truncated), the crop centred with Python's round, flipped copies
# cropped from the mirrored photo (their left edge measured from the other
# side).
PHOTOS = {(80, 64): [80, 64, 8, 0, 64, 64],   # tall: (64, 80), top 8.
          (64, 97): [64, 97, 0, 16, 64, 64],  # wide: (97, 64), round(16.5).
          (64, 64): [64, 64, 0, 0, 64, 64]}
FLIPPED = {(80, 64): [80, 64, 8, 0, 64, 64],
           (64, 97): [64, 97, 0, 17, 64, 64],  # 97 - 16 - 64.
           (64, 64): [64, 64, 0, 0, 64, 64]}


@pytest.mark.parametrize("shape", sorted(PHOTOS))
def test_crop_geometry_is_what_the_pixels_are(shape):
  rng = np.random.default_rng(0)
  photo = rng.integers(0, 256, shape + (3,), np.uint8)
  h, w, top, left = images_lib.crop_geometry(photo, RESOLUTION)
  assert [h, w, top, left, RESOLUTION, RESOLUTION] == PHOTOS[shape]
  _, _, _, flipped_left = images_lib.crop_geometry(photo, RESOLUTION,
                                                   flipped=True)
  assert flipped_left == FLIPPED[shape][3]
  # The pixels are those windows of the resized photo and of its mirror.
  resized_w = max(RESOLUTION, int(RESOLUTION * shape[1] / shape[0]))
  resized_h = max(RESOLUTION, int(RESOLUTION * shape[0] / shape[1]))
  resized = np.asarray(Image.fromarray(photo).resize(
      (resized_w, resized_h), Image.Resampling.BILINEAR), np.float32)
  pixels = images_lib.preprocess(photo, RESOLUTION)
  window = resized[top:top + RESOLUTION, left:left + RESOLUTION]
  np.testing.assert_array_equal(pixels, window / 127.5 - 1.0)
  mirror = resized[:, ::-1]
  np.testing.assert_array_equal(
      images_lib.flip(pixels),
      mirror[top:top + RESOLUTION, flipped_left:flipped_left + RESOLUTION]
      / 127.5 - 1.0)


def test_a_squashed_photo_has_no_crop():
  photo = np.zeros((80, 97, 3), np.uint8)
  assert images_lib.crop_geometry(photo, RESOLUTION, center_crop=False,
                                  flipped=True) == (80, 97, 0, 0)


@pytest.fixture(scope="module")
def dreambooth_sdxl(tmp_path_factory):
  """DreamBooth on tiny SDXL: photos of three shapes, two class images."""
  tmp = tmp_path_factory.mktemp("sdxl_dreambooth")
  rng = np.random.default_rng(1)
  photos, class_dir = tmp / "photos", tmp / "class_images"
  photos.mkdir()
  class_dir.mkdir()
  for i, shape in enumerate(sorted(PHOTOS)):
    Image.fromarray(rng.integers(0, 256, shape + (3,), np.uint8)).save(
        photos / f"{i}.png")
  for i in range(2):
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(
        class_dir / f"class_{i:05d}.png")
  config = recipes.load("dreambooth_tpu", "sdxl,tiny", **{
      "data.instance_dir": str(photos), "data.min_image_side": 64,
      "dreambooth.class_images_dir": str(class_dir),
      "dreambooth.num_class_images": 2, "batch_size": 3})
  pipeline = load_stable_diffusion(config.model.pretrained)
  method, params, frozen = helpers.build(dreambooth, config, tmp / "run",
                                         pipeline)
  return config, pipeline, method, params, frozen


def test_the_sdxl_variant_trains_the_tiny_sdxl_pipeline(dreambooth_sdxl):
  config, pipeline, *_ = dreambooth_sdxl
  assert config.model.pretrained == "tiny-sdxl" and pipeline.is_sdxl
  full = recipes.load("dreambooth_tpu", "sdxl")
  assert full.model.pretrained == "stabilityai/stable-diffusion-xl-base-1.0"
  assert full.data.resolution == 1024 and full.model.remat
  assert recipes.load("rpo_tpu", "sdxl,lora").lora.rank == 32


def test_each_training_row_carries_its_images_time_ids(dreambooth_sdxl):
  config, _, method, *_ = dreambooth_sdxl
  # Photos load in file order (sorted shapes); flipped copies follow them.
  table = ([PHOTOS[s] for s in sorted(PHOTOS)]
           + [FLIPPED[s] for s in sorted(PHOTOS)])
  data = dreambooth.prepare(helpers.context(
      config, Path(config.dreambooth.class_images_dir).parent / "run",
      dreambooth_sdxl[1]), text_trains=False)
  seen = set()
  for step in range(4):
    batch = method.batch(step)
    mean = batch["instance_mean"]
    for row in range(len(mean)):
      index = int(np.flatnonzero(
          (data.instance["mean"] == mean[row]).all(axis=(1, 2, 3)))[0])
      np.testing.assert_array_equal(batch["instance_time_ids"][row],
                                    table[index])
      seen.add(index)
    np.testing.assert_array_equal(batch["class_time_ids"],
                                  [[64, 64, 0, 0, 64, 64]] * len(mean))
  assert len(seen) > 3  # flipped copies too


def test_square_time_ids_are_the_rpo_authors_ones(dreambooth_sdxl):
  config, *_ = dreambooth_sdxl
  photos = [np.zeros(shape + (3,), np.uint8) for shape in sorted(PHOTOS)]
  square = recipes.override(config.copy_and_resolve_references(),
                            {"data.time_ids": "square"})
  np.testing.assert_array_equal(
      common.time_ids(square, photos, flips=True),
      [[64, 64, 0, 0, 64, 64]] * 6)
  np.testing.assert_array_equal(
      common.time_ids(config, photos, flips=True),
      [PHOTOS[s] for s in sorted(PHOTOS)] + [FLIPPED[s]
                                             for s in sorted(PHOTOS)])


def test_the_loss_is_the_unets_error_under_each_rows_conditioning(
    dreambooth_sdxl):
  config, pipeline, method, params, frozen = dreambooth_sdxl
  batch = method.batch(0)
  rng = jax.random.key(3)
  loss, metrics = method.loss_fn(params, frozen, batch, rng)
  # The same step written out with the pipeline's own encoder and U-Net.
  bs = config.batch_size
  latent_rng, noise_rng = jax.random.split(rng)
  latents = common.sample_latents(
      np.concatenate([batch["instance_mean"], batch["class_mean"]]),
      np.concatenate([batch["instance_std"], batch["class_std"]]), latent_rng,
      pipeline.vae.scaling_factor)
  noise, t = diffusion.draw_noise(pipeline.schedule, noise_rng, latents.shape)
  states, pooled = diffusion.encode_prompts(
      pipeline, ["a photo of sks mug", "a photo of mug"])
  prompt = np.array([0] * bs + [1] * bs)
  time_ids = np.concatenate([batch["instance_time_ids"],
                             batch["class_time_ids"]])

  def error(ids):
    pred = pipeline.unet(pipeline.schedule.add_noise(latents, noise, t), t,
                         states[prompt], text_embeds=pooled[prompt],
                         time_ids=ids)
    return diffusion.per_sample_error(
        pred, pipeline.schedule.training_target(latents, noise, t))

  err = error(time_ids)
  np.testing.assert_allclose(metrics["loss/instance"], jnp.mean(err[:bs]),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["loss/prior"], jnp.mean(err[bs:]),
                             rtol=1e-5)
  np.testing.assert_allclose(loss, jnp.mean(err[:bs]) + jnp.mean(err[bs:]),
                             rtol=1e-5)
  # The time ids reach the U-Net: the squares' ids give other errors.
  square = np.tile(sdxl.time_ids(RESOLUTION), (2 * bs, 1))
  assert not np.allclose(error(square)[:bs], err[:bs], rtol=1e-4)


def test_look_forward_on_sdxl_has_dreamboths_losses_beside_its_critic(
    dreambooth_sdxl, tmp_path):
  """Look Forward (critic, TD target, both text encoders training) on the
  same SDXL rows: its DreamBooth terms are DreamBooth's, to round-off."""
  from personalize_jax.methods import lookforward  # pylint: disable=g-import-not-at-top
  config, _, method, params, frozen = dreambooth_sdxl
  lf_config = recipes.load("lookforward_dreambooth_tpu", "sdxl,tiny", **{
      "data.instance_dir": config.data.instance_dir,
      "data.min_image_side": 64,
      "dreambooth.class_images_dir": config.dreambooth.class_images_dir,
      "dreambooth.num_class_images": 2, "batch_size": config.batch_size})
  lf, lf_params, lf_frozen = helpers.build(
      lookforward, lf_config, tmp_path / "run",
      load_stable_diffusion(lf_config.model.pretrained))
  assert {"text_encoder", "text_encoder_2", "qnetwork"} <= set(lf_params)
  batch, rng = method.batch(0), jax.random.key(5)
  np.testing.assert_array_equal(lf.batch(0)["instance_time_ids"],
                                batch["instance_time_ids"])
  _, metrics = jax.jit(lf.loss_fn)(lf_params, lf_frozen, batch, rng)
  _, want = jax.jit(method.loss_fn)(params, frozen, batch, rng)
  for key in ("loss/instance", "loss/prior"):
    np.testing.assert_allclose(metrics[key], want[key], rtol=1e-5)
  assert all(np.isfinite(metrics[k]) and metrics[k] != 0
             for k in ("loss/critic", "loss/actor", "q/mean"))


def test_rpo_on_sdxl_pairs_carry_their_images_time_ids(dreambooth_sdxl,
                                                      tmp_path):
  """RPO's references carry their photos' time ids, its negatives the
  square's; at step 0 (the trained U-Net is the base) L_pre is ln 2."""
  from personalize_jax.methods import rpo  # pylint: disable=g-import-not-at-top
  config = dreambooth_sdxl[0]
  rpo_config = recipes.load("rpo_tpu", "sdxl,tiny", **{
      "data.instance_dir": config.data.instance_dir,
      "data.min_image_side": 64, "data.random_flip": False,
      "batch_size": 3})
  method, params, frozen = helpers.build(
      rpo, rpo_config, tmp_path / "run",
      load_stable_diffusion(rpo_config.model.pretrained))
  photos = [PHOTOS[s] for s in sorted(PHOTOS)]
  batch = method.batch(0)
  ref_rows = [photos.index(list(r)) for r in batch["ref_time_ids"]]
  np.testing.assert_array_equal(batch["gen_time_ids"],
                                [[64, 64, 0, 0, 64, 64]] * 3)
  loss = jax.jit(method.loss_fn)
  _, metrics = loss(params, frozen, batch, jax.random.key(0))
  np.testing.assert_allclose(metrics["loss/pref"], np.log(2.0), rtol=1e-6)
  # The references' time ids reach the U-Net.
  square = dict(batch, ref_time_ids=batch["gen_time_ids"])
  _, other = loss(params, frozen, square, jax.random.key(0))
  assert any(r != photos.index([64, 64, 0, 0, 64, 64]) for r in ref_rows)
  assert not np.isclose(other["loss/sim"], metrics["loss/sim"], rtol=1e-5)


# ------------------------------------------------- a LoRA run, in diffusers


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """Two steps of DreamBooth-LoRA on tiny SDXL, both text encoders too."""
  from personalize_jax.engine import metrics as metrics_lib, train  # pylint: disable=g-import-not-at-top
  config = recipes.load("dreambooth_tpu", "sdxl,tiny,lora", **{
      "num_steps": 2, "learning_rate": 1e-2, "log_every_steps": 1,
      "dreambooth.prior_preservation": False,
      "dreambooth.train_text_encoder": True,
      "eval.prompts": ["a {token} {class_name}"],
      "eval.num_inference_steps": 1})
  workdir = tmp_path_factory.mktemp("sdxl_lora")
  train.train_and_evaluate(config, str(workdir), dreambooth)
  return config, workdir, metrics_lib.read_metrics(workdir)


@pytest.mark.slow
def test_every_text_encoder_and_the_unet_train_their_adapters(lora_run):
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  config, workdir, metrics = lora_run
  assert config.trainable == tuple(
      rf"^{c}\..*\.lora_[AB]\.weight$"
      for c in ("unet", "text_encoder", "text_encoder_2"))
  tensors = load_file(workdir / "export" / "pytorch_lora_weights.safetensors")
  # B starts at zero: a B that is not zero trained. SDXL reads the first
  # encoder's penultimate states, so its last layer gets no gradient (as in
  # diffusers) and keeps B at zero; every other adapted layer moves.
  last = "text_encoder.encoder.layers.1."
  for component in ("unet", "text_encoder", "text_encoder_2"):
    ups = {k: v for k, v in tensors.items()
           if k.startswith(component + ".") and k.endswith("lora_B.weight")}
    assert ups, component
    for key, up in ups.items():
      assert np.any(up) != key.startswith(last), key
  # Named as transformers 5 names the modules: CLIPTextModel has no tower,
  # CLIPTextModelWithProjection keeps ``text_model``.
  assert not any(k.startswith("text_encoder.text_model.") for k in tensors)
  assert all(k.startswith("text_encoder_2.text_model.encoder.")
             for k in tensors if k.startswith("text_encoder_2."))
  logged = [r for r in metrics if "loss" in r]
  assert logged and all(r[f"update_norm/{c}"] > 0 for r in logged
                        for c in ("unet", "text_encoder", "text_encoder_2"))


@pytest.mark.slow
def test_the_lora_loads_in_diffusers_sdxl_pipeline_and_computes_ours(
    lora_run, tmp_path):
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from personalize_jax import pipeline as pipeline_lib  # pylint: disable=g-import-not-at-top
  _, workdir, _ = lora_run
  load_stable_diffusion("tiny-sdxl").save_pretrained(tmp_path / "base")
  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(tmp_path / "base")
  pipe.load_lora_weights(workdir / "export")
  # Ours: the base with the exported LoRA fused as it loads.
  ours = pipeline_lib.load_export(workdir / "export")
  assert ours.is_sdxl
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  states = rng.standard_normal((2, 77, 64)).astype(np.float32)
  pooled = rng.standard_normal((2, 32)).astype(np.float32)
  time_ids = np.array([[80, 64, 8, 0, 64, 64], [64, 97, 0, 17, 64, 64]],
                      np.float32)
  t = np.asarray([10, 700])
  prompts = ["a photo of sks mug", "a sks mug on the beach"]

  @torch.no_grad()
  def diffusers_outputs():
    """The U-Net's output and the prompts' states and pooled text."""
    unet = pipe.unet(
        torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t),
        torch.from_numpy(states), added_cond_kwargs={
            "text_embeds": torch.from_numpy(pooled),
            "time_ids": torch.from_numpy(time_ids)}
    ).sample.permute(0, 2, 3, 1).numpy()
    text_states, _, text_pooled, _ = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=False)
    return unet, text_states.numpy(), text_pooled.numpy()

  theirs, their_states, their_pooled = diffusers_outputs()
  mine = np.asarray(ours.unet(x, t, states, text_embeds=pooled,
                              time_ids=time_ids))
  rel = lambda a, b: np.abs(a - np.asarray(b)).max() / np.abs(b).max()
  assert rel(mine, theirs) < 1e-4
  my_states, my_pooled = diffusion.encode_prompts(ours, prompts)
  assert rel(np.asarray(my_states), their_states) < 1e-4
  assert rel(np.asarray(my_pooled), their_pooled) < 1e-4
  # The LoRA matters in each model: without it diffusers computes otherwise.
  pipe.unload_lora_weights()
  base, base_states, base_pooled = diffusers_outputs()
  assert rel(mine, base) > 1e-3
  # The first encoder's half of the states, and the second's pooled text.
  assert rel(np.asarray(my_states)[..., :32], base_states[..., :32]) > 1e-3
  assert rel(np.asarray(my_pooled), base_pooled) > 1e-3


# ------------------------------------- Custom Diffusion: the token in both


@pytest.fixture(scope="module")
def custom_diffusion_run(tmp_path_factory):
  """Two steps of Custom Diffusion on tiny SDXL; the base's tensors."""
  from personalize_jax.engine import train  # pylint: disable=g-import-not-at-top
  from personalize_jax.methods import custom_diffusion  # pylint: disable=g-import-not-at-top
  from personalize_jax.models import checkpoint  # pylint: disable=g-import-not-at-top
  config = recipes.load("custom_diffusion_tpu", "sdxl,tiny", **{
      "num_steps": 2, "learning_rate": 1e-3,
      "dreambooth.prior_preservation": False,
      "eval.prompts": ["a {token} {class_name}"],
      "eval.num_inference_steps": 1})
  workdir = tmp_path_factory.mktemp("sdxl_custom_diffusion")
  train.train_and_evaluate(config, str(workdir), custom_diffusion)
  base = load_stable_diffusion("tiny-sdxl", seed=config.seed)
  return config, workdir / "export", {
      name: checkpoint.module_tensors(getattr(base, name))
      for name in ("unet", "vae", "text_encoder", "text_encoder_2")}


@pytest.mark.slow
def test_custom_diffusion_trains_kv_and_the_new_row_of_both_tables(
    custom_diffusion_run):
  from personalize_jax.methods import custom_diffusion  # pylint: disable=g-import-not-at-top
  from personalize_jax.models import checkpoint  # pylint: disable=g-import-not-at-top
  config, export, before = custom_diffusion_run
  assert config.trainable == (*custom_diffusion.TRAINABLE,
                              custom_diffusion.TRAINABLE_2)
  ours = load_stable_diffusion(export)
  table = "text_model.embeddings.token_embedding.weight"
  for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
    after = checkpoint.module_tensors(getattr(ours, name))
    assert sorted(after) == sorted(before[name]), name
    moved = {k for k in after if after[k].shape != before[name][k].shape
             or not np.array_equal(after[k], before[name][k])}
    if name == "unet":
      assert moved and all(".attn2.to_k." in k or ".attn2.to_v." in k
                           for k in moved)
      assert len(moved) == len([k for k in after
                                if ".attn2.to_k." in k or ".attn2.to_v." in k])
    elif name == "vae":
      assert not moved
    else:  # one row more, the only one that moved (despite weight decay)
      assert moved == {table}, name
      new, old = after[table], before[name][table]
      assert new.shape[0] == old.shape[0] + 1
      np.testing.assert_array_equal(new[:-1], old)
      assert getattr(ours, "tokenizer" + name[len("text_encoder"):]
                     ).convert_tokens_to_ids("<new1>") == old.shape[0]


@pytest.mark.slow
def test_custom_diffusion_export_loads_in_diffusers_sdxl_pipeline(
    custom_diffusion_run):
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  _, export, _ = custom_diffusion_run
  pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(export)
  prompts = ["a photo of a <new1> mug"]
  with torch.no_grad():
    states, _, pooled, _ = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=False)
  ours = load_stable_diffusion(export)
  my_states, my_pooled = diffusion.encode_prompts(ours, prompts)
  np.testing.assert_allclose(my_states, states.numpy(), atol=1e-5)
  np.testing.assert_allclose(my_pooled, pooled.numpy(), atol=1e-5)
  # The new token is one token in both tokenizers.
  for tokenizer in (pipe.tokenizer, pipe.tokenizer_2):
    assert len(tokenizer.tokenize("<new1>")) == 1


def test_custom_diffusions_config_check_reads_the_pipelines_own_tokenizers():
  """The tokenizers Custom Diffusion checks its tokens with are the ones the
  run will load: SDXL's second pads with "!"."""
  from personalize_jax.methods import custom_diffusion  # pylint: disable=g-import-not-at-top
  pipe = load_stable_diffusion("tiny-sdxl")
  checked = custom_diffusion.base_tokenizers(
      recipes.load("custom_diffusion_tpu", "sdxl,tiny"))
  assert [t.pad_token for t in checked] == [
      pipe.tokenizer.pad_token, pipe.tokenizer_2.pad_token]
  assert checked[1].pad_token == "!" != checked[0].pad_token
  assert [len(t) for t in checked] == [len(pipe.tokenizer),
                                       len(pipe.tokenizer_2)]
