"""Head-role atlas and value-weighted attention (gptviz.analysis.heads)."""

from __future__ import annotations

import gc
import math
import threading
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gptviz import GPTConfig, GPTModel, Trace
from gptviz.analysis import heads as heads_module
from gptviz.analysis.heads import ROLES, cached_head_roles, head_roles, known_head_roles, probe_ids, role_scores, session_value_weighted, strongest_role, text_probe_ids, value_norms, value_weighted
from gptviz.generation.session import GenerationSession
from gptviz.tokenizer import ENDOFTEXT_ID

pytestmark = pytest.mark.numeric

# float32 means of at most a few hundred weights in [0, 1]: rounding ~1e-7 relative; 1e-6 leaves 10x room.
MEAN_TOL = dict(atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- synthetic patterns


def one_key(T: int, key_of) -> torch.Tensor:
    """(T, T) attention where query i puts all its weight on key key_of(i) (<= i)."""
    a = torch.zeros(T, T)
    for i in range(T):
        a[i, key_of(i)] = 1.0
    return a


def uniform(T: int) -> torch.Tensor:
    """(T, T) causal uniform attention: query i gives 1/(i+1) to each key 0 … i."""
    return torch.tril(torch.ones(T, T)) / torch.arange(1, T + 1, dtype=torch.float32)[:, None]


R = 7  # repeat length of the synthetic probe
T = 2 * R


def synthetic() -> dict[str, torch.Tensor]:
    return {
        "previous": one_key(T, lambda i: max(i - 1, 0)),
        "first": one_key(T, lambda i: 0),
        "self": one_key(T, lambda i: i),
        "induction": one_key(T, lambda i: i - R + 1 if i >= R else 0),
        "duplicate": one_key(T, lambda i: i - R if i >= R else 0),
        "uniform": uniform(T),
    }


def expected_scores() -> dict[str, dict[str, float]]:
    """Worked out by hand from the definitions (queries 1 … T-1 for the first three roles,
    R … T-1 for the two repeat roles), not from the code."""
    harmonic_all = sum(1 / (i + 1) for i in range(1, T)) / (T - 1)  # uniform: w[i, j] = 1/(i+1)
    harmonic_second = sum(1 / (i + 1) for i in range(R, T)) / (T - R)
    return {
        # query i -> i-1: key 0 only for i = 1; never itself; i-1 = i-R+1 only if R = 2; i-1 = i-R only if R = 1.
        "previous": dict(previous_token=1, first_token=1 / (T - 1), self=0, induction=0, duplicate_token=0),
        # query i -> 0: i-1 = 0 only for i = 1; i-R = 0 only for i = R (1 of the R second-copy queries).
        "first": dict(previous_token=1 / (T - 1), first_token=1, self=0, induction=0, duplicate_token=1 / R),
        "self": dict(previous_token=0, first_token=0, self=1, induction=0, duplicate_token=0),
        # the first copy attends to 0: i = 1 (key 0 = i-1 = first) is in the first copy.
        "induction": dict(previous_token=1 / (T - 1), first_token=(R - 1) / (T - 1), self=0, induction=1,
                          duplicate_token=0),
        "duplicate": dict(previous_token=1 / (T - 1), first_token=R / (T - 1), self=0, induction=0, duplicate_token=1),
        "uniform": dict(previous_token=harmonic_all, first_token=harmonic_all, self=harmonic_all,
                        induction=harmonic_second, duplicate_token=harmonic_second),
    }


def test_role_scores_of_synthetic_heads():
    patterns = synthetic()
    names = list(patterns)
    attn = torch.stack([torch.stack([patterns[n] for n in names])])  # (1 layer, n_heads, T, T)
    scores = role_scores(attn, repeat_len=R)
    assert list(scores) == list(ROLES)
    expected = expected_scores()
    for role in ROLES:
        assert scores[role].shape == (1, len(names))
        want = torch.tensor([[float(expected[n][role]) for n in names]])
        torch.testing.assert_close(scores[role], want, **MEAN_TOL, msg=role)
    # each synthetic role head scores 1 on its own role
    for name, role in [("previous", "previous_token"), ("first", "first_token"), ("self", "self"),
                       ("induction", "induction"), ("duplicate", "duplicate_token")]:
        assert scores[role][0, names.index(name)] == 1.0


def test_role_scores_without_repeat_and_invalid_input():
    scores = role_scores(uniform(5))
    assert set(scores) == {"previous_token", "first_token", "self"}
    torch.testing.assert_close(scores["previous_token"], torch.tensor((1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4), **MEAN_TOL)
    with pytest.raises(ValueError, match="T, T"):
        role_scores(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="at least 2"):
        role_scores(torch.ones(1, 1))
    with pytest.raises(ValueError, match="repeat_len"):
        role_scores(uniform(10), repeat_len=4)  # 10 > 2 * 4: not one repetition


@settings(max_examples=30, deadline=None)
@given(T=st.integers(2, 16), seed=st.integers(0, 2**16), batch=st.integers(1, 3))
def test_role_scores_are_in_unit_interval_and_linear(T, seed, batch):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, 3, T, T, generator=g) * 4
    attn = torch.softmax(logits.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), -torch.inf), -1)
    r = (T + 1) // 2
    per = role_scores(attn, repeat_len=r)  # (batch, 3) each
    mean = role_scores(attn.mean(0), repeat_len=r)  # (3,)
    for role in ROLES:
        assert ((per[role] >= 0) & (per[role] <= 1 + 1e-6)).all()
        torch.testing.assert_close(mean[role], per[role].mean(0), **MEAN_TOL)  # scores are linear in attn


