"""The U-Net port against diffusers' PyTorch UNet2DConditionModel."""

import json
import re

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from flax import nnx

from personalize_jax.errors import CheckpointError, UserError
from personalize_jax.models import checkpoint, presets
from personalize_jax.models.unet import (UNet2DConditionConfig,
                                         UNet2DConditionModel)

import torch_reference

# Parameters of the published U-Nets (presets.PUBLISHED holds their configs).
PUBLISHED_PARAMS = {
    "CompVis/stable-diffusion-v1-4": 859_520_964,
    "stable-diffusion-v1-5/stable-diffusion-v1-5": 859_520_964,
    "stabilityai/stable-diffusion-2-1-base": 865_910_724,
    "stabilityai/stable-diffusion-2-1": 865_910_724,
    "stabilityai/stable-diffusion-xl-base-1.0": 2_567_463_684,
}

# SD 1.x style: conv projections, one head count; odd flags to test them too.
SD1_TINY = dict(
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[16, 32], layers_per_block=1, attention_head_dim=4,
    cross_attention_dim=32, norm_num_groups=8, sample_size=8,
    downsample_padding=0, center_input_sample=True)

# SD 2.x style: per-block heads, linear projections, upcast, 3 resolutions.
# Per-block lists differ between mirrored blocks, so a wrong reversal shows.
SD2_TINY = dict(
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[16, 32, 32], layers_per_block=[2, 1, 1],
    attention_head_dim=[2, 4, 8], cross_attention_dim=24, norm_num_groups=4,
    use_linear_projection=True, upcast_attention=True, flip_sin_to_cos=False,
    freq_shift=1, transformer_layers_per_block=[1, 1, 2], norm_eps=1e-6,
    mid_block_scale_factor=2.0, sample_size=8)

# (config, latent size, timesteps, with gradients): 10x10 latents exercise
# diffusers' odd-size upsampling (10 -> 5 -> 3 -> 5 -> 10). The gradient case
# is built with remat=True, which must not change values.
CASES = {"sd1": (SD1_TINY, 8, 999, True),
         "sd2": (SD2_TINY, 10, [10.5, 700.0], False)}


def _torch_unet(config, seed=0):
  torch.manual_seed(seed)
  model = diffusers.UNet2DConditionModel(**config).eval()
  with torch.no_grad():  # norms and biases start at 1/0: move them
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.2 * torch.randn_like(p))
  return model


def _torch_forward(model, x_bhwc, t, context):
  t = torch.tensor(t, dtype=torch.float32 if isinstance(t, list) else None)
  out = model(torch.from_numpy(x_bhwc).permute(0, 3, 1, 2), t,
              torch.from_numpy(context)).sample
  return out.permute(0, 2, 3, 1)


def _forward(model, x, t, context):
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, *args: nnx.merge(graphdef, state)(*args),
               compiler_options=torch_reference.FAST_COMPILE)
  return fn(state, jnp.asarray(x), jnp.asarray(t), jnp.asarray(context))


def _forward_and_grads(model, x, t, context, target):
  """The prediction and d mean((pred - target)^2) / d params, in one compile."""
  graphdef, params = nnx.split(model, nnx.Param)

  def loss_fn(params):
    pred = nnx.merge(graphdef, params)(x, t, context)
    return jnp.mean((pred - target) ** 2), pred

  fn = jax.jit(jax.grad(loss_fn, has_aux=True), compiler_options=torch_reference.FAST_COMPILE)
  traced = fn.trace(params)
  grads, pred = traced.lower().compile()(params)
  return pred, grads, str(traced.jaxpr)


class _Cases:
  """Each case built on first use: diffusers model, its folder, our outputs."""

  def __init__(self, tmp_path_factory):
    self._tmp = tmp_path_factory
    self._built = {}

  def __getitem__(self, name):
    if name not in self._built:
      self._built[name] = self._build(name)
    return self._built[name]

  def _build(self, name):
    config, size, t, with_grads = CASES[name]
    torch_model = _torch_unet(config)
    folder = self._tmp.mktemp(name)
    torch_model.save_pretrained(folder)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, size, size, 4)).astype(np.float32)
    context = rng.normal(size=(2, 5, config["cross_attention_dim"])).astype(
        np.float32)
    target = rng.normal(size=x.shape).astype(np.float32)
    ours = UNet2DConditionModel.from_pretrained(folder, remat=with_grads)
    case = dict(config=config, torch_model=torch_model, folder=folder, x=x,
                t=t, context=context, target=target, ours=ours)
    if with_grads:
      out, case["grads"], case["jaxpr"] = _forward_and_grads(
          ours, x, jnp.asarray(t), context, target)
    else:
      out = _forward(ours, x, t, context)
    case["out"] = np.asarray(out)
    with torch.no_grad():
      case["ref"] = _torch_forward(torch_model, x, t, context).numpy()
    return case


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
  return _Cases(tmp_path_factory)


@pytest.mark.parametrize("name", sorted(CASES))
def test_forward_matches_diffusers(cases, name):
  case = cases[name]
  assert case["out"].shape == case["ref"].shape
  assert torch_reference.rel_err(case["out"], case["ref"]) < 1e-4


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_pretrained_loads_in_diffusers(cases, name, tmp_path):
  case = cases[name]
  case["ours"].save_pretrained(tmp_path)
  back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
  assert sorted(checkpoint.module_tensors(case["ours"])) == sorted(
      back.state_dict())
  with torch.no_grad():
    ref = _torch_forward(back, case["x"], case["t"], case["context"]).numpy()
  assert torch_reference.rel_err(case["out"], ref) < 1e-4


