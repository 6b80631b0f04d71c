"""The same DreamBooth train step in ours, diffusers' Flax U-Net and PyTorch.

One step, everywhere: a U-Net of the ``small`` shape (``common.SMALL_UNET``,
12.9M parameters) on 2 rows of 32x32x4 latents (DreamBooth batch 1 with
prior preservation: one instance row and one class row) with 77x256 text
states, fp32; noise and timesteps drawn in the step, SD's scaled-linear
noising, epsilon MSE of both halves, gradient clipping at 1.0 and AdamW
(lr 5e-6, weight decay 1e-2).

  ours    the engine's step (``train.build_trainer``, DreamBooth recipe,
          its default ``attention_impl="auto"``: ``chunked`` on CPU), run
          as the engine's loop runs it (batch transfer and finite check
          included).
  flax    diffusers 0.39's ``FlaxUNet2DConditionModel`` (the last release
          with Flax models) in the step of its ``train_dreambooth_flax.py``
          (jit with the state donated, optax), in its own virtual environment
          (``--venv``, created on first use with ``FLAX_PINS``). The noising
          is written inline: ``FlaxDDPMScheduler`` of 0.39 breaks on jax 0.10.
  flax-mea  the same with ``use_memory_efficient_attention=True`` (its
          chunked attention; off in ``train_dreambooth_flax.py``).
  torch   diffusers' PyTorch ``UNet2DConditionModel`` (the main environment's
          diffusers and torch, CPU) in the step of ``train_dreambooth.py``
          (eager, SDPA attention, ``clip_grad_norm_``, ``torch.optim.AdamW``)
          with torch's default threads (one per core), and ``torch-1t`` with
          one thread: on a loaded machine, OpenMP's per-op barriers make the
          multi-threaded eager step pay for every time slice it waits for.

Each framework runs in a worker process of its own that builds and warms up
first; then rounds alternate between them (one worker computes at a time,
the order rotating every round) so that a change in the machine's load hits
all of them alike. Reported: each one's median step time and the ratios to ours.

  python benchmarks/peers.py                   # 6 rounds of 5 steps each
  python benchmarks/peers.py --rounds=1 --steps=2 --peers=ours,torch   # smoke

Prints one JSON line per framework and a summary line, then a markdown table.
Workers speak JSON lines on stdin/stdout; this file runs as a worker under
``--worker`` and imports nothing outside the standard library at the top, so
the Flax worker runs in the virtual environment without this package.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PEERS = ("ours", "flax", "flax-mea", "torch", "torch-1t")
FLAX_PINS = ("diffusers==0.39.0", "transformers==4.57.6",
             "huggingface-hub==0.36.2", "jax==0.10.2", "jaxlib==0.10.2",
             "flax==0.12.8")
DEFAULT_VENV = "/tmp/personalize-jax-peers-venv"
ROWS, TEXT_LEN = 2, 77
LR, WEIGHT_DECAY, CLIP = 5e-6, 1e-2, 1.0


def scaled_linear_alphas_cumprod(np):
  """SD's training schedule (scaled_linear 0.00085..0.012, 1000 steps)."""
  betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64)**2
  return np.cumprod(1.0 - betas).astype(np.float32)


# ----------------------------------------------------------------- workers


def ours_worker(spec: dict, seed: int):
  """The engine's DreamBooth step at the shape; returns ``run(n)``, info."""
  sys.path.insert(0, str(HERE))
  import tempfile  # pylint: disable=g-import-not-at-top
  import common  # pylint: disable=g-import-not-at-top
  from personalize_jax.engine import state as state_lib  # pylint: disable=g-import-not-at-top
  shape = common.SHAPES[spec["shape"]]
  assert shape.unet == spec["unet"], "ours must run the shape the peers run"
  assert shape.resolution // 8 == spec["latent"]
  config = common.recipe_config("dreambooth", shape, batch_size=1,
                                precision="fp32")
  config.seed = seed
  config.model.attention_impl = "auto"  # the recipes' default
  config.learning_rate = LR
  config.optimizer.weight_decay = WEIGHT_DECAY
  config.optimizer.clip_grad_norm = CLIP
  assert config.dreambooth.prior_preservation  # 2 U-Net rows per step
  built = common.engine_trainer(config, Path(tempfile.mkdtemp()), shape)
  method, mesh = built.method, built.mesh
  batch = state_lib.shard_batch(method.batch(0), mesh)
  start = time.perf_counter()
  compiled = built.train_step.lower(built.state, built.frozen,
                                    batch).compile()
  compile_s = time.perf_counter() - start
  box = {"state": built.state, "step": 0}

  def run(n):
    times = []
    for _ in range(n):
      begin = time.perf_counter()
      batch = state_lib.shard_batch(method.batch(box["step"]), mesh)
      box["state"], metrics = compiled(box["state"], built.frozen, batch)
      bool(metrics["finite"])
      times.append(time.perf_counter() - begin)
      box["step"] += 1
    return times

  import jax  # pylint: disable=g-import-not-at-top
  info = {"params": built.unet_params, "compile_s": compile_s,
          "flops_per_step": common.cost_flops(compiled),
          "versions": {"jax": jax.__version__}}
  return run, info


