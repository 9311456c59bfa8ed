"""The CPU output cache: recycled outputs hold the right values, never alias a live tensor,
respect the limit, and behave as ordinary tensors (resize, exit with live outputs)."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import lowrank_kernels as lk
from lowrank_kernels.reference.nf4 import dequantize_nf4_ref

LARGE = (1024, 1024)  # 4 MiB of fp32: above the cache's 1 MiB threshold


@pytest.fixture(autouse=True)
def cache_limit():
    """Each test starts with an empty cache of the default limit and leaves it so."""
    limit = lk.output_cache_info().limit_bytes
    lk.empty_output_cache()
    yield
    lk.set_output_cache_limit(limit)
    lk.empty_output_cache()


def reference(q: lk.NF4Weight) -> torch.Tensor:
    return dequantize_nf4_ref(q.packed, q.absmax, q.blocksize, q.shape.numel(), q.dtype).view(q.shape)


def test_a_recycled_block_is_overwritten_with_the_new_values():
    first, second = (lk.quantize_nf4(torch.randn(LARGE, generator=torch.Generator().manual_seed(s))) for s in (1, 2))
    stale = first.dequantize()
    address = stale.data_ptr()
    del stale
    hits = lk.output_cache_info().hits
    out = second.dequantize()
    assert out.data_ptr() == address and lk.output_cache_info().hits == hits + 1
    torch.testing.assert_close(out, reference(second), rtol=0, atol=0)


def test_live_outputs_never_share_memory():
    q = lk.quantize_nf4(torch.randn(LARGE))
    freed = [q.dequantize() for _ in range(2)]
    del freed  # two idle blocks: the next outputs are hits, then misses
    outs = [q.dequantize() for _ in range(4)]
    spans = sorted((o.data_ptr(), o.data_ptr() + o.nbytes) for o in outs)
    assert all(end <= next_begin for (_, end), (next_begin, _) in zip(spans, spans[1:]))
    for o in outs:
        torch.testing.assert_close(o, reference(q), rtol=0, atol=0)


def test_the_limit_bounds_idle_bytes_and_zero_turns_the_cache_off():
    q = lk.quantize_nf4(torch.randn(LARGE))
    lk.set_output_cache_limit(0)
    misses = lk.output_cache_info().misses
    for _ in range(3):
        out = q.dequantize()
        del out
    info = lk.output_cache_info()
    assert info.idle_bytes == 0 and info.misses == misses + 3
    lk.set_output_cache_limit(4 << 20)  # one 4 MiB block fits, a second does not
    outs = [q.dequantize() for _ in range(2)]
    del outs
    assert lk.output_cache_info().idle_bytes == 4 << 20
    lk.set_output_cache_limit(0)
    assert lk.output_cache_info().idle_bytes == 0


def test_empty_output_cache_frees_idle_blocks_only():
    q = lk.quantize_nf4(torch.randn(LARGE))
    kept, dropped = q.dequantize(), q.dequantize()
    del dropped
    assert lk.output_cache_info().idle_bytes == 4 << 20
    lk.empty_output_cache()
    assert lk.output_cache_info().idle_bytes == 0
    torch.testing.assert_close(kept, reference(q), rtol=0, atol=0)


def test_small_outputs_bypass_the_cache():
    q = lk.quantize_nf4(torch.randn(64, 64))
    before = lk.output_cache_info()
    out = q.dequantize()
    del out
    assert lk.output_cache_info() == before


def test_outputs_resize_like_ordinary_tensors():
    q = lk.quantize_nf4(torch.randn(LARGE))
    out = q.dequantize()
    expected = reference(q).flatten()
    out.resize_(2 * expected.numel())
    torch.testing.assert_close(out[: expected.numel()], expected, rtol=0, atol=0)
    out.resize_(10)
    torch.testing.assert_close(out, expected[:10], rtol=0, atol=0)


def test_concurrent_calls_get_correct_distinct_outputs():
    weights = [lk.quantize_nf4(torch.randn(LARGE, generator=torch.Generator().manual_seed(s))) for s in range(8)]

    def round_trip(q):
        return all(torch.equal(q.dequantize(), reference(q)) for _ in range(5))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(round_trip, weights))


def test_stale_sizes_make_room_for_the_size_in_use():
    small, large = (lk.quantize_nf4(torch.randn(rows, 1024)) for rows in (1024, 1536))  # 4 and 6 MiB
    lk.set_output_cache_limit(8 << 20)
    stale = [small.dequantize() for _ in range(2)]
    del stale
    assert lk.output_cache_info().idle_bytes == 8 << 20
    out = large.dequantize()  # a miss: the stale blocks go so that idle + 6 MiB fits the limit
    assert lk.output_cache_info().idle_bytes <= 2 << 20
    del out
    hits = lk.output_cache_info().hits
    out = large.dequantize()
    assert lk.output_cache_info().hits == hits + 1
    torch.testing.assert_close(out, reference(large), rtol=0, atol=0)


def test_shared_memory_moves_an_output_and_returns_its_block():
    q = lk.quantize_nf4(torch.randn(LARGE))
    out = q.dequantize()
    address = out.data_ptr()
    out.share_memory_()
    assert out.is_shared() and out.data_ptr() != address
    assert lk.output_cache_info().idle_bytes == 4 << 20
    torch.testing.assert_close(out, reference(q), rtol=0, atol=0)


def _child_round_trip(q, inherited, queue):
    """In a forked child: free an output inherited from the parent, dequantize twice (one thread,
    as in DataLoader workers: GNU OpenMP's thread pool does not survive fork)."""
    torch.set_num_threads(1)
    del inherited
    outs = [q.dequantize() for _ in range(2)]
    queue.put(all(torch.equal(o, reference(q)) for o in outs))


def test_a_forked_child_uses_and_frees_outputs():
    import multiprocessing

    q = lk.quantize_nf4(torch.randn(LARGE))
    inherited = q.dequantize()
    idle = q.dequantize()
    del idle
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_round_trip, args=(q, inherited, queue))
    child.start()
    child.join(timeout=120)
    assert child.exitcode == 0 and queue.get(timeout=10)


