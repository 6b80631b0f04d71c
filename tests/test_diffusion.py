"""The noise schedule and DDIM sampling against diffusers' schedulers."""

import json
import types

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from personalize_jax import diffusion
from personalize_jax.errors import UserError
from personalize_jax.models import presets

# SD 1.x (the preset), SD 2.x-v style, and the plain DDPM defaults.
SD1 = dict(presets.SCHEDULER)
SD2_V = dict(SD1, prediction_type="v_prediction", set_alpha_to_one=True,
             steps_offset=0)
DDPM = {"beta_schedule": "linear", "clip_sample": False}


def _rel(a, b):
  return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def _both(config):
  return (diffusion.NoiseSchedule.from_config(config),
          diffusers.DDIMScheduler.from_config(config))


@pytest.mark.parametrize("config", [
    SD1, SD2_V, DDPM, dict(SD1, beta_schedule="squaredcos_cap_v2"),
    dict(SD1, rescale_betas_zero_snr=True, timestep_spacing="trailing")])
def test_schedule_and_timesteps_match_diffusers(config):
  ours, ref = _both(config)
  np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(),
                             rtol=5e-5, atol=1e-7)
  for spacing in diffusion.TIMESTEP_SPACINGS:
    ours, ref = _both(dict(config, timestep_spacing=spacing))
    for n in (1, 7, 10, 50, 1000):
      ref.set_timesteps(n)
      np.testing.assert_array_equal(ours.ddim_timesteps(n),
                                    ref.timesteps.numpy())


def test_add_noise_and_training_target_match_ddpm():
  rng = np.random.default_rng(0)
  x0, noise = rng.normal(size=(2, 2, 5, 8, 3)).astype(np.float32)
  t = np.array([3, 870])
  config = dict(SD1, prediction_type="v_prediction")
  ours = diffusion.NoiseSchedule.from_config(config)
  ref = diffusers.DDPMScheduler.from_config(config)
  x0_t, noise_t, t_t = (torch.from_numpy(a) for a in (x0, noise, t))
  noisy = ours.add_noise(jnp.asarray(x0), jnp.asarray(noise), jnp.asarray(t))
  assert _rel(noisy, ref.add_noise(x0_t, noise_t, t_t).numpy()) < 1e-5
  assert _rel(ours.training_target(x0, noise, t),
              ref.get_velocity(x0_t, noise_t, t_t).numpy()) < 1e-5
  eps = diffusion.NoiseSchedule.from_config(SD1)
  np.testing.assert_array_equal(eps.training_target(x0, noise, t), noise)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_and_ddim_step_match_ddim_step(prediction_type):
  ours, ref = _both(dict(SD1, prediction_type=prediction_type))
  ref.set_timesteps(10)
  rng = np.random.default_rng(1)
  x_t, out = rng.normal(size=(2, 2, 4, 3, 5)).astype(np.float32)
  for t in (901, 1):  # a noisy step and the last one (prev_t < 0)
    step = ref.step(torch.from_numpy(out), t, torch.from_numpy(x_t))
    x0 = ours.predict_x0(x_t, out, t)
    assert _rel(x0, step.pred_original_sample.numpy()) < 1e-5
    x_prev, x0_step = ours.ddim_step(x_t, out, t, 10)
    assert _rel(x_prev, step.prev_sample.numpy()) < 1e-5
    np.testing.assert_array_equal(x0, x0_step)
  # Per-example timesteps give each example its own coefficients.
  batch = ours.predict_x0(x_t, out, jnp.array([901, 1]))
  for i, t in enumerate((901, 1)):
    np.testing.assert_allclose(batch[i], ours.predict_x0(x_t, out, t)[i],
                               rtol=1e-6)


# A deterministic stand-in for the U-Net, written twice: a fixed channel mix of
# the latents plus functions of t and of the text embedding.
_MIX = np.random.default_rng(2).normal(size=(4, 4)).astype(np.float32) * 0.3


def _jax_denoiser(x_bhwc, t_b, emb_btd):
  t = t_b.astype(jnp.float32)[:, None, None, None]
  return (x_bhwc @ _MIX + 0.1 * jnp.cos(t / 100.0)
          + emb_btd.mean(axis=(1, 2))[:, None, None, None])


def _torch_denoiser(x_bchw, t, emb_btd):
  mixed = torch.einsum("bchw,cd->bdhw", x_bchw, torch.from_numpy(_MIX))
  return (mixed + 0.1 * torch.cos(torch.tensor(float(t)) / 100.0)
          + emb_btd.mean(dim=(1, 2))[:, None, None, None])


