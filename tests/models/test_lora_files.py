"""LoRA files (diffusers/PEFT, older diffusers, kohya-ss) fused into our models.

Each style is checked against diffusers loading the same file into the same
tiny pipeline (``load_lora_weights``): U-Net outputs and text-encoder hidden
states, and every fused weight.
"""

import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from personalize_jax.errors import CheckpointError, UserError
from personalize_jax.models import checkpoint, lora_files
from personalize_jax.pipeline import load_stable_diffusion

import torch_reference

TOL = 1e-4
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
# Conv layers of the tiny U-Net that kohya's file adapts too: a 1x1 (proj_in,
# SD 1.x style) and a 3x3 (LoCon), each with its own alpha.
KOHYA_CONVS = {"down_blocks.0.attentions.0.proj_in": (32, 1, 6.0),
               "down_blocks.0.resnets.0.conv1": (32, 3, 4.0)}
KOHYA_ALPHAS = {"unet": 2.0, "text_encoder": 3.0}



@functools.partial(jax.jit, static_argnums=0, compiler_options=torch_reference.FAST_COMPILE)
def _apply(graphdef, state, *args):
  return nnx.merge(graphdef, state)(*args)


def _run(model, *args):
  """``model(*args)``, compiled once per model structure."""
  graphdef, state = nnx.split(model)
  return np.asarray(_apply(graphdef, state, *map(jnp.asarray, args)))


_RNG = np.random.default_rng(0)
LATENTS_BHWC = _RNG.normal(size=(2, 8, 8, 4)).astype(np.float32)
TIMESTEP = 500
CONTEXT_BTD = _RNG.normal(size=(2, 5, 32)).astype(np.float32)
INPUT_IDS_BT = _RNG.integers(0, 49406, size=(2, 7)).astype(np.int32)


def _ours(pipe):
  """Our U-Net output (NHWC) and text-encoder hidden states."""
  return (_run(pipe.unet, LATENTS_BHWC, np.int32(TIMESTEP), CONTEXT_BTD),
          _run(pipe.text_encoder, INPUT_IDS_BT))


def _theirs(folder, lora_path):
  """diffusers with ``lora_path`` loaded: outputs, then its fused weights."""
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
  pipe.load_lora_weights(str(lora_path))
  with torch.no_grad():
    unet = pipe.unet(
        torch.from_numpy(LATENTS_BHWC).permute(0, 3, 1, 2),
        torch.tensor(TIMESTEP), torch.from_numpy(CONTEXT_BTD)
    ).sample.permute(0, 2, 3, 1)
    text = pipe.text_encoder(
        torch.from_numpy(INPUT_IDS_BT).long()).last_hidden_state
  pipe.fuse_lora()
  pipe.unload_lora_weights()  # keeps the fused weights, drops the adapters
  weights = {f"unet.{k}": v.numpy() for k, v in pipe.unet.state_dict().items()}
  weights.update({f"text_encoder.text_model.{k}": v.numpy()
                  for k, v in pipe.text_encoder.state_dict().items()})
  return unet.numpy(), text.numpy(), weights


def _tensors(pipe):
  """Our fused weights in PyTorch layout, keyed as ``_theirs`` keys them."""
  out = {f"unet.{k}": v
         for k, v in checkpoint.module_tensors(pipe.unet).items()}
  out.update({f"text_encoder.{k}": v
              for k, v in checkpoint.module_tensors(pipe.text_encoder).items()})
  return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
  """A tiny diffusers pipeline folder, and our outputs without a LoRA."""
  folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
  torch_reference.tiny_pipeline(folder)
  ours = load_stable_diffusion(folder)
  return dict(folder=folder, tensors=_tensors(ours),
              outputs=_ours(ours))


