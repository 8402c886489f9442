"""No hang: the delta rule on a 4-device CPU mesh (issue 23 item 4, issue 21 item 1).

The tiny MoE hung forever on a 4-device expert mesh (and on one device): every XLA:CPU pool
thread waited in LAPACK's batched trsm (jax.scipy.linalg.solve_triangular), which blocks a pool
thread until its own sub-tasks, queued on the same pool, finish. Devices that reach the solves
together (after a collective, as the MoE's all-to-alls make them) fill the pool with waiters.
The device count is fixed when jax starts, so this runs in a subprocess (conftest forces 8).
"""
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from configs import tiny_moe
from lightning_jax.ops.delta_rule import api as delta_rule_op
cfg = tiny_moe.get_config()
dnc = cfg.model.deltanet
b, t, h, d = cfg.train.global_batch, cfg.train.seq_len, dnc.n_heads, dnc.head_dim
mesh = jax.make_mesh((4,), ("expert",))
sh = NamedSharding(mesh, P("expert"))
rng = np.random.default_rng(int(np.random.randint(1 << 30)))
unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
q, k = unit(rng.standard_normal((2, b, t, h, d)))
v = rng.standard_normal((b, t, h, d))
la = -np.abs(rng.standard_normal((b, t, h)))
be = rng.uniform(0, 1, (b, t, h))
args = [jax.device_put(a.astype(np.float32), sh) for a in (q, k, v, la, be)]
def loss(q, k, v, la, be):
  v = v + jnp.mean(v)        # an all-reduce: every device reaches the chunk solves together
  o, _ = delta_rule_op.chunked(q, k, v, la, be, chunk_size=int(dnc.chunk_size))
  return jnp.sum(o ** 2)
f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
for _ in range(10):
  val, grads = jax.block_until_ready(f(*args))
assert np.isfinite(float(val)) and all(np.isfinite(np.asarray(g)).all() for g in grads)
print("DONE", len(jax.devices()))
"""


def test_delta_rule_on_a_4_device_mesh_does_not_hang():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS="--xla_force_host_platform_device_count=4 "
                       "--xla_cpu_multi_thread_eigen=false")
  try:
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=240)
  except subprocess.TimeoutExpired:
    raise AssertionError("the delta rule's forward and backward on a 4-device mesh did not "
                         "finish in 240 s (the LAPACK trsm pool deadlock)") from None
  assert r.returncode == 0 and "DONE 4" in r.stdout, r.stderr[-2000:]
