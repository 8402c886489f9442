"""Start-up and resume checks of a training run (launch.train calls these; the growth CLIs share
the data one).

* `schedule_on_resume`: resuming with a different step budget (train.steps / total_tokens) would
  silently reshape the LR schedule (a finished cosine run given twice the steps re-warms from
  peak / decay_ratio to mid-cosine). It refuses unless train.extend_schedule says what to do:
    "stretch": the schedule spans the new budget from step 0, as if it had always been planned
                (the LR at the resumed step changes; the message says from what to what);
    "restart": a new schedule from the resumed step to the new end: warmup over
                optim.warmup_steps from the LR the run had reached (as optim.start_from does for a
                new stage) to optim.peak_lr, then the decay (optim.schedule_start = that step).
  A run resumed with an unchanged budget keeps the schedule anchor its checkpoint recorded.
* `pool_layout_fallback`: the tiny configs train on a pool mixture over the bundled corpus's
  domains; data with none of those domains trains as one stream (data.use_pools=False), said in
  one line; data with some of them is an error naming the flags to set.
* `config_diff`: the resolved config against its stage file, one line.
* `enable_compile_cache`: JAX's persistent compilation cache (train.compile_cache).
"""
from __future__ import annotations

import os
import pathlib

import jax
from ml_collections import ConfigDict, config_flags

from lightning_jax import optim
from lightning_jax.config import ConfigError, load_config
from lightning_jax.data import pools as pools_lib

EXTEND_CHOICES = ("ask", "stretch", "restart")
# train.* fields the compiled step does not depend on (launch.train's in-process compile key)
HOST_ONLY = ("extend_schedule", "watchdog_factor", "watchdog_min_s", "watchdog_compile_s",
             "compile_cache", "log_every", "eval_every", "fit_memory", "device_memory_gb",
             "memory_headroom_gb", "wandb_project")


# ----------------------------------------------------------------------------- schedule extension
def budget_steps(config_json: dict) -> int | None:
  """Optimizer steps of a stored config (its train section), as optim.total_steps computes."""
  t = (config_json or {}).get("train") or {}
  try:
    steps, tokens = int(t.get("steps") or 0), int(t.get("total_tokens") or 0)
    per = int(t["global_batch"]) * int(t["seq_len"])
  except (KeyError, TypeError, ValueError):
    return None
  if steps > 0:
    return steps
  return tokens // per if per > 0 and tokens > 0 else None


def schedule_on_resume(cfg, saved_config: dict, saved_meta: dict, step: int, log=print) -> bool:
  """Check (and for "restart" set) the LR schedule of a run resumed at `step`; returns whether
  cfg.optim changed (the optimizer must then be rebuilt). Raises ConfigError when the budget
  changed and train.extend_schedule is "ask"."""
  choice = cfg.train.extend_schedule
  if choice not in EXTEND_CHOICES:
    raise ConfigError(f"train.extend_schedule={choice!r} must be one of "
                      f"{', '.join(map(repr, EXTEND_CHOICES))}.")
  o = cfg.optim
  saved_o = (saved_config or {}).get("optim") or {}
  saved_anchor = int(saved_o.get("schedule_start") or 0)
  old, new = budget_steps(saved_config), optim.total_steps(cfg)
  if step <= 0 or old is None or old == new or step >= new:
    if saved_anchor and int(o.schedule_start) == 0 and (old is None or old == new):
      # the checkpoint recorded a restarted schedule: keep it (its start LR came with it)
      o.schedule_start = saved_anchor
      o.start_lr = float(saved_o.get("start_lr", o.start_lr))
      o.start_from = ""
      return True
    return False
  lr_old = float(_lr_at(cfg, old, saved_anchor, saved_o, saved_meta, step))
  if choice == "ask":
    raise ConfigError(
        f"this run's checkpoint at step {step} was trained for {old} steps but the config now "
        f"asks for {new} (train.steps / train.total_tokens); choose how the LR schedule "
        f"continues: --config.train.extend_schedule=stretch (one schedule over {new} steps: "
        f"the LR at step {step} goes from {lr_old:.3g} to "
        f"{float(optim.make_schedule(cfg, new)(step)):.3g}) or --config.train.extend_schedule="
        f"restart (warm up again from {lr_old:.3g} to optim.peak_lr={o.peak_lr:g} over "
        f"optim.warmup_steps={o.warmup_steps}, then decay by step {new}).")
  if choice == "stretch":
    log(f"train.extend_schedule=stretch: the LR schedule now spans {new} steps (was {old}); the "
        f"LR at step {step} goes from {lr_old:.3g} to "
        f"{float(optim.make_schedule(cfg, new)(step)):.3g}.")
    return False
  o.schedule_start = int(step)
  o.start_lr = lr_old
  o.start_from = ""
  log(f"train.extend_schedule=restart: a new LR schedule for steps {step}..{new} (the run had "
      f"{old}): warmup over {o.warmup_steps} steps from {lr_old:.3g} (the LR reached at step "
      f"{step}) to {o.peak_lr:g}, then {o.schedule} decay.")
  return True


