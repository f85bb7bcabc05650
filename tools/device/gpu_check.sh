#!/usr/bin/env bash
# The one-shot GPU check (issue 13), run on a lent GPU machine from the repo
# root, after tools/device/prepare.sh on the CPU machine (carry .device-deps):
#   configure + build with QLORA_CUDA=ON for this GPU's architecture, the
#   CUDA-labelled ctest tests (CUDA kernels = CPU kernels bit for bit, opcheck
#   of every op on CUDA, a 20-step fine-tune on CUDA against the CPU run,
#   checkpoints across devices, NCCL), then benchmarks/bench_gpu.py.
# Logs and a summary go to $OUT (or ./gpu-check-out).
#   bash tools/device/gpu_check.sh [--dry-run]   # --dry-run: configure only (any machine)
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)

DRY_RUN=0
[[ ${1:-} == --dry-run ]] && DRY_RUN=1
OUT=${OUT:-$REPO/gpu-check-out}
mkdir -p "$OUT"
LOG=$OUT/check.log
: >"$LOG"
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
say() { echo "[gpu_check $(date +%T)] $*" | tee -a "$LOG" "$SUMMARY"; }
phase_start=$SECONDS
phase() { say "$1 done in $((SECONDS - phase_start)) s"; phase_start=$SECONDS; }

PY=${QLORA_GPU_PYTHON:-$(command -v python3)}
BUILD=${QLORA_GPU_BUILD:-$REPO/build-gpu}
JOBS=${JOBS:-$(nproc)}

# ---- the header libraries, unpacked into a prefix (never into /) ----
PREFIX=$REPO/.device-deps/prefix
if [[ ! -d $PREFIX/usr ]]; then
  if ! compgen -G "$REPO/.device-deps/debs/*.deb" >/dev/null; then
    say "FAIL: no .device-deps/debs: run tools/device/prepare.sh on the CPU machine and carry .device-deps"
    exit 2
  fi
  mkdir -p "$PREFIX"
  for d in "$REPO"/.device-deps/debs/*.deb; do
    if command -v dpkg-deb >/dev/null; then
      dpkg-deb -x "$d" "$PREFIX"
    else  # a .deb is an ar archive around data.tar.*
      member=$(ar t "$d" | grep '^data\.tar')
      ar p "$d" "$member" | tar -x -C "$PREFIX" $([[ $member == *.xz ]] && echo -J) \
        $([[ $member == *.zst ]] && echo --zstd)
    fi
  done
fi
MULTIARCH=$PREFIX/usr/lib/x86_64-linux-gnu
export LD_LIBRARY_PATH=$MULTIARCH${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}

{
  echo "host: $(uname -a)"
  nvidia-smi 2>&1 | head -20 || echo "nvidia-smi: not found"
  "$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count())'
} >>"$LOG" 2>&1

ARCH=${QLORA_CUDA_ARCH:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability(0)) if torch.cuda.is_available() else print("9.0")' 2>/dev/null || echo 9.0)}
say "python $PY, CUDA arch $ARCH, $JOBS jobs, build in $BUILD"

# ---- configure: our dependencies from the prefix first ----
cmake -S "$REPO" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DQLORA_CUDA=ON \
  -DQLORA_PYTHON="$PY" -DQLORA_BUILD_BENCHMARKS=OFF -DTORCH_CUDA_ARCH_LIST="$ARCH" \
  -DCMAKE_PREFIX_PATH="$PREFIX/usr;$MULTIARCH/cmake" >>"$LOG" 2>&1
rc=$?
if ((rc != 0)); then
  say "FAIL: configure (exit $rc); see check.log"
  tail -30 "$LOG"
  exit 1
fi
for dep in nlohmann_json_DIR yaml-cpp_DIR spdlog_DIR GTest_DIR CLI11_DIR QLORA_GLOO_INCLUDE_DIR QLORA_NCCL_INCLUDE_DIR QLORA_PCRE2_LIBRARY PCRE2_LINK_LIBRARIES; do
  v=$(grep -E "^$dep(:[A-Z]+)?=" "$BUILD/CMakeCache.txt" | head -1 | cut -d= -f2-)
  [[ -n $v ]] && say "  $dep = $v"
done
phase configure
if ((DRY_RUN)); then
  say "dry run: configured with CUDA on; stopping before the build"
  exit 0
fi

# ---- build what the CUDA tests and the benchmark run ----
cmake --build "$BUILD" -j "$JOBS" --target qlora_ops qlora qlora_cli qlora_cuda_tests gpu_train_step >>"$LOG" 2>&1
rc=$?
if ((rc != 0)); then
  say "FAIL: build (exit $rc)"
  grep -E "error|FAILED" "$LOG" | head -40 | tee -a "$SUMMARY"
  exit 1
fi
phase build

# ---- the CUDA-labelled tests ----
(cd "$BUILD" && ctest -L cuda --output-on-failure --timeout 400 -j 1) >"$OUT/ctest.log" 2>&1
rc=$?
grep -E "tests passed|tests failed|\*\*\*Failed|Not Run|Skipped|Total Test time" "$OUT/ctest.log" | tee -a "$SUMMARY"
((rc != 0)) && say "FAIL: CUDA tests (exit $rc); see ctest.log"
phase tests

# ---- the GPU benchmark: ours against transformers + PEFT ----
PYTHONUNBUFFERED=1 timeout 420 "$PY" "$REPO/benchmarks/bench_gpu.py" --ours "$BUILD/benchmarks/gpu_train_step" \
  --json "$OUT/bench_gpu.json" >"$OUT/bench.txt" 2>&1
brc=$?
cat "$OUT/bench.txt" | tee -a "$SUMMARY" >/dev/null
((brc != 0)) && say "FAIL: benchmark (exit $brc)"
phase benchmark
say "exit $((rc != 0 || brc != 0))"
exit $((rc != 0 || brc != 0))
