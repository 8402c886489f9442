"""Look inside a run or checkpoint directory without building the model.

  python -m launch.inspect runs/tiny                 # newest checkpoint of a run
  python -m launch.inspect runs/tiny/checkpoints/80  # one step
  python -m launch.inspect runs/tiny --step 40 --opt_state --full_config

Prints the steps present, the config (its sections), the data-loader state, the save's meta
record, the growth history of a grown run (RUN/growth_history.json: every growth step that led to
it, kept after training has deleted checkpoints/0), the frozen version the step uses (checkpoints/frozen/<version>/, stored once per run and
shared by the steps: its fingerprint, the steps using it, its bytes on disk, and every stored
version), and the parameter tree with shape, dtype, bytes and sharding of every leaf (optimizer
state totals; --opt_state lists its leaves too). Sizes are read from orbax metadata: no arrays
are loaded.

  python -m launch.inspect runs/tiny --verify        # read and check every array of every step

--verify reads every step's arrays (onto the host CPU) and compares each with the checksum
recorded when it was saved, and both copies of every frozen version with the fingerprint the
steps recorded; it prints one line per step and exits 1 naming the first damaged file.
"""
from __future__ import annotations

import json
import math
import pathlib
import sys

from absl import app, flags, logging as absl_logging
import jax
import numpy as np

from lightning_jax.run import history
from lightning_jax.run.checkpoints import locate
from lightning_jax import checkpoint as ck

flags.DEFINE_integer("step", -1, "Step to show (default: the newest).")
flags.DEFINE_bool("opt_state", False, "Also list every optimizer-state leaf.")
flags.DEFINE_bool("full_config", False, "Print the whole config as JSON (default: the "
                  "model/train/data/optim/mesh/checkpoint sections, one line each).")
flags.DEFINE_bool("verify", False, "Read every array of every step and check it against the "
                  "checksums recorded at save time (both copies of the frozen base too).")
FLAGS = flags.FLAGS


def _sharding_str(sh) -> str:
  if sh is None:
    return "-"
  spec = getattr(sh, "partition_spec", None)
  if spec is None:
    return str(sh)
  mesh = getattr(sh, "shape", None)
  names = getattr(sh, "axis_names", None)
  m = ""
  if mesh is not None and names is not None:
    m = " mesh " + "x".join(f"{n}{s}" for n, s in zip(names, np.ravel(mesh).tolist()))
  return f"P{tuple(spec)}{m}"


def _rows(tree, prefix):
  rows = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    name = "/".join(str(getattr(p, "key", getattr(p, "idx", getattr(p, "name", p))))
                    for p in path)
    shape = tuple(getattr(leaf, "shape", ()) or ())
    dtype = np.dtype(getattr(leaf, "dtype", np.float32))
    nbytes = math.prod(shape) * dtype.itemsize
    rows.append((f"{prefix}/{name}", shape, str(dtype), nbytes,
                 _sharding_str(getattr(leaf, "sharding", None))))
  return rows


def _fmt_bytes(n: float) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if n < 1024 or unit == "TB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
    n /= 1024


def inspect(path: str, step: int = -1, opt_state: bool = False, full_config: bool = False,
            out=print) -> dict:
  cdir, given = locate(path)
  cfg = ck.config_ns(keep=0)
  c = ck.Checkpointer(cdir, cfg, read_only=True)
  steps = c.steps()
  if not steps:
    raise ck.CheckpointError(f"{cdir} holds no complete checkpoint.")
  step = given if given is not None else (step if step >= 0 else steps[-1])
  if step not in steps:
    raise ck.CheckpointError(f"step {step} is not among the checkpoints in {cdir}: {steps}.")
  out(f"checkpoints: {cdir}")
  out(f"steps present: {steps}   (showing {step})")
  try:
    config = c.read_json(step, "config")
    loader = c.read_json(step, "loader")
    meta = c.read_json(step, "meta")
    md = c.state_metadata(step)
  except Exception as e:
    raise ck.CheckpointError(f"checkpoint {c.step_dir(step)} is unreadable ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}).") from e
  out("\nconfig:")
  if full_config:
    out(json.dumps(config, indent=1))
  else:
    for sec in ("stage", "model", "moe", "reversible", "tqp", "data", "optim", "train", "mesh",
                "checkpoint"):
      v = config.get(sec)
      if isinstance(v, dict):
        flat = {k: x for k, x in v.items() if not isinstance(x, dict)}
        out(f"  {sec}: " + ", ".join(f"{k}={x}" for k, x in flat.items()))
      elif v is not None:
        out(f"  {sec}: {v}")
  out(f"\ndata loader state: {json.dumps(loader)}")
  out(f"meta: {json.dumps(meta)}")
  grown = history.read(cdir.parent)
  if grown:
    out(f"growth history ({cdir.parent / history.FILE}):")
    for line in history.format_lines(grown):
      out(line)
  frozen = _frozen_summary(c, step, out)
  total = {}
  for coll in ("params", "frozen", "stats"):
    rows = _rows(md.get(coll, {}) if hasattr(md, "get") else md[coll], coll)
    total[coll] = (sum(math.prod(r[1]) for r in rows), sum(r[3] for r in rows))
    where = ""
    if coll == "frozen" and frozen.get("version") is not None:
      where = f"  (frozen version {frozen['version']}, stored once in {frozen['dir']})"
    out(f"\n{coll}: {len(rows)} leaves, {total[coll][0]:,} values, {_fmt_bytes(total[coll][1])}"
        f"{where}")
    w = max([len(r[0]) for r in rows] + [10])
    for name, shape, dtype, nbytes, sh in rows:
      out(f"  {name:<{w}}  {str(list(shape)):<22} {dtype:<9} {_fmt_bytes(nbytes):>10}  {sh}")
  orows = _rows(md["opt_state"], "opt_state")
  total["opt_state"] = (sum(math.prod(r[1]) for r in orows), sum(r[3] for r in orows))
  out(f"\nopt_state: {len(orows)} leaves, {total['opt_state'][0]:,} values, "
      f"{_fmt_bytes(total['opt_state'][1])}")
  if opt_state:
    w = max([len(r[0]) for r in orows] + [10])
    for name, shape, dtype, nbytes, sh in orows:
      out(f"  {name:<{w}}  {str(list(shape)):<22} {dtype:<9} {_fmt_bytes(nbytes):>10}  {sh}")
  c.close()
  return {"steps": steps, "step": step, "config": config, "loader": loader, "totals": total,
          "frozen": frozen, "growth_history": grown}


