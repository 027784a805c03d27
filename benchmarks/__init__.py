"""tandem's benchmarks: one module per benchmark, each run as ``python -m benchmarks.NAME`` from the repository root.

Not part of the installed package. ``benchmarks.common`` is the shared scenario runner (flags, device and dtype,
results JSON, tables, timing); ``python -m benchmarks.NAME --tiny --device cpu`` is each one's smoke test.
"""
