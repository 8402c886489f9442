"""Every entry point (a module of launch/, growth/ or tokenizer/ with a __main__ block) takes absl
flags, and its `--help` lists every flag the project defines for it, with that flag's help text.
Every benchmark script (benchmarks/*.py with a __main__ block) takes argparse options (or absl
flags) with the same underscored names, each listed by `--help` with its help text."""
import ast
import functools
import json
import os
import pathlib
import re
import subprocess
import sys


REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("launch", "growth", "tokenizer")

# One process imports the heavy dependencies once, then forks a child per entry point that runs
# `python -m MOD --help` (runpy, as __main__) and sends back the help text, every absl flag that
# project code (launch/, growth/, tokenizer/, benchmarks/, lightning_jax/) defined along the way
# and every argparse parser that parsed the command line (its prog, description and options).
DRIVER = r"""
import argparse, contextlib, io, json, os, runpy, sys
import numpy, jax, flax, optax, ml_collections
from absl import flags

PARSERS = []
_parse_known = argparse.ArgumentParser.parse_known_args

def _record(self, *a, **k):
  if self not in PARSERS:
    PARSERS.append(self)
  return _parse_known(self, *a, **k)
argparse.ArgumentParser.parse_known_args = _record

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
           for p in ("launch", "growth", "tokenizer", "benchmarks", "lightning_jax")):
      ours.update({f.name: f.help or "" for f in fl})
  parsers = [{"prog": p.prog, "description": p.description or "",
              "options": [[list(a.option_strings), a.help or ""] for a in p._actions]}
             for p in PARSERS]
  return {"help": buf.getvalue(), "flags": ours, "parsers": parsers, "code": code}

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


def entry_points(packages=PACKAGES):
  out = []
  for pkg in packages:
    for f in sorted((REPO / pkg).glob("*.py")):
      if re.search(r'^if __name__ == "__main__":', f.read_text(), re.M):
        out.append(f"{pkg}.{f.stem}")
  return out


@functools.lru_cache(maxsize=None)
def _all_help():
  """The --help results of every entry point and benchmark script, from one driver process."""
  return _help(entry_points() + entry_points(("benchmarks",)))


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
  results = {m: r for m, r in _all_help().items() if m in mods}
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


def test_every_benchmark_lists_every_option_with_its_help():
  mods = entry_points(("benchmarks",))
  for m in ("benchmarks.rank120", "benchmarks.step", "benchmarks.kernels_bench",
            "benchmarks.gsa_kernel_bench", "benchmarks.tiny_main_job"):
    assert m in mods, m
  results = {m: r for m, r in _all_help().items() if m in mods}
  assert set(results) == set(mods)
  flat = lambda s: re.sub(r"\s+", "", s)      # argparse wraps lines
  n_options = 0
  for mod, r in results.items():
    assert "error" not in r, f"{mod}: {r.get('error')}"
    text = flat(r["help"])
    if not r["parsers"]:                       # an absl script: checked as the entry points are
      assert "Try--helpfull" in text and r["flags"], f"{mod}: --help is neither argparse's nor absl's"
      for name, hlp in r["flags"].items():
        assert hlp.strip(), f"{mod}: --{name} has no help text"
        assert flat(hlp) in text, f"{mod}: --{name}'s help text missing"
      continue
    assert r["code"] in (0, None), f"{mod}: --help ended with {r['code']!r}"
    assert len(r["parsers"]) == 1, f"{mod}: {len(r['parsers'])} parsers parsed the command line"
    p = r["parsers"][0]
    src = (REPO / "benchmarks" / f"{mod.split('.')[1]}.py").read_text()
    assert p["prog"] == f"python -m {mod}", f"{mod}: prog is {p['prog']!r}"
    assert p["description"] == ast.get_docstring(ast.parse(src)).splitlines()[0], \
        f"{mod}: the description is not the docstring's first line"
    assert text.startswith(flat(f"usage: python -m {mod}")), r["help"][:200]
    for names, hlp in p["options"]:
      if names == ["-h", "--help"]:
        continue
      n_options += 1
      primary = names[0]
      assert re.fullmatch(r"--[a-z0-9_]+", primary), f"{mod}: {names}: the first name must be " \
          "underscored (dashed spellings are aliases after it)"
      for alias in names[1:]:
        assert alias.replace("-", "_")[2:] == primary[2:], f"{mod}: {alias} is not {primary}"
      assert hlp.strip() and hlp != "==SUPPRESS==", f"{mod}: {primary} has no help text"
      assert "\n" not in hlp.strip(), f"{mod}: {primary}'s help text is not one line"
      assert all(flat(n) in text for n in names), f"{mod}: {names} missing from --help"
      assert flat(hlp) in text, f"{mod}: {primary}'s help text missing from --help"
  assert n_options >= 100, n_options


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
  from lightning_jax.run import history
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
