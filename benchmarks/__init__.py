"""cosattn benchmarks: the CPU and GPU harnesses and the baselines they compare against.

Run them as modules from the repository root (``python -m benchmarks.cpu_bench``,
``python -m benchmarks.gpu_bench``); ``benchmarks/README.md`` says what each one measures.
"""
