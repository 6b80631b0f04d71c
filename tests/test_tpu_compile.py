"""The TPU path compiles with the real TPU compiler, on this CPU host.

``libtpu`` (the ``tpu`` and ``test`` extras) gives compile-only devices of a
TPU slice; ``benchmarks/tpu_compile.py`` lowers each tiny recipe's train step
and the validation sampler over them and compiles with the TPU compiler,
Mosaic (Pallas) kernels included. What these tests pin down:

  * ``auto`` resolves to ``pallas`` for a TPU target on a CPU host, and the
    compiled programs hold Pallas kernels;
  * the Pallas kernel is run under ``shard_map``: without it the TPU compiler
    refuses the program ("Mosaic kernels cannot be automatically
    partitioned"), with it the same program compiles;
  * each tiny recipe compiles under the data mesh and the FSDP mesh.
"""

import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

import recipes
from personalize_jax.engine import sharding
from personalize_jax.models import attention, layers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import tpu_compile  # pylint: disable=g-import-not-at-top,wrong-import-position

TOPOLOGY = "v5e:2x2"


@pytest.fixture(scope="module")
def tpu_devices():
  return tpu_compile.topology_devices(TOPOLOGY)


def test_topology_devices_are_tpus_while_the_host_runs_on_cpu(tpu_devices):
  assert len(tpu_devices) == 4
  assert {d.platform for d in tpu_devices} == {"tpu"}
  assert jax.default_backend() == "cpu"


def test_auto_resolves_from_the_mesh_the_step_is_traced_for(tpu_devices):
  assert attention.resolve_impl("auto", jnp.bfloat16, "tpu") == "pallas"
  assert attention.resolve_impl("auto", jnp.float32) == "chunked"  # the host
  mesh = sharding.create_mesh(-1, 1, tpu_devices)
  with layers.batch_sharded_activations(mesh, sharding.BATCH_AXES):
    assert attention.target_platform() == "tpu"
    assert attention.resolve_impl("auto", jnp.float32) == "pallas"
  assert attention.target_platform() == "cpu"


def _attention_program(mesh, q_shape, k_len):
  """Attention's value and gradients, batch-split over ``mesh`` if it can be."""
  b, _, h, d = q_shape
  spread = (sharding.batch_sharding(mesh) if b % mesh.size == 0
            else sharding.replicated(mesh))
  q = jax.ShapeDtypeStruct(q_shape, jnp.bfloat16, sharding=spread)
  kv = jax.ShapeDtypeStruct((b, k_len, h, d), jnp.bfloat16, sharding=spread)

  def loss(q, k, v):
    with layers.batch_sharded_activations(mesh, sharding.BATCH_AXES):
      out = attention.dot_product_attention(q, k, v, impl="pallas")
    return jnp.sum(out.astype(jnp.float32) ** 2)

  return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, kv, kv)


@pytest.mark.parametrize("q_shape, k_len", [
    ((8, 256, 4, 40), 256),  # batch split: 2 rows per chip.
    ((2, 64, 8, 160), 77),  # heads split, padded sequences and heads.
])
def test_pallas_attention_compiles_for_a_tpu_slice_only_with_shard_map(
    tpu_devices, monkeypatch, q_shape, k_len):
  mesh = sharding.create_mesh(-1, 1, tpu_devices)
  lowered = _attention_program(mesh, q_shape, k_len)
  text = lowered.as_text()
  assert text.count("tpu_custom_call") == 3  # forward, dq, dk/dv kernels
  assert "sdy.manual_computation" in text or "shard_map" in text
  lowered.compile()
  # The same program with the kernel called directly, as before shard_map.
  monkeypatch.setattr(attention, "pallas_partition_spec",
                      lambda shape, split: None)
  with pytest.raises(Exception, match="Mosaic kernels cannot be automatically"
                     " partitioned"):
    _attention_program(mesh, q_shape, k_len).compile()


