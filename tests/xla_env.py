"""How tests compile: one set of XLA options, one compilation cache.

The test models are tiny and every program runs a few times, so XLA's CPU
optimisation passes cost more than they save: tests compile with
``FAST_COMPILE`` (in-process, as ``compiler_options``) or ``FAST_XLA`` (the
same options as ``XLA_FLAGS`` for subprocesses).

Subprocess runs (``python -m personalize_jax.main ...``) of the same tiny
recipe compile the same programs, so ``env()`` points every one of them at
one persistent compilation cache for the whole test session
(``tests/conftest.py`` makes it; pytest-xdist workers inherit it). JAX keys an
entry by the program, the compile options, ``XLA_FLAGS`` and the devices, so
a hit is the program that would have been compiled.
"""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# XLA's CPU optimisation passes and fusion emitters do not pay off for models
# this small (it roughly halves the compile time). Single-threaded Eigen
# matmuls and convolutions: the suite keeps both cores busy with its two
# workers and their subprocesses, and a thread pool per process only
# oversubscribes them (a cached tiny CLI run: 30 s -> 24.5 s alone).
FAST_COMPILE = {"xla_backend_optimization_level": 0,
                "xla_llvm_disable_expensive_passes": True,
                "xla_cpu_use_fusion_emitters": False,
                "xla_cpu_multi_thread_eigen": False}
FAST_XLA = " ".join(f"--{k}={str(v).lower()}" for k, v in FAST_COMPILE.items())

# Set by tests/conftest.py for the session: the subprocesses' shared cache.
CACHE_VARIABLE = "PERSONALIZE_JAX_TEST_COMPILATION_CACHE"


def env(devices: int | None = None, cache: bool = True,
        **extra: str) -> dict[str, str]:
  """The environment of a subprocess run: CPU, ``FAST_XLA``, shared cache.

  Args:
    devices: CPU devices the process sees (``None``: the default, one).
    cache: use the session's compilation cache (off for programs whose
      compile itself is measured, e.g. the benchmarks' memory reports).
    **extra: more variables (they win over the ones set here).
  """
  flags = FAST_XLA
  if devices is not None:
    flags = f"--xla_force_host_platform_device_count={devices} {flags}"
  out = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags,
             PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
  folder = os.environ.get(CACHE_VARIABLE)
  if cache and folder:
    out.update(JAX_COMPILATION_CACHE_DIR=folder,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  out.update(extra)
  return out
