"""Flash attention in Pallas: one kernel body for CPU (interpret), TPU (Mosaic) and GPU (Triton)."""
from kernels_pallas.flash.attention import BLOCKS, flash_attention

__all__ = ["BLOCKS", "flash_attention"]
