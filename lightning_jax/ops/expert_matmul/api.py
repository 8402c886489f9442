"""The TQP base matmul's entry point. tqp.py chooses by `tqp.kernel` (tqp.base_kernel: "xla"
dequantises then einsums in XLA, "xla_rotate" adds the Pallas rotation, "pallas" /
"pallas_rotate" the dequantising kernel) and calls only what is here.

tqp_matmul / tqp_matmul_adapter / rotate: the Pallas kernels (native on GPU, the Pallas
interpreter elsewhere unless told); reference / reference_rotate: the float32 references.
"""
from __future__ import annotations

from lightning_jax.ops.expert_matmul import reference as _reference
from lightning_jax.ops.expert_matmul.kernel import (default_blocks, rotate, rotation_factors,
                                                    split_even_odd, tqp_matmul,
                                                    tqp_matmul_adapter)
from lightning_jax.ops.pallas import on_gpu

reference = _reference.dequantized_matmul
reference_rotate = _reference.rotate

__all__ = ["default_blocks", "on_gpu", "reference", "reference_rotate", "rotate",
           "rotation_factors", "split_even_odd", "tqp_matmul", "tqp_matmul_adapter"]