@pytest.fixture(scope="module")
def peft_lora(base, tmp_path_factory):
  """A PEFT LoRA (random, non-zero B) saved by diffusers with its metadata.

  The U-Net's config has rank and alpha patterns, so its scale differs by
  module (8/4 by default, 2/4 on ``to_k``, 8/2 on the rank-2 ``to_v``).
  """
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(base["folder"])
  torch.manual_seed(1)
  configs = {
      "unet": LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian",
                         target_modules=UNET_TARGETS, alpha_pattern={"to_k": 2},
                         rank_pattern={"to_v": 2}),
      "text_encoder": LoraConfig(r=4, lora_alpha=2,
                                 init_lora_weights="gaussian",
                                 target_modules=TEXT_TARGETS)}
  layers, metadata = {}, {}
  for component, config in configs.items():
    model = getattr(pipe, component)
    model.add_adapter(config)
    with torch.no_grad():  # B starts at zero: make the LoRA do something
      for name, p in model.named_parameters():
        if "lora_B" in name:
          p.normal_(0.0, 0.2)
    layers[component] = get_peft_model_state_dict(model)
    metadata[component] = model.peft_config["default"].to_dict()
  folder = tmp_path_factory.mktemp("peft-lora")
  diffusers.StableDiffusionPipeline.save_lora_weights(
      folder, unet_lora_layers=layers["unet"],
      text_encoder_lora_layers=layers["text_encoder"],
      unet_lora_adapter_metadata=metadata["unet"],
      text_encoder_lora_adapter_metadata=metadata["text_encoder"])
  return folder


def _factors(lora_dir):
  """``{component: {module as in the file: (down, up)}}`` of a PEFT file."""
  tensors = safetensors.numpy.load_file(
      lora_dir / lora_files.LORA_WEIGHTS_NAME)
  out = {}
  for key, value in tensors.items():
    component, _, rest = key.partition(".")
    module, _, factor = rest.rpartition(".lora_")
    pair = out.setdefault(component, {}).setdefault(module, [None, None])
    pair["AB".index(factor[0])] = value
  return out


@pytest.fixture(scope="module")
def kohya_lora(peft_lora, tmp_path_factory):
  """The PEFT LoRA in kohya's keys, plus two conv layers (1x1 and 3x3).

  Returns the file and ``{our torch module path: (down, up, scale)}``.
  """
  rng = np.random.default_rng(2)
  tensors, expected = {}, {}

  def add(prefix, module, down, up, alpha):
    name = f"{prefix}_{module.replace('.', '_')}"
    tensors[f"{name}.lora_down.weight"] = down
    tensors[f"{name}.lora_up.weight"] = up
    tensors[f"{name}.alpha"] = np.array(alpha, np.float16)
    expected[module] = (down, up, alpha / down.shape[0])

  for module, (down, up) in _factors(peft_lora)["unet"].items():
    add("lora_unet", module, down, up, KOHYA_ALPHAS["unet"])
  for module, (down, up) in _factors(peft_lora)["text_encoder"].items():
    add("lora_te", "text_model." + module, down, up,
        KOHYA_ALPHAS["text_encoder"])
  for module, (channels, size, alpha) in KOHYA_CONVS.items():
    add("lora_unet", module,
        rng.normal(0, 0.3, (4, channels, size, size)).astype(np.float32),
        rng.normal(0, 0.3, (channels, 4, 1, 1)).astype(np.float32), alpha)
  path = tmp_path_factory.mktemp("kohya") / "my_lora.safetensors"
  safetensors.numpy.save_file(tensors, path)
  return path, expected


# Older diffusers names of the adapted modules' last parts.
_OLD_UNET_PROCESSORS = {".to_q": ".processor.to_q_lora",
                        ".to_k": ".processor.to_k_lora",
                        ".to_v": ".processor.to_v_lora",
                        ".to_out.0": ".processor.to_out_lora"}
# diffusers tells the text encoder's old keys by ``to_out_lora``, so it is one.
_OLD_TEXT_PROCESSORS = {".q_proj": ".to_q_lora", ".k_proj": ".to_k_lora",
                        ".out_proj": ".to_out_lora"}