def _disk_bytes(path: pathlib.Path) -> int:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _frozen_summary(c, step, out) -> dict:
  """The frozen version `step` uses and every stored version, with bytes (metadata only)."""
  try:
    ref = c.frozen_ref(step)
  except Exception as e:
    raise ck.CheckpointError(f"checkpoint {c.step_dir(step)} is unreadable ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]}).") from e
  if ref is None:
    out("frozen: inside the step's state (older checkpoint layout)")
    return {"version": None}
  if ref["version"] is None:
    out("frozen: none")
    return {"version": None}
  v, fp = ref["version"], ref["fingerprint"]
  versions = c.frozen_versions()
  users = {u: c.frozen_users(u) for u in versions}
  d = c.frozen_dir(v)
  state = "stored" if v in versions else "MISSING"
  out(f"frozen: version {v} ({d}, {state}), {_fmt_bytes(fp['n_bytes'])} in {len(fp['leaves'])} "
      f"leaves, tqp.bits {fp.get('tqp_bits')}, checksum {fp.get('checksum')}; used by steps "
      f"{users.get(v, [])}")
  out("frozen versions on disk: " + (", ".join(
      f"{u} ({_fmt_bytes(_disk_bytes(c.frozen_dir(u)))}, steps {users[u]})" for u in versions)
      or "none"))
  return {"version": v, "dir": str(d), "n_bytes": fp["n_bytes"], "versions": versions,
          "users": users}


def verify(path: str, out=print) -> dict:
  """Read and check every array of every step of a run (see the module docstring). Returns
  {step: "ok" | error sentence}; raises CheckpointError naming the first damaged step."""
  cdir, given = locate(path)
  c = ck.Checkpointer(cdir, ck.config_ns(keep=0), read_only=True, log=lambda *_: None)
  steps = c.steps() if given is None else [given]
  if not steps:
    raise ck.CheckpointError(f"{cdir} holds no complete checkpoint.")
  dev = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  res = {}
  for s in steps:
    try:
      md = c.state_metadata(s)
      ab = jax.tree_util.tree_map(
          lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev), dict(md))
      c.restore(s, ab)     # every state array against its checksum, the frozen base too
      rec = c.checksums(s)
      n = len(rec["leaves"]) if rec else 0
      ref = c.frozen_ref(s)
      extra = ""
      if ref is not None and ref["version"] is not None:
        v = ref["version"]
        copies = []
        for copy in (False, True):
          if v in c.frozen_versions(copy):
            _, bad = c._read_frozen(ref, ab["frozen"], c.step_dir(s), copy)
            if bad is not None:
              raise ck.CheckpointError(f"frozen base {c.frozen_dir(v, copy)} (used by checkpoint "
                                       f"{c.step_dir(s)}) {bad[1]}.")
            copies.append("second copy" if copy else "first copy")
        extra = f"; frozen version {v}: {' and '.join(copies) or 'no copy'} match its fingerprint"
      res[s] = "ok"
      out(f"step {s}: ok ({n} arrays match their checksums"
          f"{'' if n else ', none recorded (saved before checksums existed)'}{extra})")
    except ck.CheckpointError as e:
      res[s] = str(e)
      out(f"step {s}: DAMAGED: {e}")
  c.close()
  bad = [s for s, r in res.items() if r != "ok"]
  if bad:
    raise ck.CheckpointError(f"{len(bad)} of {len(res)} checkpoint(s) in {cdir} are damaged "
                             f"(steps {bad}); the first: {res[bad[0]]}")
  return res


def main(argv):
  if len(argv) != 2:
    print("usage: python -m launch.inspect RUN_OR_CHECKPOINT_DIR [--step N] [--opt_state]",
          file=sys.stderr)
    return 2
  try:
    if FLAGS.verify:
      verify(argv[1], out=print)
    else:
      inspect(argv[1], FLAGS.step, FLAGS.opt_state, FLAGS.full_config)
  except ck.CheckpointError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  absl_logging.set_verbosity(absl_logging.ERROR)
  app.run(lambda argv: sys.exit(main(argv)))
