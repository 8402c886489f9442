"""Bytes a compiled step moves, by model scope, from its optimized HLO text (no device needed).

    python -m benchmarks.hlo_traffic --hlo HLO.txt [--bandwidth 3.35e12] [--top 25] [--json F]
    python -m benchmarks.hlo_traffic --hlo HLO.txt --scope "bwd hc_pre"   (that scope's instructions)

The HLO is what `--hlo_out` of benchmarks.step / benchmarks.rank120 writes (with --compile_for,
lightning_jax/gpu_target.py, on a host without a GPU) or XLA's `*after_optimizations.txt` dump.
Every top-level instruction (a fusion, a library GEMM, a copy, a collective; not the instructions
inside a fusion) moves its operands and its result through device memory once. Its bytes are
counted that many times per step:
  * a while loop's body `known_trip_count` times (nested loops multiply; a loop without a known
    count is counted once);
  * an operand that a fusion only dynamic-slices counts as the slice (the stored boundaries of a
    reversible stack: one layer's state is read, not the stack);
  * a dynamic-update-slice is in place: its buffer is neither read nor written whole.
Each instruction is attributed to "phase scope" as `profile_table.hlo_scopes` names it (the
model's jax.named_scope names, phase fwd / rebuild / recompute / bwd).

Bytes over the card's bandwidth is the time a memory-bound scope takes. On the 120B rank's H100
profile (session 11) that estimate came within 12% of the measured time for the streams' read-in
and the routed experts' forward; compute-bound scopes (GEMMs, the Pallas kernels: the mixers, the
head) take longer than their bytes say, and a custom call's own traffic is only its operands and
result. So use it to compare two compiles of the same step (a change that moves fewer bytes in a
memory-bound scope), not as a step time.
"""
from __future__ import annotations

import argparse
import collections
import json
import re

from benchmarks import profile_table

_ELT = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
        "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
