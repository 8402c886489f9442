"""The house's import rules as a ratchet (issue 19, docs/house_plan.md step 1).

Counts today's imports of project modules made inside functions, and the edges between packages
that all imports make (an import inside a function is a dependency too, only hidden), from the
source (ast; nothing imported). A change may lower them, never raise
them; when the house move lands, the ceilings go to zero and the only edges left are entry
points -> lightning_jax. Lower the numbers below in the same commit that removes imports.
"""
from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("lightning_jax", "launch", "growth", "benchmarks", "tokenizer")
# imports of project modules inside functions, per package (ceilings after issue 19 step 2: the
# entry points have none; lightning_jax's are in the modules the later steps move)
IN_FUNCTION_CEILING = {"lightning_jax": 16, "launch": 0, "growth": 0, "benchmarks": 0,
                       "tokenizer": 0}
# edges between top-level packages that exist today: entry points -> lightning_jax, and one
# entry point -> entry point left (growth.lineage trains every stage in its one process with
# launch.train's loop). Inside the library layers/ import ops/, and ops/ never imports layers/
# (the edge ("ops", "layers") is refused).
EDGES_TODAY = {("launch", "lightning_jax"), ("growth", "lightning_jax"),
               ("benchmarks", "lightning_jax"), ("tokenizer", "lightning_jax"),
               ("growth", "launch"),
               ("layers", "ops")}


def _imported(node) -> list[str]:
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
    return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
  return []


def scan(root: pathlib.Path = REPO):
  """(in-function project imports per package, package edges of all imports)."""
  inside = {p: 0 for p in PACKAGES}
  edges = set()
  for pkg in PACKAGES:
    for f in sorted((root / pkg).rglob("*.py")):
      tree = ast.parse(f.read_text(), str(f))
      nested = set()
      for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
          for n in ast.walk(fn):
            if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in nested:
              nested.add(id(n))
              if any(m.split(".")[0] in PACKAGES for m in _imported(n)):
                inside[pkg] += 1
      sub = f.relative_to(root / pkg).parts[0] if pkg == "lightning_jax" else None
      for n in ast.walk(tree):
        for m in _imported(n):
          top = m.split(".")[0]
          if top in PACKAGES and top != pkg:
            edges.add((pkg, top))
          for a, b in (("layers", "ops"), ("ops", "layers")):
            if sub == a and m.startswith(f"lightning_jax.{b}"):
              edges.add((a, b))
  return inside, edges


def test_imports_do_not_grow_beyond_todays_house():
  inside, edges = scan()
  over = {p: (n, IN_FUNCTION_CEILING[p]) for p, n in inside.items() if n > IN_FUNCTION_CEILING[p]}
  assert not over, (f"imports of project modules inside functions grew (count, ceiling): {over}; "
                    "import at module level (docs/house_plan.md)")
  new = edges - EDGES_TODAY
  assert not new, (f"new import edges between packages {sorted(new)}; entry points import only "
                   "lightning_jax and the library imports no entry point (docs/house_plan.md)")


def test_the_scan_sees_an_import_inside_a_function(tmp_path):
  """The counter counts what it should: a nested project import, and edges of both kinds."""
  for pkg in PACKAGES:
    (tmp_path / pkg).mkdir()
  (tmp_path / "launch" / "a.py").write_text(
      "import os\nfrom growth import cli\n\ndef f():\n  from lightning_jax import model\n"
      "  import json\n  return model\n")
  (tmp_path / "lightning_jax" / "layers").mkdir()
  (tmp_path / "lightning_jax" / "layers" / "x.py").write_text("from lightning_jax.ops import k\n")
  (tmp_path / "lightning_jax" / "ops").mkdir()
  (tmp_path / "lightning_jax" / "ops" / "y.py").write_text("from lightning_jax.layers import x\n")
  inside, edges = scan(tmp_path)
  assert inside["launch"] == 1 and sum(inside.values()) == 1
  assert edges == {("launch", "growth"), ("launch", "lightning_jax"), ("layers", "ops"),
                   ("ops", "layers")}
  assert ("ops", "layers") not in EDGES_TODAY     # the library's rule: ops never import layers
