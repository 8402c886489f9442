"""MoE dispatch / combine (SPEC §2.4): reference.py (plain indexing, autodiff) and api.py (custom
VJPs whose backward gathers through the inverse map)."""
