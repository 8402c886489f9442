"""`python -m growth.to_tqp`: TQP quantization (SPEC §4); the transform is lightning_jax/growth/to_tqp.py, its
flags and --help come from its registration (growth/cli.py)."""
from growth import cli

if __name__ == "__main__":
  cli.run("to_tqp")
