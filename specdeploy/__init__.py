"""specdeploy: lossless speculative decoding, exported, built and served."""

__version__ = "0.1.0"
