"""The PyTorch reference's state dicts <-> our variable trees (pure functions on numpy dicts).

The reference (The-School-of-AI/LLM, `Model1B` = recurrence_model_1b_non_rev and `Model120B` =
recurrence_model_120b_moe) names every tensor by its module path, stores `nn.Linear` weights
[out, in] (`x @ W.T`) and one tensor per layer. Our tree (docs/ARCHITECTURE.md) stores weights
[in, out] and stacks the layers of one pattern position: layer n = groups/l{n % 4}[n // 4].

`entries(cfg)` lists, for a config, every reference tensor we read: its name, our path, the
group index it fills and the layout change. docs/reference.md prints that table.

* `import_state_dict(sd, cfg)` -> ({"params", "stats"}, ImportReport): every reference tensor
  is mapped, checked against an alias it duplicates, or dropped on purpose (`DROPPED`, with the
  reason); anything else, a missing tensor, a wrong shape or a non-float dtype is an
  ReferenceError naming the tensors. Every one of our params/stats leaves is written, except
  the ones listed as deliberately fresh (`FRESH`). With TQP (cfg.tqp.enabled) the dense routed
  experts are quantized with lightning_jax.tqp (the reference's 120B stores them dense).
* `export_state_dict(variables, cfg)` -> {name: float32 array}: the reference's full state dict
  (aliases, buffers, and the memory-stream parameters at the reference's initial values), so
  that `Model*.load_state_dict(strict=True)` accepts it.
* `config_from_reference(cfg_json)`: our config from the reference's own config record (the
  fixtures' `config_json`), with `model.compat="reference_cuda"`.
* `load_source(path)`: a state dict from .safetensors or the fixtures' .npz layout.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import struct
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from lightning_jax import model, nn, tqp
from lightning_jax.config import base_config, n_groups
from lightning_jax.layers import moe as moe_lib
from lightning_jax.layers import sparse_attention as sa
from lightning_jax.layers.kronecker import codec_dim

MAX_NAMED = 6


class ReferenceError(ValueError):
  """A reference state dict does not fit the config; the message names the tensors or file."""


def _names(xs, n=MAX_NAMED) -> str:
  xs = sorted(xs)
  more = f" and {len(xs) - n} more" if len(xs) > n else ""
  return ", ".join(xs[:n]) + more


# ----------------------------------------------------------------------------- the table
@dataclasses.dataclass(frozen=True)
class Entry:
  """One reference tensor: name, our path ("params/groups/l0/mixer/q"), group index (None for
  an unstacked leaf), layout ("T" transpose, "id", "conv" [C,1,K] -> [K,C], "experts" pad to
  the stored expert count, "vec1" [1] -> []), and the reference shape."""
  ref: str
  ours: str
  index: int | None
  layout: str
  ref_shape: tuple


LAYOUTS = {
    "T": "transpose [out, in] -> [in, out]",
    "id": "unchanged",
    "conv": "Conv1d weight [C, 1, K] -> [K, C]",
    "experts": "[E, a, b] unchanged; padding experts (mesh.expert) appended as zeros",
    "vec1": "[1] -> scalar",
}

# reference tensors that are read but not kept, and why
DROPPED = {
    "lambda_r_raw": "memory-stream recurrence (prev_memory_stream): training never passes one",
    "memory_ln.weight": "memory-stream recurrence: training never passes a memory stream",
    "memory_ln.bias": "memory-stream recurrence: training never passes a memory stream",
    "memory_gate_proj.weight": "memory-stream recurrence: training never passes a memory stream",
    "memory_gate_proj.bias": "memory-stream recurrence: training never passes a memory stream",
}
DROPPED_SUFFIX = {
    "rotary_emb.inv_freq": "rotary frequencies, recomputed (checked equal to base^(-2i/d))",
    "_variance_ema_snapshot": "the reference's copy of variance_ema for its reversible "
                              "recompute; we reuse the forward's selection instead",
    "gate.null_logit": "the sigmoid router has no null slots (frozen, unused)",
}
FRESH = {
    "moe/use_ema": "expert-use EMA of the bias controller: the reference keeps it outside the "
                   "state dict and starts it at 1/E, as we do",
    "frozen/embed": "Kronecker byte buffers: from the source's kron_token_bytes when it has them, "
                    "else from the tokenizer of the run's data",
    "moe/adapters": "TQP adapters start at their init (A ~ N(0, 1e-4), B ~ N(0, 1/sqrt(r)))",
}


def _hc(prefix: str, ours: str, i, s: int, d: int) -> list[Entry]:
  e = [Entry(f"{prefix}.coeffs.phi_pre.weight", f"{ours}/phi_pre", i, "T", (s, s * d)),
       Entry(f"{prefix}.coeffs.phi_post.weight", f"{ours}/phi_post", i, "T", (s, s * d)),
       Entry(f"{prefix}.coeffs.phi_res.weight", f"{ours}/phi_res", i, "T", (s * s, s * d)),
       Entry(f"{prefix}.coeffs.rms.weight", f"{ours}/norm/scale", i, "id", (s * d,)),
       Entry(f"{prefix}.norm.weight", f"{ours}/in_norm/scale", i, "id", (d,))]
  for k in ("pre", "post", "res"):
    e.append(Entry(f"{prefix}.coeffs.alpha_{k}", f"{ours}/a_{k}", i, "id", ()))
  e += [Entry(f"{prefix}.coeffs.b_pre", f"{ours}/b_pre", i, "id", (s,)),
        Entry(f"{prefix}.coeffs.b_post", f"{ours}/b_post", i, "id", (s,)),
        Entry(f"{prefix}.coeffs.b_res", f"{ours}/b_res", i, "id", (s, s))]
  return e


def _deltanet(prefix: str, ours: str, i, cfg) -> list[Entry]:
  m = cfg.model
  d, h, dh, kern = m.d_model, m.deltanet.n_heads, m.deltanet.head_dim, m.deltanet.conv_kernel
  hd = h * dh
  e = [Entry(f"{prefix}.{n}_proj.weight", f"{ours}/{n}", i, "T", (hd, d)) for n in "qkvg"]
  e.append(Entry(f"{prefix}.o_proj.weight", f"{ours}/o", i, "T", (d, hd)))
  for n in ("b", "gk"):
    e += [Entry(f"{prefix}.{n}_proj.weight", f"{ours}/{n}/w", i, "T", (h, d)),
          Entry(f"{prefix}.{n}_proj.bias", f"{ours}/{n}/b", i, "id", (h,))]
  for n in "qkv":
    e += [Entry(f"{prefix}.{n}_conv1d.conv.weight", f"{ours}/conv_{n}/w", i, "conv", (hd, 1, kern)),
          Entry(f"{prefix}.{n}_conv1d.conv.bias", f"{ours}/conv_{n}/b", i, "id", (hd,))]
  e += [Entry(f"{prefix}.{n}", f"{ours}/{n}", i, "id", (h,)) for n in ("A_log", "D", "dt_bias")]
  e.append(Entry(f"{prefix}.o_norm.norm.weight", f"{ours}/o_norm/scale", i, "id", (dh,)))
  return e


def _gsa(prefix: str, ours: str, stats: str, i, cfg) -> list[Entry]:
  m, g = cfg.model, cfg.model.gsa
  d, hd = m.d_model, g.n_heads * g.head_dim
  e = [Entry(f"{prefix}.W_{n}.weight", f"{ours}/{n}", i, "T", (hd, d))
       for n in ("q", "k", "v", "gv", "go")]
  e += [Entry(f"{prefix}.o_proj.weight", f"{ours}/o", i, "T", (d, hd)),
        Entry(f"{prefix}.W_Iq.weight", f"{ours}/idx_q", i, "T", (g.idx_heads * g.idx_dim, d)),
        Entry(f"{prefix}.W_Ik.weight", f"{ours}/idx_k", i, "T", (g.idx_dim, d)),
        Entry(f"{prefix}.W_Iw.weight", f"{ours}/idx_w", i, "T", (g.idx_heads, d)),
        Entry(f"{prefix}.gate_bias", f"{ours}/idx_b", i, "id", (g.idx_heads,)),
        Entry(f"{prefix}.variance_ema", f"{stats}/var_ema", i, "id", ())]
  return e


def _ffn(prefix: str, ours: str, i, d: int, f: int) -> list[Entry]:
  return [Entry(f"{prefix}.gate_proj.weight", f"{ours}/gate", i, "T", (f, d)),
          Entry(f"{prefix}.up_proj.weight", f"{ours}/up", i, "T", (f, d)),
          Entry(f"{prefix}.down_proj.weight", f"{ours}/down", i, "T", (d, f))]


def _moe(prefix: str, ours: str, stats: str, i, cfg, n_exp: int) -> list[Entry]:
  e, d = cfg.moe, cfg.model.d_model
  f, fs = e.expert_width, e.shared_width
  out = [Entry(f"{prefix}.W_gate", f"{ours}/experts/gate", i, "experts", (n_exp, d, f)),
         Entry(f"{prefix}.W_up", f"{ours}/experts/up", i, "experts", (n_exp, d, f)),
         Entry(f"{prefix}.W_down", f"{ours}/experts/down", i, "experts", (n_exp, f, d)),
         Entry(f"{prefix}.gate.gate.weight", f"{ours}/router/w", i, "T", (n_exp, d)),
         Entry(f"{prefix}.shared_gate.weight", f"{ours}/shared/gate", i, "T", (fs, d)),
         Entry(f"{prefix}.shared_up.weight", f"{ours}/shared/up", i, "T", (fs, d)),
         Entry(f"{prefix}.shared_down.weight", f"{ours}/shared/down", i, "T", (d, fs))]
  if e.router == "sigmoid":
    out.append(Entry(f"{prefix}.gate.logit_bias", f"{stats}/bias", i, "id", (n_exp,)))
  else:
    out += [Entry(f"{prefix}.gate.logit_bias", f"{ours}/router/logit_bias", i, "id", (n_exp,)),
            Entry(f"{prefix}.gate.null_logit", f"{ours}/router/null_logit", i, "vec1", (1,))]
  return out


def _layer(cfg, kind: str, pre: str, ours: str, stats: str, i, mtp_names=None) -> list[Entry]:
  """One layer: pre = "layers.N" (backbone) or "mtp_block" (mtp_names gives its prefixes)."""
  d, s = cfg.model.d_model, cfg.model.hc.n_streams
  names = mtp_names or {"mix_hc": f"{pre}.attn_block", "mixer": f"{pre}.attn_block.sublayer",
                        "ffn_hc": f"{pre}.mlp_block", "ffn": f"{pre}.mlp_block.sublayer.mlp.mlp",
                        "moe": f"{pre}.mlp_block.sublayer.moe"}
  e = _hc(names["mix_hc"], f"{ours}/mix_hc", i, s, d)
  if kind == "D":
    e += _deltanet(names["mixer"], f"{ours}/mixer", i, cfg)
  else:
    e += _gsa(names["mixer"], f"{ours}/mixer", f"{stats}/mixer", i, cfg)
  e += _hc(names["ffn_hc"], f"{ours}/ffn_hc", i, s, d)
  if cfg.moe.enabled:
    n_exp = cfg.moe.mtp_n_experts if mtp_names else cfg.moe.n_experts
    e += _moe(names["moe"], f"{ours}/moe", f"{stats}/moe", i, cfg, n_exp)
  else:
    e += _ffn(names["ffn"], f"{ours}/ffn", i, d, cfg.model.ffn_width)
  return e


def mtp_reversible(cfg) -> bool:
  return bool(cfg.model.mtp.reversible)


def entries(cfg) -> list[Entry]:
  """Every reference tensor of `cfg`'s model, in the reference's registration order."""
  m = cfg.model
  d, v = m.d_model, m.vocab_size
  out = [Entry("pf_to_model.weight", "params/embed/proj", None, "T", (d, codec_dim(m.embed.max_bytes))),
         Entry("embed_norm.weight", "params/embed/norm/scale", None, "id", (d,))]
  for n in range(m.n_layers):
    j, g = n % len(m.pattern), n // len(m.pattern)
    out += _layer(cfg, m.pattern[j], f"layers.{n}", f"params/groups/l{j}", f"stats/groups/l{j}", g)
  out.append(Entry("norm.weight", "params/final_norm/scale", None, "id", (d,)))
  if m.mtp.enabled:
    out.append(Entry("mtp_block.fusion_proj.weight", "params/mtp/in_proj", None, "T", (d, 2 * d)))
    if mtp_reversible(cfg):
      hc = ("mtp_block.reversible_stack.blocks.0.block", "mtp_block.reversible_stack.blocks.1.block")
    else:
      hc = ("mtp_block.attn_block", "mtp_block.mlp_block")
    names = {"mix_hc": hc[0], "mixer": "mtp_block.attn", "ffn_hc": hc[1],
             "ffn": "mtp_block.mlp.mlp.mlp", "moe": "mtp_block.mlp.moe"}
    out += _layer(cfg, "G", "mtp_block", "params/mtp/layer", "stats/mtp/layer", None, names)
  out.append(Entry("lm_head.weight", "params/head/w", None, "T", (v, d)))
  return out


# ----------------------------------------------------------------------------- aliases
# (alias pattern, canonical replacement): the reference registers the same modules under more
# than one name (its reversible stacks hold the layers again); these names duplicate tensors.
_ALIAS_RULES = [
    (re.compile(r"^stack\.blocks\.(\d+)\."), lambda mt: f"layers.{mt.group(1)}."),
    (re.compile(r"^stack\.bootstrap_layer\."), lambda mt: "layers.0."),
    (re.compile(r"^stack\.mid_layers\.(\d+)\.(block|wrapper\.layer)\."),
     lambda mt: f"layers.{int(mt.group(1)) + 1}."),
    (re.compile(r"^mtp_block\.attn_block\.sublayer\."), lambda mt: "mtp_block.attn."),
    (re.compile(r"^mtp_block\.mlp_block\.sublayer\."), lambda mt: "mtp_block.mlp."),
    (re.compile(r"^mtp_block\.reversible_stack\.bootstrap_layer\.block\."),
     lambda mt: "mtp_block.reversible_stack.blocks.0.block."),
    (re.compile(r"^mtp_block\.reversible_stack\.mid_layers\.0\.(block|wrapper\.layer)\.block\."),
     lambda mt: "mtp_block.reversible_stack.blocks.1.block."),
    (re.compile(r"^mtp_block\.reversible_stack\.blocks\.0\.block\.sublayer\."),
     lambda mt: "mtp_block.attn."),
    (re.compile(r"^mtp_block\.reversible_stack\.blocks\.1\.block\.sublayer\."),
     lambda mt: "mtp_block.mlp."),
]


def canonical(name: str) -> str:
  """The name an alias duplicates (itself when it is not an alias)."""
  for _ in range(4):
    for pat, rep in _ALIAS_RULES:
      mt = pat.match(name)
      if mt:
        name = rep(mt) + name[mt.end():]
        break
    else:
      return name
  return name


def _dropped_reason(name: str, cfg) -> str | None:
  if name in DROPPED:
    return DROPPED[name]
  for suf, why in DROPPED_SUFFIX.items():
    if name.endswith("." + suf) or name == suf:
      if suf == "gate.null_logit" and cfg.moe.router != "sigmoid":
        return None
      return why
  return None


def alias_names(cfg) -> dict:
  """{alias name: canonical name} of the reference model described by cfg (export)."""
  m = cfg.model
  out = {}

  def layer_tensors(n):
    pre = f"layers.{n}."
    return [e.ref for e in entries(cfg) if e.ref.startswith(pre)] + _buffers_of_layer(cfg, n)

  if cfg.reversible.enabled:
    for n in range(m.n_layers):
      for name in layer_tensors(n):
        rest = name[len(f"layers.{n}."):]
        out[f"stack.blocks.{n}.{rest}"] = name
        if n == 0:
          out[f"stack.bootstrap_layer.{rest}"] = name
        else:
          out[f"stack.mid_layers.{n - 1}.block.{rest}"] = name
          out[f"stack.mid_layers.{n - 1}.wrapper.layer.{rest}"] = name
  if m.mtp.enabled:
    mtp = [e.ref for e in entries(cfg) if e.ref.startswith("mtp_block.")] + _mtp_buffers(cfg)
    attn = [x for x in mtp if x.startswith("mtp_block.attn.")]
    mlp = [x for x in mtp if x.startswith("mtp_block.mlp.")]
    if mtp_reversible(cfg):
      b0, b1 = "mtp_block.reversible_stack.blocks.0.block.", "mtp_block.reversible_stack.blocks.1.block."
      own0 = [x for x in mtp if x.startswith(b0)] + [b0 + "sublayer." + x[len("mtp_block.attn."):]
                                                     for x in attn]
      own1 = [x for x in mtp if x.startswith(b1)] + [b1 + "sublayer." + x[len("mtp_block.mlp."):]
                                                     for x in mlp]
      for x in own0:
        if x.startswith(b0 + "sublayer."):
          out[x] = "mtp_block.attn." + x[len(b0 + "sublayer."):]
        out["mtp_block.reversible_stack.bootstrap_layer.block." + x[len(b0):]] = canonical(x)
      for x in own1:
        if x.startswith(b1 + "sublayer."):
          out[x] = "mtp_block.mlp." + x[len(b1 + "sublayer."):]
        for mid in ("block", "wrapper.layer"):
          out[f"mtp_block.reversible_stack.mid_layers.0.{mid}.block." + x[len(b1):]] = canonical(x)
    else:
      for x in attn:
        out["mtp_block.attn_block.sublayer." + x[len("mtp_block.attn."):]] = x
      for x in mlp:
        out["mtp_block.mlp_block.sublayer." + x[len("mtp_block.mlp."):]] = x
  return out


def _buffers_of_layer(cfg, n: int) -> list[str]:
  kind = cfg.model.pattern[n % len(cfg.model.pattern)]
  pre = f"layers.{n}.attn_block.sublayer."
  out = [pre + "rotary_emb.inv_freq"]
  if kind == "G":
    out.append(pre + "_variance_ema_snapshot")
  if cfg.moe.enabled and cfg.moe.router == "sigmoid":
    out.append(f"layers.{n}.mlp_block.sublayer.moe.gate.null_logit")
  return out


def _mtp_buffers(cfg) -> list[str]:
  out = ["mtp_block.attn.rotary_emb.inv_freq", "mtp_block.attn._variance_ema_snapshot"]
  if cfg.moe.enabled and cfg.moe.router == "sigmoid":
    out.append("mtp_block.mlp.moe.gate.null_logit")
  return out


def inv_freq(head_dim: int, base: float) -> np.ndarray:
  """The reference's rotary buffer 1 / base^(arange(0, dim, 2) / dim), float32."""
  return (1.0 / (np.float32(base) ** (np.arange(0, head_dim, 2, dtype=np.float32)
                                      / np.float32(head_dim)))).astype(np.float32)


