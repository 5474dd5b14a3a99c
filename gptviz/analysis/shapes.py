"""The shape tracer: every module call of a real forward pass, in order, with input and output
shapes and the line of ``gptviz/model.py`` that made the call (plus the attention intermediates
the model's :class:`~gptviz.model.Trace` records); :func:`model_source` gives the source text
those line numbers refer to. Also :func:`_batch`, the token ids as a batch, which
:mod:`gptviz.analysis.inside` shares.

:mod:`gptviz.analysis.inside` re-exports :func:`trace_shapes`, :func:`collapse_blocks` and :func:`model_source`.
"""

from __future__ import annotations

import ast
import functools
import inspect
import sys
import threading
from types import FrameType
from typing import Any, Iterable

import pandas as pd
import torch
import torch.nn as nn

from .. import model as model_module
from ..ids import TokenIds, as_batch
from ..model import GPTModel
from ..trace import RESIDUAL, TRACE_NAMES, Trace

__all__ = ["model_source", "trace_shapes", "collapse_blocks"]



# --------------------------------------------------------------------------- shape tracer

_MODEL_FILE = GPTModel.forward.__code__.co_filename
#: The tensors the shape table shows among each attention layer's calls (the block-level
#: residual streams are left out: they would repeat the blocks' own rows).
_ATTENTION_NAMES = tuple(n for n in TRACE_NAMES if n not in (RESIDUAL, "resid_mid", "ff_out"))


@functools.cache
def _source_lines() -> tuple[str, ...]:
    return tuple(inspect.getsource(model_module).splitlines())


def _assigned(target: ast.expr) -> set[str]:
    if isinstance(target, ast.Name):
        return {target.id}
    if isinstance(target, (ast.Tuple, ast.List)):
        return set().union(*(_assigned(t) for t in target.elts))
    return set()


@functools.cache
def _made_at() -> dict[int, int]:
    """For each ``record(NAME, var)`` call in gptviz/model.py (the model records a tensor right
    after making it): the line of the last statement before it, in the same block, that assigns
    ``var`` — the line that made the recorded tensor. Read from the syntax tree, so renaming a
    variable (consistently) cannot break it."""
    made: dict[int, int] = {}
    for node in ast.walk(ast.parse("\n".join(_source_lines()))):
        for block in (getattr(node, f, None) for f in ("body", "orelse")):
            if not isinstance(block, list):
                continue
            for i, stmt in enumerate(block):
                call = stmt.value if isinstance(stmt, ast.Expr) else None
                if not (isinstance(call, ast.Call) and getattr(call.func, "id", None) == "record"
                        and len(call.args) == 2 and isinstance(call.args[1], ast.Name)):
                    continue
                var = call.args[1].id
                maker = next((prev for prev in reversed(block[:i]) if isinstance(prev, ast.Assign)
                              and any(var in _assigned(t) for t in prev.targets)), None)
                if maker is not None:
                    made[stmt.lineno] = maker.lineno
    return made


def model_source(obj: Any = None) -> tuple[str, int]:
    """Source text of ``gptviz/model.py`` (or of one of its classes/functions, ``obj``) and
    the file line number of its first line: the text the tracer's ``line`` numbers refer to."""
    if obj is None:
        return "\n".join(_source_lines()) + "\n", 1
    lines, first = inspect.getsourcelines(obj)
    return "".join(lines), first


def _call_site(frame: FrameType | None) -> int | None:
    """Line of ``gptviz/model.py`` from which the module being entered was called."""
    while frame is not None:
        if frame.f_code.co_filename == _MODEL_FILE:
            return frame.f_lineno
        frame = frame.f_back
    return None


def _shapes(tensors: Iterable[Any]) -> str:
    return "; ".join(str(tuple(t.shape)) for t in tensors if isinstance(t, torch.Tensor))


class _ShapeTrace(Trace):
    """A :class:`Trace` that keeps only the shapes (and lines), so a long input costs no extra memory."""

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__(names)
        self.shapes: dict[tuple[int, str], tuple[int, ...]] = {}

    def record(self, layer: int, name: str, tensor: torch.Tensor, line: int = 0) -> None:
        if self.wants(name):
            self.shapes[(layer, name)] = tuple(tensor.shape)
            self.lines[(layer, name)] = line


def _place_traced(rows: list[dict[str, Any]], model: GPTModel, names: dict[nn.Module, str],
                  trace: _ShapeTrace) -> None:
    """Put each attention layer's traced tensors among its children's rows, in source-line order."""
    for i, block in enumerate(model.trf_blocks):
        att = names[block.att]
        start = next(j for j, r in enumerate(rows) if r["module"] == att) + 1
        end = start
        while end < len(rows) and rows[end]["module"].startswith(att + "."):
            end += 1
        traced = [
            {
                "depth": rows[start - 1]["depth"] + 1,
                "module": f"{att}:{name}",
                "kind": "traced tensor",
                "input": "",
                "output": str(trace.shapes[(i, name)]),
                "line": _made_at().get(line, line),  # the line that made it (the record call follows it)
            }
            for name in _ATTENTION_NAMES
            for line in [trace.lines[(i, name)]]
        ]
        rows[start:end] = sorted(rows[start:end] + traced, key=lambda r: r["line"])


