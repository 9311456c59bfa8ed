"""NF4 public API: bad input, serialisation round trips, torch.compile."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from nf4_cases import make_weight

import lowrank_kernels as lk
from lowrank_kernels import ops

# ---- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_rejects_non_finite(bad):
    w = torch.randn(10, 100)
    w[3, 7] = bad
    with pytest.raises(ValueError, match=r"NaN or Inf.*shape \(10, 100\)"):
        lk.quantize_nf4(w)


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.int64, torch.bool, torch.float64])
def test_rejects_non_float_dtypes(dtype):
    with pytest.raises(TypeError, match=f"float32, float16 or bfloat16.*{dtype}"):
        lk.quantize_nf4(torch.zeros(4, 64, dtype=dtype))


def test_rejects_3d_and_0d():
    with pytest.raises(ValueError, match=r"1-D or 2-D.*shape \(2, 3, 64\)"):
        lk.quantize_nf4(torch.randn(2, 3, 64))
    with pytest.raises(ValueError, match=r"1-D or 2-D.*shape \(\)"):
        lk.quantize_nf4(torch.tensor(1.0))


def test_rejects_non_tensor():
    with pytest.raises(TypeError, match="W must be a torch.Tensor, got list"):
        lk.quantize_nf4([[1.0, 2.0]])


@pytest.mark.parametrize("blocksize", [0, 16, 48, 100, 8192, -64])
def test_rejects_bad_blocksize(blocksize):
    with pytest.raises(ValueError, match=f"power of two in \\[32, 4096\\], got {blocksize}"):
        lk.quantize_nf4(torch.randn(4, 64), blocksize=blocksize)
    with pytest.raises(TypeError, match="blocksize must be an int"):
        lk.quantize_nf4(torch.randn(4, 64), blocksize=64.0)


def test_rejects_packed_data_of_wrong_length():
    q = lk.quantize_nf4(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"packed must be torch.uint8 with 256 elements.*shape \(255,\)"):
        dataclasses.replace(q, packed=q.packed[:-1])
    with pytest.raises(ValueError, match=r"absmax must be torch.float32 with 8 elements"):
        dataclasses.replace(q, absmax=q.absmax[:-1])
    with pytest.raises(ValueError, match="double quant needs offset, absmax2 and code2 together"):
        dataclasses.replace(q, offset=torch.tensor(0.0))


def test_raw_ops_check_lengths_too(device):
    q = lk.quantize_nf4(torch.randn(8, 64).to(device))
    with pytest.raises(RuntimeError, match="packed must hold 256 bytes for 512 elements"):
        ops.op("dequantize_nf4")(q.packed[:-1], q.absmax, 64, 512, torch.float32)
    with pytest.raises(RuntimeError, match="absmax must hold 8 values"):
        ops.op("dequantize_nf4")(q.packed, q.absmax[:3], 64, 512, torch.float32)
    with pytest.raises(RuntimeError, match="blocksize must be a power of two"):
        ops.op("quantize_nf4")(torch.randn(64, device=device), 33)
    with pytest.raises(RuntimeError, match="must be float32, float16 or bfloat16"):
        ops.op("quantize_nf4")(torch.zeros(64, dtype=torch.int32, device=device), 64)


def test_dequantize_rejects_wrong_out_and_wrong_type():
    q = lk.quantize_nf4(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"out must be a contiguous torch.float32 tensor of shape \(8, 64\)"):
        q.dequantize(out=torch.empty(8, 63))
    with pytest.raises(TypeError, match="q must be an NF4Weight, got Tensor"):
        lk.dequantize_nf4(torch.randn(3))


# ---- serialisation ----------------------------------------------------------------------------


def assert_identical(a: lk.NF4Weight, b: lk.NF4Weight):
    assert (a.shape, a.dtype, a.blocksize, a.double_quant) == (b.shape, b.dtype, b.blocksize, b.double_quant)
    for f in ("packed", "absmax", "offset", "absmax2", "code2"):
        x, y = getattr(a, f), getattr(b, f)
        assert (x is None and y is None) or (x.dtype == y.dtype and torch.equal(x, y)), f


@pytest.mark.parametrize("double_quant", [False, True], ids=["plain", "dq"])
def test_safetensors_round_trip_bit_exact(tmp_path, double_quant, dtype, device):
    weights = {
        "layer.0.q": lk.quantize_nf4(make_weight((33, 77), dtype, "normal").to(device), 64, double_quant),
        "layer.1.v": lk.quantize_nf4(make_weight((1000,), dtype, "large").to(device), 128, double_quant),
    }
    path = tmp_path / "w.safetensors"
    lk.save_nf4(path, weights)
    loaded = lk.load_nf4(path, device=device)
    assert loaded.keys() == weights.keys()
    for name in weights:
        assert_identical(loaded[name], weights[name])
        assert torch.equal(loaded[name].dequantize(), weights[name].dequantize())


def test_state_dict_round_trip_through_module_buffers(device):
    q = lk.quantize_nf4(torch.randn(40, 70).to(device), 64, double_quant=True)
    module = torch.nn.Module()
    for k, v in q.state_dict().items():
        module.register_buffer(k, v)
    assert_identical(lk.NF4Weight.from_state_dict(module.state_dict()), q)


def test_load_refuses_corrupted_and_foreign_files(tmp_path):
    path = tmp_path / "w.safetensors"
    lk.save_nf4(path, {"w": lk.quantize_nf4(torch.randn(16, 64))})
    data = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read NF4 checkpoint"):
        lk.load_nf4(tmp_path / "truncated.safetensors")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="cannot read NF4 checkpoint"):
        lk.load_nf4(tmp_path / "garbage.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="holds no NF4 weights"):
        lk.load_nf4(tmp_path / "foreign.safetensors")


def test_from_state_dict_refuses_unknown_version():
    sd = lk.quantize_nf4(torch.randn(16, 64)).state_dict()
    sd["nf4_meta"] = sd["nf4_meta"].clone()
    sd["nf4_meta"][0] = 99
    with pytest.raises(ValueError, match="unsupported NF4 format"):
        lk.NF4Weight.from_state_dict(sd)


# ---- torch.compile (opcheck of every op: tests/test_registry.py) ---------------------------------


def test_compiled_quantize_dequantize_equals_eager(device):
    def roundtrip(w):
        packed, absmax = torch.ops.lowrank_kernels.quantize_nf4(w, 64)
        return torch.ops.lowrank_kernels.dequantize_nf4(packed, absmax, 64, w.numel(), w.dtype).view(w.shape) * 2

    w = torch.randn(48, 80).to(device)
    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(w), roundtrip(w))
