"""The benchmarks, one module each (`python -m lowrank_kernels.bench.<name> [--quick] [--out DIR]`,
or the thin scripts bench/bench_<name>.py of the checkout); each prints its tables and targets
and writes <out>/<name>.json + .png (default out: bench/results). `python -m
lowrank_kernels.bench.readme` rewrites the README's results section from those files."""

#: the benchmarks `lowrank-kernels bench` runs, in order (module lowrank_kernels.bench.<name>);
#: gpu_check is `make gpu-check`'s, not among them.
BENCHMARKS = ("nf4", "fused_linear", "decompose", "robust", "adapters", "convert")
