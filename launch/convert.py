"""PyTorch reference checkpoints in and out (docs/reference.md):

  python -m launch.convert import --src FILE --out RUN [--config=configs/stage_120b.py]
                                  [--compat reference_cuda|spec] [--data_path DIR]
  python -m launch.convert check RUN --against FIXTURE.npz [--mode gpu|cpu]
  python -m launch.convert export RUN --out model.safetensors [--dtype float32|bfloat16]

import: FILE is a reference state dict as .safetensors or in the fixtures' .npz layout
(state_dict/<name> keys; tests/fixtures/reference/README.md). A .pt file needs torch: convert it
once with `safetensors.torch.save_file(torch.load(path, map_location="cpu"), "x.safetensors")`.
Every reference tensor is mapped to our tree (lightning_jax/reference.py), the tensors dropped on
purpose are listed with the reason, and anything unmapped, missing, mis-shaped or truncated is
refused with one sentence. Without --config, the config is built from the reference's own
config record (the fixtures' `config_json`, or the metadata of a file this command exported).
--compat (default reference_cuda: what the released weights were trained with) is recorded in
the run's config. RUN/checkpoints/0 is a step-0 run in launch.train's format (lightning_jax.run.
checkpoints.write_grown: fresh optimizer state, fresh loader state); `launch.train --config=RUN/config.py
--workdir=RUN` resumes it and `launch.inspect RUN` reads it. The Kronecker byte buffers come
from the source when it carries them (kron_token_bytes), else from the run data's tokenizer.

check: runs the run's model in float32 on the fixture's inputs and prints one line per
quantity (logits_ntp, logits_mtp: normwise relative error; ce_ntp, ce_mtp, aux: absolute) and
the GSA/router selection agreement; exits 1 above the tolerances (1e-4 relative, 1e-5
absolute). The GSA layers run on the fixture's recorded selections (its ties make torch's
pick arbitrary); our own selections are compared to them outside the recorded ties.

export: the reference's state dict (names, [out, in] layouts, alias names, buffers) as
.safetensors, with the reference config record in its metadata. Import then export returns the
imported tensors bit for bit.
"""
from __future__ import annotations

import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from lightning_jax import checkpoint as ck
from lightning_jax import model
from lightning_jax import reference as R
from lightning_jax.config import ConfigError, validate
from lightning_jax.data import shards
from lightning_jax.data.shards import DataError
from lightning_jax.layers import kronecker
from lightning_jax.run import setup
from lightning_jax.run.checkpoints import read_source, write_grown

COMMANDS = ("import", "check", "export")
TOL_REL, TOL_ABS = 1e-4, 1e-5


class ConvertError(ValueError):
  """A convert command cannot run; the message names the file or flag at fault."""


def _log(msg):
  print(msg, flush=True)


# ----------------------------------------------------------------------------- import
def _override(cfg, item: str):
  """--set section.field=value (a JSON value, else the string) on the config."""
  key, sep, raw = item.partition("=")
  node, parts = cfg, key.strip().split(".")
  try:
    for part in parts[:-1]:
      node = node[part]
    old = node[parts[-1]]
  except (KeyError, AttributeError, TypeError):
    raise ConvertError(f"--set {item!r} names no config field; expected section.field=value, e.g. "
                       f"train.seq_len=256.") from None
  if not sep:
    raise ConvertError(f"--set {item!r} has no value; expected section.field=value.")
  try:
    val = json.loads(raw)
  except ValueError:
    val = raw
  node[parts[-1]] = type(old)(val) if isinstance(old, (int, float)) and not isinstance(old, bool) \
      and isinstance(val, (int, float)) else val


