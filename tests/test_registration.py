"""Custom-op registration: opcheck and torch.compile(fullgraph=True) over every op, forward and backward."""

import pytest
import torch
from utils import assert_close, kernel_targets

import linattn
from linattn import reference


def _targets():
    """The reference backend on CPU, plus every kernel backend that can run here."""
    return [pytest.param(("reference", "cpu"), id="reference-cpu"), *kernel_targets()]


def _qkv(device, requires_grad=False):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 19, 16, generator=gen).to(device).requires_grad_(requires_grad) for _ in range(3))
    return q, k, v


def _packed(device, requires_grad=False):
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 2 * 3 * 16, 5, 7, generator=gen).to(device).requires_grad_(requires_grad)


@pytest.mark.parametrize("target", _targets())
def test_opcheck(target):
    name, device = target
    q, k, v = _qkv(device, requires_grad=True)
    qkv = _packed(device, requires_grad=True)
    g = torch.randn(2, 2, 19, 16, device=device)
    g_packed = torch.randn(2, 2 * 16, 5, 7, device=device)
    ops = torch.ops.linattn
    with linattn.backend(name):
        torch.library.opcheck(ops.relu_linear_attention, (q, k, v, 1e-15))
        torch.library.opcheck(ops.relu_linear_attention_backward, (g, q.detach(), k.detach(), v.detach(), 1e-15))
        torch.library.opcheck(ops.lite_mla_attention, (qkv, 16, 1e-15))
        torch.library.opcheck(ops.lite_mla_attention_backward, (g_packed, qkv.detach(), 16, 1e-15))


@pytest.mark.parametrize("target", _targets())
def test_compile_fullgraph(target):
    """Both ops, forward and backward, inside one compiled graph with surrounding PyTorch ops."""
    name, device = target
    torch._dynamo.reset()

    def block(q, k, v, qkv):
        a = linattn.relu_linear_attention(q * 2.0, k, v)
        b = linattn.lite_mla_attention(qkv + 1.0, 16)
        return a.sum() + b.square().sum()

    def grads(fn):
        q, k, v = _qkv(device, requires_grad=True)
        qkv = _packed(device, requires_grad=True)
        with linattn.backend(name):
            loss = fn(q, k, v, qkv)
            loss.backward()
        return loss.detach(), q.grad, k.grad, v.grad, qkv.grad

    compiled = torch.compile(block, fullgraph=True)
    want = grads(block)
    got = grads(compiled)
    for label, a, b in zip(("loss", "dq", "dk", "dv", "dqkv"), got, want):
        assert_close(a, b, 1e-5, label)


def test_compile_eager_reference_agree_on_packed_shape():
    """The fake kernel's output metadata (shape, dtype, channels_last strides) matches the real one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    qkv = _packed("cpu").to(memory_format=torch.channels_last)
    real = linattn.lite_mla_attention(qkv, 16)
    with FakeTensorMode() as mode:
        fake = linattn.lite_mla_attention(mode.from_tensor(qkv), 16)
    assert fake.shape == real.shape and fake.stride() == real.stride() and fake.dtype == real.dtype
    assert_close(real, reference.lite_mla_attention(qkv, 16), 1e-6, "out")
