"""Benchmarks: each ``bench_NAME`` module times our code path against the book's (``bench.book``) in the same
run and prints the ratio. Run one as ``python -m bench.bench_NAME --help`` from the repository root; the current
figures and the machines that gave them are in docs/benchmarks.md."""
