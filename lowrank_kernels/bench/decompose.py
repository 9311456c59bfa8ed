"""Decompositions: rsvd (subspace, krylov) vs torch.svd_lowrank (PEFT's q = r), sklearn's
randomized_svd and torch.linalg.svd; cur vs both; batched vs loop; the one-pass norm kernel.

Error metrics in fp64: Frobenius suboptimality ‖W − W_k‖_F / ‖W − W_k*‖_F − 1 and the relative
error of the top-k singular values. Matrices: LLM-like synthetic spectra with known singular
values (σ_i = (1 + i / c)^-1/2, c = min(m, n) / 48, random singular vectors) at 4096×4096 and
4096×11008, and the real all-MiniLM-L6-v2 weights. Prints tables (with GEMM-pass and QR counts),
the issue's targets, and writes decompose.json and a PNG of error vs time.

Usage: python -m lowrank_kernels.bench.decompose [--quick] [--out DIR]
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence

import torch

from lowrank_kernels import decompose as D
from lowrank_kernels.bench._harness import Run, Target, bench_parser, round_robin, time_call
from lowrank_kernels.bench._minilm import minilm_linear_weights

TARGET_SUBOPTIMALITY = 0.005


def llm_like(m: int, n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """W [m, n] fp32 with singular values σ_i = (1 + i / c)^-1/2 (returned, fp64)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    sigma = (1 + torch.arange(k, dtype=torch.float64) / (k / 48)) ** -0.5
    U = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    return (U * sigma.float()) @ V.T, sigma


class Errors:
    """fp64 error metrics of rank-k factors of one matrix with known singular values."""

    def __init__(self, W: torch.Tensor, sigma: torch.Tensor):
        self.W = W.double()
        self.sigma = sigma
        self.total = self.W.square().sum()

    def __call__(self, U, S, Vh, k):
        """(Frobenius suboptimality, max relative error of the top-k singular values)."""
        U, S, Vh = U.double(), S.double(), Vh.double()
        # ‖W − U S Vh‖² = ‖W‖² − 2 tr(S Uᵀ W Vhᵀ) + ‖U S Vh‖², all in fp64, no m×n temporary.
        cross = (S * ((U.T @ self.W) * Vh).sum(-1)).sum()
        own = ((U.T @ U) * ((S[:, None] * (Vh @ Vh.T)) * S[None, :])).sum()
        err = (self.total - 2 * cross + own).clamp(min=0).sqrt()
        best = self.sigma[k:].square().sum().sqrt()
        return (err / best - 1).item(), ((S - self.sigma[:k]).abs() / self.sigma[:k]).max().item()


