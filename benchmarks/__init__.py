"""Benchmarks: the modules behind ``sparsecc bench`` and the scripts that make the README's figures.

``bench_kernels`` (``sparsecc bench kernels``) and ``bench_decode`` (``sparsecc bench
decode``) are imported by the CLI; the other files are scripts, run as
``python benchmarks/NAME.py`` from the repository root, that import them and the compiler.
"""
