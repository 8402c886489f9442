"""LM head + cross-entropy: reference.py (full float32 logits, autodiff) and api.py
(head_logits' custom VJP and the chunked cross-entropy)."""
