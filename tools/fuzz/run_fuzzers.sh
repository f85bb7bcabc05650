#!/usr/bin/env bash
# Runs every libFuzzer program of a QLORA_FUZZ build (make fuzz) on the seed
# corpus and prints one Markdown table row per target (docs/ROBUSTNESS.md):
# executions, exec/s, edges covered, findings. Crashers land in
# BUILD/fuzz-artifacts/<target>/; a fixed one belongs in
# tests/fuzz/regressions/<target>/ so the ctest replay guards it.
#   run_fuzzers.sh BUILD [target ...]
# Environment: FUZZ_SECONDS (per target, default 60), FUZZ_RUNS (stop after
# this many executions instead, 0 = no limit), FUZZ_JOBS (targets at once,
# default 2).
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${1:?usage: run_fuzzers.sh BUILD [target ...]}
shift
SECONDS_PER_TARGET=${FUZZ_SECONDS:-60}
RUNS=${FUZZ_RUNS:-0}
JOBS=${FUZZ_JOBS:-2}
targets=("$@")
if ((${#targets[@]} == 0)); then
  for f in tests/fuzz/targets/*.cpp; do targets+=("$(basename "$f" .cpp)"); done
fi

SEEDS=$BUILD/fuzz-corpus
.venv/bin/python tools/fuzz/make_seed_corpus.py "$SEEDS" --seeds-tool "$BUILD/tests/fuzz/qlora_fuzz_seeds" >/dev/null

run_one() {
  # Separate statements: `local` expands all its words before assigning any.
  local t=$1
  local work=$BUILD/fuzz-work/$t art=$BUILD/fuzz-artifacts/$t log=$BUILD/fuzz-logs/$t.log
  mkdir -p "$work" "$art" "$(dirname "$log")"
  local dict=()
  [[ -f tests/fuzz/dict/$t.dict ]] && dict=(-dict="tests/fuzz/dict/$t.dict")
  # libFuzzer refuses a corpus folder that does not exist (no regressions yet).
  local dirs=("$work" "$SEEDS/$t")
  [[ -d tests/fuzz/regressions/$t ]] && dirs+=("tests/fuzz/regressions/$t")
  # A private scratch folder per run; the corpus grows in fuzz-work/ across runs.
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
  LSAN_OPTIONS=suppressions=$PWD/tests/fuzz/lsan.supp \
    "$BUILD/tests/fuzz/qlora_fuzz_$t" "${dirs[@]}" "${dict[@]}" \
      -max_total_time="$SECONDS_PER_TARGET" -runs="$([[ $RUNS -gt 0 ]] && echo "$RUNS" || echo -1)" \
      -rss_limit_mb=2048 -malloc_limit_mb=1024 -timeout=10 -print_final_stats=1 \
      -artifact_prefix="$art/" >"$log" 2>&1 || true
}
export -f run_one
export BUILD SEEDS SECONDS_PER_TARGET RUNS
printf '%s\n' "${targets[@]}" | xargs -P "$JOBS" -I{} bash -c 'run_one {}'

# libFuzzer pads the final stats with spaces ("stat::average_exec_per_sec:     3772").
stat() { grep -o "stat::$2: *[0-9]*" "$1" | awk '{print $2}' | tail -1; }
echo "| target | executions | exec/s | edges | corpus | peak RSS (MB) | findings |"
echo "|---|---:|---:|---:|---:|---:|---|"
for t in "${targets[@]}"; do
  log=$BUILD/fuzz-logs/$t.log
  execs=$(stat "$log" number_of_executed_units)
  rate=$(stat "$log" average_exec_per_sec)
  rss=$(stat "$log" peak_rss_mb)
  edges=$(grep -o 'cov: [0-9]*' "$log" | awk '{print $2}' | tail -1)
  corpus=$(grep -o 'corp: [0-9]*' "$log" | awk '{print $2}' | tail -1)
  found=$(find "$BUILD/fuzz-artifacts/$t" -type f | wc -l)
  echo "| $t | ${execs:-?} | ${rate:-?} | ${edges:-?} | ${corpus:-?} | ${rss:-?} | $found |"
done
