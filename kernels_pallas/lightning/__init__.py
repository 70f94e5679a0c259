"""Chunked lightning attention (linear attention with a per-head exponential decay) in Pallas: one kernel body for
CPU (interpret), TPU (Mosaic) and GPU (Triton), forward and backward."""
from kernels_pallas.lightning.attention import CHUNKS, lightning_attention

__all__ = ["CHUNKS", "lightning_attention"]