def _inv_freq_for(name: str, cfg) -> np.ndarray:
  m = cfg.model
  is_gsa = name.startswith("mtp_block.") or m.pattern[int(name.split(".")[1]) % len(m.pattern)] == "G"
  return inv_freq(m.gsa.head_dim if is_gsa else m.deltanet.head_dim, m.rope_base)


# ----------------------------------------------------------------------------- layout changes
def to_ours(a: np.ndarray, layout: str, shape: tuple) -> np.ndarray:
  if layout == "T":
    return a.T
  if layout == "conv":
    return a[:, 0, :].T
  if layout == "vec1":
    return a.reshape(())
  if layout == "experts":
    pad = shape[0] - a.shape[0]
    return np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) if pad else a
  return a


def to_ref(a: np.ndarray, layout: str, ref_shape: tuple) -> np.ndarray:
  if layout == "T":
    return a.T
  if layout == "conv":
    return a.T[:, None, :]
  if layout == "vec1":
    return a.reshape((1,))
  if layout == "experts":
    return a[:ref_shape[0]]
  return a


# ----------------------------------------------------------------------------- import
@dataclasses.dataclass
class ImportReport:
  mapped: int = 0
  aliases: int = 0
  dropped: dict = dataclasses.field(default_factory=dict)      # name -> why
  fresh: dict = dataclasses.field(default_factory=dict)        # our path -> why

  def lines(self) -> list[str]:
    why: dict = {}
    for n, w in self.dropped.items():
      why.setdefault(w, []).append(n)
    out = [f"mapped {self.mapped} reference tensors; {self.aliases} alias names checked equal "
           f"to the tensors they duplicate"]
    out += [f"dropped {len(ns)} ({w}): {_names(ns, 3)}" for w, ns in why.items()]
    fresh: dict = {}
    for p, w in self.fresh.items():
      fresh.setdefault(w, []).append(p)
    out += [f"fresh {len(ps)} ({w}): {_names(ps, 3)}" for w, ps in fresh.items()]
    return out


