"""Every entry point (a module of launch/, growth/ or tokenizer/ with a __main__ block) takes absl
flags, and its `--help` lists every flag the project defines for it, with that flag's help text."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("launch", "growth", "tokenizer")

# One process imports the heavy dependencies once, then forks a child per entry point that runs
# `python -m MOD --help` (runpy, as __main__) and sends back the help text and every flag that
# project code (launch/, growth/, tokenizer/, lightning_jax/) defined along the way.
DRIVER = r"""
import contextlib, io, json, os, runpy, sys
import numpy, jax, flax, optax, ml_collections
from absl import flags

def one(mod):
  sys.argv = [mod, "--help"]
  buf, code = io.StringIO(), None
  try:
    with contextlib.redirect_stdout(buf):
      runpy.run_module(mod, run_name="__main__", alter_sys=True)
  except SystemExit as e:
    code = e.code
  ours = {}
  for module, fl in flags.FLAGS.flags_by_module_dict().items():
    # keyed by file path for the __main__ module, by module name for the others
    if any(f"/{p}/" in module or module.startswith(p + ".")
           for p in ("launch", "growth", "tokenizer", "lightning_jax")):
      ours.update({f.name: f.help or "" for f in fl})
  return {"help": buf.getvalue(), "flags": ours, "code": code}

out = {}
for mod in sys.argv[1:]:
  r, w = os.pipe()
  pid = os.fork()
  if pid == 0:
    os.close(r)
    try:
      data = json.dumps(one(mod))
    except BaseException as e:
      data = json.dumps({"error": f"{type(e).__name__}: {e}"})
    with os.fdopen(w, "w") as f:
      f.write(data)
    os._exit(0)
  os.close(w)
  with os.fdopen(r) as f:
    out[mod] = json.loads(f.read())
  os.waitpid(pid, 0)
print("\x00" + json.dumps(out))
"""


def entry_points():
  out = []
  for pkg in PACKAGES:
    for f in sorted((REPO / pkg).glob("*.py")):
      if re.search(r'^if __name__ == "__main__":', f.read_text(), re.M):
        out.append(f"{pkg}.{f.stem}")
  return out


def _help(mods):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", DRIVER, *mods], capture_output=True, text=True,
                     cwd=REPO, env=env, timeout=600)
  assert "\x00" in r.stdout, f"{r.stdout[-2000:]}{r.stderr[-2000:]}"
  return json.loads(r.stdout.rsplit("\x00", 1)[1])


def test_every_entry_point_lists_every_flag_with_its_help():
  mods = entry_points()
  # the tools named by the issue are among them
  for m in ("launch.train", "launch.generate", "launch.score", "launch.plan", "launch.inspect",
            "growth.expand_experts", "growth.lineage", "tokenizer.build", "tokenizer.check",
            "tokenizer.fertility", "tokenizer.corpus_extract"):
    assert m in mods, m
  results = _help(mods)
  flat = lambda s: re.sub(r"\s+", "", s)      # absl wraps lines, also after a hyphen
  assert set(results) == set(mods)
  for mod, r in results.items():
    assert "error" not in r, f"{mod}: {r.get('error')}"
    text = flat(r["help"])
    assert "Try--helpfull" in text, f"{mod}: --help is not absl's ({r['help'][:300]!r})"
    assert r["code"] in (0, 1), f"{mod}: --help ended with {r['code']!r}"
    for name, hlp in r["flags"].items():
      assert hlp.strip(), f"{mod}: --{name} has no help text"
      assert re.search(rf"--(\[no\])?{re.escape(name)}: ", r["help"]), f"{mod}: --{name} missing"
      assert flat(hlp) in text, f"{mod}: --{name}'s help text missing"
  # the growth CLIs list their shared flags (defined in growth/cli.py, not in the module itself)
  for name in ("src", "dst", "seed", "ratio", "config"):
    assert name in results["growth.expand_experts"]["flags"], name
  assert {"audit_corpus", "out", "freq_corpus", "target", "overwrite"} <= set(
      results["tokenizer.build"]["flags"])


def test_tokenizer_build_refuses_to_write_over_a_tokenizer(tmp_path, capsys):
  from tokenizer import build
  out = tmp_path / "tok"
  out.mkdir()
  (out / "meta.json").write_text("{}")
  assert build.main(["--audit_corpus", str(REPO / "corpus"), f"--out={out}"]) == 2
  assert "already holds files" in capsys.readouterr().err
  assert (out / "meta.json").read_text() == "{}"
  assert build.main(["--out=x"]) == 2                         # --audit_corpus is required
  assert "audit_corpus" in capsys.readouterr().err


def test_growth_history_chains_through_runs(tmp_path):
  """Each written run's growth_history.json is its source run's history plus its own step."""
  from growth import history
  a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
  history.record(a, {"provenance": {"source_path": None, "transform": "init",
                                    "args": {"seed": 0}}}, "tiny")
  history.record(b, {"provenance": {"source_path": str(a / "checkpoints" / "20"),
                                    "source_step": 20, "source_stage": "tiny",
                                    "transform": "dense_to_moe", "args": {"seed": 1}},
                     "growth_report": {"source_loss": 5.0, "grown_loss": 5.5,
                                       "heldout_domain": "en"}}, "tiny_moe")
  history.record(c, {"provenance": {"source_path": str(b / "checkpoints"), "source_step": 7,
                                    "transform": "ema", "ema": {"alpha": 0.2}}}, "tiny_moe")
  h = history.read(c)
  assert [e["transform"] for e in h] == ["init", "dense_to_moe", "ema"]
  assert [e["run"] for e in h] == [str(a), str(b), str(c)]
  assert h[1]["heldout"] == {"source": 5.0, "grown": 5.5, "domain": "en"}
  lines = history.format_lines(h)
  assert len(lines) == 3 and "from scratch" in lines[0] and "5.0000 -> 5.5000" in lines[1]
  assert '"alpha": 0.2' in lines[2] and "step 7" in lines[2]
  assert history.read(tmp_path / "none") == [] and not list(tmp_path.glob("*/*.tmp"))
