"""Entry point of one rank for tests.helpers.harness.run_ranks: `python -m tests.helpers.dist_worker module:fn out.pt kwargs`."""

import importlib
import json
import sys

import torch


def main() -> None:
    target, out_path, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    module_name, fn_name = target.split(":")
    result = getattr(importlib.import_module(module_name), fn_name)(**kwargs)
    torch.save(result, out_path)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