# --------------------------------------------------------------------------- probes


def test_probe_ids_are_distinct_repeated_and_never_endoftext():
    ids = probe_ids(50257, 6, n_probes=3, seed=5)
    assert ids.shape == (3, 12)
    assert torch.equal(ids[:, :6], ids[:, 6:])
    assert all(len(set(row[:6].tolist())) == 6 for row in ids)
    assert torch.equal(probe_ids(50257, 6, n_probes=3, seed=5), ids)  # seeded
    assert not torch.equal(probe_ids(50257, 6, n_probes=3, seed=6), ids)
    # every id but 50256 when the probe takes the whole rest of the vocabulary
    state = torch.random.get_rng_state()
    whole = probe_ids(50257, 50256, n_probes=1, seed=0)[0, :50256]
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert set(whole.tolist()) == set(range(50257)) - {ENDOFTEXT_ID}
    small = probe_ids(100, 100, n_probes=1)  # a vocabulary without 50256 uses every id
    assert set(small[0].tolist()) == set(range(100))
    with pytest.raises(ValueError, match="probe_len"):
        probe_ids(50257, 1)


# --------------------------------------------------------------------------- on models


def plant_previous_token_head(model: GPTModel, head: int, gain: float = 40.0) -> None:
    """Layer 0, `head`: query i matches key i-1. Position p is written into 16 embedding
    dimensions as (cos pα, sin pα, -cos pα, -sin pα) for 4 frequencies α (zero mean, constant
    norm, so norm1 only rescales it); the head's keys read (cos jα, sin jα) and its queries the
    same rotated by -α, so q_i · k_j = gain · 4 · Σ cos((i - 1 - j) α), largest at j = i - 1.
    Token embeddings are shrunk so positions dominate; every other head keeps its random weights."""
    cfg = model.cfg
    hd = cfg.head_dim
    periods = (128, 16, 8, 5)
    with torch.no_grad():
        model.tok_emb.weight.mul_(0.02)
        pos = torch.zeros(cfg.context_length, cfg.emb_dim)
        p = torch.arange(cfg.context_length, dtype=torch.float32)
        att = model.trf_blocks[0].att
        rows = slice(head * hd, (head + 1) * hd)  # the head's output dimensions
        att.W_query.weight[rows] = 0
        att.W_key.weight[rows] = 0
        for k, period in enumerate(periods):
            a = 2 * math.pi / period
            pos[:, 4 * k : 4 * k + 4] = torch.stack([torch.cos(p * a), torch.sin(p * a),
                                                     -torch.cos(p * a), -torch.sin(p * a)], 1) * 10
            rot = torch.tensor([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])  # R(-α)
            att.W_query.weight[head * hd + 2 * k : head * hd + 2 * k + 2, 4 * k : 4 * k + 2] = gain * rot
            att.W_key.weight[head * hd + 2 * k : head * hd + 2 * k + 2, 4 * k : 4 * k + 2] = torch.eye(2)
        model.pos_emb.weight.copy_(pos)