def _inputs(seed=3):
  rng = np.random.default_rng(seed)
  latents = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  cond = rng.normal(size=(2, 5, 6)).astype(np.float32)
  uncond = rng.normal(size=(1, 5, 6)).astype(np.float32)
  return latents, cond, uncond


def _diffusers_sample(config, latents, cond, uncond, steps, guidance,
                      eta=0.0, noises=None):
  """The StableDiffusionPipeline denoising loop with a DDIMScheduler."""
  scheduler = diffusers.DDIMScheduler.from_config(config)
  scheduler.set_timesteps(steps)
  x = torch.from_numpy(latents).permute(0, 3, 1, 2)
  emb = torch.cat([torch.from_numpy(uncond).expand(len(cond), -1, -1),
                   torch.from_numpy(cond)])
  for i, t in enumerate(scheduler.timesteps):
    out_uncond, out_cond = _torch_denoiser(torch.cat([x, x]), t, emb).chunk(2)
    out = out_uncond + guidance * (out_cond - out_uncond)
    noise = None if noises is None else noises[i].permute(0, 3, 1, 2)
    x = scheduler.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
  return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("config, guidance", [
    (SD1, 7.5),
    (SD1, 1.0),
    (dict(SD1, timestep_spacing="trailing"), 7.5),
    (dict(SD1, timestep_spacing="linspace"), 7.5),
    (SD2_V, 7.5),
    (dict(SD2_V, timestep_spacing="trailing", rescale_betas_zero_snr=True),
     5.0),
])
def test_ddim_trajectory_matches_diffusers(config, guidance):
  latents, cond, uncond = _inputs()
  schedule = diffusion.NoiseSchedule.from_config(config)
  ours = diffusion.ddim_sample(_jax_denoiser, schedule, jnp.asarray(latents),
                               jnp.asarray(cond), jnp.asarray(uncond), 10,
                               guidance)
  ref = _diffusers_sample(config, latents, cond, uncond, 10, guidance)
  assert ours.shape == latents.shape and ours.dtype == jnp.float32
  assert _rel(ours, ref) < 1e-3


def test_eta_noise_is_deterministic_and_matches_diffusers():
  latents, cond, uncond = _inputs()
  schedule = diffusion.NoiseSchedule.from_config(SD1)
  rng = jax.random.key(7)
  args = (_jax_denoiser, schedule, latents, cond, uncond, 10, 7.5)
  first = diffusion.ddim_sample(*args, eta=1.0, rng=rng)
  np.testing.assert_array_equal(first,
                                diffusion.ddim_sample(*args, eta=1.0, rng=rng))
  assert _rel(first, diffusion.ddim_sample(*args)) > 1e-2
  # Step i draws its noise from fold_in(rng, i): feed diffusers the same noise.
  noises = [torch.from_numpy(np.array(jax.random.normal(
      jax.random.fold_in(rng, i), latents.shape))) for i in range(10)]
  ref = _diffusers_sample(SD1, latents, cond, uncond, 10, 7.5, eta=1.0,
                          noises=noises)
  assert _rel(first, ref) < 1e-3
  with pytest.raises(ValueError, match="rng"):
    diffusion.ddim_sample(*args, eta=0.5)


def test_ddim_with_a_tiny_unet_matches_diffusers(tmp_path):
  # Imported here so that the rest of this file does not depend on the U-Net.
  from personalize_jax.models import unet  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  torch_unet = diffusers.UNet2DConditionModel.from_config({
      "sample_size": 4, "block_out_channels": [8, 16], "layers_per_block": 1,
      "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
      "attention_head_dim": 2, "cross_attention_dim": 6,
      "norm_num_groups": 4}).eval()
  with torch.no_grad():  # norms start at identity, biases at zero: perturb all
    for p in torch_unet.parameters():
      p.add_(0.1 * torch.randn_like(p))
  torch_unet.save_pretrained(tmp_path)
  _, cond, uncond = _inputs()
  latents = np.random.default_rng(4).normal(size=(2, 4, 4, 4))
  latents = latents.astype(np.float32)
  ours = diffusion.ddim_sample(
      unet.UNet2DConditionModel.from_pretrained(tmp_path),
      diffusion.NoiseSchedule.from_config(SD1), latents, cond, uncond, 10, 7.5)

  scheduler = diffusers.DDIMScheduler.from_config(SD1)
  scheduler.set_timesteps(10)
  x = torch.from_numpy(latents).permute(0, 3, 1, 2)
  emb = torch.cat([torch.from_numpy(uncond).expand(2, -1, -1),
                   torch.from_numpy(cond)])
  with torch.no_grad():
    for t in scheduler.timesteps:
      out = torch_unet(torch.cat([x, x]), t, emb).sample
      out_uncond, out_cond = out.chunk(2)
      out = out_uncond + 7.5 * (out_cond - out_uncond)
      x = scheduler.step(out, t, x).prev_sample
  assert _rel(ours, x.permute(0, 2, 3, 1).numpy()) < 1e-3


