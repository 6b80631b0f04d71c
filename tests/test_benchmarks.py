"""The benchmark scripts run on tiny shapes and print well-formed results.

Nothing here asserts a timing: only that each script finishes, that its JSON
lines carry the expected keys with positive numbers, that the abstract
trainer the SD 1.4 shapes use lays out exactly what the engine's does, and
that FLOPs and MFU are computed right on known costs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import xla_env  # pylint: disable=g-import-not-at-top,wrong-import-position

# Whole trainings or benchmark scripts in subprocesses: minutes on CPU.
pytestmark = pytest.mark.slow



def _run(script: str, *args: str, timeout: int = 1200) -> list[dict]:
  # Off the shared cache: the scripts measure their own compiles.
  env = xla_env.env(cache=False)
  result = subprocess.run(
      [sys.executable, str(BENCHMARKS / script), *args], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [json.loads(line) for line in result.stdout.splitlines()
           if line.startswith("{")]
  assert lines, result.stdout
  assert "|---" in result.stdout  # the markdown table follows the JSON lines
  return lines


def _positive(record: dict, *keys: str) -> None:
  for key in keys:
    value = record[key]
    assert isinstance(value, (int, float)) and value > 0, (key, value)


def test_train_step_script():
  lines = _run("train_step.py", "--shapes=tiny", "--methods=dreambooth",
               "--steps=2", "--lora-ranks=0,4")
  peak, (record, lora) = lines[0], lines[1:]
  assert (record["lora_rank"], lora["lora_rank"]) == (0, 4)
  _positive(lora, "steps_per_s", "tflops_per_step")
  assert peak["benchmark"] == "matmul_peak"
  _positive(peak, "peak_tflops")
  assert (record["method"], record["shape"]) == ("dreambooth", "tiny")
  _positive(record, "compile_s", "steps_per_s", "images_per_s",
            "tflops_per_step", "achieved_tflops", "mfu", "step_peak_gib",
            "unet_params_m")
  for key in ("argument", "output", "temp", "peak"):
    _positive(record["memory_bytes"], key)
  # DreamBooth with prior preservation: one U-Net call on instance + class.
  assert record["unet_calls_per_step"] == 1
  assert record["unet_evals_per_step"] == 2 * record["batch_size"]
  assert record["step_time"]["n"] == 2


def test_sampling_script_and_rpo_split():
  lines = _run("sampling.py", "--shape=tiny", "--batch-sizes=2",
               "--steps=2", "--rpo-split", "--rpo-steps=2", "--rpo-online=1")
  by_kind = {}
  for line in lines:
    by_kind.setdefault(line["benchmark"], []).append(line)
  assert [r["batch_size"] for r in by_kind["sampling"]] == [2]
  for record in by_kind["sampling"]:
    _positive(record, "images_per_s", "unet_evals_per_s", "first_call_s")
    # Two guided DDIM steps: 2 x batch U-Net rows per step.
    assert record["unet_evals_per_s"] == pytest.approx(
        4 * record["images_per_s"])
  (split,) = by_kind["rpo_split"]
  _positive(split, "total_s")
  for phase in ("prepare", "validation", "train step (first: compile)"):
    _positive(split["seconds"], phase)
  # 2 steps: the first is timed as compilation, the second as a step.
  assert split["num_steps"] == split["train_steps_timed"] == 2
  # Top-level phases (and "other") add up to the run; "a > b" is inside a.
  assert sum(v for k, v in split["share"].items()
             if " > " not in k) == pytest.approx(1.0)
  assert (split["seconds"]["prepare > generate"]
          <= split["seconds"]["prepare"])
  # Online RPO: one refresh (before step 2), timed against a step.
  assert split["online_every_steps"] == split["refreshes"] == 1
  _positive(split, "refresh_s", "step_s", "refresh_over_step")
  assert split["refresh_over_step"] == pytest.approx(
      split["refresh_s"] / split["step_s"])
  (work,) = by_kind["rpo_unet_work"]
  assert sum(work["share"].values()) == pytest.approx(1.0)
  # Every negative redrawn (prompts x images x DDIM steps x 2) over a step's
  # U-Net work (pairs x (2 base + 3 x 3 trained rows)), for configs/rpo_tpu.py.
  assert work["refresh_over_step"] == pytest.approx(
      8 * 4 * 50 * 2 / (4 * 11))


def test_memory_script_tiny_fsdp():
  lines = _run("memory.py", "--scenarios=tiny-fsdp4", "--method=dreambooth")
  memory = next(r for r in lines if r["benchmark"] == "memory")
  assert memory["devices"] == 4 and memory["mesh"] == {"data": 1, "fsdp": 4}
  _positive(memory["step_bytes_per_device"], "argument", "temp", "peak")
  _positive(memory, "train_peak_gib_device0", "eval_peak_gib_device0",
            "train_state_bytes_per_device")
  assert memory["sharded_fraction_of_params"] > 0.9
  # Parameters and Adam's moments alike are split four ways (what is not is
  # small: step counters, the PRNG key, indivisible leaves).
  assert (memory["train_state_bytes_per_device"]
          < 0.27 * memory["train_state_bytes_total"])
  residents = next(r for r in lines if r["benchmark"] == "engine_residents")
  outside = residents["outside_step_bytes_per_device"]
  assert set(outside) == {"0", "1", "2", "3"}
  # The pipeline's U-Net holds the sharded state, not a whole copy on
  # device 0: outside the step, device 0 keeps exactly the fp32 VAE and text
  # encoder (for validation), and a few small arrays (the noise schedule),
  # and the other devices nothing.
  assert residents["pipeline_unet_holds_the_state"]
  extra = outside["0"] - sum(
      residents["pipeline_vae_and_text_encoder_bytes"].values())
  assert 0 <= extra < 0.01 * residents["pipeline_unet_fp32_bytes"]
  assert outside["1"] == outside["2"] == outside["3"] == 0


def test_peers_script_ours_against_torch():
  lines = _run("peers.py", "--shape=tiny", "--peers=ours,torch", "--rounds=2",
               "--steps=1", "--warmup=1")
  records = {r["framework"]: r for r in lines if r["benchmark"] == "peers"}
  assert set(records) == {"ours", "torch"}
  assert records["ours"]["unet_params"] == records["torch"]["unet_params"]
  for record in records.values():
    _positive(record, "median_step_s", "steps_per_s", "ratio_to_ours")
    assert len(record["round_medians_s"]) == 2
  assert records["ours"]["ratio_to_ours"] == 1.0
  (summary,) = [r for r in lines if r["benchmark"] == "peers_summary"]
  _positive(summary, "torch_over_ours")


def test_abstract_trainer_matches_engine(tmp_path):
  """What the SD 1.4 shapes compile is laid out as the engine lays it out."""
  shape = common.SHAPES["tiny"]
  config = common.recipe_config("dreambooth", shape, batch_size=1,
                                precision="bf16")
  config.dreambooth.prior_preservation = False  # no class images to make
  real = common.engine_trainer(config, tmp_path, shape)
  abstract = common.abstract_trainer(config, tmp_path, shape)

  for name in ("state", "frozen"):
    ours, theirs = getattr(abstract, name), getattr(real, name)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs), name
    for x, y in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
      assert (x.shape, x.dtype) == (y.shape, y.dtype), name
      assert x.sharding.is_equivalent_to(y.sharding, len(x.shape)), name
  assert abstract.unet_params == real.unet_params


def test_cost_flops_and_mfu_on_known_costs():
  m, k, n = 64, 128, 32
  compiled = jax.jit(lambda a, b: a @ b).lower(
      jax.ShapeDtypeStruct((m, k), jnp.float32),
      jax.ShapeDtypeStruct((k, n), jnp.float32)).compile()
  assert common.cost_flops(compiled) == 2 * m * k * n
  memory = common.memory_report(compiled)
  assert memory["argument"] == 4 * (m * k + k * n)
  assert memory["output"] == 4 * m * n
  assert memory["peak"] >= memory["argument"] + memory["output"]
  # 2 TFLOP in 2 s on a 4 TFLOP/s device: half of 1 TFLOP/s achieved.
  assert common.mfu(2e12, 2.0, 4e12) == pytest.approx(0.25)
  assert common.mfu(None, 2.0, 4e12) is None
  assert common.mfu(2e12, 2.0, None) is None


def test_full_size_twins_have_sd14_sizes():
  from personalize_jax.models import checkpoint  # pylint: disable=g-import-not-at-top
  shape = common.SHAPES["sd14-512"]
  config = common.recipe_config("dreambooth", shape, batch_size=1,
                                precision="bf16")
  pipe = common.stand_in_pipeline(common.SHAPES["sd14-256"], "bf16")
  sizes = {name: checkpoint.count_params(
      common.full_size(getattr(pipe, name), shape, config))
           for name in ("unet", "vae", "text_encoder")}
  assert sizes == {"unet": 859_520_964, "vae": 83_653_863,
                   "text_encoder": 123_060_480}


def test_full_size_twins_of_sdxl_stand_ins_have_sdxl_sizes():
  """The SDXL stand-ins prepare data at SDXL's widths; their twins are SDXL."""
  from personalize_jax.models import checkpoint  # pylint: disable=g-import-not-at-top
  shape = common.SHAPES["sdxl-1024"]
  config = common.recipe_config("dreambooth", shape, batch_size=1,
                                precision="bf16")
  pipe = common.stand_in_pipeline(shape, "bf16")
  assert pipe.is_sdxl
  states, pooled = pipe.text_encoder, pipe.text_encoder_2
  assert (states.config.hidden_size + pooled.config.hidden_size,
          pooled.config.projection_dim) == (2048, 1280)
  sizes = {name: checkpoint.count_params(
      common.full_size(getattr(pipe, name), shape, config))
           for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
  assert sizes == {"unet": 2_567_463_684, "vae": 83_653_863,
                   "text_encoder": 123_060_480,
                   "text_encoder_2": 694_659_840}


def test_lora_size_script_counts_sd14_adapters():
  rows = {(r["components"], r["rank"]): r
          for r in _run("lora_size.py", "--ranks=4,32")}
  # 16 transformer blocks x (self + cross attention) x q, k, v, out: the
  # 797,184 parameters of a rank-4 SD 1.x LoRA from diffusers' script.
  unet4 = rows[("unet", 4)]
  assert unet4["adapted_layers"] == 128 and unet4["params"] == 797_184
  assert rows[("unet", 32)]["params"] == 8 * 797_184
  # CLIP ViT-L/14: 12 layers x 4 projections of 768 x 768.
  assert rows[("unet+text_encoder", 4)]["params"] == 797_184 + 48 * 2 * 4 * 768
  # fp32 tensors plus a JSON header of at most a few tens of KiB.
  for r in rows.values():
    assert 4 * r["params"] < r["file_bytes"] < 4 * r["params"] + 64 * 1024
