"""The GPU-fit gate (lowrank_kernels.gpu_fit) and what it guards that the interpreter cannot see:
its ptxas-log parser and limit checks, a real AOT compile of a tiny kernel, 64-bit address
arithmetic in the generated TTIR at >= 2^31 elements and for strided inputs, and autotune keys
that tell launches apart. Runs without a GPU (Triton compiles for sm_80 / sm_90 on the CPU)."""

from __future__ import annotations

import os
import re

import pytest
import torch

pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles for GPUs; run without TRITON_INTERPRET", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lowrank_kernels import gpu_fit  # noqa: E402

# The shape of nvcc -Xptxas -v output (CUDA 13.0), two entries and one device function.
NVCC_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelILi4EEvPf' for 'sm_80'
ptxas info    : Function properties for _Z6kernelILi4EEvPf
    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 8 bytes cumulative stack size, 64 bytes smem, 464 bytes cmem[0]
ptxas info    : Compile time = 12.5 ms
ptxas info    : Function properties for _Z6helperv
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z5otherPf' for 'sm_80'
ptxas info    : Function properties for _Z5otherPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 22 registers, used 0 barriers, 380 bytes cmem[0]
"""


def test_parser_reads_entries_and_ignores_device_functions():
    usages = gpu_fit.parse_ptxas_log(NVCC_LOG)
    assert set(usages) == {"_Z6kernelILi4EEvPf", "_Z5otherPf"}
    k = usages["_Z6kernelILi4EEvPf"]
    assert (k.registers, k.spill_stores, k.spill_loads, k.stack_frame, k.static_smem) == (96, 8, 4, 8, 64)
    o = usages["_Z5otherPf"]
    assert (o.registers, o.spill_stores, o.stack_frame, o.static_smem) == (22, 0, 0, 0)


@pytest.mark.parametrize(
    "row, failing",
    [
        (dict(registers=255, spill_bytes=0, dynamic_smem=163 * 1024), []),
        (dict(registers=64, spill_bytes=4), ["spills"]),
        (dict(registers=64, static_smem=1024, dynamic_smem=163 * 1024), ["smem"]),
        (dict(registers=255, threads=512), ["registers"]),
        (dict(error="ptxas SIGSEGV"), ["error:"]),
    ],
    ids=["at-limits", "spill", "smem", "register-file", "error"],
)
def test_limit_checks_on_sm_80(row, failing):
    checked = gpu_fit.check_row(gpu_fit.Row("k", "v", 80, row.pop("threads", 128), **row))
    assert [f.split()[0] for f in checked.failures] == failing


def test_sm_90_allows_more_shared_memory_than_sm_80():
    big = dict(registers=128, spill_bytes=0, dynamic_smem=200 * 1024)
    assert gpu_fit.check_row(gpu_fit.Row("k", "v", 80, 128, **big)).failures
    assert not gpu_fit.check_row(gpu_fit.Row("k", "v", 90, 128, **big)).failures


@triton.jit
def _copy_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def test_compiles_a_tiny_kernel_for_both_targets(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # cold: ptxas runs, its log is parsed
    monkeypatch.setattr(gpu_fit, "_jit_function", lambda module, name: _copy_kernel)
    for target in gpu_fit.TARGETS:
        task = gpu_fit.TritonTask(
            __name__,
            "_copy_kernel",
            "fp32",
            target,
            {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
            {"BLOCK": 1024},
            {},
            {"num_warps": 4},
        )
        row = gpu_fit.check_row(gpu_fit.Row(**gpu_fit.compile_triton(task)))
        assert not row.error and not row.failures
        assert 0 < row.registers <= 255 and row.spill_bytes == 0 and row.threads == 128
        # Again: Triton's cache has the cubin and ptxas does not run; the gate runs it on the PTX.
        again = gpu_fit.Row(**gpu_fit.compile_triton(task))
        assert not again.error and again.registers == row.registers


def test_summary_table_takes_the_worst_variant():
    rows = [
        gpu_fit.check_row(gpu_fit.Row("k", v, 80, 128, registers=r, spill_bytes=s, dynamic_smem=m))
        for v, r, s, m in (("a", 40, 0, 1024), ("b", 200, 8, 4096))
    ]
    table = gpu_fit.summary_table(rows)
    line = next(ln for ln in table.splitlines() if ln.startswith("k "))
    assert line.split()[1:7] == ["sm_80", "2", "200", "8", "0", "4.0"] and line.split()[-1] == "1"
    assert gpu_fit.failure_lines(rows) == ["FAIL k b sm_80: spills 8 B/thread"]


# --------------------------------------------------------------------------------------------
# 64-bit addresses (TTIR of real compiles)


def _ttir(task: gpu_fit.TritonTask) -> str:
    fn = gpu_fit._jit_function(task.module, task.name)
    compiled = triton.compile(
        ASTSource(fn, task.signature, task.constexprs, task.attrs),
        target=GPUTarget("cuda", task.target, 32),
        options=task.options,
    )
    return compiled.asm["ttir"]


def test_dequantize_addresses_are_64_bit_past_2_31_elements():
    """numel = 2^31 + 64 (the launch records a small problem, numel then set as a real launch
    would pass it, i64): every address the kernel forms is an i64 offset (i32 ones wrap and, with
    the masks still passing, store out of bounds)."""
    from lowrank_kernels.triton import nf4

    launches: list[gpu_fit.Launch] = []
    with gpu_fit._recording(nf4, "_dequantize_nf4_kernel", "bf16", launches):
        nf4.dequantize_nf4(torch.empty(32, dtype=torch.uint8), torch.empty(1), 64, 64, torch.bfloat16)
    (launch,) = launches
    launch.args = (*launch.args[:4], 2**31 + 64)
    task = gpu_fit.triton_tasks([launch])[0]
    assert task.signature["numel"] == "i64"
    ttir = _ttir(task)
    # pointer argument -> the offset types of the address tensors formed from it
    # (TTIR names values after the kernel's arguments; a splat of a pointer argument is its address
    # tensor, and the offsets added to it are the element offsets).
    splats = dict(re.findall(r"(%\S+) = tt\.splat %(\w+) : !tt\.ptr", ttir))
    by_name: dict[str, set[str]] = {}
    for base, ty in re.findall(r"tt\.addptr (%\S+), %\S+ : tensor<\d+x!tt\.ptr<\w+>>, tensor<\d+x(i\d+)>", ttir):
        if base in splats:
            by_name.setdefault(splats[base], set()).add(ty)
    # Element-indexed pointers are i64; the code table (a nibble < 16) may stay i32.
    assert by_name["packed_ptr"] == by_name["absmax_ptr"] == by_name["out_ptr"] == {"i64"}, by_name
    assert "code_ptr" in by_name


def _transposed_launch(kernel: str) -> gpu_fit.Launch:
    """A bf16 launch with every activation / factor transposed (no unit strides but the output's)."""
    from lowrank_kernels.triton import fused_linear as fl

    m, n, k, r = 64, 128, 256, 16
    t = lambda *shape: torch.empty(shape[::-1], dtype=torch.bfloat16).T  # noqa: E731
    packed, absmax = torch.empty(n * k // 2, dtype=torch.uint8), torch.empty(n * k // 64)
    launches: list[gpu_fit.Launch] = []
    with gpu_fit._recording(fl, kernel, "bf16 transposed", launches):
        if kernel == "_nf4_lowrank_linear_kernel":
            fl.nf4_lowrank_linear(t(m, k), packed, absmax, 64, n, t(m, r), t(n, r), 1.0, None)
        else:
            fl.nf4_lowrank_linear_grad_input(t(m, n), packed, absmax, 64, k, t(m, r), t(r, k), 1.0)
    return launches[0]


@pytest.mark.parametrize("kernel", ["_nf4_lowrank_linear_kernel", "_nf4_lowrank_linear_grad_input_kernel"])
def test_fused_strides_multiply_in_64_bit(kernel):
    """Every stride argument enters address arithmetic widened to i64: transposed inputs have
    strides of M or K, and index x stride exceeds 2^31 well before either does."""
    task = next(t for t in gpu_fit.triton_tasks([_transposed_launch(kernel)]) if t.target == 80)
    ttir = _ttir(task)
    strides = [name for name, ty in task.signature.items() if name.startswith("stride") and ty == "i32"]
    assert len(strides) >= 4, strides
    for name in strides:  # TTIR names arguments after the kernel's parameters
        uses = [ln for ln in ttir.splitlines() if re.search(rf"%{name}\b", ln) and "tt.func" not in ln]
        ops = [m.group(1) if (m := re.search(r"= (\S+)", ln)) else ln.strip() for ln in uses]
        assert ops and set(ops) == {"arith.extsi"}, (name, ops)


# --------------------------------------------------------------------------------------------
# autotune keys


def _autotune_key(kernel, launch: gpu_fit.Launch) -> tuple:
    """The key Triton's Autotuner.run caches the chosen config under (its own rule)."""
    args = dict(zip(kernel.arg_names, launch.args)) | launch.kwargs
    key = [args[k] for k in kernel.keys if k in args]
    return tuple(key + [str(a.dtype) for a in args.values() if hasattr(a, "dtype")])


def test_autotune_key_changes_with_rank_bias_blocksize_and_strides():
    """A config tuned for one launch must not be reused for another that compiles differently:
    rank 16 -> 128 (BLOCK_R), bias, blocksize, a transposed x."""
    from lowrank_kernels.triton import fused_linear as fl

    n = k = 256
    packed = torch.empty(n * k // 2, dtype=torch.uint8)
    e = lambda *s: torch.empty(s, dtype=torch.bfloat16)  # noqa: E731
    calls = {
        "r16": lambda: fl.nf4_lowrank_linear(
            e(32, k), packed, torch.empty(n * k // 64), 64, n, e(32, 16), e(n, 16), 1.0, None
        ),
        "r128": lambda: fl.nf4_lowrank_linear(
            e(32, k), packed, torch.empty(n * k // 64), 64, n, e(32, 128), e(n, 128), 1.0, None
        ),
        "bias": lambda: fl.nf4_lowrank_linear(
            e(32, k), packed, torch.empty(n * k // 64), 64, n, e(32, 16), e(n, 16), 1.0, e(n)
        ),
        "blocksize": lambda: fl.nf4_lowrank_linear(
            e(32, k), packed, torch.empty(n * k // 128), 128, n, e(32, 16), e(n, 16), 1.0, None
        ),
        "transposed": lambda: fl.nf4_lowrank_linear(
            e(k, 32).T, packed, torch.empty(n * k // 64), 64, n, e(32, 16), e(n, 16), 1.0, None
        ),
    }
    keys = {}
    for name, call in calls.items():
        launches: list[gpu_fit.Launch] = []
        with gpu_fit._recording(fl, "_nf4_lowrank_linear_kernel", name, launches):
            call()
        keys[name] = _autotune_key(fl._nf4_lowrank_linear_kernel, launches[0])
    assert len(set(keys.values())) == len(keys), keys


def test_prune_keeps_a_subset_on_every_target():
    """At each launch the gate compiles, early_config_prune keeps at least one config on each
    target (the gate then checks what each one really needs)."""
    for launch in gpu_fit.triton_launches():
        kernel = getattr(__import__(launch.module, fromlist=["_"]), launch.name)
        if not hasattr(kernel, "configs"):
            continue
        for target in gpu_fit.TARGETS:
            kept = gpu_fit._configs_for(kernel, launch, target)
            assert kept and all(any(c is k for k in kernel.configs) for c in kept)
