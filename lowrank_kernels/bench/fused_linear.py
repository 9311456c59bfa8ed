"""fused_pissa_linear vs the ways people run QPiSSA/LoRA layers today, measured in one run.

Compared on the same NF4 residual, adapter and activations:
  fused         lowrank_kernels.fused_pissa_linear (NF4 dequantized inside the kernel)
  dense+LoRA    F.linear on the dequantized fp weight + two LoRA matmuls (the cuBLAS / MKL path)
  bnb+LoRA      bitsandbytes.matmul_4bit + two LoRA matmuls
  unfused       our dequantize_nf4 each call, then F.linear + LoRA
Forward, and forward+backward (gradients for x, A, B; W_res frozen). Prints times, ratios,
achieved weight GB/s (decode, few tokens) or GFLOP/s (GEMM), the issue's targets, and for an
H100 the analytic minimum bytes moved by the fused vs unfused paths; writes a PNG.

Usage: python -m lowrank_kernels.bench.fused_linear [--quick] [--shapes 4096x4096,...] [--ranks 16,64]
       [--tokens 1,8,512,2048] [--dtype fp32] [--out DIR]
On a GPU machine the same module measures on the GPU. Writes fused_linear.json / .png.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F

import lowrank_kernels as lk
from lowrank_kernels.bench._harness import Run, Target, bench_parser, round_robin, time_call

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
METHODS = ("fused", "dense+LoRA", "bnb+LoRA", "unfused")
H100_BANDWIDTH = 3.35e12  # bytes/s, H100 SXM HBM3
SCALE = 0.5


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """ "4096x11008" -> (out_features, in_features) = (4096, 11008)."""
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",")]


class Layer:
    """One QPiSSA layer in every representation the methods need."""

    def __init__(self, out_features, in_features, rank, dtype, device):
        g = torch.Generator().manual_seed(0)
        w = torch.randn(out_features, in_features, generator=g).to(device)
        self.q = lk.quantize_nf4(w)
        self.dense = self.q.dequantize().to(dtype)
        self.A = (torch.randn(out_features, rank, generator=g) / rank).to(device, dtype).requires_grad_()
        self.B = (torch.randn(rank, in_features, generator=g) / in_features**0.5).to(device, dtype).requires_grad_()
        self.bnb_weight, self.bnb_state = self.q.to_bnb()
        self.dtype = dtype

    def lora(self, x):
        return SCALE * F.linear(F.linear(x, self.B), self.A)

    def forward(self, method: str, x: torch.Tensor) -> torch.Tensor:
        if method == "fused":
            return lk.fused_pissa_linear(x, self.q, self.A, self.B, scale=SCALE)
        if method == "dense+LoRA":
            return F.linear(x, self.dense) + self.lora(x)
        if method == "bnb+LoRA":
            import bitsandbytes

            return bitsandbytes.matmul_4bit(x, self.bnb_weight.t(), quant_state=self.bnb_state) + self.lora(x)
        return F.linear(x, self.q.dequantize().to(self.dtype)) + self.lora(x)


def make_step(layer: Layer, method: str, tokens: int, backward: bool):
    x = torch.randn(tokens, layer.dense.shape[1], device=layer.dense.device, dtype=layer.dtype)
    if not backward:

        def step():
            with torch.no_grad():
                layer.forward(method, x)

        return step
    x.requires_grad_()
    grad = torch.randn(tokens, layer.dense.shape[0], device=x.device, dtype=x.dtype)

    def step():
        torch.autograd.backward(layer.forward(method, x), grad, inputs=[x, layer.A, layer.B])

    return step


def measure(layer: Layer, tokens: int, backward: bool, seconds: float = 2.0) -> dict[str, float]:
    """Median seconds per call of every method, timed round-robin for about ``seconds``."""
    steps = {m: make_step(layer, m, tokens, backward) for m in METHODS}
    first = {m: time_call(step, repeat=1, warmup=1) for m, step in steps.items()}
    return round_robin(steps, rounds=max(3, min(31, int(seconds / sum(first.values())))))


def weight_bytes(layer: Layer, method: str) -> int:
    n = layer.dense.numel()
    return layer.dense.nbytes if method == "dense+LoRA" else n // 2 + layer.q.absmax.nbytes


def throughput(layer: Layer, method: str, tokens: int, seconds: float, backward: bool) -> str:
    if tokens <= 8 and not backward:
        return f"{weight_bytes(layer, method) / seconds / 1e9:.1f} GB/s"
    flops = 2 * tokens * layer.dense.numel() * (2 if backward else 1)  # x W^T, and dy W
    return f"{flops / seconds / 1e9:.0f} GFLOP/s"


def h100_bytes(out_features: int, in_features: int, rank: int, tokens: int, blocksize: int = 64) -> tuple[int, int]:
    """Minimum HBM bytes of one bf16 forward: fused kernel vs dequantize + GEMM + separate LoRA."""
    n = out_features * in_features
    nf4 = n // 2 + n // blocksize * 4
    x, y = 2 * tokens * in_features, 2 * tokens * out_features
    adapter = 2 * rank * (out_features + in_features)
    lowrank = 2 * tokens * rank
    fused = nf4 + x + y + adapter + lowrank * 2  # + x B^T written and read back
    unfused = (
        (nf4 + 2 * n)
        + (2 * n + x + y)
        + (x + 2 * rank * in_features + lowrank)
        + (lowrank + 2 * rank * out_features + y)
        + 3 * y
    )  # dequant, GEMM, x B^T, (.)A^T, add
    return fused, unfused


def main(argv: Sequence[str] | None = None) -> int:
    parser = bench_parser(__doc__, quick="only the configurations the targets use")
    parser.add_argument("--shapes", default="4096x4096,4096x11008,11008x4096", help="OUTxIN,...")
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--tokens", default="1,8,512,2048")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES)
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    if args.quick:
        configs = [((4096, 4096), 16, [1, 512])]
    else:
        configs = [
            (shape, int(r), [int(t) for t in args.tokens.split(",")])
            for shape in parse_shapes(args.shapes)
            for r in args.ranks.split(",")
        ]
    run = Run("fused_linear", args, argv)

    results = {}  # (shape, r, tokens, backward, method) -> seconds
    rows = []
    for shape, rank, token_list in configs:
        layer = Layer(*shape, rank, dtype, device)
        for tokens in token_list:
            for backward in (False, True):
                times = measure(layer, tokens, backward)
                for m, t in times.items():
                    results[(shape, rank, tokens, backward, m)] = t
                mode = "fwd+bwd" if backward else "fwd"
                rows.append(
                    [f"{shape[0]}x{shape[1]}", rank, tokens, mode]
                    + [f"{times[m] * 1e3:.2f}" for m in METHODS]
                    + [
                        f"{times['dense+LoRA'] / times['fused']:.2f}x",
                        f"{times['bnb+LoRA'] / times['fused']:.1f}x",
                        throughput(layer, "fused", tokens, times["fused"], backward),
                    ]
                )
                print(f"  measured {shape} r={rank} tokens={tokens} {mode}", file=sys.stderr, flush=True)
        del layer

    run.table(
        f"fused_pissa_linear, {args.dtype} activations, NF4 blocksize 64, scale {SCALE}, device {device} "
        "(median of round-robin wall times, ms; speed-up = other / fused)",
        ["W_res [out x in]", "r", "tokens", "pass", *METHODS, "vs dense", "vs bnb", "fused throughput"],
        rows,
    )

    h100_rows = []
    for shape, rank, token_list in configs:
        for tokens in token_list:
            fused, unfused = h100_bytes(*shape, rank, tokens)
            h100_rows.append(
                [
                    f"{shape[0]}x{shape[1]}",
                    rank,
                    tokens,
                    f"{fused / 2**20:.1f}",
                    f"{unfused / 2**20:.1f}",
                    f"{fused / H100_BANDWIDTH * 1e6:.1f}",
                    f"{unfused / H100_BANDWIDTH * 1e6:.1f}",
                    f"{unfused / fused:.2f}x",
                ]
            )
    run.table(
        "H100 (3.35 TB/s), bf16 forward: analytic minimum bytes moved",
        ["W_res", "r", "tokens", "fused MiB", "unfused MiB", "fused us", "unfused us", "ratio"],
        h100_rows,
    )

    key = ((4096, 4096), 16)
    if all((*key, t, False, "fused") in results for t in (1, 512)) and args.dtype == "fp32":
        r = lambda t, bwd, m: results[(*key, t, bwd, m)]  # noqa: E731
        run.targets(
            f"targets (4096x4096, r=16, fp32, {device})",
            [
                Target(
                    "1 token fwd: speed-up vs bitsandbytes + LoRA",
                    r(1, False, "bnb+LoRA") / r(1, False, "fused"),
                    ">=",
                    20.0,
                ),
                Target(
                    "1 token fwd: speed-up vs dense F.linear + LoRA",
                    r(1, False, "dense+LoRA") / r(1, False, "fused"),
                    ">=",
                    2.0,
                ),
                Target(
                    "512 tokens fwd: time / dense F.linear + LoRA",
                    r(512, False, "fused") / r(512, False, "dense+LoRA"),
                    "<=",
                    1.15,
                ),
                Target(
                    "512 tokens fwd: speed-up vs bitsandbytes + LoRA",
                    r(512, False, "bnb+LoRA") / r(512, False, "fused"),
                    ">",
                    1.0,
                ),
                Target(
                    "512 tokens fwd+bwd: time / dense", r(512, True, "fused") / r(512, True, "dense+LoRA"), "<=", 1.3
                ),
            ],
        )
    return run.finish(lambda plt: plot(plt, results, configs))


def plot(plt, results, configs):
    fig, axes = plt.subplots(2, len(configs), figsize=(4.5 * len(configs), 7), squeeze=False)
    for col, (shape, rank, token_list) in enumerate(configs):
        for row, backward in enumerate((False, True)):
            ax = axes[row][col]
            for m in METHODS:
                ax.plot(token_list, [results[(shape, rank, t, backward, m)] * 1e3 for t in token_list], "o-", label=m)
            ax.set(
                xscale="log",
                yscale="log",
                xlabel="tokens",
                ylabel="ms",
                title=f"{shape[0]}x{shape[1]} r={rank} {'fwd+bwd' if backward else 'fwd'}",
            )
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend()
    return fig


if __name__ == "__main__":
    sys.exit(main())
