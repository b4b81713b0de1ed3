"""Measurement commands whose figures go into docs/benchmarks.md."""
