#!/usr/bin/env bash
# llama.cpp itself on `zhllama export` files: logits vs zhllama's forward (f32, f16, q8_0), greedy
# 32 tokens vs `zhllama generate`, and llama.cpp's tokenizer vs ours on the shared Chinese corpus.
# Not part of tools/test.sh: llama-cpp-python builds llama.cpp from source (tens of minutes on two
# cores); the venv it builds (.venv/llamacpp-oracle) is reused by later runs.
# Needs ../shared/data (the LLaMA and Chinese tokenizers, zh_corpus). Usage: bash tools/oracle/llamacpp_check.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=../shared/data
[ -d "$SHARED/tokenizers" ] || { echo "llamacpp_check: $SHARED/tokenizers not found" >&2; exit 1; }
VENV=.venv/llamacpp-oracle
if ! "$VENV/bin/python" -c "import llama_cpp, numpy" 2>/dev/null; then
    python3 -m venv "$VENV"
    CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF -DLLAMA_CURL=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$VENV/bin/pip" install -r tools/oracle/llamacpp_requirements.txt
fi
cargo build --release --bin zhllama --bin merge-tokenizers --example export_check
R=target/release
W="$(mktemp -d)"
trap 'rm -rf "$W"' EXIT
# The Chinese-Alpaca tokenizer (49954 pieces with [PAD]) and a random GQA model of that vocabulary
# (init std 0.35: spread-out logits, so greedy choices are not near-ties).
$R/merge-tokenizers --llama-tokenizer-dir "$SHARED/tokenizers/llama_tokenizer.model" \
    --chinese-sp-model-file "$SHARED/tokenizers/chinese_sp.model" --output-dir "$W/tok" --add-pad >/dev/null
$R/examples/export_check make-model "$W/model" 49954 64 128 2 4 2 f32 7 0.35
for t in f32 f16 q8_0; do
    $R/zhllama export --model "$W/model" --tokenizer "$W/tok" --output "$W/m-$t.gguf" --outtype "$t" >/dev/null
done
IDS=1,29871,30919,40000,49953,2,13,100,31000,45678,5,42
$R/examples/export_check logits "$W/model" "$IDS" "$W/ref.f32"
PROMPT="今天天气很好，我们"
$R/examples/export_check greedy "$W/model" "$W/tok" "$PROMPT" 32 > "$W/greedy.json"
$R/zhllama generate --model "$W/model" --tokenizer "$W/tok" --template raw --temperature 0 \
    --repetition-penalty 1 --max-new-tokens 32 --prompt "$PROMPT" > "$W/generate.txt"
cat "$SHARED"/zh_corpus/*.txt > "$W/corpus.txt"
$R/zhllama tokenize --tokenizer "$W/tok" --input "$W/corpus.txt" --output "$W/ours.jsonl"
"$VENV/bin/python" tools/oracle/llamacpp_check.py \
    --gguf "f32=$W/m-f32.gguf" --gguf "f16=$W/m-f16.gguf" --gguf "q8_0=$W/m-q8_0.gguf" \
    --ids "$IDS" --ref-logits "$W/ref.f32" --greedy "$W/greedy.json" --generate-text "$W/generate.txt" \
    --vocab-gguf "$W/m-f32.gguf" --our-tokens "$W/ours.jsonl" --corpus "$W/corpus.txt"
