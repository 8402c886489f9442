"""RMSNorm (SPEC §2.8): reference.py (float32, autodiff) and api.py (the custom-VJP norm)."""
