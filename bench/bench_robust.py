"""Entry point of `python bench/bench_robust.py`: the benchmark is lowrank_kernels/bench/robust.py (see its --help)."""

import sys

from lowrank_kernels.bench.robust import main

sys.exit(main())
