"""Measuring tools and the decode-kernel table of ``python -m gptviz.tools.benchmark``: the models
measured, timers, transformers' reference (in a persistent child process, so load hits both
alike), the gptviz step in each dtype and layout, the lens product and weight bandwidth probes."""


from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from ..config import PRESETS, GPTConfig
from ..generation.session import GenerationSession, generate_greedy
from ..kernels import CPU_KERNELS, book_kernels, chosen_kernel, linear, set_cpu_kernel
from ..model import GPTModel
from ..tokenizer import get_encoding


def build_model(dtype: torch.dtype = torch.float32) -> GPTModel:
    torch.manual_seed(123)
    return GPTModel(PRESETS["gpt2"]).to(dtype).eval()


def plain_layout(model: GPTModel) -> GPTModel:
    """A copy of ``model`` with every weight contiguous in a buffer of its own: ``nn.Linear``'s
    (out, in) layout, the three attention projections unfused (the book's model as built; run
    it inside ``book_kernels()`` for the book's products too)."""
    plain = copy.deepcopy(model)
    with torch.no_grad():
        for p in plain.parameters():
            p.data = p.detach().clone(memory_format=torch.contiguous_format)
    return plain


def random_prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 50257, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def ms(f: Callable[[], Any], repeat: int = 1) -> float:
    """Median wall time of ``f`` in milliseconds."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        f()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def uncached_step_ms(model: GPTModel, prompt: list[int], steps: int) -> float:
    """The source's generate_text_simple loop, uncached: median ms per token."""
    idx, ctx, times = torch.tensor([prompt]), model.cfg.context_length, []
    for _ in range(steps):
        t0 = time.perf_counter()
        idx_cond = idx[:, -ctx:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]
        probas = torch.softmax(logits, dim=-1)
        idx_next = torch.argmax(probas, dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _child(expr: str) -> Any:
    """Evaluate ``expr`` (this module is ``b``) in a fresh Python process; return its JSON value."""
    code = (
        f"import json, torch; from gptviz.tools import benchmark as b; torch.set_num_threads({torch.get_num_threads()}); "
        f"print(json.dumps({expr}))"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def hf_model() -> Any:
    """transformers' GPT-2 of the same shape (random init)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_embd=768, n_layer=12, n_head=12, n_positions=1024, vocab_size=50257, attn_implementation="sdpa"
    )
    torch.manual_seed(123)
    return GPT2LMHeadModel(config).eval()


def hf_decode_ms(model: Any, prompt: list[int], steps: int) -> list[float]:
    """ms per decoded token of ``generate``: gaps between consecutive logits-processor calls."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class Stamp(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return scores

    ids, stamp = torch.tensor([prompt]), Stamp()
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=steps + 1,
            min_new_tokens=steps + 1,
            do_sample=False,
            logits_processor=LogitsProcessorList([stamp]),
            pad_token_id=0,
            eos_token_id=None,
        )
    return [(b - a) * 1e3 for a, b in zip(stamp.times, stamp.times[1:])]


# --------------------------------------------------------------------------- decode kernels, same run

KERNEL_CONTEXTS = (16, 512)
_HF: dict[str, Any] = {}  # the child's transformers model, built once


def hf_decode_round(ctx: int, steps: int) -> list[float]:
    """(child side) One round of transformers' float32 decode at ``ctx``: ms per token."""
    if "model" not in _HF:
        _HF["model"] = hf_model()
    return hf_decode_ms(_HF["model"], random_prompt(ctx, seed=ctx), steps)


def serve() -> None:
    """(child side) Evaluate one expression per stdin line (this module is ``b``); answer one JSON line each."""
    env = {"b": sys.modules[__name__]}
    for line in sys.stdin:
        print(json.dumps(eval(line, env)), flush=True)  # noqa: S307 - the parent's own expressions


class Child:
    """A persistent Python process running :func:`serve`: ask it expressions, get JSON values."""

    def __init__(self) -> None:
        code = (
            f"import torch; from gptviz.tools import benchmark as b; torch.set_num_threads({torch.get_num_threads()}); "
            "b.serve()"
        )
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )

    def ask(self, expr: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(expr + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the transformers child process ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self.proc.wait(timeout=60)


def greedy_decode_ms(model: GPTModel, prompt: list[int], steps: int) -> list[float]:
    """ms per decoded token of ``generate_greedy``: gaps between consecutive forward calls
    (one cached forward + the greedy loop's own work each; the first call is the prefill)."""
    stamps: list[float] = []
    handle = model.register_forward_pre_hook(lambda module, args: stamps.append(time.perf_counter()))
    try:
        generate_greedy(model, torch.tensor([prompt]), steps + 2, model.cfg.context_length)
    finally:
        handle.remove()
    return [(b - a) * 1e3 for a, b in zip(stamps[1:], stamps[2:])]  # the gaps after the prefill: steps of them


#: Rows of the kernel table: (key, label). "hf" is transformers' float32 decode, the reference.
KERNEL_ROWS = (
    ("float32", "gptviz step, float32"),
    ("float16", "gptviz step, float16"),
    ("bfloat16", "gptviz step, bfloat16"),
    ("F.linear", "float32, every product F.linear"),
    ("oneDNN", "float32, every product oneDNN"),
    ("plain", "float32, book's layout and kernels"),
    ("greedy", "gptviz generate_greedy, float32"),
    ("hf", "transformers generate, float32"),
)


@contextlib.contextmanager
def forced_kernel(policy: str) -> Iterator[None]:
    """``set_cpu_kernel(policy)`` for the block, ``auto`` after it."""
    set_cpu_kernel(policy)
    try:
        yield
    finally:
        set_cpu_kernel("auto")


def decode_kernels(model: GPTModel, child: Child | None, steps: int, rounds: int) -> dict[int, dict[str, Any]]:
    """Every contender of :data:`KERNEL_ROWS` at each of :data:`KERNEL_CONTEXTS`, in turns round
    by round: p50 ms per token, and the spread of the per-round ratios to transformers."""
    enc = get_encoding()
    models = {
        "float32": model,
        "float16": copy.deepcopy(model).to(torch.float16),
        "bfloat16": copy.deepcopy(model).to(torch.bfloat16),
        **{name: model for name in CPU_KERNELS},  # the float32 step with one kernel forced for every shape
        "plain": plain_layout(model),
    }
    out: dict[int, dict[str, Any]] = {}
    for ctx in KERNEL_CONTEXTS:
        prompt = random_prompt(ctx, seed=ctx)
        sessions = {k: GenerationSession(m, enc, prompt, logit_lens=False) for k, m in models.items()}
        for session in sessions.values():
            session.step()  # prefill
        samples: dict[str, list[float]] = {key: [] for key, _ in KERNEL_ROWS}
        per_round: dict[str, list[float]] = {key: [] for key, _ in KERNEL_ROWS}
        for _ in range(rounds):
            got: dict[str, list[float]] = {}
            for key, session in sessions.items():
                with book_kernels() if key == "plain" else forced_kernel(key if key in CPU_KERNELS else "auto"):
                    records = session.step(steps)
                got[key] = [r.ms for r in records if r.positions_computed == 1]
                for _ in records:
                    session.undo()
            got["greedy"] = greedy_decode_ms(model, prompt, steps)
            if child is not None:
                got["hf"] = child.ask(f"b.hf_decode_round({ctx}, {steps})")
            for key, values in got.items():
                samples[key] += values
                per_round[key].append(statistics.median(values))
        row: dict[str, Any] = {key: statistics.median(v) for key, v in samples.items() if v}
        if child is not None:
            for key in list(row):
                ratios = [a / b for a, b in zip(per_round[key], per_round["hf"])]
                row[f"{key}_ratio_range"] = (min(ratios), max(ratios))
        row |= {f"{key}_min": min(v) for key, v in samples.items() if v}
        out[ctx] = row
    del models
    return out


def lens_products(repeat: int = 15) -> dict[str, float]:
    """The logit lens's product: 12 residual rows (one per block) against gpt2's 50257 × 768
    head, median ms, through :func:`~gptviz.kernels.linear` (what generation.py runs), through
    MKL as ``F.linear`` and as ``(W @ x.T).T``, and in float16."""
    torch.manual_seed(0)
    head = torch.randn(50257, 768) * 0.02  # (vocab, emb), nn.Linear's layout
    rows = torch.randn(12, 768)
    half, rows16 = head.half(), rows.half()
    with torch.inference_mode():
        cases = {
            f"linear(x, W): {chosen_kernel(head)} (what the lens runs)": lambda: linear(rows, head),
            **({"oneDNN": lambda: CPU_KERNELS["oneDNN"](rows, head, None)} if "oneDNN" in CPU_KERNELS else {}),
            "(W @ x.T).T, MKL": lambda: (head @ rows.T).T.contiguous(),
            "F.linear(x, W), MKL": lambda: torch.nn.functional.linear(rows, head),
            "F.linear(x16, W16), float16 copy": lambda: torch.nn.functional.linear(rows16, half).float(),
        }
        return {name: ms(f, repeat) for name, f in cases.items()}


#: Columns of the bandwidth table: (label, storage layout, product).
BANDWIDTH_COLUMNS = (
    ("F.linear (out, in)", "(out, in)", torch.nn.functional.linear),
    ("F.linear (in, out)", "(in, out)", torch.nn.functional.linear),
    *((f"{name} (out, in)", "(out, in)", kernel) for name, kernel in CPU_KERNELS.items() if name != "F.linear"),
    ("linear() (out, in)", "(out, in)", linear),
)


def layout_bandwidth(repeat: int = 5) -> list[dict[str, Any]]:
    """GB/s that a one-row product reads its weight at, per gpt2 weight shape, dtype, storage
    layout and kernel (F.linear, oneDNN's, and :func:`~gptviz.kernels.linear`'s choice); each over
    enough distinct matrices (>= 200 MB) that they stream from memory, not from the cache. None
    where this CPU's kernel refuses the dtype (oneDNN's float16 without the CPU's float16 support)."""
    shapes = {"W_query|W_key|W_value": (768, 2304), "out_proj": (768, 768), "ff.layers.0": (768, 3072),
              "ff.layers.2": (3072, 768), "out_head": (768, 50257)}  # fmt: skip
    table = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for name, (d_in, d_out) in shapes.items():
            n = max(2, int(200e6 // (d_in * d_out * dtype.itemsize)))
            x, bias = torch.randn(1, 1, d_in, dtype=dtype), torch.randn(d_out, dtype=dtype)
            row: dict[str, Any] = {"weight": name, "shape (out, in)": (d_out, d_in), "dtype": str(dtype)[6:]}
            for label, layout, product in BANDWIDTH_COLUMNS:
                ws = [torch.randn(d_out, d_in, dtype=dtype) for _ in range(n)]
                if layout == "(in, out)":
                    ws = [w.t().contiguous().t() for w in ws]
                with torch.inference_mode():
                    try:
                        for w in ws:
                            product(x, w, bias)  # warm-up
                    except RuntimeError:  # e.g. oneDNN's float16 product on a CPU without float16 support
                        row[label] = None
                        continue
                    t = ms(lambda: [product(x, w, bias) for w in ws], repeat) / 1e3
                row[label] = n * d_in * d_out * dtype.itemsize / t / 1e9
                del ws
            table.append(row)
    return table


def report_kernels(result: dict[str, Any]) -> list[str]:
    kernels = result["kernels"]
    hf = result["transformers"] is not None
    lines = [
        "decode kernels, same run, in turns round by round (gpt2 shape: emb 768, 12 layers, tied head, qkv bias):",
        f"{'':<38} " + " | ".join(f"{f'ctx {c}: p50 ms':>14} {'/ HF':>6} {'(rounds)':>13} {'min ms':>7} {'/ HF':>6}" for c in kernels),
    ]
    for key, label in KERNEL_ROWS:
        cells = []
        for row in kernels.values():
            if key not in row:
                cells.append(f"{'-':>14} {'-':>6} {'':>13} {'-':>7} {'-':>6}")
                continue
            ratio = f"{row[key] / row['hf']:5.2f}x" if hf else f"{'-':>6}"
            lo, hi = row.get(f"{key}_ratio_range", (None, None))
            spread = f"({lo:.2f}-{hi:.2f})" if lo is not None else ""
            low = row.get(f"{key}_min")
            low_ratio = f"{low / row['hf_min']:5.2f}x" if hf and low is not None else f"{'-':>6}"
            cells.append(f"{row[key]:14.1f} {ratio:>6} {spread:>13} " + (f"{low:7.1f} {low_ratio:>6}" if low else f"{'-':>7} {'-':>6}"))
        lines.append(f"{label:<38} " + " | ".join(cells))
    if result.get("chosen_kernels"):
        lines.append("  float32 kernels chosen on this CPU (linear's auto, timed per weight shape): "
                     + ", ".join(f"{shape} {name}" for shape, name in result["chosen_kernels"].items()))
    for ctx, row in kernels.items():
        forced = "; ".join(f"/ every product {k} {row['float32'] / row[k]:.2f}" for k in CPU_KERNELS if k in row)
        lines.append(
            f"  ctx {ctx:>4}: float32 step {forced}; / the book's layout and kernels {row['float32'] / row['plain']:.2f}; "
            f"float16 / float32 {row['float16'] / row['float32']:.2f}; bfloat16 / float32 {row['bfloat16'] / row['float32']:.2f}"
        )
    lines.append(
        "  (rounds) = lowest-highest ratio of the per-round medians: the noise of this run; min = the fastest token "
        "(what each runs at when nothing else wants the cores). generate_greedy and transformers generate: ms between "
        "consecutive forward / logits-processor calls."
    )
    if "lens_products_ms" in result:
        lines += ["", "logit lens product, 12 rows x gpt2 head (50257 x 768), median ms:"]
        lines += [f"  {name:<46} {v:7.2f}" for name, v in result["lens_products_ms"].items()]
    if "layout_gb_s" in result:
        labels = [label for label, _, _ in BANDWIDTH_COLUMNS]
        lines += ["", "one-row product x (1, in) by W: GB/s read, by kernel and storage layout"]
        lines.append(f"  {'weight':<22} {'(out, in)':>13} {'dtype':>9} " + " ".join(f"{h:>19}" for h in labels))
        lines += [
            f"  {r['weight']:<22} {str(r['shape (out, in)']):>13} {r['dtype']:>9} " + " ".join(f"{'—' if r[h] is None else f'{r[h]:.1f}':>19}" for h in labels)
            for r in result["layout_gb_s"]
        ]
    return lines