def test_rejects_bad_limits():
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match=f"max_bytes must be a non-negative int, got {bad!r}"):
            lk.set_output_cache_limit(bad)
    with pytest.raises(RuntimeError, match="max_bytes must be >= 0, got -1"):
        torch.ops.lowrank_kernels.set_output_cache_limit(-1)


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    import os

    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **env}
    )


def test_the_environment_sets_the_limit_and_bad_values_are_named():
    code = "import lowrank_kernels as lk; print(lk.output_cache_info().limit_bytes)"
    assert run_python(code, LOWRANK_KERNELS_OUTPUT_CACHE_MB="3").stdout.strip() == str(3 << 20)
    bad = run_python(code, LOWRANK_KERNELS_OUTPUT_CACHE_MB="lots")
    assert bad.returncode != 0 and "LOWRANK_KERNELS_OUTPUT_CACHE_MB must be a non-negative integer" in bad.stderr
    assert "'lots'" in bad.stderr
    huge = run_python(code, LOWRANK_KERNELS_OUTPUT_CACHE_MB=str(1 << 43))
    assert huge.returncode != 0 and "below 2^43" in huge.stderr
    off = (
        "import torch, lowrank_kernels as lk; q = lk.quantize_nf4(torch.randn(1024, 1024)); out = q.dequantize(); "
        "del out; print(lk.output_cache_info().idle_bytes)"
    )
    assert run_python(off, LOWRANK_KERNELS_OUTPUT_CACHE_MB="0").stdout.strip() == "0"


def test_outputs_alive_at_interpreter_exit_are_released_without_error():
    code = (
        "import torch, lowrank_kernels as lk; q = lk.quantize_nf4(torch.randn(1024, 1024)); "
        "kept = [q.dequantize() for _ in range(3)]; del kept[0]; print('ok')"
    )
    done = run_python(code)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
