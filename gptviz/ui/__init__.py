"""The Gradio explorer: Tokenizer, Generate, Inside, Parameters and Model views.

``build_demo()`` makes the page for an :class:`~gptviz.ui.serving.AppContext` (the shared
models, the visitors, their turns on the model and the settings, read once from the
environment unless given); launch it with ``demo.launch(**LAUNCH_KWARGS)``.

One module per view (``tokenizer``, ``generate``, ``inside``, ``parameters``, ``model``), each
with its handlers — plain functions of plain values plus Gradio's request, so tests call them
without a browser — a ``build()`` that lays out its components and a ``wire()`` for its events.
``page`` puts the views in tabs and holds the few wirings between them; ``serving`` the
context; ``html`` the chips and the code view; ``inputs`` the checks of what visitors type.

Named endpoints (``api_name``, usable from ``gradio_client``; one session per client):
``tokenize``, ``detokenize``, ``step``, ``step_n``, ``undo``, ``reset``, ``candidates``,
``attention``, ``value_weighted``, ``view_step``, ``why``, ``lens_detail``, ``saliency``,
``head_roles``, ``shapes``, ``kv_cache``, ``ablate``, ``precision``, ``params``, ``preset``,
``load_model``, ``build_model``, ``upload_model``, ``export_report``, ``export_lesson``,
``open_lesson`` (the README lists their arguments).
"""

from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import Any, Iterator

import gradio as gr

from ..settings import Settings
from .page import launch_kwargs
from .serving import AppContext

__all__ = ["build_demo", "LAUNCH_KWARGS", "AppContext", "running_app"]

LAUNCH_KWARGS = launch_kwargs()


def build_demo(settings: Settings | None = None, *, context: AppContext | None = None,
               preload: bool = True) -> gr.Blocks:
    """The explorer's Blocks (queue configured), its context at ``demo.gptviz``. ``preload``
    starts building the start-up model in the background."""
    from .page import build_page

    ctx = context or AppContext(settings)
    if preload:
        ctx.preload()
    demo = build_page(ctx)
    demo.gptviz = ctx  # the running app's context, for tests and tools
    return demo


@contextmanager
def running_app(settings: Settings | None = None, **launch: Any) -> Iterator[gr.Blocks]:
    """The app on a free local port in this process (for tests, the screenshot maker and the
    load benchmark); yields the launched demo (``demo.local_url``, ``demo.gptviz``) and closes it."""
    demo = build_demo(settings)
    demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True,
                **{**LAUNCH_KWARGS, **launch})
    try:
        yield demo
    finally:
        demo.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
