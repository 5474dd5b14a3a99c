"""The page as Gradio serves it (its config, as the browser receives it): named endpoints,
element ids, launch arguments."""

from __future__ import annotations

import pytest

from gptviz.settings import Settings
from gptviz.ui import LAUNCH_KWARGS, build_demo
from gptviz.ui.page import STYLE


@pytest.fixture(scope="module")
def config() -> dict:
    demo = build_demo(Settings(device="cpu"), preload=False)
    return demo.get_config_file()


def test_page_has_the_named_endpoints_and_ids(config):
    names = {d.get("api_name") for d in config["dependencies"]}
    assert {"tokenize", "detokenize", "step", "step_n", "undo", "reset", "attention", "params", "preset",
            "load_model", "build_model", "shapes", "kv_cache", "ablate", "precision"} <= names
    ids = {c["props"].get("elem_id") for c in config["components"]}
    assert {"tokenize-input", "tokenize-btn", "token-chips", "step-btn", "stepn-btn", "undo-btn", "reset-btn",
            "heatmap", "topk-plot", "lens-plot", "kv-readout", "params-total", "cfg-n_layers", "tab-tokenizer",
            "tab-generate", "tab-parameters", "tab-model", "weights-choice", "tab-inside", "shape-table", "model-code",
            "ablate-heads", "ablate-btn", "ablate-plot", "precision-btn", "kv-table", "kv-plot", "step-json-acc"} <= ids


def test_the_page_keeps_no_state_component(config):
    """Visitors are found by their session, not by a gr.State the browser round-trips."""
    assert all(c.get("type") != "state" for c in config["components"])


def test_launch_arguments():
    assert LAUNCH_KWARGS["share"] is False and LAUNCH_KWARGS["run_history"] is False
    assert LAUNCH_KWARGS["css_paths"] == [STYLE] and STYLE.is_file()


def test_sliders_follow_the_start_up_model(tiny_cfg, make_ctx):
    demo = build_demo(context=make_ctx(), preload=False)  # a 2-block, 4-head model
    sliders = {c["props"]["elem_id"]: c["props"] for c in demo.get_config_file()["components"]
               if c["props"].get("elem_id") in ("layer-slider", "head-slider", "stepn-count")}
    assert sliders["layer-slider"]["maximum"] == tiny_cfg.n_layers - 1
    assert sliders["head-slider"]["maximum"] == tiny_cfg.n_heads - 1
    assert sliders["stepn-count"]["maximum"] == Settings().max_steps_per_click
    assert demo.gptviz.default_spec.cfg == tiny_cfg
