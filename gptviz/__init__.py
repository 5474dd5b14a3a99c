"""gptviz: see how a GPT works from the inside."""

from .config import PRESETS, GPTConfig
from .model import GPTModel, KVCache, Trace, select_device
from .tokenizer import encode, get_encoding

__all__ = ["GPTConfig", "PRESETS", "GPTModel", "KVCache", "Trace", "select_device", "get_encoding", "encode"]
__version__ = "0.1.0"