def import_run(src: str, out: str, cfg=None, compat: str = "reference_cuda",
               data_path: str = "", overrides=(), log=_log) -> dict:
  source = R.load_source(src)
  dst = pathlib.Path(out)
  if (dst / "checkpoints").exists() and any(p.name.isdigit() for p in (dst / "checkpoints").iterdir()):
    raise ck.CheckpointError(f"--out {dst} already holds checkpoints; expected a new run directory.")
  if cfg is None:
    if source["config_json"] is None:
      raise ConvertError(f"{src} carries no reference config record; pass --config=<stage config>.")
    cfg = R.config_from_reference(source["config_json"])
  else:
    cfg = cfg.copy_and_resolve_references()
  cfg.model.compat = compat
  if data_path:
    cfg.data.path = data_path
  for item in overrides or ():
    _override(cfg, item)
  validate(cfg)
  tree, report = R.import_state_dict(source["state_dict"], cfg)
  for line in report.lines():
    log(f"  {line}")
  dst.mkdir(parents=True, exist_ok=True)
  data_dir, manifest = setup.resolve_data(cfg, dst, log)
  setup.apply_data_vocab(cfg, manifest, data_dir)
  validate(cfg)
  if source["kron"] is not None:
    b, l = source["kron"]
    frozen_embed = kronecker.frozen_from_buffers(np.asarray(b, np.uint8), np.asarray(l, np.int16), cfg)
    how = "the source's Kronecker byte buffers"
  else:
    frozen_embed = kronecker.codec_from_tokenizer(shards.token_bytes(data_dir), cfg)
    how = f"the tokenizer of {data_dir}"
  frozen = {"embed": {k: np.asarray(v) for k, v in frozen_embed.items()}, **tree.get("frozen", {})}
  variables = {"params": tree["params"], "frozen": frozen, "stats": tree["stats"]}
  meta = {"provenance": {"source_path": str(pathlib.Path(src).absolute()), "source_step": None,
                         "source_stage": "pytorch reference", "transform": "reference_import",
                         "args": {"compat": compat}, "seed": None},
          "import_report": {"mapped": report.mapped, "aliases": report.aliases,
                            "dropped": report.dropped, "fresh": report.fresh},
          "loss": None, "tokens": 0}
  write_grown(dst, cfg, variables, data_dir, manifest, meta, log, on_cpu=bool(cfg.tqp.enabled))
  (dst / "config.py").write_text(_config_file(cfg))
  log(f"imported {src} into {dst} (stage {cfg.stage!r}, model.compat={compat!r}; embedding codec "
      f"from {how}); resume with: python -m launch.train --config={dst / 'config.py'} "
      f"--workdir={dst}")
  return {"cfg": cfg, "report": report, "dst": str(dst)}


def _config_file(cfg) -> str:
  blob = json.dumps(ck.config_to_json(cfg), indent=1, sort_keys=True)
  return ('"""The config written by python -m launch.convert import (any field overrides as\n'
          '--config.section.field=...)."""\nimport json\n\nfrom ml_collections import ConfigDict\n\n'
          f"CONFIG = json.loads(r'''{blob}''')\n\n\ndef get_config():\n"
          "  return ConfigDict(CONFIG)\n")


