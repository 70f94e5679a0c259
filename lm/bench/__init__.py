"""Benchmarks behind `attnlab bench`: train-step tokens/s and MFU (step.py), op forward+backward timings (ops.py)."""
