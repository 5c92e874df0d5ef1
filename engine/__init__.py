"""TuneCLIP-engine: self-supervised fine-tuning of open-weight CLIP models."""

__version__ = "0.1.0"