def trace_shapes(model: GPTModel, ids: TokenIds, collapse: bool = False, meta: bool = True) -> pd.DataFrame:
    """Every module call of one forward pass over ``ids``, in forward order (a parent
    before its children), with the attention intermediates the model's :class:`Trace`
    records (split queries/keys/values, scores, weights, per-head context) in place.

    Columns: ``depth`` (nesting), ``module`` (qualified name; traced tensors are
    ``<attention module>:<name>``), ``kind`` (class name, or ``traced tensor``), ``input``
    and ``output`` (shapes), ``line`` (line of ``gptviz/model.py`` that made the call or
    produced the tensor, see :func:`model_source`) and ``code`` (that line's text).
    ``collapse=True`` applies :func:`collapse_blocks`.

    Shapes are taken by forward hooks, removed before returning. ``meta=True`` (the default)
    runs the model's own forward code on a twin built on PyTorch's ``meta`` device: tensors
    with shapes and dtypes but no numbers, so tracing a 1,024-token input takes milliseconds
    and never touches the shared model. With ``meta=False`` the hooks sit on ``model`` itself;
    they are safe on a model shared between threads: each hook records only calls made by the
    thread that registered it, so other users' forward passes are neither recorded nor changed.
    """
    batch = as_batch(model, ids)
    if meta:  # the same code, no arithmetic: shapes only
        with torch.device("meta"):
            model = type(model)(model.cfg).to(model.dtype).eval()
        batch = batch.to("meta")
    owner = threading.get_ident()
    rows: list[dict[str, Any]] = []
    open_rows: list[dict[str, Any]] = []  # rows of the calls under way, innermost last
    names = {module: name for name, module in model.named_modules()}
    root_line = inspect.getsourcelines(type(model).forward)[1]  # the `def forward` line

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if threading.get_ident() != owner:
            return
        line = _call_site(sys._getframe(1))
        row = {
            "depth": len(open_rows),
            "module": names[module] or type(module).__name__,
            "kind": type(module).__name__,
            "input": _shapes([*args, *kwargs.values()]),
            "output": "",
            "line": root_line if line is None else line,
        }
        rows.append(row)
        open_rows.append(row)

    def after(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if threading.get_ident() != owner:
            return
        open_rows.pop()["output"] = _shapes(output if isinstance(output, tuple) else [output])

    handles = []
    try:
        for module in names:
            handles.append(module.register_forward_pre_hook(before, with_kwargs=True))
            handles.append(module.register_forward_hook(after, with_kwargs=True))
        trace = _ShapeTrace(names=_ATTENTION_NAMES)
        with torch.no_grad():
            model(batch, trace=trace)
    finally:
        for handle in handles:
            handle.remove()

    _place_traced(rows, model, names, trace)
    lines = _source_lines()
    table = pd.DataFrame(rows, columns=["depth", "module", "kind", "input", "output", "line"])
    table["code"] = [lines[n - 1].strip() for n in table["line"]]
    return collapse_blocks(table) if collapse else table


def collapse_blocks(table: pd.DataFrame) -> pd.DataFrame:
    """Keep ``trf_blocks.0`` in full and replace each following run of blocks whose rows
    have the same shapes as block 0 by one row (``trf_blocks.1 … trf_blocks.11``)."""
    block = table["module"].str.extract(r"^trf_blocks\.(\d+)(?=[.:]|$)")[0]

    def signature(i: str) -> list[tuple]:
        part = table[block == i]
        return list(zip(part["module"].str.replace(rf"^trf_blocks\.{i}", "", regex=True), part["input"], part["output"]))

    order = list(dict.fromkeys(block.dropna()))
    if len(order) < 2:
        return table
    first = signature(order[0])
    same = {i for i in order[1:] if signature(i) == first}
    out, run = [], []

    def flush() -> None:
        if run:
            head = table[table["module"] == f"trf_blocks.{run[0]}"].iloc[0].to_dict()
            name = f"trf_blocks.{run[0]}" if len(run) == 1 else f"trf_blocks.{run[0]} … trf_blocks.{run[-1]}"
            out.append({**head, "module": name, "kind": f"{head['kind']} ×{len(run)}", "code": "same shapes as trf_blocks.0"})
            run.clear()

    for idx, row in table.iterrows():
        i = block[idx]
        if i in same:
            if not run or run[-1] != i:
                run.append(i)
            continue
        flush()
        out.append(row.to_dict())
    flush()
    return pd.DataFrame(out, columns=table.columns).reset_index(drop=True)
