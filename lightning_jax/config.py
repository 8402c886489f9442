"""Config helpers: the one place that rejects bad configs, with one sentence each."""
from __future__ import annotations

import importlib.util
import pathlib

from ml_collections import ConfigDict


class ConfigError(ValueError):
  """A config value is wrong; the message names the field and what was expected."""


REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(path: str) -> ConfigDict:
  """Load a config file as `--config=configs/x.py` would, including the ml_collections argument
  form `--config=configs/stage_9b.py:p3` (the text after ':' is passed to get_config). A relative
  path that does not exist from the working directory is looked up from the repository root."""
  path = str(path)
  file, sep, arg = path.partition(":")
  p = pathlib.Path(file)
  if not p.exists() and not p.is_absolute() and (REPO / p).exists():
    p = REPO / p
  if not p.exists():
    raise ConfigError(f"config file {file} does not exist; expected a path like configs/tiny.py "
                      f"(optionally with a phase, configs/stage_9b.py:p2).")
  spec = importlib.util.spec_from_file_location(f"_cfg_{p.stem}", p)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if not sep:
    return mod.get_config()
  import inspect
  if not inspect.signature(mod.get_config).parameters:
    raise ConfigError(f"config file {file} takes no argument, but {path!r} passes {arg!r}; "
                      f"expected just {file}.")
  return mod.get_config(arg)


def resolve_config_argv(argv: list[str]) -> list[str]:
  """argv with a relative `--config=` file that does not exist from the working directory but
  does from the repository root replaced by its absolute path (launchers run from anywhere)."""
  out = list(argv)
  for i, a in enumerate(out):
    if a.startswith("--config="):
      j, val = i, a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(out):
      j, val = i + 1, out[i + 1]
    else:
      continue
    file, sep, arg = val.partition(":")
    p = pathlib.Path(file)
    if file and not p.exists() and not p.is_absolute() and (REPO / p).exists():
      val = str(REPO / p) + sep + arg
      out[j] = f"--config={val}" if j == i else val
  return out


def from_stored(d: dict, log=None) -> ConfigDict:
  """A config read from a run directory (a checkpoint's config JSON), as pure data.

  Nothing in it is ever imported or executed: optim.start_from (a config file path) keeps its
  resolved end LR in optim.start_from_lr, recorded when the run began; a record from before that
  field existed uses its optim.start_lr instead (with a note), never the file."""
  import copy
  c = ConfigDict(copy.deepcopy(dict(d)))
  o = c.get("optim")
  if o is not None and o.get("start_from", "") and float(o.get("start_from_lr", -1.0)) < 0:
    o.start_from_lr = float(o.get("start_lr", 0.0))
    if log is not None:
      log(f"note: the stored config names optim.start_from={o.start_from!r}; a stored config is "
          f"data, so that file is not run: its warmup starts from optim.start_lr="
          f"{o.start_from_lr:g}.")
  return c


def select_phase(stage_file: str, phase, phases: dict, default: str):
  """(name, spec) of a training phase of a stage config: `phase` None or '' gives `default`;
  an unknown name is a ConfigError listing the valid ones."""
  name = default if phase in (None, "") else str(phase).strip()
  if name not in phases:
    raise ConfigError(f"{stage_file} has no phase {name!r}; expected one of "
                      f"{', '.join(phases)} (e.g. --config={stage_file}:{default}).")
  return name, phases[name]


def apply_phase(c: ConfigDict, stage_file: str, phase, phases: dict, default: str) -> ConfigDict:
  """Set a phase's fields (dotted names, e.g. 'train.total_tokens') on c, and c.phase = its name."""
  name, spec = select_phase(stage_file, phase, phases, default)
  for key, value in spec.items():
    node, parts = c, key.split(".")
    for part in parts[:-1]:
      node = node[part]
    if parts[-1] not in node:
      raise ConfigError(f"{stage_file} phase {name}: {key} names no config field.")
    node[parts[-1]] = value
  c.phase = name
  return c


def layer_kinds(cfg: ConfigDict) -> list[str]:
  """'D' or 'G' per layer: layer i is G when (i+1) % len(pattern) == 0 (SPEC §2.1)."""
  pat = cfg.model.pattern
  return [pat[i % len(pat)] for i in range(cfg.model.n_layers)]


def n_groups(cfg: ConfigDict) -> int:
  return cfg.model.n_layers // len(cfg.model.pattern)


COMPAT = ("spec", "reference_cuda")


def compat(cfg) -> str:
  """model.compat ("spec" when the config predates the field)."""
  return cfg.model.get("compat", "spec")


def _need(cond: bool, msg: str):
  if not cond:
    raise ConfigError(msg)


def _sizes(cfg: ConfigDict) -> list[str]:
  """The dotted names of every size/count field that must be a positive integer (a 0 or a
  negative one otherwise fails deep inside a kernel, or at the first save)."""
  names = ["model.d_model", "model.n_layers", "model.ce_chunk", "model.max_seq_len",
           "model.vocab_size", "model.deltanet.n_heads", "model.deltanet.head_dim",
           "model.deltanet.chunk_size", "model.deltanet.conv_kernel", "model.gsa.n_heads",
           "model.gsa.head_dim", "model.gsa.idx_heads", "model.gsa.idx_dim",
           "model.gsa.query_chunk", "model.hc.n_streams", "model.hc.sinkhorn_iters",
           "model.embed.max_bytes", "train.seq_len", "train.global_batch", "train.log_every"]
  if cfg.moe.enabled:
    names += ["moe.n_experts", "moe.expert_width", "moe.shared_width", "moe.mtp_n_experts",
              "moe.group_pad", "moe.hot_config_every"]
  else:
    names += ["model.ffn_width"]
  if cfg.tqp.enabled:
    names += ["tqp.rank"]
  if cfg.train.eval_every > 0:
    names += ["train.eval_batches", "train.eval_batch"]
  return names