def _lr_at(cfg, old_steps, anchor, saved_o, saved_meta, step) -> float:
  """The LR the run had at `step`: the checkpoint's record, else the current optim section over
  the old budget (nothing named in a checkpoint is loaded: its start_from is not followed)."""
  meta = saved_meta or {}
  if isinstance(meta.get("lr"), (int, float)) and meta.get("lr") == meta.get("lr"):
    return float(meta["lr"])
  c = ConfigDict(cfg.to_dict())
  c.optim.schedule_start = anchor
  if anchor:
    c.optim.start_lr = float(saved_o.get("start_lr", c.optim.start_lr))
    c.optim.start_from = ""
  return float(optim.make_schedule(c, old_steps)(step))


# ----------------------------------------------------------------------------- own data, no pools
def pool_layout_fallback(cfg, data_dir, manifest: dict, log=print) -> bool:
  """With data.use_pools and pools that select domains of data.path: when the data has none of
  those domains, train on its single stream (data.use_pools=False), saying so in one line, and
  return True. When it has some but not all, raise ConfigError naming the flags to set."""
  d = cfg.data
  if not d.use_pools:
    return False
  specs = pools_lib.pool_specs(d.pools)
  if any(s.shards for s in specs):
    return False            # explicit shard sources: the pools are the user's own
  have = [str(x) for x in manifest.get("domains", [])]
  train_doms = {e["domain"] for e in manifest.get("shards", []) if e.get("split") == "train"}
  want = {s.name: [x.strip() for x in (s.domains.split(",") if isinstance(s.domains, str)
                                       else s.domains) if x.strip()]
          for s in specs if s.weight > 0}
  named = {x for ds in want.values() for x in ds}
  if not named:
    return False
  if not named & train_doms:
    with cfg.unlocked() if hasattr(cfg, "unlocked") else _Null():
      d.use_pools = False
    log(f"note: the data in {data_dir} has none of the pool domains the config names "
        f"({', '.join(sorted(named))}); training on its single stream of all {len(have)} "
        f"domain(s) ({', '.join(have[:8])}{' ...' if len(have) > 8 else ''}) as "
        f"--config.data.use_pools=False would (set data.pools.<pool>.domains for a curriculum).")
    return True
  missing = sorted(named - train_doms)
  if missing:
    pool = next(p for p, ds in want.items() if set(ds) & set(missing))
    raise ConfigError(
        f"data.pools.{pool}.domains names {', '.join(repr(m) for m in missing if m in want[pool])}"
        f", which {data_dir} has no train shards of (its domains: {', '.join(have)}); set "
        f"--config.data.pools.{pool}.domains=<some of those> (and the weights of the other "
        f"pools), or --config.data.use_pools=False to train on the single stream.")
  return False


class _Null:
  def __enter__(self):
    return self

  def __exit__(self, *a):
    return False


# ----------------------------------------------------------------------------- start-up report
def _flat(d, prefix=""):
  out = {}
  for k, v in (d or {}).items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat(v, key + "."))
    else:
      out[key] = v
  return out


