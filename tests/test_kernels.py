"""gptviz.kernels: the float32 CPU kernel chosen per weight shape, and its fallback."""

import contextlib
import platform

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import gptviz.kernels as kernels
from gptviz.kernels import book_kernels, linear

pytestmark = pytest.mark.numeric  # .ci/run runs this file again on another CPU code path


# F.linear's MKL kernel and oneDNN's sum the same products in other orders: a few ulps of
# O(1) results from up to 300-term dot products of O(1) values; 1e-5 is safe and 1e-3 would
# catch any wrong element.
KERNEL_TOL = dict(atol=1e-5, rtol=1e-5)


@contextlib.contextmanager
def forced(kernel):
    """One of the CPU kernels that ``linear`` may choose, for every product (auto after)."""
    kernels.set_cpu_kernel(kernel)
    try:
        yield
    finally:
        kernels.set_cpu_kernel("auto")


def test_both_kernels_are_candidates_on_x86():
    if platform.machine() in ("x86_64", "AMD64"):
        assert set(kernels.CPU_KERNELS) == {"F.linear", "oneDNN"}


@pytest.mark.parametrize("cpu_kernel", list(kernels.CPU_KERNELS))
@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 5),
    lead=st.sampled_from([(), (1,), (3,)]),
    d_in=st.integers(1, 300),
    d_out=st.integers(1, 70),
    bias=st.booleans(),
    sliced=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_linear_equals_f_linear(cpu_kernel, rows, lead, d_in, d_out, bias, sliced, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, rows + sliced, d_in, generator=g)[..., int(sliced) :, :]  # maybe not contiguous
    w = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    b = torch.randn(d_out, generator=g) if bias else None
    with torch.no_grad(), forced(cpu_kernel):
        got = linear(x, w, b)
        assert kernels.chosen_kernel(w, b) == cpu_kernel
        with book_kernels():
            book = linear(x, w, b)
    expected = F.linear(x, w, b)
    assert torch.equal(book, expected)  # book_kernels(): F.linear itself, the same kernel both sides
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, **KERNEL_TOL)


def test_auto_runs_the_kernel_timed_fastest_per_shape(monkeypatch):
    calls = []

    def slow(x, w, b):
        calls.append(("slow", tuple(w.shape)))
        sum(range(20_000))  # ~0.3 ms of Python: slower than any small product
        return F.linear(x, w, b)

    def fast(x, w, b):
        calls.append(("fast", tuple(w.shape)))
        return F.linear(x, w, b)

    monkeypatch.setattr(kernels, "CPU_KERNELS", {"slow": slow, "fast": fast})
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.setattr(kernels, "_kernel_policy", "auto")
    x, w = torch.randn(2, 8), torch.randn(5, 8)
    with torch.no_grad():
        y = linear(x, w)
        timed = len(calls)
        assert {name for name, _ in calls} == {"slow", "fast"}  # both were timed ...
        calls.clear()
        linear(x, w)
        linear(torch.randn(1, 8), w)
    assert calls == [("fast", (5, 8))] * 2  # ... once per shape: then only the faster one runs
    assert timed >= 2 * 64  # over copies filling a last-level cache (64 of a small weight)
    assert kernels.chosen_kernels() == {"(5, 8)": "fast"}
    torch.testing.assert_close(y, F.linear(x, w), **KERNEL_TOL)
    kernels.set_cpu_kernel("slow")  # a policy names one kernel for every shape
    assert kernels.chosen_kernel(w) == "slow"
    with pytest.raises(ValueError, match="auto, slow, fast"):
        kernels.set_cpu_kernel("mkl")


def test_auto_leaves_out_a_kernel_that_refuses_the_shape(monkeypatch):
    def refuses(x, w, b):
        raise RuntimeError("could not create a primitive descriptor for the inner product")

    monkeypatch.setattr(kernels, "CPU_KERNELS", {"F.linear": F.linear, "refuses": refuses})
    monkeypatch.setattr(kernels, "_chosen", {})
    monkeypatch.setattr(kernels, "_kernel_policy", "auto")
    x, w, b = torch.randn(3, 8), torch.randn(5, 8), torch.randn(5)
    with torch.no_grad():
        y = linear(x, w, b)
    assert kernels.chosen_kernel(w, b) == "F.linear"
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=0, atol=0)  # the same kernel computed both


def test_timing_a_new_shape_is_not_counted_by_a_flop_counter(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(kernels, "_chosen", {})
    x, w = torch.randn(1, 24), torch.randn(40, 24)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        linear(x, w)  # first use of this shape: both kernels timed over 64 copies
    assert counter.get_total_flops() == 2 * 24 * 40


def test_linear_keeps_gradients():
    x = torch.randn(2, 3, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    y = linear(x, w)
    assert y.grad_fn is not None  # F.linear's path: oneDNN's op has no backward
    y.sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(2, 3, 8))
    torch.testing.assert_close(w.grad, x.detach().sum((0, 1)).expand(5, 8))



def test_without_onednns_op_every_product_is_f_linear_and_the_model_gives_the_same_numbers(monkeypatch):
    """A torch that drops the private oneDNN op: onednn_linear falls back to F.linear, the kernel
    table holds F.linear alone, and a model's logits equal the book's kernels' exactly (the same
    kernel computed both sides)."""
    from gptviz import GPTConfig, GPTModel

    x, w, bias = torch.randn(3, 16), torch.randn(24, 16), torch.randn(24)
    monkeypatch.setattr(kernels, "_ONEDNN_LINEAR", None)
    assert torch.equal(kernels.onednn_linear(x, w, bias), F.linear(x, w, bias))
    monkeypatch.setattr(kernels, "CPU_KERNELS", {"F.linear": F.linear})
    monkeypatch.setattr(kernels, "_chosen", {})
    assert kernels.chosen_kernel(w, bias) == "F.linear"
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=4, n_layers=2)).eval()
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        fast = model(ids)
        with book_kernels():
            book = model(ids)
    assert torch.equal(fast, book)

