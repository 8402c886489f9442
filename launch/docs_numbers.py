"""The numbers the docs quote, generated from the code and the results files, in one place.

  python -m launch.docs_numbers            # rewrite every marked block in README.md and docs/
  python -m launch.docs_numbers --check    # change nothing; exit 1 naming the blocks out of date

A marked block is `<!-- gen:NAME -->...<!-- /gen:NAME -->` (inline in a sentence or a table
cell, or on lines of their own around a table); NAME is a generator of BLOCKS below, with its
arguments after colons (`count:stage_2b`). Sources:
  count:STAGE               parameter counts of configs/STAGE.py (lightning_jax.counting, shapes
                            by jax.eval_shape: nothing is allocated or compiled)
  gflop:STAGE               training FLOPs per token at the stage's train.seq_len
                            (counting.flops_per_token, the MFU numerator)
  node_tokens_s:STAGE:MFU   tokens/s of one 8 x H100 node (989 TFLOP/s bf16 dense each,
                            lightning_jax.metrics.PEAK_FLOPS) at that MFU
  node_step_s:STAGE:MFU     seconds per global batch at that rate
  fertility_table           tokens per word of tokenizer/brahmic131k vs o200k_base on the bundled
                            held-out samples (tokenizer.fertility)
  rank120_table             the rows of benchmarks/results/rank120.json
  step2b_table              stage_2b at B1, B2, B4 beside the reference's numbers
                            (benchmarks/results/step2b.json, issue 17)
  step2b_profile            the top 25 kernels of its profiled step (the first batch timed)
  decode_table              decode and prefill speed (benchmarks/results/decode_bench_2b.json)
  house_table               step time before and after the house move
                            (benchmarks/results/house_timing.json)
  tiny_heldout_table        the README's main job per domain: training tokens, held-out CE at
                            the start and the end (benchmarks/results/tiny_main_job.json,
                            written by benchmarks/tiny_main_job.py)
  tiny_heldout_falls        the domains whose held-out CE fell by >= FALL_NATS in that run
  tiny_unseen               the domains that supplied no training token in it
  tiny_pools_read           which domains each pool of several domains read in it
  tiny_steps                its steps
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import sys

if __name__ == "__main__":      # counting needs no accelerator: before jax is imported
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app, flags  # noqa: E402

from lightning_jax import counting, fertility, vocab  # noqa: E402
from lightning_jax.config import load_config  # noqa: E402
from lightning_jax.metrics import PEAK_FLOPS  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/data.md", "docs/PERFORMANCE.md", "docs/tokenizer.md",
        "docs/cookbook.md", "docs/ARCHITECTURE.md")
RESULTS = REPO / "benchmarks" / "results"
BLOCK = re.compile(r"<!-- gen:([\w:.]+) -->(.*?)<!-- /gen:\1 -->", re.S)
NODE_DEVICES, NODE_PEAK_KEY = 8, "H100"
# a domain's held-out loss "falls" when it ends at least this much below its start (nats)
FALL_NATS = 0.5


class DocsError(ValueError):
  """A marked block names no generator, or a generator's source is missing."""


@functools.cache
def _config(stage: str):
  path = REPO / "configs" / f"{stage}.py"
  if not path.exists():
    raise DocsError(f"block names stage {stage!r}, but configs/{stage}.py does not exist.")
  return load_config(str(path))


@functools.cache
def _counts(stage: str) -> dict:
  return counting.count_params(_config(stage))


@functools.cache
def _gflop(stage: str) -> float:
  cfg = _config(stage)
  return counting.flops_per_token(cfg, cfg.train.seq_len)["total"] / 1e9


def count(stage: str) -> str:
  c = _counts(stage)
  s, a = c["total_stored"] / 1e9, c["total_active"] / 1e9
  text = (f"{s:.2f}B stored = active" if c["total_stored"] == c["total_active"]
          else f"{s:.2f}B stored / {a:.2f}B active")
  if c["stored"].get("tqp_adapters"):
    s0, a0 = c["total_stored_no_adapters"] / 1e9, c["total_active_no_adapters"] / 1e9
    text = (f"{s0:.2f}B stored / {a0:.2f}B active "
            f"(+{c['stored']['tqp_adapters'] / 1e9:.2f}B adapters)")
  if c["mtp_total_stored"]:
    text += f"; MTP block {c['mtp_total_stored'] / 1e9:.2f}B apart"
  return text


def gflop(stage: str) -> str:
  return f"{_gflop(stage):.2f}"


def _node_rate(stage: str, mfu: str) -> float:
  return NODE_DEVICES * PEAK_FLOPS[NODE_PEAK_KEY]["bfloat16"] * float(mfu) / (_gflop(stage) * 1e9)


def node_tokens_s(stage: str, mfu: str) -> str:
  return f"{_node_rate(stage, mfu):.1e}".replace("e+0", "e")


