"""Benchmark scripts for segrt (not part of the installed package; see bench_cpu.py)."""
