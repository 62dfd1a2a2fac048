#!/usr/bin/env bash
# Mutation testing with cargo-mutants (not part of CI: many hours on a small machine). Each module
# group is mutated with only the test targets that exercise it. The build is the release profile
# (dependencies at opt-level 3: the tests run real forward/backward passes) with this crate at
# opt-level 1 without debug info and incremental: a mutant then rebuilds in ~6 s instead of ~12 s on
# 2 cores, and the group's tests still take about a second. cargo-mutants works in a scratch copy
# of the tree (the first build there compiles the dependencies once); the source tree is never
# modified.
#
#   tools/mutants.sh              # every group below, results under mutants-out/<group>/
#   tools/mutants.sh data peft    # only those groups
#   tools/mutants.sh --list       # count the mutants of every group without building anything
#
# docs/TESTING.md records the last results and why each surviving mutant is harmless.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-mutants >/dev/null 2>&1 || cargo install cargo-mutants --locked
export CARGO_PROFILE_RELEASE_INCREMENTAL=true
# The live PEFT check in train_parity needs the oracle venv tools/test.sh installs; without it that
# test skips and its mutants would count as missed.
peft_venv="${ZHLLAMA_ORACLE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/zhllama}/peft-oracle-$(sha256sum tools/oracle/peft_requirements.txt | cut -c1-16)"
if [ -z "${ZHLLAMA_PEFT_PYTHON:-}" ] && [ -x "$peft_venv/bin/python" ]; then
  export ZHLLAMA_PEFT_PYTHON="$peft_venv/bin/python"
fi

# group | files (-f, globs allowed) | test targets | more test targets for the second pass
#
# The first pass runs every mutant against the group's own targets. The second reruns only the
# mutants that survived it (`--iterate` skips those already caught or unviable) against those
# targets plus the wider ones: tests that reach the group's code through the CLI, other modules or
# Python oracles, too slow to pay for every mutant.
GROUPS_SPEC=(
  "peft|src/model/peft.rs|train_parity generate_cli peft_adapters hostile_adapter train_init_adapter|export_gguf hostile_cli"
  "model|src/model/config.rs src/model/generate.rs src/model/llama.rs src/model/llama/activations.rs src/model/llama/layer_backward.rs src/model/llama/layer_forward.rs src/model/lora.rs src/model/params.rs src/model/resize.rs src/model/weights.rs src/model/mod.rs|model_parity model_lora model_backward_hook model_checkpointing model_weights model_eval generate_model train_resize|generate_cli peft_adapters export_gguf hostile_run hostile_cli fuzz_parsers cli_backend train_parity train_cli train_loss_reduction train_transfer"
  "train|src/train/*.rs|train_parity train_config train_fp16 train_nonfinite train_world train_resume train_dryrun train_cli train_plot train_tensorboard|train_transfer train_loss_reduction train_init_adapter train_resize hostile_run hostile_cli fuzz_parsers"
  "zero|src/distributed/zero.rs|distributed_zero distributed_overlap distributed_device_zero train_world train_fp16|train_resume train_parity train_transfer hostile_run"
  "data|src/data/*.rs|data_sft data_pretrain data_shard data_malformed data_oracle|data_prep train_cli hostile_cli fuzz_parsers"
)

list=0
want=()
for a in "$@"; do
  if [ "$a" = "--list" ]; then list=1; else want+=("$a"); fi
done

for spec in "${GROUPS_SPEC[@]}"; do
  IFS='|' read -r name files tests wide <<<"$spec"
  if [ "${#want[@]}" -gt 0 ] && [[ " ${want[*]} " != *" $name "* ]]; then continue; fi
  fargs=()
  for f in $files; do fargs+=(-f "$f"); done
  if [ "$list" = 1 ]; then
    echo "$name: $(cargo mutants --list "${fargs[@]}" | wc -l) mutants"
    continue
  fi
  # --cargo-arg reaches both the build and the test run, so only these targets are built per mutant.
  targs=(--cargo-arg=--lib
    --cargo-arg=--config=profile.release.package.zhllama.opt-level=1
    --cargo-arg=--config=profile.release.package.zhllama.debug=0)
  for t in $tests; do targs+=("--cargo-arg=--test=$t"); done
  # cargo-mutants exits non-zero when mutants survive; keep going so every group reports.
  nice -n 15 cargo mutants --profile release --output "mutants-out/$name" \
    "${fargs[@]}" "${targs[@]}" || echo "mutants: group $name, first pass exited $? (survivors or timeouts)"
  rm -rf "mutants-out/$name/first-pass"
  cp -r "mutants-out/$name/mutants.out" "mutants-out/$name/first-pass"
  for t in $wide; do targs+=("--cargo-arg=--test=$t"); done
  nice -n 15 cargo mutants --iterate --profile release --output "mutants-out/$name" \
    "${fargs[@]}" "${targs[@]}" || echo "mutants: group $name, second pass exited $? (see mutants-out/$name/mutants.out)"
done
