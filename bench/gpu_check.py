"""Entry point of `make gpu-check`: the check is lowrank_kernels/bench/gpu_check.py (see its --help)."""

import sys

from lowrank_kernels.bench.gpu_check import main

sys.exit(main())