_ARRAY = re.compile(r"\b(" + "|".join(_ELT) + r")\[([\d,]*)\]")
_HEAD = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \(.*\{$")
_INSTR = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = (\([^=]*?\)|\S+) ([\w\-]+)\((.*)")
# instructions that move nothing themselves
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
         "call", "copy-start", "copy-done", "partition-id", "replica-id", "opt-barrier",
         "after-all", "add-dependency"}


def array_bytes(text: str) -> int:
  """Bytes of every array shape written in `text` (a shape or a tuple of shapes)."""
  total = 0
  for ty, dims in _ARRAY.findall(text):
    n = 1
    for d in dims.split(","):
      if d:
        n *= int(d)
    total += _ELT[ty] * n
  return total


def _computations(text: str) -> dict:
  """{computation name: [instruction lines]}."""
  comps, cur = {}, None
  for line in text.splitlines():
    h = _HEAD.match(line)
    if h:
      cur = comps.setdefault(h.group(1), [])
      continue
    if cur is not None and line.strip() and line.strip() != "}":
      cur.append(line)
  return comps


def _multiplicity(text: str, comps: dict) -> dict:
  """How many times per step each computation runs (while bodies by their known trip count)."""
  entry = re.search(r"^ENTRY %([\w.\-]+) ", text, re.M).group(1)
  edges = []
  for comp, lines in comps.items():
    for line in lines:
      if " while(" in line:
        n = re.search(r'known_trip_count":\{"n":"(\d+)"', line)
        for key in ("body", "condition"):
          edges.append((comp, re.search(key + r"=%([\w.\-]+)", line).group(1),
                        float(n.group(1)) if n else 1.0))
      elif re.search(r" (call|conditional)\(", line):
        for callee in re.findall(r"(?:to_apply|branch_computations=\{|, )%([\w.\-]+)", line):
          edges.append((comp, callee, 1.0))
  mult = collections.defaultdict(float, {entry: 1.0})
  for _ in range(len(comps)):          # propagate down the call graph (a DAG)
    changed = False
    for a, b, n in edges:
      if mult[a] and mult[b] < mult[a] * n:
        mult[b], changed = mult[a] * n, True
    if not changed:
      break
  return mult


def _sliced_params(lines: list) -> dict:
  """{parameter index: bytes read} for a fused computation's parameters used only through
  dynamic-slice (the slice's bytes) or as the buffer of a dynamic-update-slice (0: in place)."""
  out = {}
  params = [(m.group(1), int(m.group(2))) for line in lines
            for m in [re.search(r"%([\w.\-]+) = \S+ parameter\((\d+)\)", line)] if m]
  for name, idx in params:
    uses = [m for line in lines for m in [_INSTR.match(line)]
            if m and re.search(r"%" + re.escape(name) + r"[,)]", m.group(4))]
    if uses and all(u.group(3) == "dynamic-slice" for u in uses):
      out[idx] = sum(array_bytes(u.group(2)) for u in uses)
    elif uses and all(u.group(3) == "dynamic-update-slice"
                      and u.group(4).split(",")[0].strip().lstrip("%") == name for u in uses):
      out[idx] = 0
  return out


def instructions(hlo_text_path: str):
  """Every top-level instruction that moves bytes, as dicts {scope, name, kind, shape,
  bytes (per step: operands + result, times its computation's runs per step), runs}."""
  with open(hlo_text_path) as f:
    text = f.read()
  comps = _computations(text)
  fused = set(re.findall(r"calls=%([\w.\-]+)", text)) | set(
      re.findall(r"to_apply=%([\w.\-]+)", text)) - {
      c for line in text.splitlines() if " call(" in line
      for c in re.findall(r"to_apply=%([\w.\-]+)", line)}
  mult = _multiplicity(text, comps)
  scopes = profile_table.hlo_scopes(hlo_text_path)
  size, sliced = {}, {}
  for comp, lines in comps.items():
    for line in lines:
      m = _INSTR.match(line)
      if m:
        size[m.group(1)] = array_bytes(m.group(2))
  for comp, lines in comps.items():
    if comp in fused:
      continue
    for line in lines:
      m = _INSTR.match(line)
      if not m or m.group(3) in _FREE:
        continue
      name, kind, rest = m.group(1), m.group(3), m.group(4)
      operands = re.findall(r"%([\w.\-]+)", rest.split("), ")[0])
      callee = re.search(r"calls=%([\w.\-]+)", line)
      if callee and callee.group(1) not in sliced:
        sliced[callee.group(1)] = _sliced_params(comps.get(callee.group(1), []))
      reads = sliced.get(callee.group(1), {}) if callee else {}
      in_place = kind == "dynamic-update-slice" or any(v == 0 for v in reads.values())
      moved = (0 if in_place else size.get(name, 0)) + sum(
          reads.get(i, size.get(a, 0)) for i, a in enumerate(operands))
      if kind == "dynamic-update-slice":
        moved -= size.get(operands[0], 0) if operands else 0
      runs = mult.get(comp) or 1.0
      yield {"scope": scopes.get(name, "?"), "name": name, "kind": kind,
             "shape": m.group(2), "bytes": moved * runs, "runs": runs}


def traffic(hlo_text_path: str) -> dict:
  """{"phase scope": bytes moved per step} of a compiled HLO module's text."""
  acc = collections.defaultdict(float)
  for ins in instructions(hlo_text_path):
    acc[ins["scope"]] += ins["bytes"]
  return dict(acc)


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m benchmarks.hlo_traffic",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--hlo", required=True, help="Optimized HLO text of the step (--hlo_out, or "
                  "XLA's dump).")
  ap.add_argument("--bandwidth", type=float, default=3.35e12, help="Bytes per second for the "
                  "time column (H100 3.35e12, H200 4.8e12).")
  ap.add_argument("--top", type=int, default=25, help="Rows to print.")
  ap.add_argument("--json", default="", help="Write {scope: bytes} here.")
  ap.add_argument("--scope", default="", help="Instead, list the top instructions of this "
                  "scope (as printed, e.g. 'fwd moe/routed/experts') by bytes.")
  a = ap.parse_args(argv)
  if a.scope:
    rows = sorted((i for i in instructions(a.hlo) if i["scope"] == a.scope),
                  key=lambda i: -i["bytes"])
    if not rows:
      raise SystemExit(f"--scope {a.scope!r} names no scope of {a.hlo}; expected one of the "
                       f"names the plain listing prints.")
    print(f"{a.scope}: {sum(i['bytes'] for i in rows) / 1e9:.2f} GB per step in {len(rows)} "
          f"instructions")
    for i in rows[:a.top]:
      print(f"  {i['bytes'] / 1e9:8.2f} GB x{i['runs']:<4.0f} {i['kind']:14s} {i['name'][:36]:36s} "
            f"{i['shape'][:70]}")
    return rows
  acc = traffic(a.hlo)
  total = sum(acc.values())
  print(f"{total / 1e9:.1f} GB per step, {total / a.bandwidth * 1e3:.1f} ms at "
        f"{a.bandwidth / 1e12:.2f} TB/s if all of it were memory-bound")
  for scope, b in sorted(acc.items(), key=lambda kv: -kv[1])[:a.top]:
    print(f"  {b / 1e9:9.2f} GB {b / a.bandwidth * 1e3:8.2f} ms  {scope}")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(acc, f, indent=1)
  return acc


if __name__ == "__main__":
  main()
