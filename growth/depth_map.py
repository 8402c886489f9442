"""`python -m growth.depth_map`: depth growth (SPEC §3.2); the transform is lightning_jax/growth/depth_map.py, its
flags and --help come from its registration (growth/cli.py)."""
from growth import cli

if __name__ == "__main__":
  cli.run("depth_map")
