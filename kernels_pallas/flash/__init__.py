"""Flash attention in Pallas: one kernel body for CPU (interpret), TPU (Mosaic) and GPU (Triton); training
(`flash_attention`, forward and backward) and decode against a cache (`flash_decode`)."""
from kernels_pallas.flash.attention import BLOCKS, flash_attention
from kernels_pallas.flash.decode import DECODE_BLOCKS, KeyTransform, PagedKV, flash_decode

__all__ = ["BLOCKS", "DECODE_BLOCKS", "KeyTransform", "PagedKV", "flash_attention", "flash_decode"]
