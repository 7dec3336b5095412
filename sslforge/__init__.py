"""sslforge: distributed self-supervised and contrastive pretraining."""

__version__ = "0.1.0"
