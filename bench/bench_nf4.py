"""Entry point of `python bench/bench_nf4.py`: the benchmark is lowrank_kernels/bench/nf4.py (see its --help)."""

import sys

from lowrank_kernels.bench.nf4 import main

sys.exit(main())