# ----------------------------------------------------------------------------- check
def check_run(run: str, against: str, mode: str = "", log=_log) -> bool:
  p = pathlib.Path(against)
  try:
    z = np.load(p, allow_pickle=False)
    files = set(z.files)
  except (OSError, ValueError, EOFError) as err:
    raise ConvertError(f"--against {p} is missing, truncated or not an .npz file ({err}).") from err
  need = ("input_ids",)
  if any(k not in files for k in need):
    raise ConvertError(f"--against {p} has no input_ids; expected the fixtures' layout.")
  source = read_source(run, log=lambda *_: None)
  cfg = source["cfg"].copy_and_resolve_references()
  cfg.model.dtype = "float32"
  if not mode:
    mode = "gpu" if cfg.model.compat == "reference_cuda" else "cpu"
  if mode not in ("gpu", "cpu"):
    raise ConvertError(f"--mode={mode!r} must be 'gpu' (fwd_gpu, compat reference_cuda) or 'cpu' "
                       f"(fwd_cpu, compat spec).")
  want_compat = "reference_cuda" if mode == "gpu" else "spec"
  if cfg.model.compat != want_compat:
    log(f"note: the run has model.compat={cfg.model.compat!r}; checking fwd_{mode} "
        f"with model.compat={want_compat!r}.")
  cfg.model.compat = want_compat
  fw = f"fwd_{mode}/"
  if fw + "logits_ntp" not in files:
    raise ConvertError(f"--against {p} has no {fw}logits_ntp; expected the fixtures' layout.")
  var = jax.tree_util.tree_map(jnp.asarray, source["variables"])
  ids = jnp.asarray(z["input_ids"], jnp.int32)
  rec_run = {"gpu": "gpu_fullgrad", "cpu": "cpu_fallback"}[mode]
  if f"rec_{rec_run}/gsa/0/top_indices" not in files and mode == "gpu":
    rec_run = "gpu_exact"
  have_rec = f"rec_{rec_run}/gsa/0/top_indices" in files

  def fwd(var):
    out = model.forward(var["params"], var["frozen"], var["stats"], ids[:, :-1], cfg,
                        with_mtp=bool(cfg.model.mtp.enabled))
    lg = [model.logits(var["params"], out["h"], cfg)]
    if out["h_mtp"] is not None:
      lg.append(model.logits(var["params"], out["h_mtp"], cfg))
    _, met = model.loss_fn(var["params"], var["frozen"], var["stats"], {"ids": ids}, cfg)
    return lg, met, out["choices"]

  if have_rec:
    with R.recorded_selections(z, rec_run) as rs:
      lg, met, choices = jax.jit(fwd)(var)
      jax.effects_barrier()
  else:
    rs = None
    lg, met, choices = jax.jit(fwd)(var)
  ok = True
  rows = [("logits_ntp", lg[0], "rel")] + ([("logits_mtp", lg[1], "rel")] if len(lg) > 1 else [])
  rows += [("ce_ntp", met["loss"], "abs"), ("ce_mtp", met["ce_mtp"], "abs"), ("aux", met["aux"], "abs")]
  for name, ours, kind in rows:
    if fw + name not in files:
      log(f"{name:11s} not in {p.name}: skipped")
      continue
    ref = np.asarray(z[fw + name], np.float64)
    a = np.asarray(ours, np.float64)
    if kind == "rel":
      err = float(np.linalg.norm(a - ref) / max(np.linalg.norm(ref), 1e-30))
      good = err <= TOL_REL
      log(f"{name:11s} relative error {err:.3e} (tolerance {TOL_REL:g}) {'ok' if good else 'FAIL'}")
    else:
      err = float(abs(a - ref))
      good = err <= TOL_ABS
      log(f"{name:11s} absolute error {err:.3e} (ours {float(a):.6f}, reference {float(ref):.6f}; "
          f"tolerance {TOL_ABS:g}) {'ok' if good else 'FAIL'}")
    ok &= good
  if rs is not None:
    for i in sorted(rs.ours):
      bad = rs.mismatches(i)
      log(f"gsa call {i}  selection: {bad} queries differ from the reference outside its recorded "
          f"ties {'ok' if bad == 0 else 'FAIL'}")
      ok &= bad == 0
  rkey = (f"rec_{rec_run}/router/0/topk_idx" if f"rec_{rec_run}/router/0/topk_idx" in files
          else "router_layer0_topk_idx_forward")
  if rkey in files and cfg.moe.enabled:
    idx = np.sort(np.asarray(choices[0]["moe"]["idx"][0]), -1)
    want = np.sort(z[rkey], -1)
    wkey = rkey.replace("topk_idx", "topk_weight")
    tie = np.zeros(want.shape[:-1], bool)
    if wkey in files:      # exactly tied scores (e.g. the empty token): torch's pick is arbitrary
      w = z[wkey]
      tie = np.all(w == w[..., :1], -1)
    bad = int(np.sum(np.any(idx != want, -1) & ~tie))
    log(f"router layer 0 experts: {bad} tokens differ ({int(tie.sum())} tied tokens not "
        f"compared) {'ok' if bad == 0 else 'FAIL'}")
    ok &= bad == 0
  log("check " + ("passed" if ok else "FAILED"))
  return ok