class _ModuleDenoiser(nnx.Module):

  def __init__(self, rngs):
    self.proj = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, x_bhwc, t_b, emb_btd):
    return _jax_denoiser(self.proj(x_bhwc), t_b, emb_btd)


def test_nnx_module_is_traced_not_baked_in():
  latents, cond, _ = _inputs()
  schedule = diffusion.NoiseSchedule.from_config(SD1)
  run = lambda unet: diffusion.ddim_sample(unet, schedule, latents, cond, None,
                                           4, 1.0)
  first = _ModuleDenoiser(nnx.Rngs(0))
  out = run(first)
  np.testing.assert_allclose(out, run(lambda *a: first(*a)), rtol=1e-5)
  loop = diffusion._ddim_loop  # pylint: disable=protected-access
  compiled = loop._cache_size()  # pylint: disable=protected-access
  other = run(_ModuleDenoiser(nnx.Rngs(1)))  # new weights, same structure
  assert loop._cache_size() == compiled  # pylint: disable=protected-access
  assert _rel(other, np.asarray(out)) > 1e-3


def test_schedule_is_a_pytree_usable_under_jit():
  schedule = diffusion.NoiseSchedule.from_pretrained(presets.TINY)
  leaves, _ = jax.tree.flatten(schedule)
  assert len(leaves) == 1
  x0 = jnp.ones((2, 2, 2, 4))

  @jax.jit
  def look_forward(s, noise, t):
    return s.predict_x0(s.add_noise(x0, noise, t), noise, t)

  recovered = look_forward(schedule, x0 * 0.5, jnp.array([5, 999]))
  np.testing.assert_allclose(recovered, x0, rtol=1e-4)
  t = schedule.sample_timesteps(jax.random.key(0), 64)
  assert t.shape == (64,) and 0 <= int(t.min()) and int(t.max()) < 1000


def test_save_pretrained_loads_in_diffusers_and_back(tmp_path):
  schedule = diffusion.NoiseSchedule.from_pretrained(presets.TINY)
  schedule.save_pretrained(tmp_path / "scheduler")
  ref = diffusers.DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
  for key, value in presets.SCHEDULER.items():
    if not key.startswith("_"):
      assert ref.config[key] == value, key
  back = diffusion.NoiseSchedule.from_pretrained(tmp_path)
  assert back.config == schedule.config
  # An SD 1.4-style PNDM config reads as DDIMScheduler.from_config reads it.
  pndm = dict(SD1, _class_name="PNDMScheduler", skip_prk_steps=True,
              trained_betas=None)
  (tmp_path / "pndm").mkdir()
  (tmp_path / "pndm" / diffusion.SCHEDULER_CONFIG).write_text(json.dumps(pndm))
  assert diffusion.NoiseSchedule.from_pretrained(tmp_path, "pndm").config == (
      schedule.config)


@pytest.mark.parametrize("config, message", [
    ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
    ({"prediction_type": "flow"}, "prediction_type='flow'"),
    ({"timestep_spacing": "karras"}, "timestep_spacing='karras'"),
    ({"thresholding": True}, "thresholding"),
])
def test_bad_configs_are_one_line_errors(config, message):
  with pytest.raises(UserError, match=message) as info:
    diffusion.NoiseSchedule.from_config(config)
  assert "\n" not in str(info.value)
  with pytest.raises(UserError, match="num_inference_steps=0"):
    diffusion.NoiseSchedule.from_config(SD1).ddim_timesteps(0)


# ------------------------------------------- training draws and loss weights


def _training_draw(rng, shape):
  """What ``draw_noise`` drew before it had options: the reference."""
  noise_rng, t_rng = jax.random.split(rng)
  return (jax.random.normal(noise_rng, shape, jnp.float32),
          jax.random.randint(t_rng, (shape[0],), 0, 1000))