# (recipe, attention_impl, mesh.fsdp, functions): every method (Custom
# Diffusion's step inside Look Forward's on it: its K/V and token row, and
# the critic with its own optimizer), full fine-tuning and LoRA, SD and SDXL,
# both meshes, both ways of asking for Pallas; the sampler and the VAE
# decoder data-parallel. (RPO's step is the slowest to compile, a minute on
# SD, two and a half on the tiny SDXL: it runs once, with LoRA on SD.)
CASES = [
    # The tiny SDXL pipeline with LoRA: the pooled text and time ids of every
    # row, the guided sampler with its time ids.
    ("dreambooth_tpu:sdxl,lora", "auto", 1, ("train_step", "ddim", "decode")),
    ("lookforward_custom_diffusion_tpu", "pallas", 4, ("train_step",)),
    # LoRA: adapters sharded by FSDP, the base frozen, RPO's base the same
    # U-Net with its adapters off.
    ("rpo_tpu:lora", "pallas", 4, ("train_step",)),
]


@pytest.mark.slow  # one to three TPU compiles of a few minutes each
@pytest.mark.parametrize("recipe, impl, fsdp, functions", CASES,
                         ids=[c[0] for c in CASES])
def test_tiny_recipes_compile_for_v5e_with_pallas(recipe, impl, fsdp,
                                                  functions):
  name, _, variant = recipe.partition(":")
  config = recipes.load(name, ",".join(["tiny"] + [variant] * bool(variant)),
                        **{"model.attention_impl": impl, "mesh.data": -1,
                           "mesh.fsdp": fsdp})
  records = tpu_compile.compile_recipe(config, TOPOLOGY, functions,
                                       recipe=name)
  assert [r["function"] for r in records] == list(functions)
  for r in records:
    assert r["attention"] == "pallas"
    assert r["mesh"] == {"data": 4 // fsdp, "fsdp": fsdp}
    assert r["chips"] == 4 and r["batch"] % 4 == 0
    assert r["mosaic_kernels"] > 0 or r["function"] == "decode", r
    assert r["flops_per_chip"] > 0 and r["peak_bytes"] > 0
    assert r["fits"] and r["peak_gib"] < r["hbm_gib"]
  step = records[0]
  assert step["ms_at_40pct_mfu"] == pytest.approx(
      1.5 * step["ms_at_60pct_mfu"])


def test_the_cli_names_a_bad_topology_in_one_line():
  result = subprocess.run(
      [sys.executable, str(REPO / "benchmarks" / "tpu_compile.py"),
       "--config=configs/dreambooth_tpu.py:tiny", "--topology=v9:2x2"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines()
            if line.startswith("error:")]
  assert len(errors) == 1 and "v9" in errors[0] and "v5e" in errors[0], (
      result.stderr[-2000:])


def test_rpo_run_minutes_from_the_programs_flops():
  config = recipes.load("rpo_tpu", None)
  assert (len(config.rpo.live_prompts), len(config.eval.prompts)) == (8, 4)
  head = {"benchmark": "tpu_compile", "recipe": "rpo_tpu.py", "method": "rpo",
          "model": "m", "resolution": 512, "topology": "v4:2x2x1",
          "chip": "TPU v4", "chips": 4, "batch": 4}
  records = [dict(head, function="train_step", flops_per_chip=1e12),
             dict(head, function="ddim", flops_per_chip=2e11),
             dict(head, function="decode", flops_per_chip=1e11)]
  run = tpu_compile.rpo_run(config, records)
  # 32 negatives and 10 evaluations x (4 grid + 2 x 4 validation) images,
  # each 50 DDIM steps of 2e11 FLOPs and a 1e11 decode; 400 steps of 4e12.
  assert (run["negatives"], run["evaluations"], run["eval_images"]) == (
      32, 10, 120)
  total = 32 * 1.01e13 + 400 * 4e12 + 120 * 1.01e13
  assert sum(run["tflops"].values()) == pytest.approx(total / 1e12)
  assert run["minutes_at_40pct_mfu"] == pytest.approx(
      total / (4 * 275e12 * 0.4) / 60)
  assert tpu_compile.rpo_run(config, records[:2]) is None
