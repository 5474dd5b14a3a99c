"""NEW (speed): the CPU kernels behind the model's products, and the weights' memory layout.

Nothing here changes a value beyond float32 rounding: the same products, summed by another
kernel, over weights laid out in one buffer instead of three.

* :func:`linear` is ``F.linear`` whose float32 CPU kernel is chosen per weight shape: a
  generation step multiplies one row by every weight matrix, so its speed is how fast the
  weights stream from memory, and which kernel streams them fastest differs from CPU to CPU.
  Each shape runs the faster of ``F.linear`` and oneDNN's inner product, timed once per process
  (``GPTVIZ_KERNEL`` names one instead). :class:`Linear` is ``nn.Linear`` with that product
  (same parameters, names, ``repr``, ``state_dict``); :func:`book_kernels` turns it off (the
  reference the kernels are tested and benchmarked against).
* :func:`fuse_rows_` and :func:`joined_rows`: several ``nn.Linear`` weights as row blocks of one
  buffer, so ``W_query``, ``W_key`` and ``W_value`` run as one product
  (:meth:`gptviz.model.GPTModel.optimize_layout_`); :func:`hooked` says when a hook needs each
  module called on its own.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from typing import Any, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules import module as _module
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.flop_counter import register_flop_formula

__all__ = ["Linear", "linear", "onednn_linear", "book_kernels", "choose_kernels", "chosen_kernel", "chosen_kernels",
           "set_cpu_kernel", "CPU_KERNELS", "KERNEL_POLICIES", "hooked", "joined_rows", "fuse_rows_"]

_book_kernels = threading.local()  # .on: every product through F.linear (book_kernels())

def _find_onednn_linear() -> Any:
    """torch's oneDNN inner product, ``torch.ops.mkldnn._linear_pointwise`` (what ``torch.compile``
    runs for a CPU linear), or None where this torch lacks it or was built without oneDNN.

    The op is private to torch: this is the one place that names it. A torch that renames or
    drops it leaves :data:`CPU_KERNELS` with F.linear alone: slower on some CPUs, same numbers.
    """
    try:
        if not torch.backends.mkldnn.is_available():
            return None
        return getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _find_onednn_linear()


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias`` by oneDNN's inner product (no pointwise op fused after it);
    F.linear where this torch has no such op."""
    if _ONEDNN_LINEAR is None:
        return F.linear(x, weight, bias)
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")


#: The kernels :func:`linear` chooses between on the CPU in float32 (oneDNN's only where built in).
CPU_KERNELS: dict[str, Any] = {"F.linear": F.linear}
if _ONEDNN_LINEAR is not None:
    CPU_KERNELS["oneDNN"] = onednn_linear