def _field(cfg: ConfigDict, dotted: str):
  node = cfg
  for part in dotted.split("."):
    node = node[part]
  return node


def validate(cfg: ConfigDict) -> ConfigDict:
  """Check a config; raise ConfigError naming the field on the first problem found."""
  for name in _sizes(cfg):
    v = _field(cfg, name)
    _need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
          f"{name}={v!r} must be a positive integer (a size or count).")
  for name in ("train.eval_every", "train.micro_batch", "train.steps", "checkpoint.keep",
               "checkpoint.every_steps", "data.num_workers"):
    v = _field(cfg, name)
    _need(isinstance(v, int) and v >= 0, f"{name}={v!r} must be an integer >= 0.")
  m = cfg.model
  _need(m.d_model > 0, f"model.d_model={m.d_model} must be positive.")
  _need(set(m.pattern) <= {"D", "G"} and len(m.pattern) > 0,
        f"model.pattern={m.pattern!r} must be a string of 'D' and 'G' layers, e.g. 'DDDG'.")
  _need(m.n_layers > 0 and m.n_layers % len(m.pattern) == 0,
        f"model.n_layers={m.n_layers} must be a positive multiple of the pattern length "
        f"{len(m.pattern)} ({m.pattern!r}).")
  dn = m.deltanet
  _need(dn.n_heads * dn.head_dim == m.d_model,
        f"model.deltanet.n_heads={dn.n_heads} x head_dim={dn.head_dim} must equal "
        f"model.d_model={m.d_model}.")
  g = m.gsa
  _need(g.n_heads * g.head_dim == m.d_model,
        f"model.gsa.n_heads={g.n_heads} x head_dim={g.head_dim} must equal "
        f"model.d_model={m.d_model}.")
  _need(1 <= g.k_min <= g.k_max and g.k_base >= 1,
        f"model.gsa needs 1 <= k_min ({g.k_min}) <= k_max ({g.k_max}) and k_base ({g.k_base}) "
        f">= 1.")
  _need(m.get("compat", "spec") in COMPAT,
        f"model.compat={m.get('compat')!r} must be 'spec' (SPEC.md) or 'reference_cuda' (the "
        f"reference's CUDA-kernel mathematics, for its released weights).")
  _need(g.get("var_row", "full_row") in ("full_row", "causal"),
        f"model.gsa.var_row={g.get('var_row')!r} must be 'full_row' or 'causal'.")
  _need(g.get("attention", "gather") in ("auto", "gather", "dense_masked", "flash", "kernel"),
        f"model.gsa.attention={g.get('attention')!r} must be 'auto', 'gather', 'dense_masked', "
        f"'flash' or 'kernel'.")
  _need(0 <= g.n_sinks <= g.k_min,
        f"model.gsa.n_sinks={g.n_sinks} must be between 0 and k_min={g.k_min}.")
  _need(dn.head_dim % 2 == 0 and g.head_dim % 2 == 0,
        "model.deltanet.head_dim and model.gsa.head_dim must be even for interleaved rotary.")
  _need(m.hc.n_streams >= 1, f"model.hc.n_streams={m.hc.n_streams} must be at least 1.")
  _need(m.max_seq_len > 0, f"model.max_seq_len={m.max_seq_len} must be positive.")
  _need(m.vocab_size > 0, f"model.vocab_size={m.vocab_size} must be positive.")
  _need(m.embed.form in ("table", "on_the_fly"),
        f"model.embed.form={m.embed.form!r} must be 'table' or 'on_the_fly'.")
  _need(m.dtype in ("float32", "bfloat16", "float16"),
        f"model.dtype={m.dtype!r} must be float32, bfloat16 or float16.")

  e = cfg.moe
  if e.enabled:
    _need(e.router in ("null_slot", "sigmoid"),
          f"moe.router={e.router!r} must be 'null_slot' or 'sigmoid'.")
    n_slots = e.n_experts + (e.n_null if e.router == "null_slot" else 0)
    _need(1 <= e.top_k <= n_slots,
          f"moe.top_k={e.top_k} must be between 1 and the router's {n_slots} slots "
          f"(moe.n_experts={e.n_experts}).")
    _need(e.dispatch in ("dropless", "capacity"),
          f"moe.dispatch={e.dispatch!r} must be 'dropless' or 'capacity'.")

  r = cfg.reversible
  if r.enabled:
    _need(r.mode in ("store_boundaries", "invert"),
          f"reversible.mode={r.mode!r} must be 'store_boundaries' or 'invert'.")
    _need(r.a != 0, "reversible.a=0 makes the midpoint integrator non-invertible; "
                    "expected a non-zero a (the paper uses 0.5).")
    _need(r.h > 0, f"reversible.h={r.h} must be positive.")

  q = cfg.tqp
  if q.enabled:
    _need(q.bits in (4, 8), f"tqp.bits={q.bits} is unsupported; expected 4 or 8.")
    _need(e.enabled, "tqp.enabled needs moe.enabled: only routed experts are quantized.")

  t = cfg.train
  _need(t.seq_len <= m.max_seq_len,
        f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}.")
  _need(t.fit_memory in ("check", "auto", "off"),
        f"train.fit_memory={t.fit_memory!r} must be 'check', 'auto' or 'off'.")
  _need(t.device_memory_gb >= 0 and t.memory_headroom_gb >= 0,
        f"train.device_memory_gb={t.device_memory_gb} and train.memory_headroom_gb="
        f"{t.memory_headroom_gb} must be >= 0 (device_memory_gb 0: the device's own limit).")
  return cfg