_FLOATS = ("float32", "float16", "bfloat16", "float64")


def _dtype_name(a) -> str:
  return str(getattr(a, "dtype", type(a).__name__))


def _abstract_dense(cfg):
  """Abstract params/stats of cfg with routed experts in dense form (the TQP import target)."""
  dense = cfg
  if cfg.tqp.enabled:
    dense = cfg.copy_and_resolve_references()
    dense.tqp.enabled = False
  return dense, model.abstract_variables(dense)


def import_state_dict(sd: dict, cfg, *, check_aliases: bool = True):
  """({"params", "stats"} numpy trees for cfg, ImportReport) from a reference state dict.

  With cfg.tqp.enabled the routed experts are quantized (tqp.convert_moe_to_tqp): the result
  then also has "frozen" (the TQP bases, without the embedding codec)."""
  report = ImportReport()
  dense_cfg, abstract = _abstract_dense(cfg)
  flat_abs = {f"{c}/{k}": v for c in ("params", "stats") for k, v in nn.flatten(abstract[c]).items()}
  table = entries(dense_cfg)
  by_ref = {e.ref: e for e in table}

  bad_dtype = [n for n, a in sd.items() if _dtype_name(a) not in _FLOATS]
  if bad_dtype:
    raise ReferenceError(f"reference tensors {_names(bad_dtype)} have dtype "
                         f"{_dtype_name(sd[sorted(bad_dtype)[0]])}; expected floating point "
                         f"(float32, bfloat16 or float16).")
  missing = [e.ref for e in table if e.ref not in sd]
  unknown, aliases = [], {}
  for n in sd:
    if n in by_ref:
      continue
    c = canonical(n)
    if c != n and (c in by_ref or _dropped_reason(c, cfg) is not None or c in sd):
      aliases[n] = c
    elif _dropped_reason(n, cfg) is not None:
      report.dropped[n] = _dropped_reason(n, cfg)
    else:
      unknown.append(n)
  if unknown or missing:
    parts = []
    if unknown:
      parts.append(f"has tensors our {_stage(cfg)} config does not have: {_names(unknown)}")
    if missing:
      parts.append(f"lacks {_names(missing)}")
    raise ReferenceError(f"the reference state dict {' and '.join(parts)}; expected a state dict "
                         f"of the same stage and size as the config (another stage, size or "
                         f"layer count?).")
  wrong = [f"{e.ref} {tuple(np.shape(sd[e.ref]))} (expected {e.ref_shape})" for e in table
           if tuple(np.shape(sd[e.ref])) != tuple(e.ref_shape)]
  if wrong:
    raise ReferenceError(f"reference tensors have the wrong shape for the config: "
                         f"{_names(wrong, 4)}; expected a state dict of the same size.")
  for n in report.dropped:
    if n.endswith("rotary_emb.inv_freq"):
      want = _inv_freq_for(canonical(n), cfg)
      if np.shape(sd[n]) != want.shape or not np.allclose(np.asarray(sd[n], np.float32), want,
                                                          rtol=1e-5, atol=0):
        raise ReferenceError(f"reference buffer {n} is not the standard rotary frequency table "
                             f"base^(-2i/d) with model.rope_base={cfg.model.rope_base}; expected "
                             f"the reference's plain RoPE (no scaling).")
  if check_aliases:
    diff = [n for n, c in aliases.items() if c in sd and not _same(sd[n], sd[c])]
    if diff:
      raise ReferenceError(f"alias tensors {_names(diff)} differ from the tensors they duplicate "
                           f"({canonical(sorted(diff)[0])}); expected one tensor per module.")
  for n in aliases:
    report.dropped[n] = "alias names duplicating layers.N.* / mtp_block.* tensors"
  report.aliases = len(aliases)

  out = {}
  for path, a in flat_abs.items():
    out[path] = np.zeros(a.shape, np.float32) if a.dtype == np.float32 else np.zeros(a.shape, a.dtype)
  written: dict = {}
  for e in table:
    if e.ours not in out:
      raise ReferenceError(f"our {_stage(cfg)} tree has no leaf {e.ours} for reference tensor "
                           f"{e.ref}; the config does not describe this model.")
    shape = flat_abs[e.ours].shape
    val = to_ours(np.asarray(sd[e.ref]).astype(np.float32), e.layout,
                  shape[1:] if e.index is not None else shape)
    if e.index is None:
      out[e.ours] = val.reshape(shape)
    else:
      out[e.ours][e.index] = val
    written.setdefault(e.ours, set()).add(e.index)
    report.mapped += 1
  unwritten = []
  for path, a in flat_abs.items():
    if path.endswith("/use_ema"):
      n = a.shape[-1]
      out[path] = np.full(a.shape, 1.0 / n, np.float32)
      report.fresh[path] = FRESH["moe/use_ema"]
      continue
    got = written.get(path, set())
    if None not in got and (len(a.shape) == 0 or len(got) < _stack_len(path, a, cfg)):
      unwritten.append(path)
  if unwritten:
    raise ReferenceError(f"our leaves {_names(unwritten)} were left unwritten by the reference "
                         f"state dict; expected every parameter of the config to have a source.")
  # the abstract tree's own structure (empty subtrees included: checkpoints compare structures)
  tree = {c: jax.tree_util.tree_map_with_path(lambda kp, _, c=c: out[f"{c}/{nn.path_str(kp)}"],
                                              abstract[c]) for c in ("params", "stats")}
  if cfg.tqp.enabled:
    params, qfrozen = tqp.convert_moe_to_tqp(tree["params"], cfg)
    tree["params"] = jax_to_numpy(params)
    tree["frozen"] = jax_to_numpy(qfrozen)
    report.fresh["params/**/moe/adapters"] = FRESH["moe/adapters"]
  return tree, report


