"""Robust PiSSA: huber_factorize (IRLS, the default) vs the seed report's Algorithm 1 (Huber loss
+ Adam from a random start, `method="adam"`) vs the truncated SVD.

Cases: the real all-MiniLM-L6-v2 `encoder.layer.0.intermediate.dense.weight` (1536×384) at
rank 8 (the issue's target); a synthetic low-rank matrix with 1 % sparse large outliers (ground
truth known: the error of the recovered low-rank part is reported); the 24 MiniLM 384×384
attention matrices as one batch vs one at a time, with the time each spends inside the
compiled ops (which bounds what batching can gain). δ = 1e-3 (the seed's setting) on MiniLM.
Mean absolute error (MAE) |W − A B| in fp64. MAE-vs-time curves: each point is a separate
timed run with that budget (IRLS sweeps, Adam steps).

Usage: python -m lowrank_kernels.bench.robust [--quick] [--out DIR] (writes robust.json / .png)
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Sequence

import torch

import lowrank_kernels as lk
from lowrank_kernels import ops
from lowrank_kernels.bench._harness import Run, Target, bench_parser, round_robin
from lowrank_kernels.bench._minilm import minilm_linear_weights

SEED_DELTA = 1e-3
SEED_STEPS = 2000


def mae(W: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    return (W.double() - A.double() @ B.double()).abs().mean().item()


def run(W, rank, repeat=1, **options):
    """(seconds — the best of `repeat` runs, A, B) of huber_factorize with a fixed generator, after
    a two-iteration warm-up (the first Adam step of a process pays one-off set-up costs)."""
    lk.huber_factorize(W, rank, generator=torch.Generator().manual_seed(0), **{**options, "n_iter": 2})
    best = math.inf
    for _ in range(repeat):
        generator = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        A, B, _, _ = lk.huber_factorize(W, rank, generator=generator, **options)
        best = min(best, time.perf_counter() - start)
    return best, A, B


def truncated_svd(W, rank):
    start = time.perf_counter()
    U, S, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    seconds = time.perf_counter() - start
    root = S[..., :rank].sqrt()
    return seconds, U[..., :rank] * root[..., None, :], root[..., :, None] * Vh[..., :rank, :]


def minilm_target(W, rank, quick, rows, curves, targets):
    """The issue's target case: final MAE and time of IRLS vs the seed's 2000 Adam steps."""
    seed_t, A, B = run(W, rank, method="adam", delta=SEED_DELTA, n_iter=SEED_STEPS)
    seed_mae = mae(W, A, B)
    irls_t, A, B = run(W, rank, repeat=3, delta=SEED_DELTA)
    irls_mae = mae(W, A, B)
    svd_t, A, B = truncated_svd(W, rank)
    name = f"MiniLM intermediate 1536x384 r={rank}"
    rows += [
        [name, "truncated SVD", "-", f"{svd_t * 1e3:.1f}", f"{mae(W, A, B):.6f}"],
        [name, f"seed (Adam, {SEED_STEPS} steps)", SEED_STEPS, f"{seed_t * 1e3:.1f}", f"{seed_mae:.6f}"],
        [name, "huber_factorize (IRLS)", "tol 1e-6", f"{irls_t * 1e3:.1f}", f"{irls_mae:.6f}"],
    ]
    targets += [
        Target("MiniLM 1536x384 r=8: IRLS MAE <= seed MAE (2000 Adam steps)", irls_mae, "<=", seed_mae, "{:.6f}"),
        Target("MiniLM 1536x384 r=8: IRLS time / seed time", irls_t / seed_t, "<=", 0.1, "{:.3f}"),
    ]
    sweeps = [0, 1, 2, 4, 8, 16, 32] if not quick else [0, 2, 8]
    steps = [125, 250, 500, 1000, SEED_STEPS] if not quick else [250, SEED_STEPS]
    curves[name] = {
        "huber_factorize (IRLS)": [_point(W, rank, delta=SEED_DELTA, n_iter=k, tol=0.0) for k in sweeps],
        "seed (Adam)": [_point(W, rank, method="adam", delta=SEED_DELTA, n_iter=k) for k in steps[:-1]]
        + [(seed_t, seed_mae)],
        "truncated SVD": [(svd_t, mae(W, A, B))],
    }


def _point(W, rank, **options):
    seconds, A, B = run(W, rank, **options)
    return seconds, mae(W, A, B)


def outliers_case(rows, quick):
    """Low rank + 1 % sparse outliers: how well each method recovers the low-rank part."""
    m, n, k = (512, 512, 8) if not quick else (256, 256, 8)
    g = torch.Generator().manual_seed(0)
    L = torch.randn(m, k, generator=g) @ torch.randn(k, n, generator=g) / math.sqrt(k)
    spikes = torch.rand(m, n, generator=g) < 0.01
    W = L + torch.where(spikes, 10 * torch.sign(torch.randn(m, n, generator=g)), torch.zeros(()))
    name = f"rank {k} + 1% outliers {m}x{n}"
    for label, (seconds, A, B) in [
        ("truncated SVD", truncated_svd(W, k)),
        (f"seed (Adam, {SEED_STEPS} steps)", run(W, k, method="adam", n_iter=SEED_STEPS)),
        ("huber_factorize (IRLS)", run(W, k)),
    ]:
        recovery = ((A.double() @ B.double() - L.double()).norm() / L.double().norm()).item()
        rows.append([name, label, "-", f"{seconds * 1e3:.1f}", f"{mae(W, A, B):.6f}", f"{recovery:.2e}"])


def batched_case(run, targets):
    """The 24 MiniLM 384x384 attention matrices: one batched call vs a loop of calls."""
    weights = [W for name, W in minilm_linear_weights().items() if W.shape == (384, 384)]
    stack = torch.stack(weights)
    rank = 8

    def batched_call():
        return lk.huber_factorize(stack, rank, generator=torch.Generator().manual_seed(0))

    def loop():
        generator = torch.Generator().manual_seed(0)
        return [lk.huber_factorize(W, rank, generator=generator) for W in weights]

    # Round-robin: drifts of this shared machine hit both alike (run-to-run spread was 1.3-1.9x).
    times = round_robin({"batched": batched_call, "loop": loop}, rounds=5)
    batched_t, loop_t = times["batched"], times["loop"]
    batched, looped = batched_call(), loop()
    worst = max(
        abs(mae(W, batched.A[i], batched.B[i]) - mae(W, r.A, r.B)) / mae(W, r.A, r.B)
        for i, (W, r) in enumerate(zip(weights, looped))
    )
    bitwise = all(torch.equal(batched.A[i], r.A) and torch.equal(batched.B[i], r.B) for i, r in enumerate(looped))
    run.table(
        f"batched: {len(weights)} MiniLM 384x384 matrices, rank {rank} (median of 5 round-robin rounds)",
        ["call", "time [ms]", "per matrix [ms]"],
        [
            ["one batched call", f"{batched_t * 1e3:.1f}", f"{batched_t * 1e3 / len(weights):.2f}"],
            ["loop of calls", f"{loop_t * 1e3:.1f}", f"{loop_t * 1e3 / len(weights):.2f}"],
        ],
    )
    run.note(f"largest relative MAE difference batched vs loop: {worst:.2e}; bitwise equal A, B: {bitwise}")
    kernel_split(run, {"one batched call": batched_call, "loop of calls": loop}, rounds=3)
    targets.append(
        Target(f"{len(weights)} MiniLM 384x384 r=8: loop time / batched time", loop_t / batched_t, ">=", 3.0)
    )


def kernel_split(run, calls, rounds):
    """Where the time goes: wall time and time inside the compiled ops of each call, from
    ``rounds`` more round-robin rounds with every op call timed. Both calls run the same kernels
    on the same matrices; batching can only remove time spent outside them, so loop wall time /
    batched time in ops bounds what any batched driver of these kernels reaches."""
    inside = {name: [] for name in calls}
    wall = round_robin(
        {
            name: (lambda name=name, call=call: inside[name].append(kernel_seconds(call)))
            for name, call in calls.items()
        },
        rounds=rounds,
    )
    in_ops = {name: statistics.median(seconds) for name, seconds in inside.items()}
    run.table(
        f"time inside the compiled ops (median of {rounds} more round-robin rounds, each op call timed)",
        ["call", "time [ms]", "in ops [ms]", "outside ops [ms]"],
        [
            [name, f"{wall[name] * 1e3:.1f}", f"{in_ops[name] * 1e3:.1f}", f"{(wall[name] - in_ops[name]) * 1e3:.1f}"]
            for name in calls
        ],
    )
    batched, loop = calls
    run.note(
        f"bound on loop / batched if the batched call spent no time outside the ops: "
        f"{wall[loop] / in_ops[batched]:.2f}x"
    )


def kernel_seconds(call) -> float:
    """Seconds one call of ``call`` spends inside the compiled ops it reaches through
    ``lowrank_kernels.ops.op`` (each op call timed; the few rsvd ops called directly are left
    out, so the bound printed from this is, if anything, too generous)."""
    spent = 0.0
    original = ops.op

    def timed(name):
        kernel = original(name)

        def run(*args, **kwargs):
            nonlocal spent
            start = time.perf_counter()
            try:
                return kernel(*args, **kwargs)
            finally:
                spent += time.perf_counter() - start

        return run

    ops.op = timed
    try:
        call()
    finally:
        ops.op = original
    return spent


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__, quick="fewer curve points, smaller synthetic case")
    args = parser.parse_args(argv)
    run = Run("robust", args, argv)
    rows, curves, targets = [], {}, []
    W = minilm_linear_weights()["encoder.layer.0.intermediate.dense.weight"].contiguous()
    minilm_target(W, 8, args.quick, rows, curves, targets)
    run.table(
        "final MAE and time (delta 1e-3 on MiniLM; default delta on the synthetic case)",
        ["matrix", "method", "iterations", "time [ms]", "MAE"],
        rows,
    )
    synthetic = []
    outliers_case(synthetic, args.quick)
    run.table(
        "recovery of the low-rank part L from W = L + S (S: 1 % of entries ±10)",
        ["matrix", "method", "iterations", "time [ms]", "MAE", "‖AB − L‖/‖L‖"],
        synthetic,
    )
    batched_case(run, targets)
    run.targets("targets", targets)
    return run.finish(lambda plt: plot(plt, curves))


def plot(plt, curves):
    fig, axes = plt.subplots(1, len(curves), figsize=(6, 4.5), squeeze=False)
    for ax, (name, families) in zip(axes[0], curves.items()):
        for (family, points), marker in zip(families.items(), ("o", "s", "*")):
            ax.plot([t * 1e3 for t, _ in points], [e for _, e in points], marker + "-", label=family)
        ax.set(xscale="log", xlabel="time [ms]", ylabel="mean absolute error", title=name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return fig


if __name__ == "__main__":
    sys.exit(main())
