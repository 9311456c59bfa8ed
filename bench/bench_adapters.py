"""Entry point of `python bench/bench_adapters.py`: the benchmark is lowrank_kernels/bench/adapters.py (see its --help)."""

import sys

from lowrank_kernels.bench.adapters import main

sys.exit(main())