@pytest.fixture(scope="module")
def planted():
    torch.manual_seed(11)
    model = GPTModel(GPTConfig(context_length=64, emb_dim=32, n_heads=4, n_layers=2)).eval()
    plant_previous_token_head(model, head=2)
    return model


def test_head_roles_finds_a_planted_previous_token_head(planted):
    df = head_roles(planted)
    assert list(df.columns) == ["layer", "head", *ROLES]
    assert len(df) == 2 * 4 and df.attrs["probe_len"] == 32  # min(64, context_length // 2)
    assert ((df[list(ROLES)] >= 0) & (df[list(ROLES)] <= 1 + 1e-6)).all().all()
    best = df.sort_values("previous_token", ascending=False).iloc[0]
    assert (best["layer"], best["head"]) == (0, 2) and best["previous_token"] > 0.9
    others = df[(df["layer"] != 0) | (df["head"] != 2)]
    assert others.previous_token.max() < 0.5
    assert strongest_role(df, 0, 2) == ("previous_token", pytest.approx(best["previous_token"]))


def test_head_roles_equals_scoring_a_plain_trace(planted):
    """The streaming scorer inside head_roles gives the scores of the recorded attention
    (the same kernels compute both attentions; 1e-6 absorbs the order of the batch mean)."""
    df = head_roles(planted, probe_len=10, seed=3, n_probes=3)
    trace = Trace(("attn_weights",))
    with torch.no_grad():
        planted(probe_ids(planted.cfg.vocab_size, 10, 3, seed=3), trace=trace)
    attn = torch.stack([a.mean(0) for a in trace.attentions])  # (n_layers, n_heads, T, T)
    scores = role_scores(attn, repeat_len=10)
    for role in ROLES:
        torch.testing.assert_close(torch.tensor(df[role].to_numpy(), dtype=torch.float32).view(2, 4), scores[role],
                                   **MEAN_TOL)


def test_text_probe_ids_repeat_stretches_of_the_text():
    ids = list(range(100, 171))  # 71 tokens
    probe = text_probe_ids(ids, 20, n_probes=3)
    assert probe.shape == (3, 40) and probe.dtype == torch.long
    assert probe[1].tolist() == ids[20:40] * 2  # row r: tokens r*R … (r+1)*R - 1, then again
    assert text_probe_ids(ids, 30, n_probes=5).shape == (2, 60)  # as many rows as the text holds
    with pytest.raises(ValueError, match="at least probe_len = 80"):
        text_probe_ids(ids, 80)
    with pytest.raises(ValueError, match="at least 2"):
        text_probe_ids(ids, 1)


def test_head_roles_on_a_text_probe(planted, enc):
    """The planted previous-token head keeps its role on text (it reads positions only); the table
    equals the scores of the text probe's recorded attention, and is cached apart from the random one."""
    text = enc.encode("It was the best of times, it was the worst of times, it was the age of wisdom, it was "
                      "the age of foolishness, it was the epoch of belief, it was the epoch of incredulity.")
    df = head_roles(planted, probe_len=12, text_ids=text)
    assert df.attrs["probe"] == "text" and df.attrs["n_probes"] == 2
    trace = Trace(("attn_weights",))
    with torch.no_grad():
        planted(text_probe_ids(text, 12), trace=trace)
    attn = torch.stack([a.mean(0) for a in trace.attentions])
    scores = role_scores(attn, repeat_len=12)
    for role in ROLES:
        torch.testing.assert_close(torch.tensor(df[role].to_numpy(), dtype=torch.float32).view(2, 4), scores[role],
                                   **MEAN_TOL)
    assert df.loc[(df["layer"] == 0) & (df["head"] == 2), "previous_token"].item() > 0.9
    assert not df.equals(head_roles(planted, probe_len=12))  # the random probe is another table
    cached = cached_head_roles(planted, probe_len=12, text_ids=text)
    assert cached.equals(df) and known_head_roles(planted, probe_len=12, text_ids=text).equals(df)
    assert known_head_roles(planted, probe_len=12) is None  # the random probe was not cached