def _old_name(component, module):
  """An older diffusers key stem for ``module``, varying the style by layer."""
  if component == "unet" and ".attn1." in module:
    for ending, old in _OLD_UNET_PROCESSORS.items():
      if module.endswith(ending):
        return f"unet.{module.removesuffix(ending)}{old}"
  if component == "unet":
    return f"unet.{module}.lora"
  for ending, old in _OLD_TEXT_PROCESSORS.items():
    if module.endswith(ending):
      return f"text_encoder.text_model.{module.removesuffix(ending)}{old}"
  return f"text_encoder.text_model.{module}.lora_linear_layer"


@pytest.fixture(scope="module")
def old_lora(peft_lora, tmp_path_factory):
  """The PEFT LoRA in older diffusers keys (no alphas: every scale is 1).

  Covers attention processors (``attn1.processor.to_q_lora``,
  ``self_attn.to_q_lora``), ``.lora.down``, ``.lora_linear_layer.down`` and
  text-encoder keys with the ``text_model.`` prefix. Returns the file and
  ``{our torch module path: (down, up, scale)}``.
  """
  tensors, expected = {}, {}
  for component, layers in _factors(peft_lora).items():
    for module, (down, up) in layers.items():
      stem = _old_name(component, module)
      tensors[f"{stem}.down.weight"] = down
      tensors[f"{stem}.up.weight"] = up
      ours = module if component == "unet" else f"text_model.{module}"
      expected[ours] = (down, up, 1.0)
  path = tmp_path_factory.mktemp("old") / "old_lora.safetensors"
  safetensors.numpy.save_file(tensors, path)
  return path, expected


def _assert_matches_diffusers(base, lora_path, ours):
  unet, text, weights = _theirs(base["folder"], lora_path)
  our_unet, our_text = _ours(ours)
  assert torch_reference.rel_err(our_unet, unet) < TOL
  assert torch_reference.rel_err(our_text, text) < TOL
  # The LoRA changed both models, so the checks above are not vacuous.
  assert torch_reference.rel_err(base["outputs"][0], unet) > 1e-3
  assert torch_reference.rel_err(base["outputs"][1], text) > 1e-3
  tensors = _tensors(ours)
  assert sorted(tensors) == sorted(weights)
  for key, value in tensors.items():
    np.testing.assert_allclose(value, weights[key], atol=1e-5, err_msg=key)


@pytest.fixture(scope="module")
def peft_ours(base, peft_lora):
  return load_stable_diffusion(base["folder"], lora=peft_lora)


def test_peft_lora_matches_diffusers(base, peft_lora, peft_ours):
  lora = lora_files.read_lora(peft_lora)
  assert lora.style == "peft"
  unet = lora.components["unet"]
  prefix = "down_blocks.0.attentions.0.transformer_blocks.0.attn1."
  assert unet[prefix + "to_q"].scale == 2.0  # lora_alpha / r = 8 / 4
  assert unet[prefix + "to_k"].scale == 0.5  # alpha_pattern: 2 / 4
  assert unet[prefix + "to_v"].scale == 4.0  # rank_pattern: 8 / 2
  assert all(name.startswith("text_model.encoder.")
             for name in lora.components["text_encoder"])
  _assert_matches_diffusers(base, peft_lora, peft_ours)


def test_kohya_lora_matches_diffusers(base, kohya_lora):
  path, _ = kohya_lora
  assert lora_files.read_lora(path).style == "kohya"
  ours = load_stable_diffusion(base["folder"], lora=path)
  _assert_matches_diffusers(base, path, ours)


def test_old_diffusers_lora_matches_diffusers(base, old_lora):
  path, _ = old_lora
  assert lora_files.read_lora(path).style == "diffusers"
  ours = load_stable_diffusion(base["folder"], lora=path.parent)
  _assert_matches_diffusers(base, path, ours)


def _component(module):
  return "text_encoder" if module.startswith("text_model.") else "unet"