def config_diff(cfg, stage_cfg, limit: int = 24) -> list[str]:
  """'field=value (stage file: value)' for each field that differs from the stage file."""
  a = _flat(stage_cfg.to_dict() if hasattr(stage_cfg, "to_dict") else stage_cfg)
  b = _flat(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  out = [f"{k}={b.get(k)!r} (stage file: {a.get(k)!r})" for k in sorted(set(a) | set(b))
         if a.get(k) != b.get(k)]
  return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def stage_config(config_flag):
  """(stage file, its config as written) for the --config flag of a launcher, or None."""
  try:
    path = config_flags.get_config_filename(config_flag)
  except Exception:      # not an ml_collections config flag (e.g. a library caller)
    return None
  if not path:
    return None
  return path, load_config(path)


def config_diff_line(cfg, stage_cfg, stage_file: str) -> str:
  diff = config_diff(cfg, stage_cfg)
  if not diff:
    return f"config: {stage_file} as written (no overrides)."
  return f"config: {stage_file} with " + "; ".join(diff)


# ----------------------------------------------------------------------------- compile cache
def compile_cache_dir(cfg, workdir) -> pathlib.Path | None:
  """train.compile_cache: "auto" (the user cache dir: $LIGHTNING_JAX_CACHE, else
  $XDG_CACHE_HOME or ~/.cache, + lightning_jax/jax_compile), "run" (<workdir>/jax_cache),
  "off" or "" (none), or a directory."""
  v = str(cfg.train.compile_cache).strip()
  if v in ("", "off"):
    return None
  if v == "run":
    return pathlib.Path(workdir).resolve() / "jax_cache"
  if v == "auto":
    root = os.environ.get("LIGHTNING_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lightning_jax")
    return pathlib.Path(root) / "jax_compile"
  return pathlib.Path(v).expanduser().resolve()


def enable_compile_cache(cfg, workdir, log=print) -> pathlib.Path | None:
  """Point JAX's persistent compilation cache at compile_cache_dir (executables that took at
  least 1 s to compile are stored; a later command with the same program loads them)."""
  path = compile_cache_dir(cfg, workdir)
  if path is None:
    return None
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"train.compile_cache={cfg.train.compile_cache!r}: cannot create {path} "
                      f"({e.strerror}); expected a writable directory, or 'off'.") from None
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  log(f"compilation cache: {path} (train.compile_cache={cfg.train.compile_cache!r})")
  return path


def check_overrides(argv) -> None:
  """Reject --config.<field>=<value> overrides naming no field or of the wrong type, with one
  sentence each, before absl parses them (its messages for these cases are misleading)."""
  path, overrides = None, []
  for i, a in enumerate(argv[1:], 1):
    if a.startswith("--config="):
      path = a.split("=", 1)[1]
    elif a == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
    elif a.startswith("--config."):
      name, eq, value = a[len("--config."):].partition("=")
      overrides.append((name, value if eq else None))
  if path is None:
    if overrides:
      raise ConfigError("config overrides were given without --config=<file>; expected e.g. "
                        "--config=configs/tiny.py first.")
    return
  cfg = load_config(path)
  for name, value in overrides:
    node, parts = cfg, name.split(".")
    for k, part in enumerate(parts):
      keys = list(node.keys()) if hasattr(node, "keys") else []
      if part not in keys:
        where = ".".join(parts[:k]) or "the config"
        raise ConfigError(f"--config.{name}: {where} has no field {part!r} (it has: "
                          f"{', '.join(sorted(keys))}).")
      if k < len(parts) - 1:
        node = node[part]
    cur = node[parts[-1]]
    if value is None or hasattr(cur, "keys"):
      continue
    kind = type(cur)
    try:
      if kind is bool:
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError
      elif kind in (int, float):
        kind(value) if kind is float else int(value)
    except ValueError:
      raise ConfigError(f"--config.{name}={value}: {name} is a {kind.__name__} field "
                        f"(now {cur!r}); {value!r} is not a {kind.__name__}.") from None
