#!/usr/bin/env bash
# The main job: export the real pretrained TinyStories model, compile it, generate text.
set -euo pipefail
cd "$(dirname "$0")/.."
CKPT=../shared/models/stories260K
OUT=build/quickstart
mkdir -p "$OUT"
kvc export "$CKPT/stories260K.bin" --tokenizer "$CKPT/tok512.bin" -o "$OUT/model.onnx" --overwrite
kvc compile "$OUT/model.onnx" -o "$OUT/stories260K.kvc" --max-seq-len 512 --overwrite
kvc run "$OUT/stories260K.kvc" --prompt "Once upon a time" --max-new-tokens 64 --stats
kvc plan llama-3.1-8b --context 8192 --kv-dtype int8 --memory 80GB --bandwidth 3.35TB/s