def test_draw_noise_rows_are_the_rows_of_the_whole_steps_draw():
  schedule = diffusion.NoiseSchedule.from_config(SD1)
  rng, shape = jax.random.key(7), (6, 4, 4, 3)
  noise, t = diffusion.draw_noise(schedule, rng, shape)
  want_noise, want_t = _training_draw(rng, shape)
  np.testing.assert_array_equal(noise, want_noise)
  np.testing.assert_array_equal(t, want_t)
  # Rows 4, 1 of the 6-row draw, asked for as a 2-row micro-batch.
  index = jnp.asarray([4, 1])
  part, part_t = diffusion.draw_noise(schedule, rng, (2, 4, 4, 3),
                                      rows=(index, 6))
  np.testing.assert_array_equal(part, want_noise[np.array([4, 1])])
  np.testing.assert_array_equal(part_t, want_t[np.array([4, 1])])


def test_noise_offset_is_diffusers_per_row_and_channel_shift():
  # diffusers: noise = randn_like(latents) + noise_offset * randn(b, c, 1, 1);
  # NHWC here, so the shift is (b, 1, 1, c) and the rest of the draw stays.
  schedule = diffusion.NoiseSchedule.from_config(SD1)
  rng, shape, offset = jax.random.key(3), (5, 4, 6, 3), 0.1
  plain, t = diffusion.draw_noise(schedule, rng, shape)
  noise, t_offset = diffusion.draw_noise(schedule, rng, shape,
                                         noise_offset=offset)
  shift = np.asarray(jax.random.normal(
      jax.random.fold_in(rng, diffusion.NOISE_OFFSET_STREAM), (5, 1, 1, 3)))
  np.testing.assert_allclose(noise, np.asarray(plain) + offset * shift,
                             rtol=0, atol=1e-7)
  np.testing.assert_array_equal(t_offset, t)
  # Row-keyed like the rest: rows of a micro-batch shift as in the step.
  part, _ = diffusion.draw_noise(schedule, rng, (2, 4, 6, 3),
                                 rows=(jnp.asarray([3, 0]), 5),
                                 noise_offset=offset)
  np.testing.assert_array_equal(part, np.asarray(noise)[[3, 0]])


@pytest.mark.parametrize("config", [SD1, SD2_V, DDPM])
def test_snr_is_diffusers_compute_snr(config):
  from diffusers import training_utils  # pylint: disable=g-import-not-at-top
  schedule = diffusion.NoiseSchedule.from_config(config)
  t = np.array([0, 1, 17, 500, 998, 999])
  reference = types.SimpleNamespace(
      alphas_cumprod=torch.from_numpy(np.array(schedule.alphas_cumprod)))
  np.testing.assert_allclose(
      diffusion.snr(schedule, jnp.asarray(t)),
      training_utils.compute_snr(reference, torch.from_numpy(t)).numpy(),
      rtol=1e-6)


@pytest.mark.parametrize("prediction_type", diffusion.PREDICTION_TYPES)
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weights_are_the_papers_formulas(prediction_type, gamma):
  # Hang et al. 2023 as diffusers' --snr_gamma (and kohya's min_snr_gamma):
  # min(snr, gamma) / snr for epsilon, min(snr, gamma) / (snr + 1) for v,
  # and min(snr, gamma) for x0 targets.
  schedule = diffusion.NoiseSchedule.from_config(
      dict(SD1, prediction_type=prediction_type))
  t = np.arange(0, 1000, 37)
  a = np.asarray(schedule.alphas_cumprod, np.float64)[t]
  snr = a / (1 - a)
  divisor = {"epsilon": snr, "v_prediction": snr + 1,
             "sample": np.ones_like(snr)}[prediction_type]
  want = np.minimum(snr, gamma) / divisor
  got = diffusion.min_snr_weight(schedule, jnp.asarray(t), gamma)
  np.testing.assert_allclose(got, want, rtol=2e-5)
  if prediction_type == "epsilon":  # low noise is weighted down, high kept.
    assert got[0] < 0.01 and got[-1] == 1.0


def test_denoising_error_with_snr_gamma_weights_each_row():
  schedule = diffusion.NoiseSchedule.from_config(SD1)
  rng = np.random.default_rng(1)
  latents, noise = (jnp.asarray(rng.normal(size=(3, 2, 2, 4)), jnp.float32)
                    for _ in range(2))
  t = jnp.asarray([5, 400, 990])
  unet = lambda x, t, emb: 0.5 * x  # any prediction, the same in both.
  plain = diffusion.denoising_error(unet, schedule, latents, noise, t, None)
  weighted = diffusion.denoising_error(unet, schedule, latents, noise, t,
                                       None, snr_gamma=5.0)
  np.testing.assert_allclose(
      weighted, np.asarray(plain) * np.asarray(
          diffusion.min_snr_weight(schedule, t, 5.0)), rtol=1e-6)
  assert not np.allclose(weighted, plain)
