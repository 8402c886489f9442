"""How well the reference fixtures' gradients are determined: float32 against the exact gradient.

    python -m benchmarks.reference_grads_f64 --out benchmarks/results/reference_grads_f64.json

tests/test_reference.py compares our float32 gradients with the reference's recorded float32
gradients (tests/fixtures/reference, issue 18) within 1e-3 normwise relative. A few dozen stream
coefficients per fixture have gradients of 1e-22..1e-8 of the whole model's gradient norm: the
remainder of cancellations. This tool shows what those recorded values are worth. For each
fixture and mode it computes the same loss gradient twice, from the same imported weights and
the fixture's recorded GSA selections:
  * in float32, as the test does;
  * in float64: x64 on, and every float32 the model names resolved to float64 (the model's code
    says jnp.float32 for its accumulations; the worker process rebinds that name before the model is imported,
    and the jaxpr is checked to hold no float32 value). This is the exact gradient up to 1e-16,
    except the codec's bfloat16 rounding, which is part of the reference_cuda mathematics.
Then, per parameter: the fixture's value, ours in float32, the exact one, and which are within
1e-3 of which. Each (fixture, mode, precision) runs in its own process (the rebinding is global).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np


def _f64_worker(argv) -> bool:
  """Whether this process is a float64 worker (--worker NAME,MODE,f64,DUMP)."""
  for i, a in enumerate(argv):
    v = a.split("=", 1)[1] if a.startswith("--worker=") else (
        argv[i + 1] if a == "--worker" and i + 1 < len(argv) else None)
    if v is not None and len(v.split(",")) == 4:
      return v.split(",")[2] == "f64"
  return False


if __name__ == "__main__" and _f64_worker(sys.argv):
  # before the model is imported: x64 on, and every float32 the model names resolved to float64
  jax.config.update("jax_enable_x64", True)
  jnp.float32 = jnp.float64

from lightning_jax import metrics, model, reference as R  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "reference"
RUN = {"gpu": "gpu_fullgrad", "cpu": "cpu_fallback"}
COMPAT = {"gpu": "reference_cuda", "cpu": "spec"}
TOL = 1e-3


def worker(name: str, mode: str, precision: str, dump: str) -> None:
  """Gradients of the fixture's total loss, as the reference's parameter names -> arrays."""
  if precision == "f64" and not jax.config.jax_enable_x64:
    raise SystemExit("a float64 worker runs as its own process: python -m "
                     "benchmarks.reference_grads_f64 --worker NAME,MODE,f64,DUMP")
  path = FIXTURES / f"{name}.npz"
  src, z = R.load_source(path), np.load(path)
  cfg = R.config_from_reference(src["config_json"])
  cfg.model.dtype = "float32"
  cfg.model.compat = COMPAT[mode]
  tree, _ = R.import_state_dict(src["state_dict"], cfg)
  wide = np.float64 if precision == "f64" else np.float32
  tree = jax.tree_util.tree_map(
      lambda a: jnp.asarray(np.asarray(a, wide) if np.asarray(a).dtype.kind == "f" else a), tree)
  frozen = {"embed": {"bytes": jnp.asarray(src["kron"][0]), "lengths": jnp.asarray(src["kron"][1])}}
  ids = jnp.asarray(z["input_ids"], jnp.int32)

  def loss(params, stats):
    return model.loss_fn(params, frozen, stats, {"ids": ids}, cfg)[0]

  grad = jax.grad(loss)
  with R.recorded_selections(z, RUN[mode]):
    if precision == "f64":
      kinds = {v.aval.dtype.name for eq in jax.make_jaxpr(grad)(tree["params"], tree["stats"]).eqns
               for v in eq.outvars if hasattr(v.aval, "dtype")}
      if "float32" in kinds:
        raise SystemExit(f"the float64 gradient of {name}/{mode} still computes in float32")
    g = jax.jit(grad)(tree["params"], tree["stats"])
    jax.effects_barrier()
  sd = R.export_state_dict({"params": g, "stats": jax.tree_util.tree_map(jnp.zeros_like, tree["stats"])},
                           cfg, dtype=wide)
  np.savez(dump, **{k: np.asarray(v) for k, v in sd.items()})


def _grads(name: str, mode: str, precision: str, tmp: str) -> dict:
  dump = os.path.join(tmp, f"{name}_{mode}_{precision}.npz")
  subprocess.run([sys.executable, "-m", "benchmarks.reference_grads_f64", "--worker",
                  f"{name},{mode},{precision},{dump}"], check=True,
                 cwd=pathlib.Path(__file__).resolve().parents[1])
  return dict(np.load(dump))


def compare(name: str, mode: str, g32: dict, g64: dict) -> dict:
  """Per parameter: the fixture's gradient norm against ours (float32) and the exact one."""
  z, run = np.load(FIXTURES / f"{name}.npz"), RUN[mode]
  pre = f"grad_{run}/norm/"
  names = [k[len(pre):] for k in z.files if k.startswith(pre)]
  total = float(np.sqrt(sum(float(z[pre + n]) ** 2 for n in names)))
  rows, within, within64 = [], 0, []
  for n in names:
    if n in R.DROPPED or bool(z[f"grad_{run}/is_none/{n}"]):
      continue
    ref = float(z[pre + n])
    ours = float(np.linalg.norm(g32[n].astype(np.float64)))
    exact = float(np.linalg.norm(g64[n]))
    if abs(ours - ref) <= TOL * ref:
      within += 1
      if abs(exact - ref) > TOL * ref:     # float32 agreed, the exact value does not
        within64.append(exact / total)
      continue
    rows.append({"name": n, "ref": ref, "ours_f32": ours, "exact": exact,
                 "exact_over_total": exact / total,
                 "ref_vs_exact_rel": abs(ref - exact) / max(exact, 1e-300),
                 "ours_vs_ref_over_total": abs(ours - ref) / total,
                 "ref_vs_exact_over_total": abs(ref - exact) / total,
                 "ours_vs_exact_over_total": abs(ours - exact) / total,
                 "exactly_zero": exact <= 1e-20 * total})
  return {
      "fixture": name, "mode": mode, "run": run, "total_grad_norm": total,
      "n_params": within + len(rows), "within_1e-3": within, "outside_1e-3": len(rows),
      "outside_largest_exact_over_total": max((r["exact_over_total"] for r in rows), default=0.0),
      "outside_exactly_zero": sum(r["exactly_zero"] for r in rows),
      "outside_fixture_off_exact_by_over_1e-3": sum(r["ref_vs_exact_rel"] > TOL for r in rows),
      "outside_max_ours_vs_ref_over_total": max((r["ours_vs_ref_over_total"] for r in rows), default=0.0),
      "outside_max_ref_vs_exact_over_total": max((r["ref_vs_exact_over_total"] for r in rows), default=0.0),
      "outside_max_ours_vs_exact_over_total": max((r["ours_vs_exact_over_total"] for r in rows), default=0.0),
      "within_but_exact_off_by_over_1e-3": len(within64),
      "within_but_exact_off_largest_over_total": max(within64, default=0.0),
      "outside": rows,
  }


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(prog="python -m benchmarks.reference_grads_f64",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="benchmarks/results/reference_grads_f64.json",
                  help="JSON file to write the comparison to.")
  ap.add_argument("--fixtures", default="dense_2b_tiny,moe_120b_tiny",
                  help="Comma list of fixture names in tests/fixtures/reference.")
  ap.add_argument("--modes", default="gpu,cpu", help="Comma list of modes: gpu (reference_cuda) "
                  "and/or cpu (spec).")
  ap.add_argument("--worker", default=None, help="Internal: NAME,MODE,PRECISION,DUMP, the one "
                  "gradient a subprocess computes and saves (set by the parent).")
  a = ap.parse_args(argv)
  if a.worker:
    worker(*a.worker.split(","))
    return
  cases = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in a.fixtures.split(","):
      for mode in a.modes.split(","):
        c = compare(name, mode, _grads(name, mode, "f32", tmp), _grads(name, mode, "f64", tmp))
        cases.append(c)
        print(f"{name:14s} {mode}: {c['within_1e-3']}/{c['n_params']} within 1e-3; outside: "
              f"{c['outside_1e-3']} (largest {c['outside_largest_exact_over_total']:.1e} of the "
              f"model's gradient norm, {c['outside_exactly_zero']} exactly zero, the fixture itself "
              f"off the exact value by > 1e-3 in {c['outside_fixture_off_exact_by_over_1e-3']}); "
              f"|ours - ref| <= {c['outside_max_ours_vs_ref_over_total']:.1e}, "
              f"|ref - exact| <= {c['outside_max_ref_vs_exact_over_total']:.1e}, "
              f"|ours - exact| <= {c['outside_max_ours_vs_exact_over_total']:.1e} x the norm")
  out = {"date": datetime.date.today().isoformat(),
         "commit": metrics.git_commit(),
         "command": "python -m benchmarks.reference_grads_f64", "tolerance": TOL, "cases": cases}
  pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
  print("wrote", a.out)


if __name__ == "__main__":
  main()