def test_scaled_loras_add_up(base, kohya_lora, old_lora, tmp_path):
  """W = base + lora_scale * sum_i scale_i * alpha_i / rank_i * up_i down_i."""
  kohya_path, kohya = kohya_lora
  old_path, old = old_lora
  # An alpha beside an older diffusers key scales that module (3 / rank 4).
  rng = np.random.default_rng(3)
  fc1 = "text_model.encoder.layers.1.mlp.fc1"
  down, up = rng.normal(size=(4, 32)), rng.normal(size=(64, 4))
  extra = {f"text_encoder.{fc1}.lora.down.weight": down,
           f"text_encoder.{fc1}.lora.up.weight": up,
           f"text_encoder.{fc1}.alpha": np.array(3.0)}
  safetensors.numpy.save_file(
      {**safetensors.numpy.load_file(old_path),
       **{k: v.astype(np.float32) for k, v in extra.items()}},
      tmp_path / "old_alpha.safetensors")
  old = {**old, fc1: (down, up, 3.0 / 4)}
  pipe = load_stable_diffusion(
      base["folder"], lora_scale=2.0,
      lora=[(tmp_path / "old_alpha.safetensors", 0.5), (kohya_path, -1.0)])

  expected = {k: v.astype(np.float64) for k, v in base["tensors"].items()}
  for layers, strength in ((old, 2.0 * 0.5), (kohya, 2.0 * -1.0)):
    for module, (down, up, scale) in layers.items():
      delta = np.tensordot(up.reshape(up.shape[:2]), down, axes=(1, 0))
      expected[f"{_component(module)}.{module}.weight"] += (
          strength * scale * delta)
  tensors = _tensors(pipe)
  changed = {k for k in tensors
             if not np.array_equal(tensors[k], base["tensors"][k])}
  assert changed == {f"{_component(m)}.{m}.weight" for m in {**old, **kohya}}
  for key, value in tensors.items():
    np.testing.assert_allclose(value, expected[key], atol=1e-5, err_msg=key)


def test_bf16_parameters_are_fused_in_float32(base, peft_lora, peft_ours):
  half = load_stable_diffusion(base["folder"], lora=peft_lora,
                               param_dtype=jnp.bfloat16)
  assert half.unet.conv_in.kernel.get_value().dtype == jnp.bfloat16
  full = _tensors(peft_ours)
  for key, value in _tensors(half).items():
    np.testing.assert_allclose(value, full[key], rtol=1e-2, atol=1e-2,
                               err_msg=key)


def test_tiny_source_takes_a_lora(peft_lora, tiny):
  _, plain = tiny
  fused = _tensors(load_stable_diffusion("tiny", lora=peft_lora))
  key = ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
         ".weight")
  assert not np.array_equal(plain[key], fused[key])
  assert np.array_equal(plain["unet.conv_in.weight"],
                        fused["unet.conv_in.weight"])


@pytest.fixture(scope="module")
def tiny():
  """The ``tiny`` pipeline, never changed (the error tests check that)."""
  pipe = load_stable_diffusion("tiny")
  return pipe, _tensors(pipe)


# ------------------------------------------------------------------ errors

_Q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


def _pair(name, down_shape=(4, 32), up_shape=(32, 4), a="lora_A.weight",
          b="lora_B.weight", value=0.0):
  return {f"{name}.{a}": np.full(down_shape, value, np.float32),
          f"{name}.{b}": np.full(up_shape, value, np.float32)}


