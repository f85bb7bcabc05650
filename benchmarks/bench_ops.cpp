// Google Benchmark of the 4-bit ops on LLaMA-sized weights, with a memcpy of
// the same output bytes measured in the same run as the bandwidth yardstick.
//   build/benchmarks/bench_ops --benchmark_counters_tabular=true
#include <ATen/Parallel.h>
#include <benchmark/benchmark.h>
#include <torch/torch.h>

#include <cstring>

#include "qlora/ops.h"

namespace {

constexpr int64_t kBlocksize = 64;

at::ScalarType dtype_of(int64_t code) { return code == 0 ? at::kFloat : at::kBFloat16; }

void set_labels(benchmark::State& state, int64_t rows, int64_t cols, at::ScalarType dtype) {
  state.SetLabel(std::to_string(rows) + "x" + std::to_string(cols) + " " +
                 (dtype == at::kFloat ? "fp32" : "bf16"));
}

// Copy of rows*cols elements of dtype: the bytes dequantize writes.
void BM_Memcpy(benchmark::State& state) {
  const auto dtype = dtype_of(state.range(2));
  const at::Tensor src = torch::ones({state.range(0), state.range(1)}, dtype);
  at::Tensor dst = torch::empty_like(src);
  for (auto _ : state) {
    dst.copy_(src);
    benchmark::DoNotOptimize(dst.data_ptr());
  }
  state.SetBytesProcessed(state.iterations() * src.nbytes());
  set_labels(state, state.range(0), state.range(1), dtype);
}

void BM_Quantize4bit(benchmark::State& state) {
  const auto dtype = dtype_of(state.range(2));
  const at::Tensor w = (torch::randn({state.range(0), state.range(1)}) * 0.02).to(dtype);
  for (auto _ : state) benchmark::DoNotOptimize(qlora::quantize_4bit(w, kBlocksize, "nf4"));
  state.SetBytesProcessed(state.iterations() * w.nbytes());  // bytes read
  set_labels(state, state.range(0), state.range(1), dtype);
}

void BM_Dequantize4bit(benchmark::State& state) {
  const auto dtype = dtype_of(state.range(2));
  const at::Tensor w = torch::randn({state.range(0), state.range(1)}) * 0.02;
  auto [packed, absmax] = qlora::quantize_4bit(w, kBlocksize, "nf4");
  for (auto _ : state)
    benchmark::DoNotOptimize(
        qlora::dequantize_4bit(packed, absmax, kBlocksize, "nf4", w.sizes(), dtype));
  state.SetBytesProcessed(state.iterations() * w.numel() * c10::elementSize(dtype));  // written
  set_labels(state, state.range(0), state.range(1), dtype);
}

// Into a preallocated buffer: the kernel's bandwidth, comparable to memcpy.
void BM_Dequantize4bitInto(benchmark::State& state) {
  const auto dtype = dtype_of(state.range(2));
  const at::Tensor w = torch::randn({state.range(0), state.range(1)}) * 0.02;
  auto [packed, absmax] = qlora::quantize_4bit(w, kBlocksize, "nf4");
  at::Tensor out = torch::empty(w.sizes(), dtype);
  for (auto _ : state) {
    qlora::dequantize_4bit_out(out, packed, absmax, kBlocksize, "nf4", w.sizes(), dtype);
    benchmark::DoNotOptimize(out.data_ptr());
  }
  state.SetBytesProcessed(state.iterations() * out.nbytes());
  set_labels(state, state.range(0), state.range(1), dtype);
}

// range(3): rows of x (1 = the fused gemv path, 32 = dequantize + GEMM).
void BM_Matmul4bit(benchmark::State& state) {
  const auto dtype = dtype_of(state.range(2));
  const int64_t out = state.range(0), in = state.range(1), rows = state.range(3);
  const at::Tensor w = torch::randn({out, in}) * 0.02;
  auto [packed, absmax] = qlora::quantize_4bit(w, kBlocksize, "nf4");
  const at::Tensor x = torch::randn({rows, in}).to(dtype);
  at::NoGradGuard no_grad;
  for (auto _ : state)
    benchmark::DoNotOptimize(qlora::matmul_4bit(x, packed, absmax, kBlocksize, "nf4", {out, in}));
  state.SetBytesProcessed(state.iterations() * packed.nbytes());  // weight bytes streamed
  state.counters["rows"] = static_cast<double>(rows);
  set_labels(state, out, in, dtype);
}

void shapes(benchmark::internal::Benchmark* b) {
  for (int64_t dtype : {0, 1})
    for (auto [r, c] : {std::pair<int64_t, int64_t>{4096, 4096}, {4096, 11008}})
      b->Args({r, c, dtype});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

void matmul_shapes(benchmark::internal::Benchmark* b) {
  for (int64_t dtype : {0, 1})
    for (auto [r, c] : {std::pair<int64_t, int64_t>{4096, 4096}, {4096, 11008}})
      for (int64_t rows : {1, 32}) b->Args({r, c, dtype, rows});
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

BENCHMARK(BM_Memcpy)->Apply(shapes);
BENCHMARK(BM_Quantize4bit)->Apply(shapes);
BENCHMARK(BM_Dequantize4bit)->Apply(shapes);
BENCHMARK(BM_Dequantize4bitInto)->Apply(shapes);
BENCHMARK(BM_Matmul4bit)->Apply(matmul_shapes);

}  // namespace

BENCHMARK_MAIN();
