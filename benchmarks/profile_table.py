"""A jax.profiler trace of a few calls turned into a per-op table (the profile the method asks for).

    rows, info = profile_ops(fn, n_calls=1, logdir="/tmp/prof")   # fn() runs one step, blocking

jax.profiler writes a Perfetto trace (`create_perfetto_trace=True`: *.trace.json.gz) next to
its xplane; this module reads the JSON with the standard library (no xprof / tensorboard plugin
needed) and sums the complete events ("ph": "X") of the device by name:
  * on a GPU, the device process holds one line per CUDA stream (kernel names) and derived lines
    "XLA Ops" (the HLO instruction each kernel belongs to) and "XLA Modules"; the table is taken
    from "XLA Ops" when present (HLO names, e.g. `fusion.123`, `custom-call.7`), else from the
    stream lines (kernel names);
  * on CPU (tests, --tiny), XLA's ops run on host threads: the events of the threads whose names
    look like XLA's op threads, else every host event below the top level.
Each row: name, calls, total ms per profiled call, share of the summed device-op time, and the
HLO category / a long name when the trace carries one.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import glob
import gzip
import json
import os
import re
import shutil
import tempfile

import jax


def _load(path: str) -> dict:
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "rt") as f:
    return json.load(f)


def _names(events):
  procs, threads = {}, {}
  for ev in events:
    if ev.get("ph") != "M":
      continue
    if ev.get("name") == "process_name":
      procs[ev.get("pid")] = str(ev.get("args", {}).get("name", ""))
    elif ev.get("name") == "thread_name":
      threads[(ev.get("pid"), ev.get("tid"))] = str(ev.get("args", {}).get("name", ""))
  return procs, threads


def _pick_lines(events, procs, threads):
  """(set of (pid, tid) whose events form the table, description of the choice)."""
  dev = {p for p, n in procs.items() if "/device:" in n and "CPU" not in n.upper()}
  if dev:
    ops = {k for k, n in threads.items() if k[0] in dev and n.strip().lower() == "xla ops"}
    if ops:
      return ops, "device 'XLA Ops' lines (HLO instructions)"
    streams = {k for k, n in threads.items() if k[0] in dev and "stream" in n.lower()}
    if streams:
      return streams, "device stream lines (kernels)"
    return {k for k in threads if k[0] in dev}, "all device lines"
  # CPU: XLA ops on host threads
  xla = {k for k, n in threads.items()
         if any(s in n.lower() for s in ("xla", "tfrt", "eigen", "intra_op", "cpu"))}
  if xla:
    return xla, "host threads running XLA:CPU ops"
  return set(threads), "all host threads"


# kernel families by name (GPU stream lines; on CPU the HLO op names fall into the XLA rows)
COPY_STREAM = " [copy stream]"     # suffix of events on a stream that only copies (see op_table)
FAMILIES = (
    ("async copies on copy streams", re.compile(re.escape(COPY_STREAM) + "$")),
    ("XLA Triton GEMM fusions", re.compile(r"^(gemm_fusion|triton_gemm|cutlass_gemm_fusion)")),
    ("cuBLAS GEMMs", re.compile(r"nvjet|xmma_gemm|cublas|cutlass|^sm\d+_.*gemm", re.I)),
    ("cuDNN attention", re.compile(r"cudnn|sdpa|flash", re.I)),
    ("memcpy / memset", re.compile(r"^Memcpy|^Memset|^memcpy|^memset")),
    ("sort", re.compile(r"sort", re.I)),
    ("concatenate fusions", re.compile(r"concatenate")),
    ("other XLA fusions", re.compile(
        r"fusion|^wrapped_|^loop_|^input_|^copy|^transpose|^reduce|^select|^broadcast|^convert|"
        r"^slice|^dynamic|^scatter|^gather|^bitcast|^iota|^pad|^add|^multiply|^subtract|^divide|"
        r"^exp|^log|^negate|^compare|^and|^or|^xor|^maximum|^minimum|^rsqrt|^sqrt|^tanh|^dot|"
        r"^all-|^reduce-|^collective|^while|^conditional|^tuple|^get-tuple|^parameter|^constant")),
)
OTHER_FAMILY = "Pallas and other custom kernels"


def family_of(name: str) -> str:
  """The family a kernel (or HLO op) name belongs to: the first of FAMILIES that matches."""
  for fam, rx in FAMILIES:
    if rx.search(name):
      return fam
  return OTHER_FAMILY


def family_table(rows: list[dict]) -> list[dict]:
  """rows of op_table (all of them, not the top few) summed by family, largest first."""
  acc = collections.defaultdict(lambda: [0.0, 0.0, 0])
  for r in rows:
    a = acc[family_of(r["name"])]
    a[0] += r["ms"]
    a[1] += r["calls"]
    a[2] += 1
  total = sum(v[0] for v in acc.values()) or 1.0
  out = [{"family": k, "ms": v[0], "share": v[0] / total, "calls": v[1], "kernels": v[2]}
         for k, v in acc.items()]
  return sorted(out, key=lambda r: -r["ms"])


def _copy_only(thread_name: str) -> bool:
  """A CUDA stream line that carries copies and nothing else, e.g. 'Stream #71(MemcpyD2D)' (the
  compute stream reads 'Stream #14(MemcpyD2D,Compute,Memset)')."""
  m = re.search(r"stream.*\((.*)\)", thread_name, re.I)
  return bool(m) and all(k.strip().lower().startswith("memcpy") for k in m.group(1).split(","))


def _merged(intervals):
  out = []
  for a, b in sorted(intervals):
    if out and a <= out[-1][1]:
      out[-1][1] = max(out[-1][1], b)
    else:
      out.append([a, b])
  return out


def _overlap_us(intervals, merged) -> float:
  """Total time of `intervals` that falls inside the disjoint sorted `merged` ones."""
  starts = [m[0] for m in merged]
  total = 0.0
  for a, b in intervals:
    i = max(bisect.bisect_right(starts, a) - 1, 0)
    while i < len(merged) and merged[i][0] < b:
      total += max(0.0, min(b, merged[i][1]) - max(a, merged[i][0]))
      i += 1
  return total


def op_table(trace_path: str, n_calls: int = 1, top: int = 25) -> tuple[list[dict], dict]:
  """(rows sorted by total time, info) from one Perfetto trace JSON (optionally .gz).

  On GPU stream lines, XLA runs some copies (dynamic slices of the scans' stacked operands) on
  streams of their own, beside the compute stream. Their events are named with COPY_STREAM
  appended and form their own family; info["copy_streams"] says how much of their time the
  compute stream spent running kernels anyway, since only the rest can delay the step (session
  18 read 20 ms of such copies at stage_2b B4 as step time: docs/PERFORMANCE.md)."""
  data = _load(trace_path)
  events = data["traceEvents"] if isinstance(data, dict) else data
  procs, threads = _names(events)
  lines, how = _pick_lines(events, procs, threads)
  copy_lines = {k for k in lines if how.startswith("device stream") and _copy_only(threads[k])}
  copies, compute = [], []
  acc = collections.defaultdict(lambda: [0, 0.0, ""])
  span = [float("inf"), 0.0]
  short = 0                                      # launches under 5 us
  for ev in events:
    if ev.get("ph") != "X" or (ev.get("pid"), ev.get("tid")) not in lines:
      continue
    name = str(ev.get("name", "?"))
    if (ev.get("pid"), ev.get("tid")) in copy_lines:
      name += COPY_STREAM
      copies.append((float(ev.get("ts", 0.0)), float(ev.get("ts", 0.0)) + float(ev.get("dur", 0.0))))
    elif copy_lines:
      compute.append((float(ev.get("ts", 0.0)), float(ev.get("ts", 0.0)) + float(ev.get("dur", 0.0))))
    if how.startswith("host") and (name.startswith(("$", "end: ", "ThreadpoolListener",
                                                    "PjitFunction")) or "ThunkExecutor" in name):
      continue                                   # Python frames and executor wrappers
    dur = float(ev.get("dur", 0.0))
    short += dur < 5.0
    a = acc[name]
    a[0] += 1
    a[1] += dur
    args = ev.get("args") or {}
    if not a[2]:
      a[2] = str(args.get("hlo_category") or args.get("long_name") or args.get("hlo_op") or "")[:160]
    ts = float(ev.get("ts", 0.0))
    span[0], span[1] = min(span[0], ts), max(span[1], ts + dur)
  total_us = sum(v[1] for v in acc.values())
  rows = [{"name": k, "calls": v[0] / n_calls, "ms": v[1] / 1e3 / n_calls,
           "share": v[1] / total_us if total_us else 0.0, "detail": v[2]}
          for k, v in acc.items()]
  rows.sort(key=lambda r: -r["ms"])
  info = {"lines": how, "n_ops": len(rows), "op_ms_per_call": total_us / 1e3 / n_calls,
          "span_ms_per_call": (span[1] - span[0]) / 1e3 / n_calls if acc else 0.0,
          "trace": trace_path, "families": family_table(rows),
          "calls_per_call": sum(r["calls"] for r in rows), "calls_under_5us": short / n_calls}
  if copy_lines:
    merged = _merged(compute)
    info["copy_streams"] = {
        "lines": len(copy_lines), "ms": sum(b - a for a, b in copies) / 1e3 / n_calls,
        "ms_beside_kernels": _overlap_us(copies, merged) / 1e3 / n_calls,
        "compute_lines_busy_ms": sum(b - a for a, b in merged) / 1e3 / n_calls}
  return rows[:top], info


def profile_ops(fn, n_calls: int = 1, logdir: str | None = None, top: int = 25,
                keep_trace: str | None = None) -> tuple[list[dict], dict]:
  """Run fn() n_calls times under jax.profiler.trace and return op_table of the trace.
  keep_trace: copy the .trace.json.gz there (for later reading)."""
  own = logdir is None
  logdir = logdir or tempfile.mkdtemp(prefix="ljprof_")
  try:
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
      for _ in range(n_calls):
        jax.block_until_ready(fn())
    found = sorted(glob.glob(os.path.join(logdir, "**", "*.trace.json.gz"), recursive=True),
                   key=os.path.getmtime)
    if not found:
      raise RuntimeError(f"jax.profiler wrote no *.trace.json.gz under {logdir}.")
    if keep_trace:
      shutil.copyfile(found[-1], keep_trace)
    return op_table(found[-1], n_calls, top)
  finally:
    if own:
      shutil.rmtree(logdir, ignore_errors=True)


def format_table(rows: list[dict], info: dict, title: str = "") -> str:
  out = [f"{title}top {len(rows)} ops by time per call ({info['lines']}; "
         f"{info['op_ms_per_call']:.1f} ms of op time in a {info['span_ms_per_call']:.1f} ms span, "
         f"{info['n_ops']} distinct ops)",
         f"{'#':>3} {'ms':>9} {'share':>6} {'calls':>7}  name  [detail]"]
  for i, r in enumerate(rows, 1):
    det = f"  [{r['detail']}]" if r["detail"] else ""
    out.append(f"{i:>3} {r['ms']:9.3f} {r['share'] * 100:5.1f}% {r['calls']:7.0f}  {r['name']}{det}")
  cs = info.get("copy_streams")
  if cs:
    out.append(f"copies on {cs['lines']} copy streams: {cs['ms']:.2f} ms, {cs['ms_beside_kernels']:.2f} "
               f"ms of it while the other streams ran kernels (busy {cs['compute_lines_busy_ms']:.1f} "
               f"ms): op time counts them as if serial")
  if info.get("families"):
    out.append(f"by family ({info['calls_per_call']:,.0f} launches, "
               f"{info['calls_under_5us']:,.0f} under 5 us):")
    for f in info["families"]:
      out.append(f"    {f['ms']:9.3f} {f['share'] * 100:5.1f}% {f['calls']:7.0f}  {f['family']} "
                 f"({f['kernels']} distinct)")
  return "\n".join(out)


# ----------------------------------------------------------------------------- attribution
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_COMP = re.compile(r"^%?([\w.\-]+)\s*\(.*\{\s*$")
_KV = re.compile(r"(\w+)=(\d+)")


def _parse_hlo(hlo_text_path: str):
  """(frame tables, {instr: stack_frame_id}, {instr: op_name}, {instr: called computation},
  {computation: root instr}) of an XLA HLO text dump."""
  tables = {"FileNames": {}, "FunctionNames": {}, "FileLocations": {}, "StackFrames": {}}
  section, frame_of, op_of, calls, roots, comp = None, {}, {}, {}, {}, None
  with open(hlo_text_path) as f:
    for line in f:
      head = line.strip()
      if head in tables:
        section = head
        continue
      if section and head and head[0].isdigit():
        i, rest = head.split(" ", 1)
        tables[section][int(i)] = (rest.strip().strip('"') if section in ("FileNames",
                                   "FunctionNames") else {k: int(v) for k, v in _KV.findall(rest)})
        continue
      if head and not head[0].isdigit():
        section = None
      m = _COMP.match(head)
      if m and "=" not in head.split("(")[0]:
        comp = m.group(1)
        continue
      m = _INSTR.match(line)
      name = m.group(1) if m else None
      if name is None:
        continue
      sf = re.search(r"stack_frame_id=(\d+)", m.group(2))
      if sf:
        frame_of[name] = int(sf.group(1))
      on = re.search(r'op_name="([^"]*)"', m.group(2))
      if on:
        op_of[name] = on.group(1)
      c = _CALLS.search(line)
      if c:
        calls[name] = c.group(1)
      if head.startswith("ROOT") and comp:
        roots[comp] = name
  return tables, frame_of, op_of, calls, roots


def _own_or_root(name, own: dict, calls: dict, roots: dict):
  """An instruction's own metadata entry, else (a fusion) its fused computation's root's."""
  v = own.get(name)
  if v is None and name in calls:
    v = own.get(roots.get(calls[name], ""))
  return v


def hlo_sources(hlo_text_path: str, project: str = "lightning_jax") -> dict:
  """{instruction name: "file.py:function:line"} from an XLA HLO text dump of the step (its
  *after_optimizations.txt), read from each instruction's stack_frame_id through the module's
  FileNames / FunctionNames / FileLocations / StackFrames tables: the innermost frame inside
  `project`'s files (else the innermost frame). Kernels are named after HLO instructions when
  command buffers are off (XLA_FLAGS=--xla_gpu_enable_command_buffer=), so a trace's events map
  to the Python source that built them; a fusion without metadata of its own takes its fused
  computation's root's."""
  tables, frame_of, _, calls, roots = _parse_hlo(hlo_text_path)

  def describe(frame: int) -> str:
    first, best, seen = None, None, set()
    while frame and frame not in seen:
      seen.add(frame)
      fr = tables["StackFrames"].get(frame)
      if not fr:
        break
      loc = tables["FileLocations"].get(fr.get("file_location_id", 0), {})
      path = tables["FileNames"].get(loc.get("file_name_id", 0), "?")
      desc = (f"{os.path.basename(path)}:{tables['FunctionNames'].get(loc.get('function_name_id', 0), '?')}"
              f":{loc.get('line', '?')}")
      first = first or desc
      if best is None and project in path:
        best = desc
      frame = fr.get("parent_frame_id", 0)
    return best or first or "?"

  out = {}
  for name in set(frame_of) | set(calls):
    fr = _own_or_root(name, frame_of, calls, roots)
    out[name] = describe(fr) if fr else "?"
  return out


# The model's jax.named_scope names (model.py, layers/streams.py, layers/moe.py, reversible.py).
# Scope names survive autodiff (a backward op is named transpose(jvp(<scope>))/...), unlike the
# stack frames: inside the reversible stack's custom_vjp the backward's frames all point at
# reversible_stack.
MODEL_SCOPES = ("embed", "hc_pre", "hc_post", "mixer_D", "mixer_G", "moe", "ffn", "route",
                "routed", "gather_rows", "experts", "combine_rows", "shared", "mtp", "head_ce")
_WRAP = re.compile(r"^(?:\w+\()+|\)+$")


def scope_of(op_name: str) -> str:
  """"<phase> <scope path>" of one HLO op_name. The phase is fwd (the step's forward), rebuild
  (the reversible stack's per-layer forward again, in the backward), recompute (model.remat's
  rematerialised values inside a layer's vjp), or bwd; the path is the model scopes it sits in,
  outermost first ("-" outside every scope: the optimizer update, the loss glue)."""
  parts = [_WRAP.sub("", t) for t in op_name.split("/")]
  if "rematted_computation" in op_name:
    phase = "recompute"
  elif "rebuild" in parts and "layer_vjp" not in parts:
    phase = "rebuild"
  elif "transpose(" in op_name or "layer_vjp" in parts:
    phase = "bwd"
  else:
    phase = "fwd"
  path = [t for t in parts if t in MODEL_SCOPES]
  path = [t for i, t in enumerate(path) if t not in path[:i]]
  return f"{phase} {'/'.join(path) or '-'}"


def hlo_scopes(hlo_text_path: str) -> dict:
  """{instruction name: scope_of(its op_name)} from the step's HLO text dump (see hlo_sources);
  for source_table(..., by="line")."""
  _, _, op_of, calls, roots = _parse_hlo(hlo_text_path)
  out = {}
  for name in set(op_of) | set(calls):
    on = _own_or_root(name, op_of, calls, roots)
    out[name] = scope_of(on) if on else "? -"
  return out


def source_table(trace_path: str, sources: dict, n_calls: int = 1, by: str = "file",
                 top: int = 25) -> list[dict]:
  """Device time by Python source file (by="file"), file:function (by="function") or
  file:function:line (by="line") of the HLO instruction each kernel event belongs to (the
  event's args.hlo_op)."""
  data = _load(trace_path)
  events = data["traceEvents"] if isinstance(data, dict) else data
  procs, threads = _names(events)
  lines, _ = _pick_lines(events, procs, threads)
  acc = collections.defaultdict(lambda: [0, 0.0])
  for ev in events:
    if ev.get("ph") != "X" or (ev.get("pid"), ev.get("tid")) not in lines:
      continue
    op = str((ev.get("args") or {}).get("hlo_op", "") or ev.get("name", ""))
    src = sources.get(op, "unattributed" if op else "no hlo_op")
    key = {"file": src.split(":")[0], "function": ":".join(src.split(":")[:2])}.get(by, src)
    acc[key][0] += 1
    acc[key][1] += float(ev.get("dur", 0.0))
  total = sum(v[1] for v in acc.values()) or 1.0
  rows = [{"name": k, "calls": v[0] / n_calls, "ms": v[1] / 1e3 / n_calls, "share": v[1] / total,
           "detail": ""} for k, v in acc.items()]
  rows.sort(key=lambda r: -r["ms"])
  return rows[:top]


def attribution(trace_path: str, hlo_text_path: str, top: int = 30) -> dict:
  """The trace's device time by Python source file and function (hlo_sources) and by model
  scope and phase (hlo_scopes, up to 2 * top rows): {"file", "function", "scope"} row lists."""
  srcs = hlo_sources(hlo_text_path)
  out = {by: source_table(trace_path, srcs, 1, by=by, top=top) for by in ("file", "function")}
  out["scope"] = source_table(trace_path, hlo_scopes(hlo_text_path), 1, by="line", top=2 * top)
  return out



def main(argv=None):
  """python -m benchmarks.profile_table --trace T.json.gz [--top N] [--grep a,b] [--json F]:
  the per-op table of a kept trace (e.g. step.py's --keep_trace), one call per trace."""
  ap = argparse.ArgumentParser(prog="python -m benchmarks.profile_table",
                               description=__doc__.splitlines()[0])
  ap.add_argument("--trace", required=True, help="A jax.profiler .trace.json.gz.")
  ap.add_argument("--top", type=int, default=40, help="Rows to keep.")
  ap.add_argument("--grep", default="", help="Also print every op whose name holds one of "
                  "these comma-separated strings.")
  ap.add_argument("--json", default="", help="Write {rows, info} here.")
  a = ap.parse_args(argv)
  rows, info = op_table(a.trace, 1, a.top)
  print(format_table(rows, info))
  if a.grep:
    every, _ = op_table(a.trace, 1, 100000)
    for r in every:
      if any(g and g in r["name"] for g in a.grep.split(",")):
        print(f"    {r['ms']:9.3f} ms {r['calls']:5.0f} calls  {r['name']}")
  if a.json:
    with open(a.json, "w") as fh:
      json.dump({"rows": rows, "info": info}, fh, indent=1)


if __name__ == "__main__":
  main()