BAD_FILES = {
    "full weight": ({"unet.conv_in.weight": np.zeros((32, 4, 3, 3))},
                    "unet.conv_in.weight", "not a LoRA weight"),
    "sdxl module": (_pair("unet.input_blocks.4.1.proj_in"),
                    "unet.input_blocks.4.1.proj_in.lora_A.weight",
                    "no module 'input_blocks.4.1.proj_in'.*SDXL"),
    "sdxl kohya module": (
        _pair("lora_unet_input_blocks_4_1_proj_in", a="lora_down.weight",
              b="lora_up.weight"),
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight",
        "no module 'input_blocks_4_1_proj_in'.*SDXL"),
    # A layer that fits, then one that does not: nothing may be fused.
    "fits, then sdxl": ({**_pair(f"unet.{_Q}", value=1.0),
                         **_pair("unet.input_blocks.4.1.proj_in")},
                        "unet.input_blocks.4.1.proj_in.lora_A.weight",
                        "no module"),
    "wrong shape": (_pair(f"unet.{_Q}", down_shape=(4, 48)),
                    f"unet.{_Q}.lora_A.weight", "does not fit"),
    "linear lora on a 3x3 conv": (
        _pair("unet.conv_in", down_shape=(4, 4), up_shape=(32, 4)),
        "unet.conv_in.lora_A.weight", "does not fit"),
    "text_encoder_2": (_pair("text_encoder_2.encoder.layers.0.mlp.fc1"),
                       "text_encoder_2.encoder.layers.0.mlp.fc1.lora_A.weight",
                       "SDXL"),
    "kohya te2": (_pair("lora_te2_text_model_encoder_layers_0_mlp_fc1",
                        a="lora_down.weight", b="lora_up.weight"),
                  "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down"
                  ".weight", "SDXL"),
    "another model": (_pair("transformer.blocks.0.attn.to_q"),
                      "transformer.blocks.0.attn.to_q.lora_A.weight",
                      "another model"),
    "missing up": ({f"unet.{_Q}.lora_A.weight": np.zeros((4, 32))},
                   f"unet.{_Q}.lora_A.weight", "no matching up"),
    "rank mismatch": (_pair(f"unet.{_Q}", up_shape=(32, 2)),
                      f"unet.{_Q}.lora_A.weight", "expected \\(rank, in"),
    "dora": ({**_pair(f"unet.{_Q}"),
              f"unet.{_Q}.lora_magnitude_vector": np.zeros(32)},
             f"unet.{_Q}.lora_magnitude_vector", "DoRA"),
    "loha": ({"lora_unet_conv_in.hada_w1_a": np.zeros((4, 4))},
             "lora_unet_conv_in.hada_w1_a", "not a LoRA weight"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_lora_files_are_one_line_errors(case, tiny, tmp_path):
  tensors, key, message = BAD_FILES[case]
  path = tmp_path / "lora.safetensors"
  safetensors.numpy.save_file(
      {k: np.asarray(v, np.float32) for k, v in tensors.items()}, path)
  pipe, before = tiny
  models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
  with pytest.raises(CheckpointError, match=message) as info:
    lora_files.fuse_loras(models, lora_files.read_loras(path))
  assert "\n" not in str(info.value) and repr(key) in str(info.value)
  after = _tensors(pipe)
  assert all(np.array_equal(after[k], before[k]) for k in before)


def test_bad_paths_are_one_line_errors(tmp_path):
  cases = {tmp_path / "absent.safetensors": "does not exist",
           tmp_path / "lora.bin": "not a .safetensors file",
           tmp_path / "broken.safetensors": "not a readable safetensors",
           tmp_path / "empty": "holds no .safetensors",
           tmp_path / "two": "holds 2 .safetensors files"}
  (tmp_path / "lora.bin").write_bytes(b"\x00" * 16)
  (tmp_path / "broken.safetensors").write_text("not a safetensors file")
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "lora.bin").write_bytes(b"\x00")
  (tmp_path / "two").mkdir()
  for name in ("a", "b"):
    safetensors.numpy.save_file(_pair(f"unet.{_Q}"),
                                tmp_path / "two" / f"{name}.safetensors")
  for path, message in cases.items():
    with pytest.raises(CheckpointError, match=message) as info:
      lora_files.read_lora(path)
    assert "\n" not in str(info.value) and path.name in str(info.value)


def test_pipeline_checks_loras_before_loading(tmp_path):
  # The file is read before any model: the error comes first, and fast.
  with pytest.raises(CheckpointError, match="LoRA .*none does not exist"):
    load_stable_diffusion(tmp_path / "no-model", lora=tmp_path / "none")
  with pytest.raises(UserError, match="not a \\(file_or_dir, scale\\) pair"):
    load_stable_diffusion("tiny", lora=[tmp_path / "a.safetensors"])
