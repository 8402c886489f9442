"""`python -m growth.dense_to_moe`: dense seed -> MoE (SPEC §3.1); the transform is lightning_jax/growth/dense_to_moe.py, its
flags and --help come from its registration (growth/cli.py)."""
from growth import cli

if __name__ == "__main__":
  cli.run("dense_to_moe")
