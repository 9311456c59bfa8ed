"""Entry point of `python bench/bench_fused_linear.py`: the benchmark is lowrank_kernels/bench/fused_linear.py (see its --help)."""

import sys

from lowrank_kernels.bench.fused_linear import main

sys.exit(main())