def methods(rank: int, quick: bool):
    """name -> (callable W -> (U, S, Vh), GEMM passes over W, QR factorisations)."""
    out = {}
    for niter in [2, 4] if quick else [0, 1, 2, 4, 8, 16]:
        out[f"torch.svd_lowrank q=r niter={niter}"] = (
            lambda W, niter=niter: _lowrank(W, rank, niter),
            2 * niter + 2,
            f"{2 * niter + 1} Householder",
        )
    for q in [1, 2] if quick else [0, 1, 2, 3]:
        out[f"rsvd subspace q={q}"] = (
            lambda W, q=q: D.rsvd(W, rank, n_iter=q, method="subspace", generator=torch.Generator().manual_seed(0))[:3],
            2 * q + 2,
            f"{2 * q + 1} CholeskyQR2",
        )
    for q in [1] if quick else [1, 2, 3]:
        # The default oversampling, and none: the Krylov space is (q + 1)·(r + p) wide already.
        for p, label in ((None, ""), (0, " p=0")):
            out[f"rsvd krylov q={q}{label}"] = (
                lambda W, q=q, p=p: D.rsvd(
                    W, rank, n_iter=q, oversample=p, method="krylov", generator=torch.Generator().manual_seed(0)
                )[:3],
                2 * q + 2,
                f"{2 * q + 2} CholeskyQR2",
            )
    for q in [] if quick else [3, 4]:
        # Blocks of r/2 columns and a deeper space: (q + 1)·r GEMM columns in all, as many as
        # q' = (q - 1)/2 with blocks of r (p = 0).
        out[f"rsvd krylov q={q} b=r/2"] = (
            lambda W, q=q: D.rsvd(
                W,
                rank,
                n_iter=q,
                block_size=max(1, rank // 2),
                method="krylov",
                generator=torch.Generator().manual_seed(0),
            )[:3],
            f"{2 * q + 2} x r/2",
            f"{2 * q + 2} CholeskyQR2",
        )
    if not quick:
        out["sklearn randomized_svd (auto)"] = (lambda W: _sklearn(W, rank), None, "LU / QR")
    return out


def _lowrank(W, rank, niter):
    U, S, V = torch.svd_lowrank(W, q=rank, niter=niter)
    return U, S, V.T


def _sklearn(W, rank):
    from sklearn.utils.extmath import randomized_svd

    U, S, Vh = randomized_svd(W.numpy(), rank, random_state=0)
    return torch.from_numpy(U), torch.from_numpy(S), torch.from_numpy(Vh)


def error_vs_time(name, W, sigma, ranks, quick, rows, curves, comparisons):
    """Error vs time of every method on W at each rank; the time-to-accuracy ratios go to
    ``comparisons``: the targets table for the LLM-sized matrices (the issue's acceptance), an
    informational table for the small MiniLM matrices, which per-call overheads dominate."""
    errors = Errors(W, sigma)
    svd_time = time_call(lambda: torch.linalg.svd(W, full_matrices=False), repeat=1, warmup=0) if not quick else None
    for rank in ranks:
        candidates = methods(rank, quick)
        # The first call of each method doubles as its warm-up; then every method is timed
        # round-robin (single calls of the same method differ by up to 1.4x on this machine).
        accuracy = {method: errors(*fn(W), rank) for method, (fn, _, _) in candidates.items()}
        time.sleep(0.5)  # sklearn ran last: let numpy's BLAS threads stop spinning (see below)
        rounds = 5
        seconds_of = round_robin(
            {
                method: (lambda fn=fn: fn(W))
                for method, (fn, _, _) in candidates.items()
                if not method.startswith("sklearn")
            },
            rounds,
        )
        for method, (fn, _, _) in candidates.items():
            if method.startswith("sklearn"):
                # Timed on its own: numpy's BLAS threads spin on after each call and would slow
                # whichever method ran next; the pause lets them sleep before the next rank.
                seconds_of[method] = time_call(lambda fn=fn: fn(W), repeat=rounds, warmup=0)
                time.sleep(0.5)
        results = {}
        for method, (fn, passes, qrs) in candidates.items():
            (sub, sv), seconds = accuracy[method], seconds_of[method]
            results[method] = (seconds, sub)
            rows.append(
                [
                    name,
                    rank,
                    method,
                    passes if passes is not None else "-",
                    qrs,
                    f"{seconds * 1e3:.1f}",
                    f"{sub * 100:.3f}",
                    f"{sv * 100:.3f}",
                ]
            )
            curves.setdefault((name, rank), []).append((method, seconds, sub))
            print(f"  {name} r={rank} {method}: {seconds * 1e3:.1f} ms, {sub * 100:.3f} %", file=sys.stderr, flush=True)
        if svd_time is not None:
            rows.append([name, rank, "torch.linalg.svd (exact)", "-", "-", f"{svd_time * 1e3:.1f}", "0", "0"])
        ours = _fastest(results, "rsvd")
        theirs = _fastest(results, "torch.svd_lowrank")
        if ours and theirs:
            comparisons.append(
                Target(
                    f"{name} r={rank}: time to <= 0.5 % vs svd_lowrank ({ours[0]} vs {theirs[0]})",
                    ours[1] / theirs[1],
                    "<=",
                    0.7,
                )
            )
        if ours and svd_time is not None:
            comparisons.append(
                Target(
                    f"{name} r={rank}: speed-up vs torch.linalg.svd ({ours[0]})",
                    svd_time / ours[1],
                    ">=",
                    40,
                    "{:.0f}x",
                )
            )


def _fastest(results, prefix):
    """(method, seconds) of the fastest method with this prefix reaching the target accuracy."""
    hits = [(m, t) for m, (t, sub) in results.items() if m.startswith(prefix) and sub <= TARGET_SUBOPTIMALITY]
    return min(hits, key=lambda x: x[1]) if hits else None


def batched_vs_loop(run, quick, targets):
    batch, size, rank = (8 if quick else 32), 1024, 16
    g = torch.Generator().manual_seed(1)
    sigma = (1 + torch.arange(size, dtype=torch.float64) / (size / 48)) ** -0.5
    U = torch.linalg.qr(torch.randn(batch, size, size, generator=g)).Q
    V = torch.linalg.qr(torch.randn(batch, size, size, generator=g)).Q
    W = (U * sigma.float()) @ V.mT
    errs = [Errors(W[i], sigma) for i in range(batch)]
    calls = {
        "rsvd krylov q=2 (defaults), one batched call": lambda: D.rsvd(
            W, rank, n_iter=2, generator=torch.Generator().manual_seed(0)
        )
    }
    for niter in (1, 2, 3, 4, 6, 8, 16):
        calls[f"loop of torch.svd_lowrank q=r niter={niter}"] = lambda niter=niter: [
            _lowrank(W[i], rank, niter) for i in range(batch)
        ]
    # svd_lowrank draws its test matrices from torch's global generator: seeded, every run sees
    # the same draws (its worst error over the batch varied 0.20-0.24 % at niter=6 unseeded).
    torch.manual_seed(0)
    worst = {}
    for name, call in calls.items():  # the first calls double as warm-up
        out = call()
        factors = [(out.U[i], out.S[i], out.Vh[i]) for i in range(batch)] if name.startswith("rsvd") else out
        worst[name] = max(errs[i](*factors[i], rank)[0] for i in range(batch))
    seconds = round_robin(calls, rounds=3)
    run.table(
        f"batched: {batch} matrices {size}x{size}, rank {rank} (worst suboptimality over the batch; "
        "median of round-robin wall times)",
        ["method", "time [ms]", "subopt. [%]"],
        [[name, f"{seconds[name] * 1e3:.1f}", f"{worst[name] * 100:.3f}"] for name in calls],
    )
    ours = next(iter(calls))
    best = next((name for name in calls if name != ours and worst[name] <= worst[ours]), None)
    if best:
        ratio = seconds[best] / seconds[ours]
        targets.append(
            Target(
                f"batched {batch}x{size}^2 r={rank}: speed-up vs {best.removeprefix('loop of torch.')} "
                "(first niter at equal or better accuracy)",
                ratio,
                ">=",
                2,
                "{:.1f}x",
            )
        )


def cur_and_norms(run, W, targets):
    rank = 64
    # Round-robin (single runs of the same call differ by up to 1.4x on this shared 2-core machine).
    seconds = round_robin(
        {
            "cur": lambda: D.cur(W, rank, generator=torch.Generator().manual_seed(0)),
            "rsvd": lambda: D.rsvd(W, rank, generator=torch.Generator().manual_seed(0)),
            "norms": lambda: torch.ops.lowrank_kernels.row_col_sq_norms(W),
            "torch": lambda: (W.square().sum(1), W.square().sum(0)),
            "vector_norm": lambda: (torch.linalg.vector_norm(W, dim=1) ** 2, torch.linalg.vector_norm(W, dim=0) ** 2),
        },
        rounds=5,
        warmup=1,
    )
    t_cur, t_rsvd, t_norms, t_torch, t_vnorm = seconds.values()
    t_two = min(t_torch, t_vnorm)
    run.table(
        f"cur / norms on {W.shape[0]}x{W.shape[1]} {W.dtype}, rank {rank}",
        ["operation", "time [ms]"],
        [
            ["cur (u=pinv)", f"{t_cur * 1e3:.1f}"],
            ["rsvd (defaults)", f"{t_rsvd * 1e3:.1f}"],
            ["row_col_sq_norms (one pass)", f"{t_norms * 1e3:.2f}"],
            ["W.square().sum(1), .sum(0)", f"{t_torch * 1e3:.2f}"],
            ["vector_norm(dim=1)**2, (dim=0)**2", f"{t_vnorm * 1e3:.2f}"],
        ],
    )
    targets.append(Target(f"cur r={rank} speed-up vs rsvd r={rank}", t_rsvd / t_cur, ">=", 10, "{:.1f}x"))
    targets.append(Target("one-pass norms vs two torch reductions (fastest)", t_two / t_norms, ">=", 1.7))


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__, quick="small grid (no exact SVD, no sklearn)")
    args = parser.parse_args(argv)
    run = Run("decompose", args, argv)
    rows, curves, targets, informational = [], {}, [], []
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (4096, 11008)]
    big = None
    for m, n in shapes:
        W, sigma = llm_like(m, n)
        error_vs_time(f"llm-like {m}x{n}", W, sigma, [16, 128], args.quick, rows, curves, targets)
        big = W
    for name, W in list(minilm_linear_weights().items())[: 2 if args.quick else 4]:
        W = W.contiguous()
        error_vs_time(
            f"MiniLM {name.removeprefix('encoder.')}",
            W,
            torch.linalg.svdvals(W.double()),
            [16],
            args.quick,
            rows,
            curves,
            informational,
        )
    run.table(
        "error vs time (fp64 metrics; passes = GEMM passes over W)",
        ["matrix", "r", "method", "passes", "QRs", "time [ms]", "subopt. [%]", "top-k sv err [%]"],
        rows,
    )
    batched_vs_loop(run, args.quick, targets)
    cur_and_norms(run, big, targets)
    run.table(
        "MiniLM (384-1536 wide: per-call overheads dominate; not an acceptance target)",
        ["comparison", "measured", "target for LLM sizes", "met"],
        [t.cells() for t in informational],
    )
    run.targets(f"targets (suboptimality <= {TARGET_SUBOPTIMALITY * 100} %)", targets)
    return run.finish(lambda plt: plot(plt, curves))


def plot(plt, curves):
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 4), squeeze=False)
    for ax, ((name, rank), points) in zip(axes[0], curves.items()):
        for family, marker in (
            ("torch.svd_lowrank", "o"),
            ("rsvd subspace", "s"),
            ("rsvd krylov", "^"),
            ("rsvd krylov p=0", "v"),
            ("sklearn", "x"),
        ):
            prefix, _, suffix = family.partition(" p=")
            pts = sorted(
                (t, max(sub, 1e-6))
                for m, t, sub in points
                if m.startswith(prefix) and m.endswith(" p=0") == bool(suffix)
            )
            if pts:
                ax.plot([p[0] * 1e3 for p in pts], [p[1] * 100 for p in pts], marker + "-", label=family)
        ax.axhline(TARGET_SUBOPTIMALITY * 100, color="gray", lw=0.8, ls="--")
        ax.set(xscale="log", yscale="log", xlabel="time [ms]", ylabel="suboptimality [%]", title=f"{name} r={rank}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return fig


if __name__ == "__main__":
    sys.exit(main())
