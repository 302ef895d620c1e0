"""rwkv-peft: parameter-efficient fine-tuning of RWKV-7 and RWKV-6 language models."""

from .errors import RWKVPeftError
from .model import RWKV, RWKVConfig, RWKVState, create_model, infer_config
from .peft.load import load_model

__all__ = ["RWKV", "RWKVConfig", "RWKVPeftError", "RWKVState", "create_model", "infer_config", "load_model"]
__version__ = "0.1.0"
