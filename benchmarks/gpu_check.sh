#!/usr/bin/env bash
# GPU check of the engine (about 10 minutes on one GPU, compiles included; no downloads): the loss checks on CUDA in fp32 and
# bf16, a tiny `tune` in one process on CUDA, training throughput (images/s per device, MFU) and peak GPU memory
# of the OpenCLIP step vs the TuneCLIP step (HGCL + u table) with bf16 autocast, eager and run.compile=blocks,
# for ViT-B-16 and ViT-L-14 (ViT-H-14 eager where memory allows), an FSDP2 bf16 tune under torchrun with
# background checkpoints (its last checkpoint exported equals its final weights), and a 2-process NCCL run
# when more than one GPU is present. Prints one table; exits non-zero on any failure.
#
#   benchmarks/gpu_check.sh --build-wheels   # here, with a package index: wheels into .whl/ (about 10 MB)
#   benchmarks/gpu_check.sh                  # on the GPU machine, from the repository root; installs .whl/*.whl
#   benchmarks/gpu_check.sh --cpu-dry-run    # the same pieces on the CPU at tiny sizes (a minute or two)
#
# The GPU machine has torch, torchvision, timm, safetensors, numpy, pillow, tqdm, pyyaml but not
# open_clip_torch, webdataset or deepspeed: those and their missing dependencies travel as wheels in
# .whl/ and are installed with `pip install --no-index --no-deps` into a private folder.
set -u
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
PY=${PYTHON:-python3}
mode=gpu
case "${1:-}" in
  --build-wheels) mode=wheels ;;
  --cpu-dry-run) mode=cpu ;;
  "") ;;
  *) echo "usage: $0 [--build-wheels | --cpu-dry-run]" >&2; exit 2 ;;
esac

if [ "$mode" = wheels ]; then
  set -e
  mkdir -p "$WHEELS"
  # Pure-python packages (deepspeed is an sdist: built here without its ops, which it JIT-builds there).
  DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps -w "$WHEELS" open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.7.0 \
    webdataset==1.0.2 braceexpand==0.1.7 deepspeed==0.19.8 hjson==3.1.0 pydantic==2.13.4 annotated-types==0.7.0 \
    typing-inspection==0.4.2
  # pydantic's compiled core for the GPU machine's python 3.12, at the version pydantic 2.13.4 pins.
  core=$(unzip -p "$WHEELS"/pydantic-2.13.4-*.whl '*/METADATA' | sed -n 's/^Requires-Dist: pydantic-core==\([0-9.]*\).*/\1/p')
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" "pydantic-core==$core"
  ls -la "$WHEELS"; du -sh "$WHEELS"
  exit 0
fi

