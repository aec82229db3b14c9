#!/usr/bin/env bash
# The GPU check, one command (sized for < 8 minutes on one H100: tests stop at 4 min, the benchmark at 4.5):
#   1. refuses at once, in one line, without an NVIDIA GPU, ONNX Runtime's CUDA EP or TVM's CUDA runtime;
#   2. runs the GPU-marked tests (pytest -m gpu: both CUDA engines vs the CPU ORT engine, fp32/fp16/int8/fp8
#      caches, fp16/int4 weights);
#   3. times decode on CUDA (ms/token at 512/8192/32768 tokens of context, llama-1b with bf16 weights,
#      % of HBM bandwidth), unless --no-bench;
#   4. writes everything to one JSON file (--out, default gpu_check.json).
# Exit status: 0 all passed; 1 a test or the benchmark failed (the JSON says which); 2 bad arguments;
# 3 no usable GPU.
#
# usage: benchmarks/gpu_check.sh [--out FILE] [--python PY] [--contexts N,N,...] [--engines ort[,tvm]]
#                                [--kv-dtype fp16|int8|...] [--no-bench] [--work-dir DIR]
set -uo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
out="gpu_check.json"
python="${PYTHON:-python3}"
[ -x "$repo/.venv/bin/python" ] && python="$repo/.venv/bin/python"
contexts="512,8192,32768"
engines="ort"
kv_dtype="fp16"
bench=1
work_dir=""

fail() { echo "gpu_check: $1" >&2; exit "${2:-2}"; }
need_value() { [ $# -ge 2 ] && [ -n "$2" ] || fail "$1 needs a value; see the usage at the top of $0"; }

while [ $# -gt 0 ]; do
  case "$1" in
    --out) need_value "$@"; out="$2"; shift 2 ;;
    --python) need_value "$@"; python="$2"; shift 2 ;;
    --contexts) need_value "$@"; contexts="$2"; shift 2 ;;
    --engines) need_value "$@"; engines="$2"; shift 2 ;;
    --kv-dtype) need_value "$@"; kv_dtype="$2"; shift 2 ;;
    --work-dir) need_value "$@"; work_dir="$2"; shift 2 ;;
    --no-bench) bench=0; shift ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) fail "unknown argument '$1'; see --help" ;;
  esac
done

out_dir="$(dirname "$out")"
[ -d "$out_dir" ] || fail "the directory of --out $out does not exist; create it or choose another"
command -v "$python" >/dev/null 2>&1 || [ -x "$python" ] || fail "python '$python' not found; pass --python"

cd "$repo"
"$python" benchmarks/gpu_check.py preflight || exit 3

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
[ -n "$work_dir" ] || work_dir="$scratch/work"
status=0

echo "gpu_check: GPU-marked tests" >&2
timeout 240 "$python" -m pytest -q -m gpu tests/ -p no:cacheprovider --junitxml "$scratch/tests.xml" || status=1

bench_args=()
if [ "$bench" = 1 ]; then
  echo "gpu_check: decode benchmark ($engines, $kv_dtype KV, contexts $contexts)" >&2
  timeout 270 "$python" benchmarks/gpu_check.py bench --out "$scratch/bench.json" --contexts "$contexts" \
      --engines "$engines" --kv-dtype "$kv_dtype" --work-dir "$work_dir" || status=1
  bench_args=(--bench "$scratch/bench.json")
fi

"$python" benchmarks/gpu_check.py report --out "$out" --tests "$scratch/tests.xml" "${bench_args[@]}" || exit 1
echo "gpu_check: wrote $out" >&2
exit "$status"
