"""personalize_jax: JAX/Flax training for personalized text-to-image generation."""

import glob
import importlib.util
import os

__version__ = "0.1.0"


def _hide_absent_tpu() -> None:
  """Runs on the CPU, quietly, where libtpu is installed but no TPU is.

  The ``tpu`` extra (also in ``test``) installs libtpu, the TPU compiler that
  ``benchmarks/tpu_compile.py`` uses on any host. On a host without TPU
  chips JAX would still try it first and print libtpu's initialisation
  warnings on every run. Where no platform was chosen (``JAX_PLATFORMS``),
  no TPU device file exists and no GPU plugin is installed, the CPU is the
  only platform there is: say so. Compiling for a TPU topology still works.
  """
  if "JAX_PLATFORMS" in os.environ:
    return
  if importlib.util.find_spec("libtpu") is None:
    return
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return  # a Cloud TPU VM: its chips are there.
  for plugin in ("jax_cuda12_plugin", "jax_cuda13_plugin",
                 "jax_rocm60_plugin", "jax_rocm7_plugin"):
    if importlib.util.find_spec(plugin) is not None:
      return
  os.environ["JAX_PLATFORMS"] = "cpu"


_hide_absent_tpu()
