"""Benchmark suite of lbw-guard (pytest-benchmark). See benchmarks/README.md."""
