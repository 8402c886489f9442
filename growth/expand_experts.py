"""`python -m growth.expand_experts`: expert expansion (SPEC §3.3); the transform is lightning_jax/growth/expand_experts.py, its
flags and --help come from its registration (growth/cli.py)."""
from growth import cli

if __name__ == "__main__":
  cli.run("expand_experts")
