"""Backends that own the model, optimizer and checkpoints (single process, DeepSpeed)."""
