#!/usr/bin/env bash
# GPU check (issue 10): one prepared run on a lent H100/H200. Work in progress: GPU detection only.
set -uo pipefail
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
die() { echo "gpu-check: $*" | tee -a "$OUT/summary.txt" >&2; exit 2; }
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >"$OUT/nvidia-smi.txt" 2>&1 || ! grep -q "^GPU " "$OUT/nvidia-smi.txt"; then
    die "no usable NVIDIA GPU (nvidia-smi missing or lists no GPU); this script runs on a lent GPU machine"
fi
die "not finished yet: only GPU detection is implemented"
