"""Step-through greedy generation (CONTRACT STUB — to be implemented).

The public API below is a contract shared by the generation engine and the UI.
Implementations may add fields and helpers but must keep these names and meanings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tiktoken
import torch

from .model import GPTModel


@dataclass(frozen=True)
class Candidate:
    token_id: int
    piece: str  # display text of the token (gptviz.tokenizer.token_piece(...).text)
    prob: float  # softmax over the full vocabulary


@dataclass(frozen=True)
class LensEntry:
    layer: int  # 0 .. n_layers-1: after block `layer`
    token_id: int  # top-1 of out_head(final_norm(residual)) at the last position
    piece: str
    prob: float


@dataclass(frozen=True)
class StepRecord:
    token_id: int  # the chosen (greedy: argmax) token
    piece: str
    candidates: list[Candidate]  # top-k, highest first
    lens: list[LensEntry]  # one per layer; the last equals the model's own prediction
    cropped: bool  # the context was cropped to the last context_length tokens for this step
    context_len: int  # tokens the model saw for this step
    positions_computed: int  # positions run through the model (1 with a warm KV cache, T on a prefill)
    cache_tokens: int  # positions in the KV cache after the step
    cache_bytes: int  # bytes held by the KV cache after the step
    ms: float  # wall time of the step


class GenerationSession:
    """One visitor's generation state (no global mutable state).

    ``GenerationSession(model, enc, prompt)`` with ``prompt`` a str or a list of ids.
    """

    def __init__(
        self,
        model: GPTModel,
        enc: tiktoken.Encoding,
        prompt: str | list[int],
        *,
        top_k: int = 10,
        attn_window: int = 64,
    ) -> None:
        raise NotImplementedError

    # --- state
    prompt_ids: list[int]  # the prompt's ids
    steps: list[StepRecord]  # one per generated token, oldest first

    @property
    def ids(self) -> list[int]:  # prompt + generated ids (never cropped)
        raise NotImplementedError

    @property
    def text(self) -> str:
        raise NotImplementedError

    # --- actions
    def step(self, n: int = 1) -> list[StepRecord]:
        """Append n greedy tokens; returns their records."""
        raise NotImplementedError

    def iter_steps(self, n: int):
        """Like step(n) but yields each StepRecord as soon as it is produced (for streaming)."""
        raise NotImplementedError

    def undo(self) -> StepRecord:
        """Remove the last generated token; ValueError if only the prompt is left."""
        raise NotImplementedError

    def reset(self) -> None:
        """Back to the prompt."""
        raise NotImplementedError

    # --- observation
    def attention(self, layer: int, window: int | None = None) -> tuple[torch.Tensor, list[int]]:
        """Attention weights of `layer` over the last `window` tokens (default attn_window) of
        the current sequence: ``(n_heads, W, W)`` (row = query, column = key, causal) and the
        absolute positions of those W tokens."""
        raise NotImplementedError


def generate_greedy(model: GPTModel, idx: torch.Tensor, max_new_tokens: int, context_size: int) -> torch.Tensor:
    """The source's ``generate_text_simple`` contract and output, computed with a KV cache."""
    raise NotImplementedError
