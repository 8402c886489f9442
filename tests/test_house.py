"""The house's import rules (issue 19; docs/ARCHITECTURE.md "Which way imports go").

From the source (ast; nothing is imported):
  * entry points (launch, growth, benchmarks, tokenizer) import only the library, lightning_jax;
    the library imports no entry point; no two entry points import each other;
  * inside the library, layers/ import ops/ and ops/ never import layers/;
  * no import sits inside a function, except of an optional dependency (OPTIONAL): an import in
    a function is a dependency too, only hidden;
  * no unused import (ruff's F401, which the test extra installs).
"""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("lightning_jax", "launch", "growth", "benchmarks", "tokenizer")
ENTRY_POINTS = ("launch", "growth", "benchmarks", "tokenizer")
# imported inside functions on purpose: not installed everywhere (wandb, tokamax, qwix), only
# where they are used (plots, TensorBoard), or only loadable with a GPU's Triton (the Pallas
# Triton backend's modules)
OPTIONAL = ("wandb", "tokamax", "qwix", "matplotlib", "tensorboardX",
            "jax.experimental.pallas.triton", "jax._src.pallas.triton")
ALLOWED_EDGES = {(e, "lightning_jax") for e in ENTRY_POINTS} | {("layers", "ops")}


def _imported(node) -> list[str]:
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
    return [node.module] + [f"{node.module}.{a.name}" for a in node.names]
  return []


def _optional(names: list[str]) -> bool:
  return any(n == o or n.startswith(o + ".") for n in names for o in OPTIONAL)


def scan(root: pathlib.Path = REPO):
  """(imports inside functions that are not optional: ["file:line module"], package edges)."""
  inside, edges = [], set()
  for pkg in PACKAGES:
    for f in sorted((root / pkg).rglob("*.py")):
      tree = ast.parse(f.read_text(), str(f))
      seen = set()
      for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
          for n in ast.walk(fn):
            if isinstance(n, (ast.Import, ast.ImportFrom)) and id(n) not in seen:
              seen.add(id(n))
              names = _imported(n)
              if names and not _optional(names):
                inside.append(f"{f.relative_to(root)}:{n.lineno} {names[0]}")
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


def test_imports_follow_the_house_rules():
  inside, edges = scan()
  assert not inside, (f"imports inside functions: {inside[:6]}; import at module level (only "
                      f"optional dependencies {OPTIONAL} may be imported where they are used)")
  bad = edges - ALLOWED_EDGES
  assert not bad, (f"import edges {sorted(bad)} break the house: entry points import only "
                   "lightning_jax, the library imports no entry point, ops never import layers")


def test_no_unused_imports():
  r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "F401",
                      "--output-format", "concise", *PACKAGES, "configs", "tests"],
                     cwd=REPO, capture_output=True, text=True)
  assert r.returncode == 0, f"unused imports (ruff F401):\n{r.stdout[-3000:]}{r.stderr[-500:]}"


def test_the_scan_sees_what_it_should(tmp_path):
  """A nested project import and a nested third-party one are found, an optional one is not;
  edges of both kinds are seen, and the forbidden ones are outside the allowed set."""
  for pkg in PACKAGES:
    (tmp_path / pkg).mkdir()
  (tmp_path / "launch" / "a.py").write_text(
      "import os\nfrom growth import cli\n\ndef f():\n  from lightning_jax import model\n"
      "  import json\n  import wandb\n  return model\n")
  (tmp_path / "lightning_jax" / "layers").mkdir()
  (tmp_path / "lightning_jax" / "layers" / "x.py").write_text("from lightning_jax.ops import k\n")
  (tmp_path / "lightning_jax" / "ops").mkdir()
  (tmp_path / "lightning_jax" / "ops" / "y.py").write_text("from lightning_jax.layers import x\n")
  inside, edges = scan(tmp_path)
  assert [s.split(" ")[1] for s in inside] == ["lightning_jax", "json"]
  assert edges == {("launch", "growth"), ("launch", "lightning_jax"), ("layers", "ops"),
                   ("ops", "layers")}
  assert edges - ALLOWED_EDGES == {("launch", "growth"), ("ops", "layers")}
