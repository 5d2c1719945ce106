"""Benchmarks of convmixer-ext (see benchmarks/README.md)."""
