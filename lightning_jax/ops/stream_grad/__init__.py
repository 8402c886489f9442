"""The streams' state gradient (SPEC §2.5's read-in and mix, backward): reference.py (the
formula in float32), kernel.py (one Pallas launch), api.py (the entry point)."""