# ----------------------------------------------------------------------------- export
def export_run(run: str, out: str, dtype: str = "float32", log=_log) -> dict:
  if dtype not in ("float32", "bfloat16"):
    raise ConvertError(f"--dtype={dtype!r} must be float32 or bfloat16.")
  source = read_source(run, log=lambda *_: None)
  cfg = source["cfg"]
  np_dtype = np.float32
  if dtype == "bfloat16":
    np_dtype = ml_dtypes.bfloat16
  sd = R.export_state_dict(source["variables"], cfg, np_dtype)
  if not str(out).endswith(".safetensors"):
    raise ConvertError(f"--out {out} must end in .safetensors.")
  R.save_safetensors(sd, out, R.reference_config(cfg))
  log(f"wrote {len(sd)} reference tensors ({dtype}) to {out} from {source['dir']} "
      f"(step {source['step']})")
  return {"n": len(sd), "out": out}


# ----------------------------------------------------------------------------- CLI
def main():
  config_flags.DEFINE_config_file("config", None, "Stage config file (import; optional when the "
                                  "source carries the reference's config).", lock_config=False)
  flags.DEFINE_string("src", None, "import: the reference state dict (.safetensors or .npz).")
  flags.DEFINE_string("out", None, "import: the new run directory; export: the .safetensors file.")
  flags.DEFINE_enum("compat", "reference_cuda", ["reference_cuda", "spec"],
                    "import: model.compat recorded in the run's config.")
  flags.DEFINE_string("data_path", "", "import: shard directory of the run's data (data.path).")
  flags.DEFINE_multi_string("set", [], "import: section.field=value config overrides (e.g. "
                            "train.seq_len=256), applied after the config is built.")
  flags.DEFINE_string("against", None, "check: a fixture .npz in tests/fixtures/reference's layout.")
  flags.DEFINE_string("mode", "", "check: gpu (fwd_gpu) or cpu (fwd_cpu); default from the run's "
                      "model.compat.")
  flags.DEFINE_string("dtype", "float32", "export: float32 or bfloat16.")

  def run(argv):
    F = flags.FLAGS
    args = argv[1:]
    if not args or args[0] not in COMMANDS:
      print(f"error: expected a command, one of {', '.join(COMMANDS)} (python -m launch.convert "
            f"import --src FILE --out RUN).", file=sys.stderr)
      return 2
    cmd, rest = args[0], args[1:]
    try:
      if cmd == "import":
        if rest or not F.src or not F.out:
          raise ConvertError("import takes --src FILE --out RUN [--config=...] and no other "
                             f"arguments (got {rest}).")
        import_run(F.src, F.out, F.config, F.compat, F.data_path, F.set)
        return 0
      if len(rest) != 1:
        raise ConvertError(f"{cmd} takes one run directory (python -m launch.convert {cmd} RUN ...); "
                           f"got {rest}.")
      if cmd == "check":
        if not F.against:
          raise ConvertError("check needs --against FIXTURE.npz.")
        return 0 if check_run(rest[0], F.against, F.mode) else 1
      if not F.out:
        raise ConvertError("export needs --out model.safetensors.")
      export_run(rest[0], F.out, F.dtype)
      return 0
    except (ConvertError, R.ReferenceError, ConfigError, ck.CheckpointError, DataError) as e:
      print(f"error: {e}", file=sys.stderr)
      return 1

  absl_logging.set_verbosity(absl_logging.ERROR)
  app.run(lambda argv: sys.exit(run(argv)))


if __name__ == "__main__":
  main()
