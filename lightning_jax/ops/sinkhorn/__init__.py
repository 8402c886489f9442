"""Sinkhorn (SPEC §2.5): reference.py (unrolled, float32) and api.py (the rolled loop)."""
