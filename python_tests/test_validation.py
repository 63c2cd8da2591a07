"""Each class of bad input to easgd_ext.ops raises a clear TypeError/ValueError naming the
argument: never a crash, never a silent wrong answer."""

from __future__ import annotations

import pytest
import torch

from conftest import cuda_usable
from easgd_ext import build_info, ops
from easgd_ext._native import native


def f32(n: int = 16) -> torch.Tensor:
    return torch.randn(n)


def test_not_a_tensor():
    with pytest.raises(TypeError, match="center must be a torch.Tensor, got list"):
        ops.async_exchange(f32(), [0.0] * 16, 0.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.complex64, torch.bool])
def test_unsupported_parameter_dtype(dtype):
    x = torch.zeros(16, dtype=dtype)
    with pytest.raises(TypeError, match=r"x must be float32, bfloat16 or float16, got "):
        ops.async_exchange(x, f32(), 0.5)


def test_center_must_be_float32():
    with pytest.raises(TypeError, match=r"center must be float32 .* got bfloat16"):
        ops.elastic_difference(f32(), f32().bfloat16(), f32(), 0.5)


def test_x_last_must_match_x_dtype():
    with pytest.raises(TypeError, match=r"x_last must have the dtype of x \(bfloat16\), got float32"):
        ops.downpour_push(f32().bfloat16(), f32(), f32())


def test_wire_dtype_checked():
    with pytest.raises(TypeError, match="wire must be float32, bfloat16 or float16, got float64"):
        ops.elastic_difference(f32(), f32(), f32().double(), 0.5)


def test_shape_mismatch():
    with pytest.raises(ValueError, match=r"wire has shape \(15,\) but x has shape \(16,\)"):
        ops.elastic_difference(f32(16), f32(16), f32(15), 0.5)
    with pytest.raises(ValueError, match=r"center has shape \(4, 4\) but x has shape \(16,\)"):
        ops.async_exchange(f32(16), f32(16).view(4, 4), 0.5)


def test_non_contiguous():
    x = torch.randn(16, 2)[:, 0]
    with pytest.raises(ValueError, match="x must be contiguous"):
        ops.async_exchange(x, f32(), 0.5)


def test_overlapping_buffers():
    buf = torch.randn(32)
    with pytest.raises(ValueError, match="x and center overlap in memory"):
        ops.async_exchange(buf[:16], buf[8:24], 0.5)
    with pytest.raises(ValueError, match="x and wire overlap in memory"):
        ops.elastic_difference(buf[:16], f32(), buf[:16], 0.5)


def test_aliasing_only_where_allowed():
    x = torch.randn(16)
    ops.average_apply(x, x, 0.5)  # allowed: reduced is x
    with pytest.raises(ValueError, match="overlap"):
        ops.average_apply(x[:8], x[4:12], 0.5)  # partial overlap is not
    with pytest.raises(ValueError, match="overlap"):
        ops.sync_apply(x, f32(), x, 0.5)  # same buffer twice is not allowed elsewhere


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), 1e39])
def test_non_finite_scalar(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite float32 number"):
        ops.async_exchange(f32(), f32(), alpha)


@pytest.mark.parametrize("alpha", ["0.5", None, True, torch.tensor(0.5)])
def test_scalar_type(alpha):
    with pytest.raises(TypeError, match="alpha must be a real number"):
        ops.async_exchange(f32(), f32(), alpha)


def test_meta_tensors_rejected():
    x = torch.empty(16, device="meta")
    with pytest.raises(ValueError, match="x is on meta"):
        ops.async_exchange(x, torch.empty(16, device="meta"), 0.5)


def test_inputs_untouched_after_an_error():
    x, c = f32(), f32()
    x0, c0 = x.clone(), c.clone()
    with pytest.raises(TypeError):
        ops.elastic_difference(x, c, f32().double(), 0.5)
    assert torch.equal(x, x0) and torch.equal(c, c0)


def test_native_layer_validates_on_its_own():
    """Callers of easgd_ext._C directly get the same checks, not a segfault."""
    t = native.TensorRef("x", 0, 100, "float32", "cpu", -1)
    c = native.TensorRef("center", 0, 100, "float32", "cpu", -1)
    with pytest.raises(ValueError, match="x has a null data pointer"):
        native.prepare.async_exchange(t, c, 0.5)
    x = torch.randn(100)
    bad = native.TensorRef("x", x.data_ptr() + 1, 10, "float32", "cpu", -1)
    good = native.TensorRef("center", torch.randn(10).data_ptr(), 10, "float32", "cpu", -1)
    with pytest.raises(ValueError, match="x is not aligned"):
        native.prepare.async_exchange(bad, good, 0.5)
    neg = native.TensorRef("x", x.data_ptr(), -1, "float32", "cpu", -1)
    with pytest.raises(ValueError, match="negative element count"):
        native.prepare.async_exchange(neg, neg, 0.5)


def test_autograd_sees_in_place_updates():
    """A backward that saved a parameter fails loudly after an exchange modified it."""
    w = torch.randn(8, requires_grad=True)
    c = torch.randn(8)
    loss = (w * w).sum()
    with torch.no_grad():
        ops.async_exchange(w.detach(), c, 0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.skipif(not cuda_usable(), reason="needs a CUDA GPU and easgd_ext built with CUDA")
def test_mixed_devices():
    with pytest.raises(ValueError, match="center is on cpu but x is on cuda:0"):
        ops.async_exchange(f32().cuda(), f32(), 0.5)


@pytest.mark.skipif(build_info()["cuda"], reason="checks the message of a CPU-only build")
def test_cuda_tensor_on_cpu_only_build():
    t = native.TensorRef("x", 256, 4, "float32", "cuda", 0)
    c = native.TensorRef("center", 1024, 4, "float32", "cuda", 0)
    with pytest.raises(RuntimeError, match="built without CUDA"):
        native.prepare.async_exchange(t, c, 0.5)