KERNEL_POLICIES = ("auto", *CPU_KERNELS)  # auto: the fastest on this CPU, timed per weight shape
_kernel_policy = "auto"
_chosen: dict[tuple[tuple[int, ...], bool], str] = {}  # (weight shape, has bias) -> kernel name
_choosing = threading.Lock()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``x @ weight.T + bias``, weight ``(out, in)``.

    A generation step multiplies one row by every weight matrix, so its speed is how fast the
    weights stream from memory, and which kernel streams ``nn.Linear``'s ``(out, in)`` layout
    fastest differs from CPU to CPU: oneDNN's inner product (the kernel ``torch.compile`` picks
    for a CPU linear) read gpt2's matrices at 17-22 GB/s where F.linear's MKL kernel read 11-12
    on one Xeon, and at 9-17 against 13-19 on another (``python -m gptviz.tools.benchmark --layouts``).
    So on the CPU in float32 each weight shape runs the kernel that :func:`chosen_kernel` timed
    fastest here (or the one :func:`set_cpu_kernel` names). The same sums in another order:
    equal to float32 rounding. F.linear for float16 and bfloat16, on other devices, where
    gradients are wanted (oneDNN's op has no backward), and inside :func:`book_kernels`.
    """
    if (
        len(CPU_KERNELS) > 1
        and not getattr(_book_kernels, "on", False)
        and x.dtype == torch.float32
        and x.device.type == "cpu"
        and weight.is_contiguous()
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    ):
        return CPU_KERNELS[chosen_kernel(weight, bias)](x, weight, bias)
    return F.linear(x, weight, bias)


def chosen_kernel(weight: torch.Tensor, bias: torch.Tensor | None = None) -> str:
    """The kernel :func:`linear` runs for a float32 CPU ``weight`` of this shape: the policy's,
    or under ``auto`` the one that read it fastest, timed once per shape in this process."""
    if _kernel_policy != "auto":
        return _kernel_policy
    key = (tuple(weight.shape), bias is not None)
    name = _chosen.get(key)
    if name is None:
        with _choosing:
            name = _chosen.get(key) or _chosen.setdefault(key, _fastest(weight, bias))
    return name


def _fastest(weight: torch.Tensor, bias: torch.Tensor | None, rounds: int = 3) -> str:
    """The kernel that multiplies one row by weights of this shape fastest, streamed from memory
    as in a step: timed over copies filling >= 256 MB (more than a CPU's last cache), in turns;
    a kernel that raises for this shape is left out."""
    x = torch.zeros(1, weight.shape[1])
    best = dict.fromkeys(CPU_KERNELS, math.inf)
    with torch.no_grad(), _disable_current_modes():  # not counted by a FlopCounterMode around the first call
        copies = [weight] + [weight.clone() for _ in range(min(63, -(-256_000_000 // weight.nbytes) - 1))]
        for name, kernel in CPU_KERNELS.items():
            try:
                kernel(x, weight, bias)
            except RuntimeError:  # refused by this CPU's build for this shape: no candidate (F.linear always is)
                del best[name]
        for _ in range(rounds):
            for name in list(best):
                kernel = CPU_KERNELS[name]
                t0 = time.perf_counter()
                for w in copies:
                    kernel(x, w, bias)
                best[name] = min(best[name], time.perf_counter() - t0)
    return min(best, key=best.get)


def set_cpu_kernel(policy: str) -> None:
    """``auto`` (the default: each weight shape's fastest kernel on this CPU, timed on first use)
    or one kernel of :data:`CPU_KERNELS` for every float32 CPU product (``GPTVIZ_KERNEL``)."""
    global _kernel_policy
    if policy != "auto" and policy not in CPU_KERNELS:
        raise ValueError(f"the CPU kernel must be one of auto, {', '.join(CPU_KERNELS)}, got {policy!r}")
    _kernel_policy = policy


def choose_kernels(model: nn.Module) -> dict[str, str]:
    """Time the kernels for each of ``model``'s weight shapes now (one row through the model),
    so that its first step does not pay for it; returns :func:`chosen_kernels`."""
    with torch.no_grad():
        model(torch.zeros((1, 1), dtype=torch.long, device=next(model.parameters()).device))
    return chosen_kernels()


def chosen_kernels() -> dict[str, str]:
    """What ``auto`` chose so far, ``"(out, in)[+bias]"`` -> kernel name (the benchmark prints it)."""
    return {f"{shape}{'+bias' if has_bias else ''}": name for (shape, has_bias), name in sorted(_chosen.items())}


if _ONEDNN_LINEAR is not None:  # FLOP counters (torch.utils.flop_counter) count it as F.linear's addmm

    @register_flop_formula(_ONEDNN_LINEAR)
    def _linear_flops(x_shape: torch.Size, w_shape: torch.Size, *args: Any, **kwargs: Any) -> int:
        return 2 * math.prod(x_shape[:-1]) * w_shape[0] * w_shape[1]  # (rows, in) @ (in, out)


@contextlib.contextmanager
def book_kernels() -> Iterator[None]:
    """Within it (this thread), every product runs through F.linear, as the book's model does:
    the reference that :func:`linear`'s kernel is measured and tested against."""
    before = getattr(_book_kernels, "on", False)
    _book_kernels.on = True
    try:
        yield
    finally:
        _book_kernels.on = before


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, names, ``repr`` and ``state_dict``) whose product is
    :func:`linear`: the book's layers with a faster kernel on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# --------------------------------------------------------------------------- the weights' layout

def hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook watches any of ``modules`` (then every module must be called)."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


def joined_rows(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    """The one contiguous tensor that ``parts`` are consecutive row blocks of (along dim 0), as
    a view of their shared storage; None when they do not lie that way."""
    first = parts[0]
    if first is None or any(p is None for p in parts) or not first.is_contiguous():
        return None
    step = first.numel()
    storage = first.untyped_storage().data_ptr()
    for i, p in enumerate(parts):
        if (
            p.shape != first.shape
            or not p.is_contiguous()
            or p.storage_offset() != first.storage_offset() + i * step
            or p.untyped_storage().data_ptr() != storage
        ):
            return None
    return first.as_strided((len(parts) * first.shape[0], *first.shape[1:]), first.stride())


def fuse_rows_(linears: list[nn.Linear]) -> None:
    """Put the weights (and biases) of ``linears`` into one buffer each, stacked along ``out``:
    each ``weight`` becomes a row block (a view) of the ``(Σout, in)`` stack."""
    for name in ("weight", "bias"):
        parts = [getattr(lin, name) for lin in linears]
        if parts[0] is None or joined_rows(parts) is not None:
            continue
        stack = torch.cat([p.detach().contiguous() for p in parts])  # (Σout, in) or (Σout,)
        n = parts[0].shape[0]
        for i, p in enumerate(parts):
            p.data = stack[i * n : (i + 1) * n]