def test_head_roles_checks(tiny_model, tiny_cfg):
    with pytest.raises(ValueError, match="context_length"):
        head_roles(tiny_model, probe_len=33)  # 66 > 64
    train = GPTModel(tiny_cfg)
    with pytest.raises(ValueError, match="eval"):
        head_roles(train)
    assert train.training


def test_strongest_role_threshold_and_ties():
    import pandas as pd

    df = pd.DataFrame([dict(layer=0, head=0, previous_token=0.3, first_token=0.39, induction=0.1,
                            duplicate_token=0.0, self=0.2),
                       dict(layer=0, head=1, previous_token=0.7, first_token=0.7, induction=0.1,
                            duplicate_token=0.0, self=0.2)])
    assert strongest_role(df, 0, 0) is None
    assert strongest_role(df, 0, 0, threshold=0.35) == ("first_token", 0.39)
    assert strongest_role(df, 0, 1) == ("previous_token", 0.7)  # tie: the first in ROLES
    with pytest.raises(KeyError):
        strongest_role(df, 3, 0)


def test_cached_head_roles_computes_once_per_model(tiny_cfg, monkeypatch):
    calls = []
    real = heads_module.head_roles

    def slow(model, **kwargs):
        calls.append(id(model))
        time.sleep(0.2)  # let every thread arrive while the first computes
        return real(model, **kwargs)

    monkeypatch.setattr(heads_module, "head_roles", slow)
    torch.manual_seed(0)
    model = GPTModel(tiny_cfg).eval()
    results = [None] * 6
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, cached_head_roles(model))) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [id(model)]
    assert all(r.equals(results[0]) for r in results)
    assert results[0].equals(real(model))  # the cached table is head_roles' table
    results[0].loc[0, "self"] = 99.0  # a caller's copy: the cache is not changed
    assert cached_head_roles(model).loc[0, "self"] != 99.0 and len(calls) == 1
    cached_head_roles(model, probe_len=8)  # other arguments: computed once more
    assert len(calls) == 2
    n = len(heads_module._CACHE)
    del model, results, threads
    gc.collect()
    assert len(heads_module._CACHE) == n - 1  # the table goes with its model


# --------------------------------------------------------------------------- value-weighted attention


def causal(g: torch.Generator, h: int, t: int) -> torch.Tensor:
    x = torch.rand(h, t, t, generator=g) * torch.tril(torch.ones(t, t))
    return x / x.sum(-1, keepdim=True)


