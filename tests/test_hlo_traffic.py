"""benchmarks/hlo_traffic.py: bytes per scope from a compiled module's HLO text, loop bodies by
their trip count, dynamic-update-slices in place (checked on a small CPU compile)."""
import jax
import jax.numpy as jnp
import pytest

from benchmarks import hlo_traffic


def test_traffic_counts_loop_trips_and_in_place_updates(tmp_path):
  n, steps, slots = 256 * 256 * 4, 5, 64          # one [256, 256] f32 array; 5 trips; 64 slots

  def f(x, buf):
    def body(carry, i):
      x, buf = carry
      with jax.named_scope("hc_pre"):              # a model scope name: elementwise work
        x = jnp.sin(x) * 2.0 + 1.0
      with jax.named_scope("experts"):             # an in-place store into a large buffer
        buf = jax.lax.dynamic_update_slice_in_dim(buf, x[None], i, axis=0)
      return (x, buf), None
    return jax.lax.scan(body, (x, buf), jnp.arange(steps))[0]

  compiled = jax.jit(f, donate_argnums=(1,)).lower(
      jnp.ones((256, 256)), jnp.zeros((slots, 256, 256))).compile()
  path = tmp_path / "step.txt"
  path.write_text(compiled.as_text())
  acc = hlo_traffic.traffic(str(path))
  # the elementwise pass reads and writes x once per trip
  assert acc["fwd hc_pre"] == pytest.approx(steps * 2 * n, rel=0.01), acc
  # the store moves the update (x) per trip, not the 16.8 MB buffer
  assert steps * n * 0.99 <= acc["fwd experts"] <= steps * n * 1.1, acc
  assert acc["fwd experts"] < slots * n, acc
  assert hlo_traffic.array_bytes("(bf16[2,3]{1,0}, s32[4])") == 2 * 6 + 4 * 4
  # --scope lists one scope's instructions; their bytes add up to the scope's total
  rows = hlo_traffic.main(["--hlo", str(path), "--scope", "fwd hc_pre"])
  assert rows and sum(r["bytes"] for r in rows) == pytest.approx(acc["fwd hc_pre"])
  assert all(r["scope"] == "fwd hc_pre" and r["runs"] == steps for r in rows), rows
  with pytest.raises(SystemExit, match="names no scope"):
    hlo_traffic.main(["--hlo", str(path), "--scope", "fwd nothing"])
