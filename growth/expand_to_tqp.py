"""`python -m growth.expand_to_tqp`: expand_experts then to_tqp in one process; the transform is lightning_jax/growth/expand_to_tqp.py, its
flags and --help come from its registration (growth/cli.py)."""
from growth import cli

if __name__ == "__main__":
  cli.run("expand_to_tqp")
