"""RWKV-6 and RWKV-7 models that load official checkpoints."""

from .common import RWKVState
from .config import RWKVConfig, infer_config
from .init import create_model
from .load import load_model
from .rwkv import RWKV

__all__ = ["RWKV", "RWKVConfig", "RWKVState", "create_model", "infer_config", "load_model"]
