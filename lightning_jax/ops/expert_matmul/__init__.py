"""The TQP base experts' matmul (SPEC §4): reference.py (dequantise + einsum and the dense
rotation, float32), kernel.py (the dequantising Pallas matmul, its adapter epilogue and the
one-pass Pallas rotation; config-free, keyword options), api.py (the entry point)."""
