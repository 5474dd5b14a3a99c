"""gptviz: see how a GPT works from the inside."""

from .config import PRESETS, GPTConfig
from .files.weights import load_pretrained
from .generation.session import GenerationSession, generate_greedy
from .kv_cache import KVCache
from .model import GPTModel
from .params import count_params, param_breakdown
from .settings import select_device
from .tokenizer import encode, get_encoding
from .trace import Trace

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
