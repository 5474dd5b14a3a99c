"""The app context: shared models built once, visitors by session (bounded, released when their
tab closes), and the turns model work takes on one model."""

from __future__ import annotations

import gc
import threading
import time
import warnings
import weakref

import gradio as gr
import pytest
import torch

from gptviz import PRESETS
from gptviz.settings import RANDOM, Settings
from gptviz.ui.generate import GenerateView
from gptviz.ui.serving import AppContext, ModelSpec, ModelStore, Visitors

from .conftest import seeded, visit

PROMPT = "Hello, I am"


# --------------------------------------------------------------------------- shared models


def test_model_store_builds_each_model_once(tiny_cfg):
    calls = []

    def build(spec):
        calls.append(spec)
        time.sleep(0.05)  # long enough for the other threads to ask meanwhile
        return seeded(spec.cfg)

    store = ModelStore(build, capacity=2)
    spec = ModelSpec(RANDOM, tiny_cfg)
    got = []
    threads = [threading.Thread(target=lambda: got.append(store.get(spec))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(got) == 4 and all(m is got[0] for m in got) and spec in store
    for n in (1, 3):  # two more specs: the least recently used is dropped
        store.get(ModelSpec(RANDOM, tiny_cfg.replace(n_layers=n)))
    assert spec not in store and len(calls) == 3


def test_a_failed_build_is_not_kept(tiny_cfg):
    attempts = []

    def build(spec):
        attempts.append(spec)
        if len(attempts) == 1:
            raise RuntimeError("out of memory")
        return seeded(spec.cfg)

    store, spec = ModelStore(build), ModelSpec(RANDOM, tiny_cfg)
    with pytest.raises(RuntimeError, match="out of memory"):
        store.get(spec)
    assert spec not in store
    assert store.get(spec).cfg == tiny_cfg and len(attempts) == 2  # asked again: built again


def test_low_precision_copies_leave_with_their_model(tiny_cfg):
    store = ModelStore(lambda spec: seeded(spec.cfg), capacity=1)
    spec = ModelSpec(RANDOM, tiny_cfg)
    bf16, fp16 = store.low_precision(spec, torch.bfloat16), store.low_precision(spec, torch.float16)
    assert store.low_precision(spec, torch.bfloat16) is bf16 and bf16.dtype == torch.bfloat16
    assert store.low_precision(spec, torch.float16) is fp16 and fp16.dtype == torch.float16
    assert store.get(spec).dtype == torch.float32  # the shared model itself is untouched
    store.get(ModelSpec(RANDOM, tiny_cfg.replace(n_layers=1)))  # evicts spec, and its copies
    assert spec not in store
    assert store.low_precision(spec, torch.bfloat16) is not bf16 and store.low_precision(spec, torch.float16) is not fp16


def test_random_weights_are_seeded_as_the_source_and_leave_the_callers_rng_alone(ctx, tiny_cfg):
    from gptviz.ui.serving import build_model

    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    model = build_model(ModelSpec(RANDOM, tiny_cfg), torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random numbers go on as before
    reference = seeded(tiny_cfg)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))
    assert not model.training


def test_spec_labels_and_sizes(tiny_cfg):
    assert ModelSpec(RANDOM, PRESETS["seed-124M"]).label == "random weights (seed 123), seed-124M, float32"
    assert ModelSpec(RANDOM, tiny_cfg, "bfloat16").label == "random weights (seed 123), custom configuration, bfloat16"
    assert ModelSpec("gpt2", None, "float16").label == "gpt2, float16"
    assert ModelSpec("/srv/ckpt").label == "the operator's checkpoint, float32"  # never a server path
    assert ModelSpec("/srv/ckpt").weight_bytes() is None
    from gptviz.files.weights import estimated_bytes

    assert ModelSpec(RANDOM, tiny_cfg, "bfloat16").weight_bytes() == estimated_bytes(tiny_cfg, torch.bfloat16)
    assert ModelSpec("gpt2-xl").weight_bytes() == estimated_bytes("gpt2-xl", torch.float32) > 6e9  # known unloaded


# --------------------------------------------------------------------------- visitors


def test_one_visitor_per_session_hash(ctx):
    a, b = ctx.visitor(visit("a")), ctx.visitor(visit("b"))
    assert a is not b and ctx.visitor(visit("a")) is a and len(ctx.visitors) == 2
    assert a.spec == ctx.default_spec and a.session is None


def test_visitors_are_bounded_in_number_least_recently_used_forgotten(make_ctx):
    ctx = make_ctx(max_sessions=2)
    a = ctx.visitor(visit("a"))
    ctx.visitor(visit("b"))
    ctx.visitor(visit("a"))  # a used again: b is now the least recently used
    ctx.visitor(visit("c"))
    assert len(ctx.visitors) == 2
    assert ctx.visitor(visit("a")) is a  # kept
    assert len(ctx.visitors) == 2  # b was forgotten, a and c remain


def test_idle_visitors_are_forgotten_after_the_ttl(tiny_cfg):
    visitors = Visitors(ModelSpec(RANDOM, tiny_cfg), max_sessions=100, max_live=10, ttl_s=0.2)
    a = visitors.get("a")
    time.sleep(0.3)
    visitors.get("b")  # any event sweeps the idle ones
    assert len(visitors) == 1 and visitors.get("a") is not a


def test_a_closed_tab_frees_its_session_unless_busy(ctx):
    gen = GenerateView(ctx)
    gen.step(PROMPT, 0, 0, request=visit("a"))
    v = ctx.visitor(visit("a"))
    session = weakref.ref(v.session)
    with v.lock:  # busy: the running step finishes with its session
        ctx.visitors.release("a")
        assert v.session is not None
    assert len(ctx.visitors) == 0 and ctx.visitor(visit("a")) is not v  # forgotten all the same
    del v
    assert ctx.ahead.idle()  # a read ahead of its next step, if one was running, is over
    gc.collect()
    assert session() is None  # nothing else holds it: its KV cache and history are gone
    gen.step(PROMPT, 0, 0, request=visit("b"))
    b = ctx.visitor(visit("b"))
    session = weakref.ref(b.session)
    assert ctx.ahead.idle()
    ctx.visitors.release("b")  # idle: freed at once
    assert b.session is None
    gc.collect()
    assert session() is None
    ctx.visitors.release("never-stepped")  # a tab that never sent an event


def test_live_sessions_are_capped_least_recently_used_first(make_ctx):
    # no reads ahead: the worker holds a visitor's lock for a moment, which the cap reads as busy
    ctx = make_ctx(max_live_sessions=3, read_ahead=False)
    gen = GenerateView(ctx)
    vs = [ctx.visitor(visit(str(k))) for k in range(5)]
    for k in range(3):
        gen.step(PROMPT, 0, 0, request=visit(str(k)))
    dropped = weakref.ref(vs[1].session)
    with vs[0].lock:  # the least recently used is busy: it keeps its session, the next idle one goes
        gen.step(PROMPT, 0, 0, request=visit("3"))
    assert [v.session is not None for v in vs] == [True, False, True, True, False]
    gen.step(PROMPT, 0, 0, request=visit("4"))  # now vs[0] goes
    assert [v.session is not None for v in vs] == [False, False, True, True, True]
    assert ctx.visitors.live_sessions() == 3
    gc.collect()
    assert dropped() is None  # its KV cache and history are gone
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data = gen.step(PROMPT, 0, 0, request=visit("1")).step_json
    assert data["steps"] == 1 and any("released to make room" in str(w.message) for w in caught)  # told, restarts
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gen.step(PROMPT, 0, 0, request=visit("1"))
    assert not any("released" in str(w.message) for w in caught)  # told once


def test_the_context_reads_its_limits_from_its_settings():
    s = Settings(device="cpu", max_sessions=7, max_live_sessions=5, session_ttl_s=9, model_store_capacity=2)
    ctx = AppContext(s)
    assert ctx.settings is s and ctx.device == torch.device("cpu")
    assert (ctx.visitors.max_sessions, ctx.visitors.max_live, ctx.visitors.ttl_s) == (7, 5, 9)
    assert ctx.models.capacity == 2
    assert ctx.model_event["concurrency_limit"] == s.model_concurrency and ctx.model_event["concurrency_id"] == "model"


# --------------------------------------------------------------------------- turns on the model


def test_a_function_runs_in_its_turn_and_an_error_gives_the_turn_back(ctx):
    seen = []

    def work(x):
        seen.append(ctx.turn.locked())
        return x * 2

    assert ctx.turns(work)(21) == 42 and seen == [True] and not ctx.turn.locked()
    assert ctx.turns(work).__name__ == "work"  # wrapped, its name kept for Gradio's endpoint

    def fails():
        assert ctx.turn.locked()
        raise gr.Error("no")

    with pytest.raises(gr.Error):
        ctx.turns(fails)()
    assert not ctx.turn.locked()


def test_a_generator_takes_a_turn_per_item(ctx):
    seen = []

    def gen(n):
        for k in range(n):
            seen.append(ctx.turn.locked())
            yield k

    out = []
    for k in ctx.turns(gen)(3):
        out.append(k)
        seen.append(ctx.turn.locked())  # free between items: others take their turn
    assert out == [0, 1, 2] and seen == [True, False] * 3 and not ctx.turn.locked()

    def fails_midway():
        yield 1
        raise gr.Error("no")

    items = ctx.turns(fails_midway)()
    assert next(items) == 1
    with pytest.raises(gr.Error):
        next(items)
    assert not ctx.turn.locked()


def test_work_waits_for_the_turn(ctx):
    """Model work takes turns: while the turn is held, a wrapped call waits; once given back, it runs."""
    ran = threading.Event()
    ctx.turn.acquire()
    try:
        worker = threading.Thread(target=ctx.turns(ran.set))
        worker.start()
        assert not ran.wait(0.3)  # held by someone else: waiting
    finally:
        ctx.turn.release()
    worker.join(5)
    assert ran.is_set() and not ctx.turn.locked()


def test_visitors_can_step_from_many_threads_at_once(ctx, tiny_cfg, tiny_model):
    """Handlers called concurrently (as Gradio's worker threads do), each taking turns: each
    visitor gets exactly its own prompt's greedy tokens."""
    from gptviz import encode

    prompts = [f"Visitor {k} says" for k in range(6)]
    step_n = ctx.turns(GenerateView(ctx).step_n)
    got: dict[int, list[int]] = {}

    def run(k):
        for _ in step_n(prompts[k], 5, 0, 0, request=visit(f"v{k}")):
            pass
        got[k] = ctx.visitor(visit(f"v{k}")).session.ids

    threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, p in enumerate(prompts):
        ids = torch.tensor([encode(p)])
        with torch.no_grad():
            for _ in range(5):
                ids = torch.cat([ids, tiny_model(ids[:, -tiny_cfg.context_length:])[:, -1].argmax(-1, keepdim=True)], 1)
        assert got[k] == ids[0].tolist()


def test_the_operator_chooses_the_cpu_kernel():
    import gptviz.kernels as model_module

    assert Settings.from_env({}).cpu_kernel == "auto"
    assert Settings.from_env({"GPTVIZ_KERNEL": " F.linear "}).cpu_kernel == "F.linear"
    with pytest.raises(ValueError, match="GPTVIZ_KERNEL must be one of auto, F.linear"):
        Settings.from_env({"GPTVIZ_KERNEL": "mkl"})
    try:
        AppContext(Settings(device="cpu", cpu_kernel="F.linear"))
        assert model_module.chosen_kernel(torch.zeros(7, 3)) == "F.linear"  # every shape, no timing
    finally:
        model_module.set_cpu_kernel("auto")
    AppContext(Settings(device="cpu"))
    assert model_module._kernel_policy == "auto"
