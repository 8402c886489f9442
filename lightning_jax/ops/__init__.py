"""The ops: one folder per op, each with reference.py (float32, obvious), its fast
implementation(s) (config-free; Pallas kernels take typed options) and api.py, the only entry
point layers and models use. testing.py registers every implementation of every op against its
reference (tests/test_ops.py runs them). docs/ARCHITECTURE.md has the table. ops/ imports
neither layers/ nor model / config."""
