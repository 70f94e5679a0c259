"""Chunked Kimi Delta Attention in Pallas: one kernel body for CPU (interpret), TPU (Mosaic) and GPU (Triton),
forward and backward (by recomputation from the saved chunk states)."""
from kernels_pallas.kda.attention import CHUNKS, kda_attention

__all__ = ["CHUNKS", "kda_attention"]
