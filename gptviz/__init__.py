"""gptviz: see how a GPT works from the inside."""

from .config import PRESETS, GPTConfig
from .generation import GenerationSession, generate_greedy
from .kv_cache import KVCache
from .model import GPTModel
from .settings import select_device
from .trace import Trace
from .params import count_params, param_breakdown
from .tokenizer import encode, get_encoding
from .weights import load_pretrained

__all__ = [
    "GPTConfig",
    "PRESETS",
    "GPTModel",
    "KVCache",
    "Trace",
    "select_device",
    "get_encoding",
    "encode",
    "GenerationSession",
    "generate_greedy",
    "count_params",
    "param_breakdown",
    "load_pretrained",
]
__version__ = "0.1.0"