def node_step_s(stage: str, mfu: str) -> str:
  t = _config(stage).train
  return f"{t.global_batch * t.seq_len / _node_rate(stage, mfu):.1f}"


def fertility_table() -> str:
  rep = fertility.report(vocab.load_encoding(fertility.DEFAULT_TOKENIZER),
                         vocab.load_o200k_base(), REPO / "corpus")
  names = {**fertility.BRAHMIC_LANGS, **fertility.OTHER_LANGS}
  rows = ["| language | words | BrahmicTokenizer | o200k_base | ratio |",
          "| --- | ---: | ---: | ---: | ---: |"]
  for lang, r in rep.items():
    rows.append(f"| {names[lang]} | {r['words']:,} | {r['fertility']:.3f} | "
                f"{r['o200k_fertility']:.3f} | {r['ratio']:.3f} |")
  br = [r for lang, r in rep.items() if lang in fertility.BRAHMIC_LANGS]
  m = sum(r["fertility"] for r in br) / len(br)
  mr = sum(r["o200k_fertility"] for r in br) / len(br)
  rows.append(f"| Brahmic mean | | {m:.3f} | {mr:.3f} | {m / mr:.3f} |")
  return "\n" + "\n".join(rows) + "\n"


@functools.cache
def _result(name: str) -> dict:
  p = RESULTS / name
  if not p.exists():
    raise DocsError(f"results file {p.relative_to(REPO)} does not exist; expected the JSON record "
                    f"the block is generated from.")
  return json.loads(p.read_text())


def rank120_table() -> str:
  r = _result("rank120.json")
  b = r["before_this_issue"]
  rows = ["| commit | device | what | layers x experts, B | step | tokens/s | MFU | device peak | "
          "compiled plan |", "|---|---|---|---|---|---|---|---|---|",
          f"| before | H200 | {b['source']} | {r['layers']} x {r['experts_per_rank']}, B1 | "
          f"{b['step_ms']:,.1f} ms | {b['tokens_per_s']:,} | | {b['peak_gib']} GiB | "
          f"{b['compiled_plan_gb']} GB |"]
  for x in r["runs"]:
    rows.append(f"| {x['commit']} | {x.get('device', 'H200')} | {x['what']} | "
                f"{x['layers']} x {x['experts']}, B{x['batch']} | "
                f"{x['step_ms']:,.1f} ms | {x['tokens_per_s']:,} | {x['mfu']:.1%} | "
                f"{x['peak_gb']:.2f} GB | {x['compiled_plan_gb']:.2f} GB |")
  return "\n" + "\n".join(rows) + "\n"


# the reference PyTorch model at stage_2b on one H200 (issue 17's table, ../shared/MEASUREMENTS.md)
REFERENCE_2B = {1: (295.2, 13877, 31.9), 2: (535.0, 15311, 44.1), 4: (1023.6, 16006, 68.5)}


def _card(device: str) -> str:
  """'H100' / 'H200' from a device description ('NVIDIA H100 80GB HBM3', 'NVIDIA H200', ...)."""
  for card in ("H100", "H200"):
    if card in device:
      return card
  return device


def step2b_table() -> str:
  r = _result("step2b.json")
  rows = ["| batch | device | commit, settings | ours: ms / tokens/s / peak / MFU | "
          "reference (H200): ms / tokens/s / peak | speed ratio | memory ratio |",
          "|---|---|---|---|---|---|---|"]
  for x in r["rows"]:
    ref = REFERENCE_2B.get(x["batch"])
    card = _card(x.get("device", r["device"]))
    if "step_ms" not in x or x.get("step_ms") is None:
      ours = f"did not run: {x.get('error', 'no result')}"
      ratio = mem = "—"
    else:
      peak = f"{x['peak_gib']:.1f} GiB" if x.get("peak_gib") is not None else "peak not read"
      ours = f"{x['step_ms']:,.1f} / {x['tokens_per_s']:,.0f} / {peak} / {x['mfu']:.1%}"
      ratio = f"{x['tokens_per_s'] / ref[1]:.2f}x" if ref else "—"
      if ref and card != "H200":       # a speed ratio across two kinds of card says so
        ratio += f" ({card} vs H200)"
      mem = f"{x['peak_gib'] / ref[2]:.2f}x" if ref and x.get("peak_gib") is not None else "—"
    refs = f"{ref[0]:,.1f} / {ref[1]:,} / {ref[2]} GiB" if ref else "—"
    how = f"{x.get('commit', r['commit'])}, {x.get('settings', 'the default')}"
    rows.append(f"| {x['batch']} | {card} | {how} | {ours} | {refs} | {ratio} | {mem} |")
  dr = r["delta_rule"]
  card = _card(dr.get("device", r["device"]))
  rows.append(f"\nDelta rule alone ({dr['shape']}, `{dr['command']}`, {card}"
              f"{', commit ' + dr['commit'] if dr.get('commit') else ''}): forward "
              f"{dr['fwd_ms']:.2f} ms, forward + backward {dr['fwdbwd_ms']:.2f} ms, one call "
              f"waited for" + (f"; queued back to back as FLA's do_bench times, "
              f"{dr['fwd_queued_ms']:.2f} and {dr['fwdbwd_queued_ms']:.2f} ms; the kernels alone "
              f"{dr['fwd_kernel_ms']:.2f} and {dr['fwdbwd_kernel_ms']:.2f} ms"
              if "fwd_queued_ms" in dr else "") + " (FLA 0.6.0 on an H200: 0.99 and 3.85 ms).")
  return "\n" + "\n".join(rows) + "\n"