def flax_worker(spec: dict, seed: int, memory_efficient: bool = False):
  """diffusers 0.39 Flax U-Net in train_dreambooth_flax.py's step.

  ``memory_efficient``: the U-Net's ``use_memory_efficient_attention`` (query
  and key chunks, Rabe and Staats), off in ``train_dreambooth_flax.py``.
  """
  unet_config, side = spec["unet"], spec["latent"]
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import diffusers  # pylint: disable=g-import-not-at-top
  import flax  # pylint: disable=g-import-not-at-top
  from flax.training import train_state  # pylint: disable=g-import-not-at-top
  fields = set(diffusers.FlaxUNet2DConditionModel.__dataclass_fields__)
  # Flax GroupNorms are fixed at 32 groups, the value the shape uses.
  assert unet_config.get("norm_num_groups", 32) == 32
  unet = diffusers.FlaxUNet2DConditionModel(
      **{k: tuple(v) if isinstance(v, list) else v
         for k, v in unet_config.items() if k in fields}, dtype=jnp.float32,
      use_memory_efficient_attention=memory_efficient)
  params = unet.init_weights(jax.random.key(seed))
  tx = optax.chain(optax.clip_by_global_norm(CLIP),
                   optax.adamw(LR, b1=0.9, b2=0.999, eps=1e-8,
                               weight_decay=WEIGHT_DECAY))
  state = train_state.TrainState.create(apply_fn=unet.__call__, params=params,
                                        tx=tx)
  alphas = jnp.asarray(scaled_linear_alphas_cumprod(np))
  rng = np.random.default_rng(seed)
  channels = unet_config["in_channels"]
  # NCHW, as the Flax pipeline feeds its U-Net.
  latents = jnp.asarray(rng.standard_normal((ROWS, channels, side, side)),
                        jnp.float32)
  emb = jnp.asarray(rng.standard_normal(
      (ROWS, TEXT_LEN, unet_config["cross_attention_dim"])), jnp.float32)

  def train_step(state, latents, emb, key):
    noise_key, t_key, key = jax.random.split(key, 3)

    def loss_fn(params):
      noise = jax.random.normal(noise_key, latents.shape)
      t = jax.random.randint(t_key, (latents.shape[0],), 0, alphas.shape[0])
      a = alphas[t][:, None, None, None]
      noisy = jnp.sqrt(a) * latents + jnp.sqrt(1 - a) * noise
      pred = unet.apply({"params": params}, noisy, t, emb, train=True).sample
      pred_i, pred_p = jnp.split(pred, 2)
      noise_i, noise_p = jnp.split(noise, 2)
      return (jnp.mean((pred_i - noise_i) ** 2)
              + jnp.mean((pred_p - noise_p) ** 2))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss, key

  step = jax.jit(train_step, donate_argnums=0)
  box = {"state": state, "key": jax.random.key(seed)}

  def run(n):
    times = []
    for _ in range(n):
      begin = time.perf_counter()
      box["state"], loss, box["key"] = step(box["state"], latents, emb,
                                            box["key"])
      float(loss)
      times.append(time.perf_counter() - begin)
    return times

  info = {"params": int(sum(x.size for x in jax.tree.leaves(params))),
          "versions": {"diffusers": diffusers.__version__,
                       "jax": jax.__version__, "flax": flax.__version__}}
  return run, info


