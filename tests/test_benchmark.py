"""Tests of gptviz.tools.benchmark's helpers (no timings are asserted: speed is the benchmark's to report)."""

from __future__ import annotations

import threading
import time

import torch

from gptviz import GPTConfig, GPTModel
from gptviz.kernels import book_kernels
from gptviz.tools import benchmark as b
from gptviz.tools import benchmark_kernels as bk
from gptviz.tools import fairness


def small_model() -> GPTModel:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=97, context_length=32, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True, tie_weights=True)
    return GPTModel(cfg).eval()


def test_plain_layout_is_the_book_layout_with_the_same_numbers():
    model = small_model()
    plain = b.plain_layout(model)
    assert all(p.is_contiguous() for p in plain.parameters())
    att = plain.trf_blocks[0].att
    fused = model.trf_blocks[0].att
    assert fused.W_key.weight.untyped_storage().data_ptr() == fused.W_query.weight.untyped_storage().data_ptr()
    assert att.W_key.weight.untyped_storage().data_ptr() != att.W_query.weight.untyped_storage().data_ptr()
    with torch.no_grad():
        assert att._fused_qkv(torch.zeros(1, 1, 32)) is None  # unfused: each projection is its own product
    assert plain.out_head.weight is plain.tok_emb.weight  # tying survives
    idx = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        with book_kernels():
            book = plain(idx)
        # float32, other kernels and summation orders: a few ulps of O(1) logits.
        torch.testing.assert_close(book, model(idx), atol=1e-5, rtol=1e-5)


def test_greedy_decode_ms_times_each_cached_step_and_leaves_no_hook():
    model = small_model()
    gaps = b.greedy_decode_ms(model, [1, 2, 3], steps=4)
    assert len(gaps) == 4 and all(g > 0 for g in gaps)
    assert not model._forward_pre_hooks


def test_child_process_answers_expressions_in_turn():
    child = b.Child()
    try:
        assert child.ask("1 + 1") == 2
        assert child.ask("b.random_prompt(3, seed=1)") == b.random_prompt(3, seed=1)
    finally:
        child.close()
    assert child.proc.returncode == 0


def test_kernel_report_prints_every_row_with_its_ratio():
    kernels = {}
    for ctx in b.KERNEL_CONTEXTS:
        row = {key: 10.0 + i for i, (key, _) in enumerate(b.KERNEL_ROWS)}
        row["hf"] = 20.0
        row |= {f"{key}_ratio_range": (0.4, 0.6) for key, _ in b.KERNEL_ROWS}
        row |= {f"{key}_min": row[key] / 2 for key, _ in b.KERNEL_ROWS}
        kernels[ctx] = row
    chosen = {"(768, 768)+bias": "F.linear", "(50257, 768)": "oneDNN"}
    text = "\n".join(b.report_kernels({"kernels": kernels, "transformers": "x", "chosen_kernels": chosen}))
    for _, label in b.KERNEL_ROWS:
        assert label in text
    assert "0.50x" in text  # float32: 10 ms against transformers' 20 ms (p50, and min: 5 against 10)
    assert "    5.0  0.50x" in text
    assert "(0.40-0.60)" in text
    # rows 10, 11, 12, 13, 14, 15 ms: float32 against F.linear only, oneDNN only, the book's
    assert "float32 step / every product F.linear 0.77; / every product oneDNN 0.71; / the book's layout and kernels 0.67" in text
    assert "(768, 768)+bias F.linear, (50257, 768) oneDNN" in text


def test_layouts_table_shows_a_kernel_the_cpu_refuses_as_a_dash():
    labels = [label for label, _, _ in bk.BANDWIDTH_COLUMNS]
    row = {"weight": "out_proj", "shape (out, in)": (768, 768), "dtype": "float16"}
    row |= {label: 12.5 for label in labels}
    row[labels[2]] = None  # oneDNN's column: refused for float16 on a CPU without float16 support
    line = b.report_kernels({"kernels": {}, "transformers": None, "layout_gb_s": [row]})[-1]
    cells = line.split()[-len(labels):]
    assert cells[2] == "—" and cells.count("12.5") == len(labels) - 1


# --------------------------------------------------------------------------- fairness scenarios


class _FakeClient:
    """Answers every call after ``delay`` seconds; counts the Steps."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay, self.steps, self.closed = delay, 0, False

    def predict(self, *args, api_name: str):
        time.sleep(self.delay)
        self.steps += api_name == "/step"

    def close(self) -> None:
        self.closed = True


def test_a_stepper_stops_when_the_work_is_back_and_at_its_bound():
    done = threading.Event()
    done.set()
    c = _FakeClient()
    assert fairness._steps_until(c, "p", done) == [] and c.steps == 0
    c = _FakeClient()
    times = fairness._steps_until(c, "p", threading.Event(), limit=7)  # never set: the bound ends it
    assert c.steps == 7 and len(times) == 6  # the first Step (a prefill) is left out


def test_the_work_runs_beside_steppers_that_stop_when_it_is_back():
    clients = []

    def make():
        clients.append(_FakeClient(0.001))
        return clients[-1]

    seconds, steps = fairness._beside_steppers(make, lambda c: time.sleep(0.3), steppers=3)
    assert seconds >= 0.3 and len(clients) == 4 and all(c.closed for c in clients)
    assert 3 < len(steps) < 3 * fairness.MAX_STEPS  # they stepped during the work, and stopped after it


def test_the_fairness_report_prints_every_bound_and_ratio():
    one = {a: dict(alone_s=10.0, beside_s=15.0, ratio=1.5, p50=0.2, p95=0.5, n=40) for a, _, _ in fairness.ANALYSES}
    one["training"] = dict(without_p95=0.4, with_p95=0.5, without_p50=0.2, with_p50=0.3, ratio=1.25, throughout=True)
    text = fairness.report({"this checkout": one})
    assert "precision beside 4 steppers without pause" in text and "1.50×" in text and "1.25×" in text
    assert "the training ran while every stepper stepped: True" in text