def _stack_len(path: str, a, cfg) -> int:
  return a.shape[0] if path.split("/")[1] == "groups" else 1


def _same(a, b) -> bool:
  a, b = np.asarray(a), np.asarray(b)
  return (a.shape == b.shape and a.dtype == b.dtype
          and a.reshape(-1).view(np.uint8).tobytes() == b.reshape(-1).view(np.uint8).tobytes())


def jax_to_numpy(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


def _stage(cfg) -> str:
  return f"stage {cfg.get('stage', '?')!r}"


# ----------------------------------------------------------------------------- export
REFERENCE_INIT = {
    "lambda_r_raw": np.float32(-2.5),
}


def export_state_dict(variables: dict, cfg, dtype=np.float32) -> dict:
  """The reference state dict (names, layouts, aliases, buffers) of our variables.

  With TQP, the routed experts are the dequantized bases with the adapters folded in (the
  reference's 120B keeps dense experts). Memory-stream parameters (never trained) are written
  at the reference's initial values (memory_gate_proj zero)."""
  params = variables["params"]
  if cfg.tqp.enabled:
    params = _dense_experts(params, variables["frozen"], cfg)
    cfg = _abstract_dense(cfg)[0]
  flat = {f"params/{k}": np.asarray(v) for k, v in nn.flatten(params).items()}
  flat.update({f"stats/{k}": np.asarray(v) for k, v in nn.flatten(variables.get("stats", {})).items()})
  sd = {}
  for e in entries(cfg):
    if e.ours not in flat:
      raise ReferenceError(f"the variables have no leaf {e.ours} (for reference tensor {e.ref}); "
                           f"expected variables of the config's model.")
    a = flat[e.ours] if e.index is None else flat[e.ours][e.index]
    sd[e.ref] = np.array(to_ref(np.asarray(a, np.float32), e.layout, e.ref_shape), order="C")
  m = cfg.model
  for n in range(m.n_layers):
    for b in _buffers_of_layer(cfg, n):
      sd[b] = _buffer_value(b, sd, cfg)
  if m.mtp.enabled:
    for b in _mtp_buffers(cfg):
      sd[b] = _buffer_value(b, sd, cfg)
  for alias, c in alias_names(cfg).items():
    sd[alias] = sd[c]
  d = m.d_model
  sd["lambda_r_raw"] = np.asarray(REFERENCE_INIT["lambda_r_raw"], np.float32)
  sd["memory_ln.weight"] = np.ones((d,), np.float32)
  sd["memory_ln.bias"] = np.zeros((d,), np.float32)
  sd["memory_gate_proj.weight"] = np.zeros((1, d), np.float32)
  sd["memory_gate_proj.bias"] = np.zeros((1,), np.float32)
  if np.dtype(dtype) != np.float32:
    sd = {k: _cast(v, dtype) for k, v in sd.items()}
  return sd


def _cast(v, dtype):
  return np.asarray(v).astype(dtype)


def _buffer_value(name: str, sd: dict, cfg):
  if name.endswith("rotary_emb.inv_freq"):
    return _inv_freq_for(name, cfg)
  if name.endswith("_variance_ema_snapshot"):
    return sd[name[:-len("_variance_ema_snapshot")] + "variance_ema"]
  if name.endswith("gate.null_logit"):
    return np.zeros((1,), np.float32)
  raise KeyError(name)


def _dense_experts(params, frozen, cfg):
  """Params with dense routed experts rebuilt from the TQP bases + adapters (export)."""
  bits = int(cfg.tqp.bits)

  def walk(p, f):
    if not isinstance(p, dict):
      return p
    out = {}
    for k, v in p.items():
      sub = f.get(k, {}) if isinstance(f, dict) else {}
      if k == "moe" and isinstance(v, dict) and "adapters" in v:
        mo = {kk: vv for kk, vv in v.items() if kk != "adapters"}
        mo["experts"] = {}
        for mat in ("gate", "up", "down"):
          d_in = cfg.model.d_model if mat != "down" else cfg.moe.expert_width
          w = _dequant_stack(sub["experts"][mat], v["adapters"][mat], bits, d_in)
          mo["experts"][mat] = np.asarray(w, np.float32)
        out[k] = mo
      else:
        out[k] = walk(v, sub)
    return out

  return walk(params, frozen)


def _dequant_stack(q, a, bits, d_in):
  """tqp.dequantize (stored [..., E, d_in, d_out] layout) over the stacked group dims."""
  fn = lambda q_, a_: tqp.dequantize(q_, bits, d_in, a_)
  for _ in range(np.ndim(q["signs"]) - 1):
    fn = jax.vmap(fn)
  return fn(q, a)


# ----------------------------------------------------------------------------- config
def _moe_env(cj: dict, key: str, default: str) -> float:
  env = cj.get("moe_env") or {}
  return float(env.get(key, default))


def config_from_reference(cfg_json: dict, base=None):
  """Our config for the reference model described by its config record (the fixtures'
  `config_json`: {"config_effective": {...}, "model_class", "reference_module", "moe_env"}).
  Values the record leaves out keep the reference code's defaults (MOE_W_Z 1e-3, bias gamma
  1e-3, caps 0.02 / 0.15, guard 50)."""
  if base is None:
    base = base_config()
  c = base.copy_and_resolve_references()
  ce = cfg_json.get("config_effective", cfg_json)
  need = ("hidden_size", "num_layers", "vocab_size", "delta_v_heads", "delta_head_dim",
          "gsa_num_heads", "gsa_head_dim")
  miss = [k for k in need if k not in ce]
  if miss:
    raise ReferenceError(f"the reference config lacks {', '.join(miss)}; expected the reference's "
                         f"ModelConfig fields (config_effective).")
  module = str(cfg_json.get("reference_module", cfg_json.get("model_class", "")))
  m = c.model
  c.stage = f"reference_{cfg_json.get('name', 'import')}"
  m.d_model = int(ce["hidden_size"])
  m.n_layers = int(ce["num_layers"])
  n_gsa = int(ce.get("num_gsa_layers", m.n_layers // 4))
  if n_gsa != m.n_layers // 4:
    raise ReferenceError(f"the reference config has {n_gsa} GSA layers of {m.n_layers}; expected "
                         f"every 4th layer (DDDG).")
  m.pattern = "DDDG"
  m.vocab_size = int(ce["vocab_size"])
  m.max_seq_len = int(ce.get("max_seq_len", m.max_seq_len))
  m.rope_base = float(ce.get("rope_base", 10000))
  m.deltanet.n_heads = int(ce["delta_v_heads"])
  m.deltanet.head_dim = int(ce["delta_head_dim"])
  m.gsa.n_heads = int(ce["gsa_num_heads"])
  m.gsa.head_dim = int(ce["gsa_head_dim"])
  m.gsa.idx_heads = int(ce.get("gsa_indexer_heads", 4))
  m.gsa.idx_dim = 128                       # the reference's d_idx (fixed)
  m.gsa.k_base = int(ce.get("gsa_k_base", m.gsa.k_base))
  m.gsa.k_min = int(ce.get("gsa_k_min", m.gsa.k_min))
  m.gsa.k_max = int(ce.get("gsa_k_max", m.gsa.k_max))
  m.gsa.n_sinks = min(4, m.gsa.k_min)
  m.gsa.var_row = "full_row"
  m.hc.n_streams = int(ce.get("n_streams", 4))
  m.hc.sinkhorn_iters = int(ce.get("sinkhorn_iters", 20))
  m.embed.form = "on_the_fly"
  m.embed.round_codes_bf16 = True          # PureHybridEmbeddingTorch casts the codes to bf16
  m.mtp.enabled = bool(ce.get("enable_mtp", True))
  m.mtp.weight = float(cfg_json.get("mtp_weight", 0.3))
  m.mtp.reversible = bool(ce.get("mtp_reversible", False))
  m.compat = "reference_cuda"
  m.ffn_width = int(ce.get("shared_expert_intermediate_size", m.ffn_width))
  c.reversible.enabled = "non_rev" not in module
  if m.mtp.reversible:
    for k, ours in (("mtp_step_size", c.reversible.h), ("mtp_a", c.reversible.a)):
      if k in ce and float(ce[k]) != float(ours):
        raise ReferenceError(f"the reference config has {k}={ce[k]} but our MTP stack uses "
                             f"reversible.{'h' if k == 'mtp_step_size' else 'a'}={ours}; expected "
                             f"the reference's 0.25 / 0.5.")
  n_exp = int(ce.get("num_real_experts", 0))
  e = c.moe
  e.enabled = n_exp > 0
  if e.enabled:
    e.router = "sigmoid" if "120b" in module.lower() else "null_slot"
    e.n_experts = n_exp
    e.n_null = int(ce.get("num_null_experts", 0))
    e.top_k = int(ce["top_k"])
    e.expert_width = int(ce["expert_intermediate_size"])
    e.shared_width = int(ce["shared_expert_intermediate_size"])
    e.mtp_n_experts = int(ce.get("mtp_num_experts", n_exp))
    if e.router == "sigmoid":
      if e.n_null:
        raise ReferenceError(f"the reference 120B config has num_null_experts={e.n_null}; our "
                             f"sigmoid router has no null slots (expected 0).")
      e.z_weight = _moe_env(cfg_json, "MOE_W_Z", "1e-3")
      e.bias_gamma = _moe_env(cfg_json, "MOE_BIAS_GAMMA", "1e-3")
      e.bias_cap_lo = _moe_env(cfg_json, "MOE_EXPERT_CAP_LO", "0.02")
      e.bias_cap_hi = _moe_env(cfg_json, "MOE_EXPERT_CAP_HI", "0.15")
      e.bias_guard_k = _moe_env(cfg_json, "MOE_GUARD_K", "50")
  c.train.seq_len = min(c.train.seq_len, m.max_seq_len)
  c.train.steps = 1000              # a placeholder schedule: override --config.train.* / optim.*
  return c


# ----------------------------------------------------------------------------- files
def load_source(path) -> dict:
  """{"state_dict": {name: array}, "config_json": dict | None, "kron": (bytes, lengths) | None}
  from a .safetensors file or a file in the fixtures' .npz layout (state_dict/<name> keys)."""
  p = pathlib.Path(path)
  if not p.exists():
    raise ReferenceError(f"reference file {p} does not exist; expected a .safetensors file or "
                         f".npz in the fixtures' layout.")
  suffix = p.suffix.lower()
  if suffix in (".pt", ".pth", ".bin"):
    raise ReferenceError(f"{p} is a PyTorch pickle, which needs torch to read; convert it once "
                         f"with torch (safetensors.torch.save_file(torch.load(path), 'x.safetensors'))"
                         f" and pass the .safetensors file.")
  if suffix == ".npz":
    try:
      with np.load(p, allow_pickle=False) as z:
        keys = list(z.files)
        sd = {k[len("state_dict/"):]: z[k] for k in keys if k.startswith("state_dict/")}
        cj = json.loads(str(z["config_json"])) if "config_json" in keys else None
        kron = ((z["kron_token_bytes"], z["kron_token_lens"])
                if "kron_token_bytes" in keys and "kron_token_lens" in keys else None)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
      raise ReferenceError(f"reference file {p} is truncated or not an .npz archive ({err}); "
                           f"expected the fixtures' layout.") from err
    if not sd:
      raise ReferenceError(f"reference file {p} holds no state_dict/<name> entries; expected the "
                           f"fixtures' layout.")
    return {"state_dict": sd, "config_json": cj, "kron": kron}
  if suffix == ".safetensors":
    try:
      sd = load_file(str(p))
    except (SafetensorError, OSError, ValueError) as err:
      raise ReferenceError(f"reference file {p} is truncated or not a safetensors file ({err}).") from err
    cj = None
    meta = _safetensors_metadata(p)
    if meta and "config_json" in meta:
      cj = json.loads(meta["config_json"])
    return {"state_dict": sd, "config_json": cj, "kron": None}
  raise ReferenceError(f"reference file {p} has suffix {suffix!r}; expected .safetensors or .npz "
                       f"(a .pt file: convert it to .safetensors with torch first).")


def _safetensors_metadata(p) -> dict | None:
  try:
    with open(p, "rb") as fh:
      n = struct.unpack("<Q", fh.read(8))[0]
      head = json.loads(fh.read(n))
    return head.get("__metadata__")
  except (OSError, ValueError, struct.error):
    return None


def save_safetensors(sd: dict, path, config_json: dict | None = None) -> None:
  """Write a reference state dict (atomically: a temporary file renamed into place)."""
  p = pathlib.Path(path)
  tmp = p.with_name(p.name + ".tmp")
  meta = {"config_json": json.dumps(config_json)} if config_json else None
  save_file({k: np.array(v, order="C") for k, v in sd.items()}, str(tmp), metadata=meta)
  tmp.replace(p)


def reference_config(cfg) -> dict:
  """The reference's config record for our config (inverse of config_from_reference), written
  into exported files so that importing them needs no --config."""
  m, e = cfg.model, cfg.moe
  ce = {"hidden_size": m.d_model, "num_layers": m.n_layers, "vocab_size": m.vocab_size,
        "num_deltanet_layers": m.n_layers - m.n_layers // 4, "num_gsa_layers": m.n_layers // 4,
        "max_seq_len": m.max_seq_len, "rope_base": m.rope_base,
        "delta_v_heads": m.deltanet.n_heads, "delta_head_dim": m.deltanet.head_dim,
        "gsa_num_heads": m.gsa.n_heads, "gsa_head_dim": m.gsa.head_dim,
        "gsa_indexer_heads": m.gsa.idx_heads, "gsa_k_base": m.gsa.k_base,
        "gsa_k_min": m.gsa.k_min, "gsa_k_max": m.gsa.k_max, "n_streams": m.hc.n_streams,
        "sinkhorn_iters": m.hc.sinkhorn_iters, "enable_mtp": bool(m.mtp.enabled),
        "mtp_reversible": mtp_reversible(cfg), "mtp_step_size": cfg.reversible.h,
        "mtp_a": cfg.reversible.a,
        "shared_expert_intermediate_size": e.shared_width if e.enabled else m.ffn_width,
        "num_real_experts": e.n_experts if e.enabled else 0}
  out = {"config_effective": ce, "mtp_weight": m.mtp.weight, "name": str(cfg.get("stage", "export"))}
  if e.enabled:
    ce.update(num_null_experts=e.n_null if e.router == "null_slot" else 0, top_k=e.top_k,
              expert_intermediate_size=e.expert_width, mtp_num_experts=e.mtp_n_experts)
  if e.enabled and e.router == "sigmoid":
    out["reference_module"] = "lightninglm.models.recurrence_model_120b_moe"
    out["moe_env"] = {"MOE_W_Z": str(e.z_weight), "MOE_BIAS_GAMMA": str(e.bias_gamma),
                      "MOE_EXPERT_CAP_LO": str(e.bias_cap_lo),
                      "MOE_EXPERT_CAP_HI": str(e.bias_cap_hi), "MOE_GUARD_K": str(e.bias_guard_k)}
  elif cfg.reversible.enabled:
    out["reference_module"] = "lightninglm.models.recurrence_model_8b_moe"
  else:
    out["reference_module"] = "lightninglm.models.recurrence_model_1b_non_rev"
  return out


# ----------------------------------------------------------------------------- verification
class recorded_selections:
  """Context manager (verification only: launch.convert check, tests): while active, traced GSA
  layers use the reference's recorded selection (rec_<run>/gsa/<i>: 0 = the backbone's G
  layer, 1 = the MTP block's; models with one backbone G layer) instead of their own, and our
  own selections and k_t are collected in `self.ours[i]` when the computation runs. At the
  fixtures' tie positions the indexer scores are exactly equal and torch.topk's pick among
  them is arbitrary, so logits are compared on the reference's selection."""

  def __init__(self, z, run: str):
    self.z, self.run, self.ours, self.calls = z, run, {}, set()
    self._in_mtp = []

  def selection(self, i: int) -> np.ndarray:
    p = f"rec_{self.run}/gsa/{i}/"
    ti = self.z[p + "top_indices"].astype(np.int64)
    t = np.arange(ti.shape[1])
    k = np.minimum(self.z[p + "k_t"], t[None] + 1)
    keep = (np.arange(ti.shape[2])[None, None] < k[..., None]) & (ti <= t[None, :, None])
    return np.where(keep, ti, -1).astype(np.int32)

  def __enter__(self):
    self._saved = (sa.gsa_select, model.mtp_layer)
    orig_select, orig_mtp = self._saved

    def mtp_layer(*a, **k):
      self._in_mtp.append(1)
      try:
        return orig_mtp(*a, **k)
      finally:
        self._in_mtp.pop()

    def select(p, st, x, c):
      sel, k_t, var_t = orig_select(p, st, x, c)
      i = 1 if self._in_mtp else 0
      self.calls.add(i)
      jax.debug.callback(lambda s, k, i=i: self.ours.__setitem__(i, (np.asarray(s), np.asarray(k))),
                         sel, k_t)
      return jnp.asarray(self.selection(i)), k_t, var_t

    sa.gsa_select, model.mtp_layer = select, mtp_layer
    return self

  def __exit__(self, *exc):
    sa.gsa_select, model.mtp_layer = self._saved
    return False

  def mismatches(self, i: int) -> int:
    """Queries (outside the recorded ties) whose kept keys or k_t differ from the reference's."""
    sel, k_t = self.ours[i]
    p = f"rec_{self.run}/gsa/{i}/"
    t = np.arange(sel.shape[1])
    ties = {tuple(x) for x in self.z[p + "boundary_tie_positions"].tolist()} \
        if p + "boundary_tie_positions" in self.z.files else set()
    ref = self.selection(i)
    want_k = np.minimum(self.z[p + "k_t"], t[None] + 1)
    bad = 0
    for b in range(sel.shape[0]):
      for q in range(sel.shape[1]):
        if (b, q) in ties:
          continue
        bad += int(set(sel[b, q][sel[b, q] >= 0].tolist()) != set(ref[b, q][ref[b, q] >= 0].tolist())
                   or k_t[b, q] != want_k[b, q])
    return bad


# ----------------------------------------------------------------------------- abstract plan
def _ours_shape(e: Entry, n_groups: int | None, padded: int | None) -> tuple:
  s = tuple(e.ref_shape)
  if e.layout == "T":
    s = s[::-1]
  elif e.layout == "conv":
    s = (s[2], s[0])
  elif e.layout == "vec1":
    s = ()
  elif e.layout == "experts":
    s = (padded,) + s[1:]
  return s if n_groups is None else (n_groups,) + s


def check_plan(cfg) -> dict:
  """Check, without allocating, that the reference's state dict for cfg maps onto our tree:
  every entry lands on a leaf of model.abstract_variables with the right shape, every stacked
  leaf gets all of its groups, every leaf is written or deliberately fresh; with TQP, that the
  quantized import (tqp.convert_moe_to_tqp, traced with jax.eval_shape) has exactly the
  config's params and frozen structure. Returns {"entries", "reference_parameters"}."""
  dense_cfg, abstract = _abstract_dense(cfg)
  flat = {f"{c}/{k}": v for c in ("params", "stats") for k, v in nn.flatten(abstract[c]).items()}
  ng = n_groups(dense_cfg)
  seen: dict = {}
  n_ref = 0
  for e in entries(dense_cfg):
    if e.ours not in flat:
      raise ReferenceError(f"reference tensor {e.ref} maps to {e.ours}, which the config's tree "
                           f"lacks.")
    n_exp = dense_cfg.moe.mtp_n_experts if e.ours.startswith("params/mtp") else dense_cfg.moe.n_experts
    padded = moe_lib.padded_experts(dense_cfg, n_exp) if dense_cfg.moe.enabled else None
    want = _ours_shape(e, ng if e.index is not None else None, padded)
    if tuple(flat[e.ours].shape) != want:
      raise ReferenceError(f"reference tensor {e.ref} {e.ref_shape} becomes {want}, but our leaf "
                           f"{e.ours} is {tuple(flat[e.ours].shape)}.")
    seen.setdefault(e.ours, set()).add(e.index)
    n_ref += int(np.prod(e.ref_shape))
  missing = [p for p in flat if not p.endswith("/use_ema")
             and seen.get(p) not in ({None}, set(range(ng)))]
  if missing:
    raise ReferenceError(f"our leaves {_names(missing)} would be left unwritten by the reference "
                         f"state dict.")
  if cfg.tqp.enabled:
    got_p, got_f = jax.eval_shape(lambda p: tqp.convert_moe_to_tqp(p, cfg), abstract["params"])
    want = model.abstract_variables(cfg)
    sig = lambda t: {k: (tuple(v.shape), str(v.dtype)) for k, v in nn.flatten(t).items()}
    want_f = {k: v for k, v in want["frozen"].items() if k != "embed"}
    if sig(got_p) != sig(want["params"]) or sig(got_f) != sig(want_f):
      raise ReferenceError("the TQP conversion of the imported experts does not give the config's "
                           "params/frozen tree.")
  return {"entries": len(entries(dense_cfg)), "reference_parameters": n_ref}