if [ "$mode" = gpu ]; then
  device=cuda; tiny=""
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_check_site \
      "$WHEELS"/*.whl || { echo "error: installing the wheels in $WHEELS failed" >&2; exit 1; }
    export PYTHONPATH=/tmp/gpu_check_site:$PWD${PYTHONPATH:+:$PYTHONPATH}
  else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
  ngpu=$($PY -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -4
else
  device=cpu; tiny="--tiny"; ngpu=0
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
export PYTHONUNBUFFERED=1

results=$(mktemp)
trap 'rm -f "$results"' EXIT
for check in losses tune throughput; do
  echo "--- $check ($device)"
  log=$(mktemp)
  $PY benchmarks/tools/gpu_check.py "$check" --device "$device" $tiny >"$log" 2>&1
  line=$(grep '^GPU_CHECK ' "$log" | tail -1 | sed 's/^GPU_CHECK //')
  if [ -z "$line" ]; then
    line="{\"check\": \"$check\", \"ok\": false, \"failed\": [\"no result: the process died (log above)\"]}"
  fi
  case "$line" in *'"ok": false'*) tail -40 "$log" ;; esac
  echo "$line" >> "$results"
  rm -f "$log"
done

# FSDP2 in one process under torchrun: bf16, background checkpoints (DCP async_save stages the device's shards
# in host memory), then the last checkpoint exported in one process must equal final.safetensors bit for bit.
echo "--- FSDP2 tune with background checkpoints ($device)"
tmp=$(mktemp -d)
name="FSDP2 bf16 tune, async checkpoints ($device)"
$PY -c "import sys; sys.path.insert(0, '.'); from benchmarks.tools.gpu_check import _shards; from pathlib import Path; _shards(Path('$tmp'), 32)"
if $PY -m torch.distributed.run --nproc_per_node 1 --master_port 29519 run.py tune --train "$tmp/shards" \
    --out "$tmp/run" --batch-size 8 --epochs 1 --osr-epochs 1 --lr 1e-3 --save-every 2 --set run.backend=fsdp \
    --set run.async_checkpoint=true --set run.progress=false --set eval.at_start=false \
    --set model.precision=bf16 --set run.device=$device >"$tmp/log" 2>&1 \
    && last=$(ls -d "$tmp"/run/checkpoints/step_* | sort | tail -1) \
    && $PY run.py export --model tiny-vit --weights "$last" --out "$tmp/last.safetensors" >>"$tmp/log" 2>&1 \
    && $PY -c "
import sys, torch
from safetensors.torch import load_file
a, b = load_file('$tmp/run/final.safetensors'), load_file('$tmp/last.safetensors')
sys.exit(0 if a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a) else 1)" >>"$tmp/log" 2>&1; then
  echo "{\"check\": \"$name\", \"ok\": true, \"failed\": [], \"detail\": \"last checkpoint == final weights\"}" >> "$results"
else
  tail -30 "$tmp/log" >&2
  echo "{\"check\": \"$name\", \"ok\": false, \"failed\": [\"see the log above\"]}" >> "$results"
fi
rm -rf "$tmp"

if [ "$ngpu" -gt 1 ]; then
  echo "--- 2-process NCCL run ($ngpu GPUs)"
  tmp=$(mktemp -d)
  $PY -c "import sys; sys.path.insert(0, '.'); from benchmarks.tools.gpu_check import _shards; from pathlib import Path; _shards(Path('$tmp'), 32)"
  if $PY -m torch.distributed.run --nproc_per_node 2 --master_port 29517 run.py tune --train "$tmp/shards" \
      --out "$tmp/run" --batch-size 8 --epochs 1 --osr-epochs 1 --lr 1e-3 --set run.backend=deepspeed \
      --set run.progress=false --set eval.at_start=false --set model.precision=bf16 \
      --set run.zero_config=zero_configs/zero2_bf16.json >"$tmp/log" 2>&1 \
      && grep -q '"backend": "nccl"\|nccl' "$tmp/log" && [ -f "$tmp/run/final.safetensors" ]; then
    echo '{"check": "2-process NCCL tune (deepspeed ZeRO-2 bf16)", "ok": true, "failed": []}' >> "$results"
  else
    tail -30 "$tmp/log" >&2
    echo '{"check": "2-process NCCL tune (deepspeed ZeRO-2 bf16)", "ok": false, "failed": ["see the log above"]}' >> "$results"
  fi
  rm -rf "$tmp"
elif [ "$mode" = gpu ]; then
  echo '{"check": "2-process NCCL run", "ok": true, "failed": [], "detail": "skipped: one GPU"}' >> "$results"
fi

$PY - "$results" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print(f"\n{'check':<48} {'result':<6} detail")
print("-" * 100)
for r in rows:
    print(f"{r['check'][:48]:<48} {'ok' if r['ok'] else 'FAIL':<6} {r.get('detail', '')}")
    for f in r.get("failed", []):
        print(f"{'':<55} {f}")
    for s in r.get("rows", []):
        mfu = f"MFU {100 * s['mfu']:.1f} %" if s.get("mfu") else "MFU -"
        print(f"{'':<6} {s.get('model', ''):<9} compile={s.get('compile', 'none'):<7} {s['step']:<20} "
              f"{s['images_per_s']:>9.1f} images/s/device  {mfu:<11} peak GPU memory {s['peak_gpu_gb']:.2f} GB")
bad = [r["check"] for r in rows if not r["ok"]]
print(f"\ngpu_check: {len(rows) - len(bad)}/{len(rows)} checks passed" + (f"; FAILED: {', '.join(bad)}" if bad else ""))
sys.exit(1 if bad or len(rows) < 3 else 0)
EOF
