"""The layering the README describes: data flows down (moca_jax <- data_pipeline <-
experiments), never up; one atomic-write helper and one image decoder (moca_jax.io)."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY_PACKAGES = ("moca_jax", "data_pipeline")


def _python_files(*packages):
  for pkg in packages:
    for root, _, files in os.walk(os.path.join(ROOT, pkg)):
      for name in sorted(files):
        if name.endswith(".py"):
          yield os.path.join(root, name)


def _imported_modules(path):
  """Every module an `import` or `from ... import` statement of the file names (module level
  or inside functions)."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), filename=path)
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
      yield node.module


def test_import_parser_sees_function_level_imports(tmp_path):
  p = tmp_path / "m.py"
  p.write_text("import os\ndef f():\n  from experiments import generate\n  import experiments.x\n")
  assert list(_imported_modules(str(p))) == ["os", "experiments", "experiments.x"]


@pytest.mark.parametrize("package", LIBRARY_PACKAGES)
def test_library_never_imports_experiments(package):
  upward = [
      (os.path.relpath(p, ROOT), m)
      for p in _python_files(package)
      for m in _imported_modules(p)
      if m == "experiments" or m.startswith("experiments.")
  ]
  assert upward == []


def test_pipeline_imports_without_experiments():
  code = (
      "import sys, moca_jax.pipeline, moca_jax.dit_task, moca_jax.vae_task, "
      "moca_jax.evaluation, data_pipeline.encode_latents\n"
      "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'experiments')\n"
      "assert not bad, bad\n"
  )
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  res = subprocess.run(
      [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
  )
  assert res.returncode == 0, res.stderr[-2000:]


def _sources_calling(*names):
  """(file, line) of every call `a.b(...)` with the attribute chain `names` (e.g. ("os",
  "replace")) in the sources of the three packages (tests excluded)."""
  hits = []
  for p in _python_files("moca_jax", "data_pipeline", "experiments"):
    with open(p, encoding="utf-8") as f:
      tree = ast.parse(f.read(), filename=p)
    for node in ast.walk(tree):
      if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        parts, value = [node.func.attr], node.func.value
        while isinstance(value, ast.Attribute):
          parts.append(value.attr)
          value = value.value
        if isinstance(value, ast.Name):
          parts.append(value.id)
        if tuple(reversed(parts)) == names:
          hits.append((os.path.relpath(p, ROOT), node.lineno))
  return hits


def test_one_atomic_write_helper_and_one_image_decoder():
  assert {f for f, _ in _sources_calling("os", "replace")} == {"moca_jax/io.py"}
  assert {f for f, _ in _sources_calling("os", "rename")} == set()
  assert {f for f, _ in _sources_calling("tempfile", "mkstemp")} == set()
  assert {f for f, _ in _sources_calling("Image", "open")} == {"moca_jax/io.py"}
  assert _sources_calling("os", "getpid")  # the parser finds calls: this one exists