def test_gradients_match_torch_autograd_with_remat(cases):
  case = cases["sd1"]
  # remat=True reached jax.checkpoint (named remat2 or checkpoint by version).
  assert re.search(r"\b(remat\w*|checkpoint)\[", case["jaxpr"])
  torch_model = case["torch_model"]
  torch_model.zero_grad()
  pred = _torch_forward(torch_model, case["x"], case["t"], case["context"])
  torch.mean((pred - torch.from_numpy(case["target"])) ** 2).backward()
  torch_reference.assert_grads_match(case["grads"], torch_model, tol=1e-3)


def test_bf16_compute_is_close_to_fp32(cases):
  case = cases["sd1"]
  model = UNet2DConditionModel.from_pretrained(case["folder"],
                                               dtype=jnp.bfloat16)
  kernel = model.conv_in.kernel.get_value()
  assert kernel.dtype == jnp.float32  # stored in param_dtype
  out = _forward(model, case["x"], case["t"], case["context"])
  assert out.dtype == jnp.bfloat16  # returned in the compute dtype
  assert 1e-4 < torch_reference.rel_err(out, case["ref"]) < 5e-2
  stored = UNet2DConditionModel.from_pretrained(
      case["folder"], param_dtype=jnp.bfloat16)
  assert stored.conv_in.kernel.get_value().dtype == jnp.bfloat16


def _diffusers_count(config):
  config = {k: v for k, v in config.items() if not k.startswith("_")}
  with torch.device("meta"):
    model = diffusers.UNet2DConditionModel(**config)
  return sum(p.numel() for p in model.parameters())


def _abstract(config):
  return nnx.eval_shape(lambda: UNet2DConditionModel(
      UNet2DConditionConfig.from_dict(config), rngs=checkpoint.shape_only_rngs()))


def test_tiny_preset_builds_and_runs():
  model = UNet2DConditionModel.from_pretrained(presets.TINY, seed=3)
  assert model.config == UNet2DConditionConfig.from_dict(presets.UNET)
  assert checkpoint.count_params(model) == _diffusers_count(presets.UNET)
  out = jax.eval_shape(model, jax.ShapeDtypeStruct((3, 8, 8, 4), jnp.float32),
                       jnp.zeros((3,), jnp.int32),
                       jax.ShapeDtypeStruct((3, 7, 32), jnp.float32))
  assert (out.shape, out.dtype) == ((3, 8, 8, 4), jnp.float32)


@pytest.mark.parametrize("name", sorted(presets.PUBLISHED))
def test_published_parameter_counts(name):
  """``presets.PUBLISHED`` (used by the abstract benchmarks) builds each U-Net
  diffusers builds from the same config.json values."""
  config = presets.PUBLISHED[name]["unet"]
  count = checkpoint.count_params(_abstract(config))
  assert count == _diffusers_count(config) == PUBLISHED_PARAMS[name]


def test_missing_key_is_a_one_line_checkpoint_error(tmp_path):
  torch_model = diffusers.UNet2DConditionModel(**SD1_TINY)
  state = dict(torch_model.state_dict())
  key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  del state[key]
  safetensors.torch.save_file(state, tmp_path / checkpoint.DIFFUSERS_WEIGHTS)
  (tmp_path / "config.json").write_text(json.dumps(SD1_TINY))
  with pytest.raises(CheckpointError) as info:
    UNet2DConditionModel.from_pretrained(tmp_path)
  assert f"missing key {key!r}" in str(info.value)
  assert "\n" not in str(info.value)


def test_unsupported_config_is_a_user_error():
  with pytest.raises(UserError, match="addition_embed_type='text_time'"):
    UNet2DConditionConfig.from_dict(dict(SD1_TINY,
                                         addition_embed_type="text_time"))
  with pytest.raises(UserError, match="attention_head_dim must be"):
    UNet2DConditionConfig.from_dict(dict(SD1_TINY, attention_head_dim=[4]))
  config = UNet2DConditionConfig.from_dict(
      dict(SD1_TINY, only_cross_attention=[False, False], _version="x"))
  assert config.to_dict()["attention_head_dim"] == 4


def test_remat_works_on_a_frozen_model_called_inside_grad():
  """RPO's frozen base U-Net is merged in the step and called inside grad."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 8, 8, 4)), jnp.float32)
  context = jnp.asarray(rng.standard_normal((2, 77, 32)), jnp.float32)
  t = jnp.asarray([10, 500])
  grads = {}
  for remat in (False, True):
    graphdef, state = nnx.split(
        UNet2DConditionModel.from_pretrained("tiny", remat=remat, seed=0))

    @jax.jit
    def input_grad(state, x):
      frozen = nnx.merge(graphdef, state)  # outside the grad trace
      return jax.grad(lambda x: jnp.sum(frozen(x, t, context) ** 2))(x)

    grads[remat] = np.asarray(input_grad(state, x))
  assert np.abs(grads[False]).max() > 0
  np.testing.assert_allclose(grads[True], grads[False], rtol=1e-4,
                             atol=1e-6 * np.abs(grads[False]).max())
