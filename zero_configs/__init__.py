"""DeepSpeed ZeRO configs shipped with the engine (JSON files, found by name: engine/backends/zero_configs.py)."""
