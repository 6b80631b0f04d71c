"""``python -m personalize_jax.main`` with a SIGKILL at a chosen moment.

The fault tests kill a whole training run at moments an outside signal could
not hit reliably (a tiny checkpoint is written in milliseconds), then resume
it with the plain command. The run takes the command line of
``personalize_jax.main`` plus one flag::

  python tests/_fault_run.py --fault=during_save:2 \
      --config=configs/dreambooth_tpu.py:tiny --workdir=/tmp/w ...

``--fault=WHEN:STEP`` kills this process with SIGKILL

* ``before_save:N``: when the loop asks to save step N, before anything of
  it is written (with N = 1: before the first checkpoint write);
* ``during_save:N``: inside orbax's background write of step N, just before
  its commit marker: every file is in ``N.orbax-checkpoint-tmp/`` and the
  rename to ``N/`` has not happened;
* ``after_save:N``: once step N's checkpoint is committed, when the loop
  next waits for it.
"""

import os
import signal
from pathlib import Path

from absl import app, flags
from orbax.checkpoint._src.path import async_path

from personalize_jax import main as cli
from personalize_jax.engine import checkpoints

_FAULT = flags.DEFINE_string("fault", None, "WHEN:STEP, see the docstring.")
WHENS = ("before_save", "during_save", "after_save")


def _die() -> None:
  os.kill(os.getpid(), signal.SIGKILL)


def install(when: str, step: int) -> None:
  """Patches the checkpoint path so that it SIGKILLs this process.

  Args:
    when: one of WHENS, as the module docstring describes them.
    step: the step whose checkpoint the kill is about.
  """
  if when == "before_save":
    save = checkpoints.CheckpointManager.save

    def killing_save(self, at, *args, **kwargs):
      if at == step:
        _die()
      return save(self, at, *args, **kwargs)

    checkpoints.CheckpointManager.save = killing_save
  elif when == "during_save":
    write_text = async_path.write_text
    tmp_folder = f"{step}{checkpoints.TMP_SUFFIX}"

    async def killing_write_text(path, text):
      # The step folder's own commit marker, not those of its items.
      if Path(path).name == "commit_success.txt" and (
          Path(path).parent.name == tmp_folder):
        _die()
      return await write_text(path, text)

    async_path.write_text = killing_write_text
  elif when == "after_save":
    # pylint: disable=protected-access
    finish = checkpoints.CheckpointManager._finish_pending

    def killing_finish(self):
      pending = self._pending_step
      finish(self)
      if pending == step:
        _die()

    checkpoints.CheckpointManager._finish_pending = killing_finish
    # pylint: enable=protected-access
  else:
    raise ValueError(f"--fault={when}:{step}: use one of {WHENS}")


def main(argv) -> None:
  when, step = _FAULT.value.split(":")
  install(when, int(step))
  cli.main(argv)


if __name__ == "__main__":
  flags.mark_flag_as_required("fault")
  app.run(main, flags_parser=cli._parse)  # pylint: disable=protected-access
