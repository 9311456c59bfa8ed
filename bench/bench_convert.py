"""Entry point of `python bench/bench_convert.py`: the benchmark is lowrank_kernels/bench/convert.py (see its --help)."""

import sys

from lowrank_kernels.bench.convert import main

sys.exit(main())
