"""Sinkhorn (SPEC §2.5): reference.py (unrolled, float32), api.py (the entry point: the rolled
loop or kernel.py's Pallas kernels, one launch forward and one backward)."""
