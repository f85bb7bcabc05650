#include "ops/code_tables.h"

#include <ATen/ops/from_blob.h>

#include <map>
#include <mutex>
#include <utility>

#include "common/codebooks.h"
#include "ops/checks.h"
#include "qlora/code_tables.h"

namespace qlora {

namespace detail {

namespace {
const FourBitTables kNF4 = {
    {QLORA_NF4_VALUES}, {QLORA_NF4_BOUNDS}, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}};
const FourBitTables kFP4 = {{QLORA_FP4_VALUES}, {QLORA_FP4_BOUNDS}, {QLORA_FP4_ORDER}};
}  // namespace

const FourBitTables& host_tables(QuantType type) { return type == QuantType::kNF4 ? kNF4 : kFP4; }

at::Tensor code_table_on(std::string_view quant_type, c10::Device device) {
  const QuantType type = parse_quant_type("code_table", quant_type);
  static std::mutex mutex;
  // Leaked on purpose: device tensors must not be freed after CUDA shuts down.
  static auto& cache = *new std::map<std::pair<int, std::string>, at::Tensor>();
  const auto key = std::make_pair(static_cast<int>(type), device.str());
  std::lock_guard<std::mutex> lock(mutex);
  auto it = cache.find(key);
  if (it == cache.end()) {
    auto values = const_cast<float*>(host_tables(type).values);
    at::Tensor t = at::from_blob(values, {16}, at::TensorOptions().dtype(at::kFloat)).to(device);
    it = cache.emplace(key, t.is_cpu() ? t.clone() : t).first;
  }
  return it->second;
}

}  // namespace detail

at::Tensor code_table_4bit(const std::string& quant_type) {
  return detail::code_table_on(quant_type, c10::Device(c10::kCPU)).clone();
}

at::Tensor dynamic_map(bool is_signed) {
  static const float kSigned[256] = {QLORA_DYNAMIC_SIGNED_VALUES};
  static const float kUnsigned[256] = {QLORA_DYNAMIC_UNSIGNED_VALUES};
  auto values = const_cast<float*>(is_signed ? kSigned : kUnsigned);
  return at::from_blob(values, {256}, at::TensorOptions().dtype(at::kFloat)).clone();
}

}  // namespace qlora
