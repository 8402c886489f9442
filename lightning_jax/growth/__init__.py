"""Growth between stages (SPEC §3, §4): the transforms, each registered in registry.py, the
driver that reads, transforms, evaluates and writes (driver.py), a fresh step-0 run (init.py),
and the next phase of a stage (next_phase.py); they write through lightning_jax/run/
(checkpoints.write_grown, history). The commands are growth/ (`python -m growth.<name>`)."""
