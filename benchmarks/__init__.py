"""Measurement commands whose figures go into docs/benchmarks.md, run from a development checkout:
`python -m benchmarks.<name> --help` (they are not part of the installed package)."""