def step2b_profile() -> str:
  r = _result("step2b.json")
  info = r["profile_info"]
  rows = [f"{info['op_ms_per_call']:.1f} ms of kernel time in a {info['span_ms_per_call']:.1f} ms "
          f"step, {info['n_ops']} distinct kernels (commit {r.get('profile_commit', r['commit'])}):",
          "",
          "| # | kernel | ms | share | calls |", "|---|---|---|---|---|"]
  for i, x in enumerate(r["profile"][:25], 1):
    rows.append(f"| {i} | `{x['name'][:70]}` | {x['ms']:.2f} | {x['share']:.1%} | "
                f"{x['calls']:.0f} |")
  cs = info.get("copy_streams")
  if cs:
    rows.append(f"\nRows marked `[copy stream]` ran on {cs['lines']} copy-only CUDA streams beside "
                f"the compute stream: {cs['ms']:.2f} ms in all, {cs['ms_beside_kernels']:.2f} ms of "
                f"it while kernels ran there; the compute stream was busy "
                f"{cs['compute_lines_busy_ms']:.1f} ms.")
  return "\n" + "\n".join(rows) + "\n"


def decode_table() -> str:
  r = _result("decode_bench_2b.json")
  rows = ["| parameters | measure | batch | context | ms per step (or per prompt) | tokens/s |",
          "|---|---|---|---|---|---|"]
  for key in ("params_float32", "params_bfloat16"):
    if key not in r:
      continue
    part, dt = r[key], key.split("_")[1]
    pf = part["prefill"]
    for what, xs in (("decode", part["decode"]), ("prefill", [dict(pf, step_ms=pf["s"] * 1e3)]),
                     ("decode, by context", part["per_token_by_context"])):
      for x in xs:
        ms = f"{x['step_ms']:.1f}" if what == "prefill" else f"{x['step_ms']:.2f}"
        rows.append(f"| {dt} | {what} | {x['batch']} | {x['context']:,} | {ms} | "
                    f"{x['tokens_per_s']:,.0f} |")
  return "\n" + "\n".join(rows) + "\n"


def house_table() -> str:
  r = _result("house_timing.json")
  rows = [f"| case | before ({r['before_commit']}) | after ({r['after_commit']}) | change | "
          f"runs (ms, in order) |",
          "|---|---|---|---|---|"]
  for case, s in r["summary"].items():
    runs = ", ".join(f"{x['tree']} {x['step_ms']:,.1f}" for x in r["runs"] if x["case"] == case)
    rows.append(f"| {case} | {s['before_ms']:,.2f} ms | {s['after_ms']:,.2f} ms | {s['change']} | "
                f"{runs} |")
  return "\n" + "\n".join(rows) + "\n"


def residuals_table(name: str) -> str:
  """Per layer kind and model.remat mode: traced residual bytes, live matmul FLOPs and kernel
  launches of one layer's forward + backward (benchmarks/residuals.py), and the whole step's."""
  r = _result(name)
  rows = ["| layer | remat | residuals | per token | live matmul (fwd + bwd) | Pallas calls | "
          "cuDNN attention calls |", "|---|---|---|---|---|---|---|"]
  for kind, modes in r["layers"].items():
    base = modes.get("none", {}).get("dot_gflop")
    for mode, x in modes.items():
      more = f" ({x['dot_gflop'] / base - 1:+.2%})" if base and mode != "none" else ""
      rows.append(f"| {kind} | {mode} | {x['residual_gb']:.3f} GB | "
                  f"{x['residual_kb_per_token']:,.1f} KB | {x['dot_gflop']:,.1f} GFLOP{more} | "
                  f"{x['pallas_calls']} | {x['attention_calls']} |")
  if r.get("step"):
    rows.append("\nWhole step (B{}, T{:,}): ".format(r["batch"], r["seq"]) + ", ".join(
        f"{mode} {x['residual_gb']:.2f} GB" for mode, x in r["step"].items()) + ".")
  rows.append(f"\n`{r['command']}` (commit {r['commit']}).")
  return "\n" + "\n".join(rows) + "\n"


