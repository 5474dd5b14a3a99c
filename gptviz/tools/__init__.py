"""Command-line tools, each run with ``python -m``: the benchmark (:mod:`.benchmark`, its kernel
and layout part :mod:`.benchmark_kernels`), the load test (:mod:`.loadtest`) and the README's
screenshots (:mod:`.screenshots`)."""
