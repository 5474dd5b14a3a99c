import pytest
from hypothesis import given, strategies as st

from gptviz.config import CONFIG_FIELDS, PRESETS, GPTConfig, config_from_fields

# The source's configuration dict, as printed in the book.
GPT_CONFIG_124M = {
    "vocab_size": 50257,
    "context_length": 1024,
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}


def test_source_dict_round_trips():
    cfg = GPTConfig.from_dict(GPT_CONFIG_124M)
    assert cfg == PRESETS["seed-124M"]
    assert cfg.to_dict() == GPT_CONFIG_124M
    assert cfg.tie_weights is False


def test_gpt2_presets_are_biased_and_tied():
    for name, (emb, heads, layers) in {
        "gpt2": (768, 12, 12),
        "gpt2-medium": (1024, 16, 24),
        "gpt2-large": (1280, 20, 36),
        "gpt2-xl": (1600, 25, 48),
    }.items():
        cfg = PRESETS[name]
        assert (cfg.emb_dim, cfg.n_heads, cfg.n_layers, cfg.context_length) == (emb, heads, layers, 1024)
        assert cfg.qkv_bias and cfg.tie_weights
        assert GPTConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"emb_dim": 770}, "emb_dim"),  # not divisible by 12 heads
        ({"n_heads": 0}, "n_heads"),
        ({"n_layers": -1}, "n_layers"),
        ({"vocab_size": 3.5}, "vocab_size"),
        ({"context_length": True}, "context_length"),
        ({"drop_rate": 1.0}, "drop_rate"),
        ({"drop_rate": -0.1}, "drop_rate"),
        ({"qkv_bias": "yes"}, "qkv_bias"),
        ({"tie_weights": 1}, "tie_weights"),
    ],
)
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**changes)


def test_from_dict_names_unknown_and_missing_keys():
    with pytest.raises(ValueError, match="emb_size"):
        GPTConfig.from_dict({**GPT_CONFIG_124M, "emb_size": 3})
    partial = dict(GPT_CONFIG_124M)
    del partial["n_heads"]
    with pytest.raises(ValueError, match="n_heads"):
        GPTConfig.from_dict(partial)


@given(
    heads=st.integers(1, 64),
    head_dim=st.integers(1, 256),
    layers=st.integers(1, 128),
    vocab=st.integers(1, 300_000),
    ctx=st.integers(1, 100_000),
    drop=st.floats(0, 0.999),
    qkv=st.booleans(),
    tie=st.booleans(),
)
def test_any_valid_config_round_trips(heads, head_dim, layers, vocab, ctx, drop, qkv, tie):
    cfg = GPTConfig(vocab, ctx, heads * head_dim, heads, layers, drop, qkv, tie)
    assert cfg.head_dim == head_dim
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.replace(n_layers=1).n_layers == 1


# --------------------------------------------------------------------------- form field values


FIELDS = dict(vocab_size=50257, context_length=1024, emb_dim=768, n_heads=12, n_layers=12, drop_rate=0.1,
              qkv_bias=False, tie_weights=False)


def test_config_from_fields_accepts_integral_floats():
    cfg = config_from_fields(**{**FIELDS, "emb_dim": 768.0, "n_layers": 12.0, "vocab_size": "50257"})
    assert cfg == PRESETS["seed-124M"] and isinstance(cfg.emb_dim, int)


@pytest.mark.parametrize(
    "field, value",
    [("emb_dim", 768.5), ("n_layers", None), ("vocab_size", 0), ("context_length", -3), ("n_heads", float("nan")),
     ("n_heads", 7), ("drop_rate", 1.0), ("drop_rate", None), ("vocab_size", "many"), ("qkv_bias", "yes"),
     ("n_layers", True), ("emb_dim", float("inf"))],
)
def test_config_from_fields_names_the_bad_field(field, value):
    with pytest.raises(ValueError) as err:
        config_from_fields(**{**FIELDS, field: value})
    assert field in str(err.value)


def test_config_fields_are_every_field_in_the_source_order():
    import dataclasses
    assert CONFIG_FIELDS == tuple(f.name for f in dataclasses.fields(GPTConfig))
    assert CONFIG_FIELDS[:7] == tuple(GPT_CONFIG_124M)  # the book's own order
