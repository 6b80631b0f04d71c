"""Shared test setup: float32 everywhere, deterministic torch, shared data paths."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# libtpu (the TPU compiler of tests/test_tpu_compile.py) takes a lock file
# that would keep a second test worker from loading it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# Shared test helpers (``recipes``) import by name from any test folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import xla_env  # pylint: disable=g-import-not-at-top,wrong-import-position

# In-process programs compile as the subprocess runs do (tests/xla_env.py).
os.environ.setdefault("XLA_FLAGS", xla_env.FAST_XLA)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


# The files that cost the most (CPU time of a clean-clone run, heaviest
# first; each trains or compiles whole recipes). pytest-xdist hands whole
# files to its workers (--dist loadfile) in collection order: these go first,
# so that no worker is left alone with a long file at the end. Its default
# order (files with the most tests first) ran exactly these last.
HEAVY_FILES = (
    "tests/test_tpu_compile.py",
    "tests/engine/test_train.py",
    "tests/test_faults.py",
    "tests/test_benchmarks.py",
    "tests/test_distributed.py",
    "tests/methods/test_rpo.py",
    "tests/methods/test_lookforward.py",
    "tests/methods/test_dreambooth.py",
    "tests/methods/test_sdxl.py",
    "tests/test_golden.py",
    "tests/test_generate.py",
)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: runs whole trainings in subprocesses (minutes on CPU)")
  # Keep the order pytest_collection_modifyitems makes (xdist's default
  # reorders files by their number of tests).
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False
  # One compilation cache for the subprocess runs of the whole session
  # (tests/xla_env.py); made before pytest-xdist starts its workers, which
  # inherit the variable, and removed by the process that made it.
  if not os.environ.get(xla_env.CACHE_VARIABLE):
    os.environ[xla_env.CACHE_VARIABLE] = tempfile.mkdtemp(
        prefix="personalize_jax-xla-cache-")
    config.made_compilation_cache = os.environ[xla_env.CACHE_VARIABLE]
  _use_the_cache_in_process()


def _use_the_cache_in_process() -> None:
  """In-process programs share the session's compilation cache too."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir",
                    os.environ[xla_env.CACHE_VARIABLE])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):
  made = getattr(config, "made_compilation_cache", None)
  if made:
    shutil.rmtree(made, ignore_errors=True)
    del os.environ[xla_env.CACHE_VARIABLE]


@pytest.fixture(scope="session")
def shared_dir() -> Path:
  """``../shared`` beside the repository; tests using it skip when absent."""
  if not SHARED.is_dir():
    pytest.skip(f"{SHARED} is absent (DreamBench data lives there)")
  return SHARED


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
  try:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(1)
    torch.manual_seed(0)
  except ImportError:
    pass


def pytest_collection_modifyitems(config, items):
  """Puts the tests of ``HEAVY_FILES`` first, heaviest file first; the rest
  keep their order."""
  del config
  rank = {name: i for i, name in enumerate(HEAVY_FILES)}
  items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0],
                                       len(HEAVY_FILES)))
