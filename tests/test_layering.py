"""The package's layering, read from the source: which modules may import which.

Data flows one way (configs -> main -> engine <- methods <- models, diffusion,
rewards, data), so a model port never imports what is built on top of it, and
the engine runs a method as a value it is given rather than importing one.
"""

import ast
from pathlib import Path

import personalize_jax

PACKAGE = Path(personalize_jax.__file__).parent


def _imports(path: Path, root: Path) -> set[str]:
  """Every module ``path`` imports (absolute names, nested imports too).

  ``from a import b`` counts as importing ``a.b`` as well, since ``b`` may be
  a module; relative imports are resolved against the file's package, and
  ``importlib.import_module("...")`` with a literal name counts too.
  """
  package = ".".join(path.relative_to(root.parent).with_suffix("").parts)
  if path.name != "__init__.py":
    package = package.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:  # `from ..x import y` in a.b.c: a.x, a.x.y
        parent = package.rsplit(".", node.level - 1)[0]
        base = f"{parent}.{base}" if base else parent
      found.add(base)
      found.update(f"{base}.{alias.name}" for alias in node.names)
    elif (isinstance(node, ast.Call) and node.args
          and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str)
          and getattr(node.func, "attr", getattr(node.func, "id", None))
          == "import_module"):
      found.add(node.args[0].value)
  return found


def _violations(folder: str, forbidden: tuple[str, ...],
                root: Path = PACKAGE) -> list[str]:
  """``"<file> imports <module>"`` for each forbidden import in ``folder``."""
  out = []
  for path in sorted((root / folder).rglob("*.py")):
    for name in sorted(_imports(path, root)):
      if any(name == f or name.startswith(f + ".") for f in forbidden):
        out.append(f"{path.relative_to(root.parent)} imports {name}")
  return out


# What a model port must not import: everything built on top of the models.
ABOVE_MODELS = ("personalize_jax.diffusion", "personalize_jax.engine",
                "personalize_jax.methods", "personalize_jax.pipeline",
                "personalize_jax.rewards")


def test_models_import_nothing_built_on_them():
  assert _violations("models", ABOVE_MODELS) == []


def test_engine_imports_no_method():
  assert _violations("engine", ("personalize_jax.methods",)) == []


def test_the_import_reader_sees_every_form(tmp_path):
  """Absolute, ``from``, relative, nested and ``import_module`` imports."""
  models = tmp_path / "personalize_jax" / "models"
  models.mkdir(parents=True)
  (models / "bad.py").write_text(
      "import personalize_jax.rewards\n"
      "from personalize_jax import diffusion\n"
      "from .. import engine\n"
      "from ..methods.base import Method\n"
      "import importlib\n"
      "def f():\n"
      "  from personalize_jax.pipeline import load_stable_diffusion\n"
      "  return importlib.import_module('personalize_jax.methods.rpo')\n")
  (models / "good.py").write_text(
      "from personalize_jax.models import checkpoint\n"
      "from . import presets\n")
  found = _violations("models", ABOVE_MODELS, tmp_path / "personalize_jax")
  assert [line.split(" imports ")[1] for line in found] == [
      "personalize_jax.diffusion", "personalize_jax.engine",
      "personalize_jax.methods.base", "personalize_jax.methods.base.Method",
      "personalize_jax.methods.rpo", "personalize_jax.pipeline",
      "personalize_jax.pipeline.load_stable_diffusion",
      "personalize_jax.rewards"]
