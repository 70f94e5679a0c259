"""Pallas kernels, one folder per family (flash/, kda/, lightning/), each with the same signatures as its op in
`attention/ops/`. `platform.py` decides how a kernel body runs on each target: interpreted on the CPU,
Triton on GPU, Mosaic on TPU, and lowering for a TPU or GPU from a CPU machine. This package imports only
jax and the standard library."""
