"""Entry point of `python bench/bench_decompose.py`: the benchmark is lowrank_kernels/bench/decompose.py (see its --help)."""

import sys

from lowrank_kernels.bench.decompose import main

sys.exit(main())
