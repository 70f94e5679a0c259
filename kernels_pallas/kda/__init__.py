"""Chunked Kimi Delta Attention in Pallas: one kernel body for CPU (interpret), TPU (Mosaic) and GPU (Triton).
The forward kernel only, so far."""
from kernels_pallas.kda.forward import CHUNKS, kda_forward

__all__ = ["CHUNKS", "kda_forward"]