@settings(max_examples=30, deadline=None)
@given(h=st.integers(1, 4), t=st.integers(1, 12), d=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_value_weighted_rows_sum_to_one(h, t, d, seed):
    g = torch.Generator().manual_seed(seed)
    attn, values = causal(g, h, t), torch.randn(h, t, d, generator=g)
    out = value_weighted(attn, values)
    assert out.shape == (h, t, t)
    torch.testing.assert_close(out.sum(-1), torch.ones(h, t), atol=1e-5, rtol=0)  # float32 sums of <= 12 terms
    assert (out[attn == 0] == 0).all()  # masked keys stay masked
    norms = values.norm(dim=-1)  # (h, t), written here independently of value_norms
    expected = attn * norms[:, None, :] / (attn * norms[:, None, :]).sum(-1, keepdim=True)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


def test_value_weighted_equal_norms_zero_values_and_zero_rows():
    g = torch.Generator().manual_seed(0)
    attn = causal(g, 3, 6)
    v = torch.randn(3, 6, 4, generator=g)
    same = 2.5 * v / v.norm(dim=-1, keepdim=True)  # every value has norm 2.5
    torch.testing.assert_close(value_weighted(attn, same), attn, atol=1e-6, rtol=1e-5)
    v[:, 2] = 0  # key 2 reads nothing
    out = value_weighted(attn, v)
    assert (out[..., 2] == 0).all() and (attn[:, 2:, 2] > 0).all()
    torch.testing.assert_close(out[:, 2:].sum(-1), torch.ones(3, 4), atol=1e-5, rtol=0)
    v[:, 0] = 0
    sink = torch.zeros(3, 6, 6)
    sink[:, :, 0] = 1.0  # every query parks on key 0, whose value is zero
    assert torch.equal(value_weighted(sink, v), torch.zeros(3, 6, 6))  # all-zero rows stay zero
    with pytest.raises(ValueError, match="match"):
        value_weighted(attn, torch.randn(3, 5, 4))


def test_value_norms_through_out_proj():
    g = torch.Generator().manual_seed(1)
    n_heads, t, hd = 3, 5, 4
    v = torch.randn(n_heads, t, hd, generator=g)
    w = torch.randn(n_heads * hd + 2, n_heads * hd, generator=g)  # out_proj.weight (d_out, n_heads*hd)
    expected = torch.stack([(v[h] @ w[:, h * hd : (h + 1) * hd].T).norm(dim=-1) for h in range(n_heads)])
    # the Gram-matrix route sums products in another order: float32 agreement to ~1e-6 relative
    torch.testing.assert_close(value_norms(v, w), expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(value_norms(v), v.norm(dim=-1), atol=0, rtol=0)


def reference_value_weighted(model, ids, start, end, layer, w, through_out_proj):
    trace = Trace(("attn_weights", "values"), layers=[layer])
    with torch.no_grad():
        model(torch.tensor([ids[start:end]]), trace=trace)
    attn = trace.attentions[0][0, :, -w:, -w:]  # (n_heads, w, w)
    v = trace.get("values")[0][0, :, -w:]  # (n_heads, w, head_dim)
    hd = model.cfg.head_dim
    if through_out_proj:
        wo = model.trf_blocks[layer].att.out_proj.weight
        norms = torch.stack([(v[h] @ wo[:, h * hd : (h + 1) * hd].T).norm(dim=-1) for h in range(v.shape[0])])
    else:
        norms = v.norm(dim=-1)
    x = attn * norms[:, None, :]
    return x / x.sum(-1, keepdim=True)


@pytest.mark.parametrize("through_out_proj", [True, False])
def test_session_value_weighted_matches_a_recompute(tiny_model, enc, through_out_proj):
    session = GenerationSession(tiny_model, enc, "The cat sat on the mat and", attn_window=6)
    session.step(3)
    start, end = session.context_span
    out, positions = session_value_weighted(session, 1, through_out_proj=through_out_proj)
    assert positions == list(range(end - 6, end))
    expected = reference_value_weighted(tiny_model, session.ids, start, end, 1, 6, through_out_proj)
    # cached vs full-recompute kernels agree to ~1e-6 on these float32 weights; 1e-5 leaves room
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.sum(-1), torch.ones(4, 6), atol=1e-5, rtol=0)


def test_a_sink_with_a_near_zero_value_fades():
    """Half of every row's attention parks on key 0, whose value is 100x smaller than the others:
    value-weighted, key 0 keeps only ~1% of a row (0.5·0.01 / (0.5·0.01 + 0.5·1))."""
    t = 6
    attn = torch.zeros(1, t, t)
    attn[0, :, 0] = 0.5
    for i in range(1, t):
        attn[0, i, 1 : i + 1] = 0.5 / i
    attn[0, 0, 0] = 1.0
    v = torch.zeros(1, t, 2)
    v[0, :, 0] = 1.0
    v[0, 0, 0] = 0.01
    out = value_weighted(attn, v)
    torch.testing.assert_close(out[0, 1:, 0], torch.full((t - 1,), 0.005 / 0.505), atol=1e-6, rtol=1e-5)
    assert out[0, 0, 0] == 1.0  # a row reading only the sink stays on it (renormalised)
