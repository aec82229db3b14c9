#!/usr/bin/env bash
# Builds the optional peer engines of `kvc bench` under PEERS_DIR (each step is skipped when its result exists):
#   venv/                      a separate venv: onnxruntime-genai needs plain onnxruntime (kvc may have -gpu)
#   llama.cpp-src/, -build/    llama.cpp from the source that PyPI's llama-cpp-python sdist vendors; llama-bench and
#                              llama-batched-bench built with cmake (no git clone needed)
#   models/hf-PRESET/          kvc's seeded preset written as a Hugging Face checkpoint (benchmarks/peers/checkpoint.py)
#   models/ortgenai-PRESET/    ORT-GenAI's model builder, fp32, CPU
#   models/PRESET-f32.gguf     llama.cpp's convert_hf_to_gguf.py, --outtype f32
# Usage:  PEERS_DIR=~/kvc-peers bash benchmarks/peers/setup.sh      (KVC_PYTHON: kvc's interpreter, default python3;
#         PRESET: default llama-100m; JOBS: build jobs, default 2). On 2 cores the llama.cpp build takes 10-25 min.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
P=${PEERS_DIR:?set PEERS_DIR to a folder for the peers (venv, llama.cpp build, models)}
KVC_PYTHON=${KVC_PYTHON:-python3}
PRESET=${PRESET:-llama-100m}
JOBS=${JOBS:-2}
ORTGENAI_VERSION=${ORTGENAI_VERSION:-0.18.0}
LLAMA_CPP_PYTHON_VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
mkdir -p "$P/models" "$P/dl"
cd "$P"

# 1. The peers' venv. It sees kvc's site-packages through a .pth file (torch, transformers and onnx_ir for the
#    ORT-GenAI builder and the GGUF converter are not downloaded twice); .pth paths come after the venv's own, so its
#    onnxruntime shadows kvc's. (`venv --system-site-packages` would see the base interpreter's packages, not those
#    of a venv KVC_PYTHON belongs to.)
if [ ! -x venv/bin/python ]; then
  "$KVC_PYTHON" -m venv venv
fi
KVC_SITE=$("$KVC_PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
PEERS_SITE=$(venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
echo "$KVC_SITE" > "$PEERS_SITE/kvc-site-packages.pth"
venv/bin/python -c "import onnxruntime_genai" 2>/dev/null || \
  venv/bin/pip install -q "onnxruntime-genai==$ORTGENAI_VERSION" onnxruntime
venv/bin/python -c "import gguf, sentencepiece" 2>/dev/null || venv/bin/pip install -q gguf sentencepiece

# 2. llama.cpp source: the sdist of llama-cpp-python vendors a llama.cpp checkout.
if [ ! -d llama.cpp-src ]; then
  venv/bin/pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d dl
  tar xzf "dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz" -C dl
  cp -r "dl/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" llama.cpp-src
fi
if [ ! -x llama.cpp-build/bin/llama-bench ] || [ ! -x llama.cpp-build/bin/llama-batched-bench ]; then
  GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)
  cmake -S llama.cpp-src -B llama.cpp-build "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON
  cmake --build llama.cpp-build --target llama-bench llama-batched-bench -j "$JOBS"
fi

# 3. The same weights for every engine.
HF="models/hf-$PRESET"
[ -f "$HF/model.safetensors" ] || "$KVC_PYTHON" "$HERE/checkpoint.py" "$HF" --preset "$PRESET"
if [ ! -f "models/ortgenai-$PRESET/genai_config.json" ]; then
  venv/bin/python -m onnxruntime_genai.models.builder -i "$HF" -o "models/ortgenai-$PRESET" -p fp32 -e cpu \
    -c "dl/ortgenai-cache"
fi
if [ ! -f "models/$PRESET-f32.gguf" ]; then
  PYTHONPATH="llama.cpp-src/gguf-py" venv/bin/python llama.cpp-src/convert_hf_to_gguf.py "$HF" \
    --outtype f32 --outfile "models/$PRESET-f32.gguf"
fi
echo "peers ready in $P"
