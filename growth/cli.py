"""Command-line driver shared by the growth transforms (each registered in
lightning_jax/growth/registry.py by its module in lightning_jax/growth/; the flags and --help
of `python -m growth.<name>` come from its registration):

  python -m growth.dense_to_moe   --src RUN --dst NEW_RUN --config=configs/stage_5b.py --strategy partition [--seed 0]
  python -m growth.depth_map      --src RUN --dst NEW_RUN --config=configs/stage_9b.py --mapping 5b_to_9b
  python -m growth.expand_experts --src RUN --dst NEW_RUN --config=configs/stage_120b.py --ratio 0.5 --router_sigma 0.05 --seed 1337
  python -m growth.to_tqp         --src RUN --dst NEW_RUN --config=configs/stage_120b.py
  python -m growth.expand_to_tqp  --src RUN --dst NEW_RUN --config=configs/stage_120b.py --ratio 0.5 --router_sigma 0.05 --seed 1337
  (expand_experts then to_tqp in one process, without the dense intermediate run: lightning_jax/growth/expand_to_tqp.py)

--src: a run directory, its checkpoints/ directory, or one checkpoints/<step> directory (the
newest step by default). The source config is the one saved in the checkpoint. --config is the
TARGET stage's config (any field overrides as --config.section.field=...): pass launch.train
exactly the same --config flags and --workdir=NEW_RUN, and it starts the next stage from the
grown checkpoint.

The grown checkpoint is NEW_RUN/checkpoints/0 in launch.train's format (the frozen buffers, e.g.
the TQP quantized bases, go once to NEW_RUN/checkpoints/frozen/0: lightning_jax/checkpoint.py):
params/frozen/stats from the transform, FRESH optimizer state for the target config (its LR
groups), step 0, a fresh data-loader state, the target config (so the schedule is the new
stage's), and in its meta record the provenance: source path and step, transform, arguments, seed, and the growth report
(`python -m launch.inspect NEW_RUN` shows it). When data.path is empty, the target run's shards
are prepared in NEW_RUN/data exactly as launch.train would.

The growth report: lightning_jax/growth/driver.py.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging as absl_logging
from ml_collections import config_flags

from lightning_jax import checkpoint as ck
from lightning_jax.config import ConfigError, resolve_config_argv
from lightning_jax.data.shards import DataError
from lightning_jax.growth import driver, registry
from lightning_jax.growth.common import GrowthError
from lightning_jax.run_checks import check_overrides, enable_compile_cache


def list_in_help(*names):
  """Make the named flags key flags of the main module, so `--help` lists them (absl lists only
  the flags defined in the __main__ module itself; these are defined here, in a helper)."""
  for n in names:
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[n])


def _define_flags(transform: str):
  t = registry.get(transform)
  config_flags.DEFINE_config_file("config", None, "TARGET stage config file, e.g. "
                                  "configs/stage_5b.py (overrides: --config.section.field=...).",
                                  lock_config=True)
  flags.DEFINE_string("src", None, f"Source run directory, checkpoints/ dir or checkpoints/<step>: "
                      f"{t.needs}.")
  flags.DEFINE_string("dst", None, f"New run directory for the grown model: {t.makes}.")
  for f in t.flags:
    if f.kind == "enum":
      flags.DEFINE_enum(f.name, f.default, list(f.choices), f.help)
    else:
      getattr(flags, f"DEFINE_{f.kind}")(f.name, f.default, f.help)
  flags.mark_flags_as_required(["config", "src", "dst"])
  list_in_help("config", "src", "dst", *(f.name for f in t.flags))


def _args(transform: str) -> dict:
  F = flags.FLAGS
  return {f.name: getattr(F, f.name) for f in registry.get(transform).flags}


def guarded(argv, usage: str, fn) -> int:
  """The growth commands' shared main body: refuse stray arguments (exit 2), run `fn()`, and turn
  the errors a user can act on into one `error: ...` line on stderr (exit 1)."""
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}; flags look like {usage}.", file=sys.stderr)
    return 2
  try:
    fn()
  except (GrowthError, ConfigError, ck.CheckpointError, DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def preflight(argv=None) -> None:
  """Before absl parses the flags: a relative --config is found from the repository root too,
  and a missing config file, a bad ':phase' or an unknown/mistyped --config.<field> override
  exits with one sentence (as launch.train does) instead of a traceback."""
  argv = sys.argv if argv is None else argv
  argv[:] = resolve_config_argv(argv)
  try:
    check_overrides(argv)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def usage(transform: str) -> str:
  """The --help text of `python -m growth.<transform>`, from its registration."""
  t = registry.get(transform)
  extra = " ".join(f"[--{f.name}={f.default}]" for f in t.flags)
  return (f"python -m growth.{t.name} --src=RUN --dst=NEW_RUN --config=configs/<stage>.py "
          f"{extra}\n\n{t.describe()}\nSee growth/cli.py and lightning_jax/growth/{t.name}.py.")


def run(transform: str):
  """Entry point of `python -m growth.<transform>`."""
  preflight()
  main_module = sys.modules.get("__main__")
  if main_module is not None:       # absl's --help prints the main module's docstring
    main_module.__doc__ = usage(transform)

  def main(argv):
    F = flags.FLAGS
    def go():
      enable_compile_cache(F.config, F.dst, log=lambda *_: None)   # train.compile_cache
      driver.grow(transform, F.src, F.dst, F.config, _args(transform))
    return guarded(argv, "--src=RUN --dst=NEW_RUN --config=configs/x.py", go)

  _define_flags(transform)
  absl_logging.set_verbosity(absl_logging.ERROR)
  app.run(lambda argv: sys.exit(main(argv)))
