"""Data: tokenizers, training data sets (text, chat/SFT, binidx) and the binidx converter."""

from .binidx import BinIdx, BinIdxWriter, read_binidx
from .datasets import TrainingData, load_training_data

__all__ = ["BinIdx", "BinIdxWriter", "TrainingData", "load_training_data", "read_binidx"]
