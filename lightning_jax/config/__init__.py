"""Configs: loading, the schema (lightning_jax/config/schema.py: every field once, with its
default, allowed values and resume rule) and the rules that tie fields together. The one place
that rejects bad configs, with one sentence each."""
from __future__ import annotations

import copy
import importlib.util
import inspect
import pathlib

from ml_collections import ConfigDict

from lightning_jax.config import schema
from lightning_jax.config.schema import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[2]
base_config = schema.base_config


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
  """A config read from a run directory (a checkpoint's config JSON), as pure data, completed
  to today's schema (schema.complete: fields it predates get the value the older version
  behaved as; retired fields are dropped).

  Nothing in it is ever imported or executed: optim.start_from (a config file path) keeps its
  resolved end LR in optim.start_from_lr, recorded when the run began; a record from before that
  field existed uses its optim.start_lr instead (with a note), never the file."""
  c = ConfigDict(copy.deepcopy(dict(d)))
  schema.complete(c)
  o = c.optim
  if o.start_from and float(o.start_from_lr) < 0:
    o.start_from_lr = float(o.start_lr)
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


COMPAT = schema.BY_PATH["model.compat"].choices


def compat(cfg) -> str:
  """model.compat: "spec" or "reference_cuda"."""
  return cfg.model.compat


def expert_pad(cfg) -> int:
  """The multiple routed expert slots are padded to: moe.expert_pad, or mesh.expert when 0."""
  return int(cfg.moe.expert_pad) or max(1, int(cfg.mesh.expert))


def expert_slots(cfg, n_experts: int) -> int:
  """Stored expert slots for n_experts routed experts (padding slots are never routed to)."""
  k = expert_pad(cfg)
  return -(-int(n_experts) // k) * k


def adopt_stored_layout(cfg, stored) -> str | None:
  """On resume: a config that leaves moe.expert_pad to the mesh (0) takes the layout the run
  was created with, so the same checkpoint trains on another mesh.expert. Returns a note when
  that changes what the current mesh alone would give, else None."""
  if not cfg.moe.enabled or int(cfg.moe.expert_pad):
    return None
  was = expert_pad(stored)
  now = expert_pad(cfg)
  cfg.moe.expert_pad = was
  if was != now:
    return (f"note: the run's experts are laid out for an expert-parallel width of {was}; "
            f"moe.expert_pad={was} is kept on mesh.expert={cfg.mesh.expert}.")
  return None


def resume_view(cfg) -> dict:
  """{field: value} of what must not change when a run resumes (schema.resume_view), with the
  expert layout resolved (moe.expert_pad 0 means mesh.expert)."""
  view = schema.resume_view(cfg)
  c = from_stored(schema._plain(cfg))
  view["moe.expert_pad"] = expert_pad(c) if c.moe.enabled else 0
  return view


def _need(cond: bool, msg: str):
  if not cond:
    raise ConfigError(msg)


def validate(cfg: ConfigDict) -> ConfigDict:
  """Check a config: every field against the schema (declared, type, allowed values), then the
  rules that tie fields together; raise ConfigError naming the field on the first problem."""
  schema.check_fields(cfg)
  m = cfg.model
  _need(set(m.pattern) <= {"D", "G"} and len(m.pattern) > 0,
        f"model.pattern={m.pattern!r} must be a string of 'D' and 'G' layers, e.g. 'DDDG'.")
  _need(m.n_layers % len(m.pattern) == 0,
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
  _need(g.k_min <= g.k_max,
        f"model.gsa needs 1 <= k_min ({g.k_min}) <= k_max ({g.k_max}) and k_base ({g.k_base}) "
        f">= 1.")
  _need(g.n_sinks <= g.k_min,
        f"model.gsa.n_sinks={g.n_sinks} must be between 0 and k_min={g.k_min}.")
  _need(dn.head_dim % 2 == 0 and g.head_dim % 2 == 0,
        "model.deltanet.head_dim and model.gsa.head_dim must be even for interleaved rotary.")
  _need(not (m.hc.pre == "kernel" and m.compat == "reference_cuda"),
        "model.hc.pre='kernel' needs the projections that read the state, which "
        "model.compat='reference_cuda' replaces; expected model.hc.pre 'autodiff' or 'fused' "
        "with it.")
  _need(not (m.unroll_layers and cfg.reversible.enabled),
        "model.unroll_layers=True unrolls the plain layer stack, which reversible.enabled=True "
        "replaces; expected model.unroll_layers=False with a reversible stack.")

  e = cfg.moe
  if e.enabled:
    n_slots = e.n_experts + (e.n_null if e.router == "null_slot" else 0)
    _need(e.top_k <= n_slots,
          f"moe.top_k={e.top_k} must be between 1 and the router's {n_slots} slots "
          f"(moe.n_experts={e.n_experts}).")
    for name in ("n_experts", "mtp_n_experts"):
      n = int(e[name])
      slots, ep = expert_slots(cfg, n), int(cfg.mesh.expert)
      _need(slots % ep == 0,
            f"moe.{name}={n} padded to a multiple of moe.expert_pad={e.expert_pad} gives {slots} "
            f"expert slots, which mesh.expert={ep} does not divide; expected moe.expert_pad a "
            f"multiple of {ep} (or 0: mesh.expert).")

  r = cfg.reversible
  if r.enabled:
    _need(r.a != 0, "reversible.a=0 makes the midpoint integrator non-invertible; "
                    "expected a non-zero a (the paper uses 0.5).")

  q = cfg.tqp
  if q.enabled:
    _need(e.enabled, "tqp.enabled needs moe.enabled: only routed experts are quantized.")

  o = cfg.optim
  if o.schedule != "constant":
    _need(o.decay_ratio >= 1, f"optim.decay_ratio={o.decay_ratio} must be >= 1 (end LR = peak / "
                              f"ratio).")

  t = cfg.train
  _need(t.seq_len <= m.max_seq_len,
        f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}.")
  return cfg