def torch_worker(spec: dict, seed: int, threads: int | None = None):
  """diffusers' PyTorch U-Net in train_dreambooth.py's step (eager, CPU)."""
  unet_config, side = spec["unet"], spec["latent"]
  import diffusers  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(seed)
  unet = diffusers.UNet2DConditionModel(**{
      k: v for k, v in unet_config.items() if not k.startswith("_")}).train()
  opt = torch.optim.AdamW(unet.parameters(), lr=LR, betas=(0.9, 0.999),
                          eps=1e-8, weight_decay=WEIGHT_DECAY)
  alphas = torch.from_numpy(scaled_linear_alphas_cumprod(np))
  latents = torch.randn(ROWS, unet_config["in_channels"], side, side)
  emb = torch.randn(ROWS, TEXT_LEN, unet_config["cross_attention_dim"])

  def step():
    noise = torch.randn_like(latents)
    t = torch.randint(0, alphas.shape[0], (latents.shape[0],))
    a = alphas[t].view(-1, 1, 1, 1)
    noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
    pred = unet(noisy, t, emb).sample
    pred_i, pred_p = pred.chunk(2)
    noise_i, noise_p = noise.chunk(2)
    loss = F.mse_loss(pred_i, noise_i) + F.mse_loss(pred_p, noise_p)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), CLIP)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())

  def run(n):
    times = []
    for _ in range(n):
      begin = time.perf_counter()
      step()
      times.append(time.perf_counter() - begin)
    return times

  info = {"params": sum(p.numel() for p in unet.parameters()),
          "versions": {"torch": torch.__version__,
                       "diffusers": diffusers.__version__},
          "threads": torch.get_num_threads()}
  return run, info


WORKERS = {"ours": ours_worker, "flax": flax_worker,
           "flax-mea": lambda spec, seed: flax_worker(spec, seed, True),
           "torch": torch_worker,
           "torch-1t": lambda spec, seed: torch_worker(spec, seed, threads=1)}


def serve(name: str, spec: dict, seed: int, warmup: int) -> None:
  """Worker loop: build, warm up, then answer ``{"steps": n}`` requests."""
  out = sys.stdout
  sys.stdout = sys.stderr  # library chatter must not corrupt the protocol
  begin = time.perf_counter()
  run, info = WORKERS[name](spec, seed)
  first = run(1)[0]  # compiles (JAX) or allocates (torch)
  run(max(warmup - 1, 0))
  print(json.dumps({"ready": True, "setup_s": time.perf_counter() - begin,
                    "first_step_s": first, **info}), file=out, flush=True)
  for line in sys.stdin:
    request = json.loads(line)
    if "steps" not in request:
      break
    print(json.dumps({"times": run(int(request["steps"]))}), file=out,
          flush=True)


# ------------------------------------------------------------- coordinator


def ensure_venv(venv: Path) -> Path:
  """The Flax peers' interpreter, creating the environment if needed."""
  python = venv / "bin" / "python"
  check = [str(python), "-c", "import diffusers, flax, jax; "
           "assert diffusers.__version__ == '0.39.0', diffusers.__version__"]
  if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
    return python
  print(f"creating {venv} with {' '.join(FLAX_PINS)}", file=sys.stderr)
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
  subprocess.run([str(python), "-m", "pip", "install", "-q", *FLAX_PINS],
                 check=True)
  subprocess.run(check, check=True)
  return python


