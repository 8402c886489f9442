"""Force 8 CPU devices before jax is imported, so mesh tests get an 8-device mesh."""
import os

# Test-only XLA flags (the library and launchers never set them):
#  * 8 host devices for mesh tests;
#  * backend optimisation level 0: the suite is dominated by XLA:CPU compile time, which this
#    roughly halves (e.g. the tiny model's train step: 79 s -> 34 s); numerics stay float32;
#  * single-threaded Eigen: jaxlib 0.10.2's CPU executor intermittently hung in the tiny MoE
#    step with multi-threaded Eigen on this 2-core machine (docs/cookbook.md, "Known problem").
TEST_XLA_FLAGS = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                  "--xla_cpu_multi_thread_eigen=false")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One JAX compilation cache for the whole session: the controller makes it, and the two workers
# and every subprocess they start inherit it through the environment. A program compiled by one
# test (its step, its initializer, its evaluation) is loaded, not compiled again, by every later
# test that builds the same program. The suite is dominated by XLA:CPU compile time. Programs are
# cached only when their compile took at least 1 s (JAX's default). launch.train's own
# train.compile_cache still points its runs at their configured directory.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  _cache = tempfile.mkdtemp(prefix="lightning_jax_tests_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  atexit.register(shutil.rmtree, _cache, True)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


# The longest tests' modules run first, so that on 2 workers they do not start last and leave
# one worker idle at the end (with --dist worksteal an idle worker takes queued tests from the
# other). Modules stay contiguous: their module-scoped fixtures are built once.
SLOW_MODULES_FIRST = ("test_distributed.py", "test_lineage.py", "test_train.py",
                      "test_reversible.py", "test_step2b.py", "test_rank120.py", "test_model.py")


def pytest_collection_modifyitems(session, config, items):
  rank = {name: i for i, name in enumerate(SLOW_MODULES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_MODULES_FIRST)))
