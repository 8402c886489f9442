"""The gated delta rule (SPEC §2.2): reference.py (float32 token-by-token and chunked rules),
kernel.py (Pallas forward and backward, config-free, DeltaRuleOptions), api.py (the entry
point: picks the implementation and runs the kernels per device under a mesh)."""