class Worker:
  """A worker process and its JSON-lines conversation."""

  def __init__(self, name: str, python: str, spec: dict, seed: int,
               warmup: int):
    self.name = name
    env = dict(os.environ)
    if name.startswith("flax"):
      # The venv has no personalize_jax; keep the repo off its path.
      env.pop("PYTHONPATH", None)
    self.proc = subprocess.Popen(
        [python, str(Path(__file__).resolve()), f"--worker={name}",
         f"--spec={json.dumps(spec)}", f"--seed={seed}",
         f"--warmup={warmup}"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.info = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the {self.name} worker died (see its stderr above)")
    return json.loads(line)

  def run(self, steps: int) -> list[float]:
    self.proc.stdin.write(json.dumps({"steps": steps}) + "\n")
    self.proc.stdin.flush()
    return self._read()["times"]

  def close(self):
    if self.proc.poll() is None:
      self.proc.stdin.write("{}\n")
      self.proc.stdin.flush()
      self.proc.wait(timeout=60)


def main(argv=None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--peers", default=",".join(PEERS))
  parser.add_argument("--shape", default="small", choices=("small", "tiny"),
                      help="tiny: smoke tests (the Flax U-Net cannot run it: "
                      "its GroupNorms have 32 groups, tiny's 8)")
  parser.add_argument("--rounds", type=int, default=6)
  parser.add_argument("--steps", type=int, default=5,
                      help="timed steps of each framework per round")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--venv", default=DEFAULT_VENV,
                      help="virtual environment of the Flax peer")
  parser.add_argument("--worker", choices=PEERS, help=argparse.SUPPRESS)
  parser.add_argument("--spec", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    serve(args.worker, json.loads(args.spec), args.seed, args.warmup)
    return []

  sys.path.insert(0, str(HERE))
  import common  # pylint: disable=g-import-not-at-top
  names = [n.strip() for n in args.peers.split(",") if n.strip()]
  bad = [n for n in names if n not in PEERS]
  if bad or "ours" not in names:
    raise SystemExit(f"--peers must include 'ours' and name only {PEERS}")
  shape = common.SHAPES[args.shape]
  spec = {"shape": shape.name, "unet": shape.unet,
          "latent": shape.resolution // 8}
  if (any(n.startswith("flax") for n in names)
      and shape.unet.get("norm_num_groups", 32) != 32):
    raise SystemExit(f"the Flax peer cannot run --shape={shape.name}")
  pythons = {n: sys.executable for n in names}
  for name in names:
    if name.startswith("flax"):
      pythons[name] = str(ensure_venv(Path(args.venv)))
  workers = {}
  try:
    for name in names:  # built one after the other: setup is not timed
      workers[name] = Worker(name, pythons[name], spec, args.seed,
                             args.warmup)
    params = {n: w.info["params"] for n, w in workers.items()}
    if len(set(params.values())) != 1:
      raise RuntimeError(f"the U-Nets differ in size: {params}")
    times = {n: [] for n in names}
    rounds = {n: [] for n in names}
    for r in range(args.rounds):
      order = names[r % len(names):] + names[:r % len(names)]
      for name in order:
        got = workers[name].run(args.steps)
        times[name] += got
        rounds[name].append(statistics.median(got))
  finally:
    for w in workers.values():
      w.close()
  ours = statistics.median(times["ours"])
  flops = workers["ours"].info.get("flops_per_step")
  rows = []
  for name in names:
    median = statistics.median(times[name])
    record = {
        "benchmark": "peers", "framework": name, "shape": shape.name,
        "unet_params": params[name], "rows": ROWS,
        "latent_side": spec["latent"],
        "precision": "fp32", "device": common.device_name(),
        "median_step_s": median, "steps_per_s": 1 / median,
        "round_medians_s": rounds[name], "n": len(times[name]),
        "ratio_to_ours": median / ours,
        "tflops_at_our_flops": None if not flops else flops / median / 1e12,
        "setup_s": workers[name].info["setup_s"],
        "compile_s": workers[name].info.get("compile_s"),
        "first_step_s": workers[name].info["first_step_s"],
        "versions": workers[name].info["versions"],
        "load_average": common.load_average(),
    }
    if "threads" in workers[name].info:
      record["torch_threads"] = workers[name].info["threads"]
    common.emit(record)
    rows.append(record)
  medians = {r["framework"]: r["median_step_s"] for r in rows}
  verdict = {"benchmark": "peers_summary", "shape": shape.name,
             "rounds": args.rounds, "steps_per_round": args.steps}
  if "flax-mea" in medians:
    verdict["flax_mea_over_ours"] = medians["flax-mea"] / medians["ours"]
  if "flax" in medians:
    verdict["flax_over_ours"] = medians["flax"] / medians["ours"]
    verdict["goal_ours_1_5x_faster_than_flax"] = (
        medians["flax"] / medians["ours"] >= 1.5)
  for name in ("torch", "torch-1t"):
    if name in medians:
      verdict[f"{name}_over_ours"] = medians[name] / medians["ours"]
      if "flax" in medians:
        verdict[f"flax_over_{name}"] = medians["flax"] / medians[name]
  common.emit(verdict)
  print()
  print(common.markdown_table(rows, [
      ("framework", "framework"), ("median_step_s", "median step s"),
      ("steps_per_s", "steps/s"), ("ratio_to_ours", "time / ours"),
      ("first_step_s", "first step s"), ("n", "steps timed")]))
  return rows


if __name__ == "__main__":
  main()