def _tiny() -> dict:
  return _result("tiny_main_job.json")


def tiny_heldout_table() -> str:
  r = _tiny()
  pools = {d: p for p, ds in r["pools"].items() for d in ds}
  seen = r["train_tokens_by_domain"]
  rows = [f"| domain | pool | training tokens in {r['steps']} steps | held-out CE at step 0 | "
          f"at step {r['steps']} | change |", "| --- | --- | ---: | ---: | ---: | ---: |"]
  for d, start in r["heldout_start"].items():
    end = r["heldout_end"][d]
    rows.append(f"| {d} | {pools.get(d, '')} | {seen.get(d, 0):,} | {start:.2f} | {end:.2f} | "
                f"{end - start:+.2f} |")
  rows.append(f"| mixture-weighted (plain mean) | | {sum(seen.values()):,} | "
              f"{r['heldout_mix'][0]:.3f} ({r['heldout_mean'][0]:.3f}) | "
              f"{r['heldout_mix'][1]:.3f} ({r['heldout_mean'][1]:.3f}) | |")
  return "\n" + "\n".join(rows) + "\n"


def _names(ds) -> str:
  ds = list(ds)
  return (", ".join(ds[:-1]) + " and " + ds[-1]) if len(ds) > 1 else (ds[0] if ds else "none")


def _lang(d: str) -> str:
  return {**fertility.BRAHMIC_LANGS, **fertility.OTHER_LANGS}.get(d, d)


def tiny_heldout_falls() -> str:
  """The domains whose held-out CE ends at least FALL_NATS below its start."""
  r = _tiny()
  return _names(_lang(d) for d, s in r["heldout_start"].items()
                if r["heldout_end"][d] <= s - FALL_NATS)


def tiny_unseen() -> str:
  """The domains that supplied no training token in the run's steps."""
  r = _tiny()
  return _names(_lang(d) for d in r["heldout_start"] if not r["train_tokens_by_domain"].get(d))


def tiny_pools_read() -> str:
  """Which of its domains each pool of several domains read in the run's steps."""
  r = _tiny()
  seen = r["train_tokens_by_domain"]
  parts = [f"the {p} pool read only {_names([_lang(d) for d in ds if seen.get(d)])}"
           for p, ds in r["pools"].items() if len(ds) > 1]
  return "; ".join(parts)


def tiny_steps() -> str:
  return str(_tiny()["steps"])


BLOCKS = {"count": count, "gflop": gflop, "node_tokens_s": node_tokens_s,
          "node_step_s": node_step_s, "fertility_table": fertility_table,
          "rank120_table": rank120_table, "tiny_heldout_table": tiny_heldout_table,
          "step2b_table": step2b_table, "step2b_profile": step2b_profile,
          "decode_table": decode_table, "house_table": house_table,
          "tiny_heldout_falls": tiny_heldout_falls, "tiny_unseen": tiny_unseen,
          "tiny_pools_read": tiny_pools_read, "tiny_steps": tiny_steps,
          "residuals_table": residuals_table}


def render(name: str) -> str:
  fn, *args = name.split(":")
  if fn not in BLOCKS:
    raise DocsError(f"marked block gen:{name} names no generator; expected one of "
                    f"{', '.join(BLOCKS)} (launch/docs_numbers.py).")
  return BLOCKS[fn](*args)


def update(check: bool = False, docs=DOCS) -> list[str]:
  """Rewrite (or with check, only compare) every marked block; returns 'file: block' of those
  that were (or would be) changed."""
  changed = []
  for rel in docs:
    p = REPO / rel
    if not p.exists():
      continue
    text = p.read_text()

    def sub(m):
      new = render(m.group(1))
      if new != m.group(2):
        changed.append(f"{rel}: gen:{m.group(1)}")
      return f"<!-- gen:{m.group(1)} -->{new}<!-- /gen:{m.group(1)} -->"
    out = BLOCK.sub(sub, text)
    if not check and out != text:
      p.write_text(out)
  return changed


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; the only flag is --check.", file=sys.stderr)
    return 2
  try:
    changed = update(check=flags.FLAGS.check)
  except DocsError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if flags.FLAGS.check:
    for c in changed:
      print(f"out of date: {c}")
    print("docs are in sync" if not changed else
          f"{len(changed)} block(s) out of date; run python -m launch.docs_numbers")
    return 1 if changed else 0
  for c in changed:
    print(f"rewrote {c}")
  print(f"{len(changed)} block(s) rewritten")
  return 0


if __name__ == "__main__":
  flags.DEFINE_bool("check", False, "Change nothing; list the blocks whose text differs from "
                    "what the generators give, exit 1 if any.")
  app.run(lambda argv: sys.exit(main(argv)))
