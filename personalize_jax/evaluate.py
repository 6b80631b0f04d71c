"""DreamBench evaluation entry point (logic in ``eval_dreambench``).

  python -m personalize_jax.evaluate --config=configs/eval_dreambench.py \
      --config.images_dir=/path/to/generated --workdir=/tmp/eval

Writes ``metrics.json``, ``metrics.md`` and ``grids/<subject>.png`` into
``--workdir``. Mistakes in the inputs end with one line on stderr, exit code 2.
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from personalize_jax import eval_dreambench
from personalize_jax.errors import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Evaluation config file (configs/eval_dreambench.py).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the reports go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  try:
    results = eval_dreambench.evaluate(_CONFIG.value, _WORKDIR.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(eval_dreambench.markdown_report(results))


if __name__ == "__main__":
  app.run(main)
