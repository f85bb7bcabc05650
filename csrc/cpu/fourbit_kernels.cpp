// CPU kernels of quantize_4bit / dequantize_4bit: blocks in parallel, each
// block a branch-free loop the compiler vectorises. The per-element rules
// come from common/quant_math.h, shared with the CUDA kernels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common/tables.h"
#include "../ops/checks.h"
#include "cpu_utils.h"

namespace qlora::cpu {
namespace {

using detail::FourBitTables;

uint32_t max_abs_bits(const float* x, int64_t n) {
  uint32_t m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, detail::abs_bits(x[i]));
  return m;
}

// Normalises and encodes one block of n elements into one code per byte.
void encode_block(const float* x, int64_t n, float absmax, bool partial, const FourBitTables& t,
                  uint8_t* codes) {
  if (partial) {
    for (int64_t i = 0; i < n; ++i)
      codes[i] = detail::encode_4bit(detail::normalise_partial(x[i], absmax), t);
  } else {
    const float inv = detail::reciprocal_scale(absmax);
    for (int64_t i = 0; i < n; ++i)
      codes[i] = detail::encode_4bit(detail::normalise_full(x[i], inv), t);
  }
}

// Packs codes of elements [0, n) of a block; an odd tail is paired with the
// code of 0.0, as bitsandbytes pads the last element.
void pack_block(const uint8_t* codes, int64_t n, uint8_t pad_code, uint8_t* out) {
  const int64_t pairs = n / 2;
  for (int64_t j = 0; j < pairs; ++j) out[j] = detail::pack_pair(codes[2 * j], codes[2 * j + 1]);
  if (n & 1) out[pairs] = detail::pack_pair(codes[n - 1], pad_code);
}

template <typename T>
void quantize_4bit_impl(const T* in, int64_t n, int64_t blocksize, const FourBitTables& t,
                        uint8_t* packed, float* absmax) {
  const int64_t blocks = detail::ceil_div(n, blocksize);
  const uint8_t pad_code = detail::encode_4bit(0.f, t);
  FirstBadBlock bad;
  at::parallel_for(0, blocks, grain_in_blocks(blocksize), [&](int64_t begin, int64_t end) {
    std::vector<float> x(blocksize);
    std::vector<uint8_t> codes(blocksize);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      to_float(in + start, len, x.data());
      const uint32_t bits = max_abs_bits(x.data(), len);
      if (bits >= detail::kNonFiniteBits) {
        bad.report(b);
        continue;
      }
      const float amax = detail::bits_float(bits);
      const bool partial = len < blocksize;
      // bitsandbytes stores the clamped absmax only for the partial block.
      absmax[b] = partial ? std::max(amax, detail::kMinAbsmax) : amax;
      encode_block(x.data(), len, amax, partial, t, codes.data());
      pack_block(codes.data(), len, pad_code, packed + start / 2);
    }
  });
  bad.raise_if_any("quantize_4bit", blocksize);
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& A, int64_t blocksize,
                                                     std::string_view quant_type,
                                                     at::ScalarType quant_storage) {
  detail::check_quantize_4bit(A, blocksize, quant_type, quant_storage);
  TORCH_CHECK(A.device().is_cpu(), "qlora::quantize_4bit (CPU kernel): A must be on CPU");
  const auto& tables = detail::host_tables(detail::parse_quant_type("quantize_4bit", quant_type));
  const at::Tensor input = A.contiguous();
  const int64_t n = input.numel();
  const int64_t nbytes = (n + 1) / 2;
  at::Tensor packed = at::empty({nbytes, 1}, input.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({detail::ceil_div(n, blocksize)}, input.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "quantize_4bit",
                                  [&] {
                                    quantize_4bit_impl<scalar_t>(
                                        input.const_data_ptr<scalar_t>(), n, blocksize, tables,
                                        packed.mutable_data_ptr<uint8_t>(),
                                        absmax.mutable_data_ptr<float>());
                                  });
  if (quant_storage != at::kByte) {
    const int64_t esize = static_cast<int64_t>(c10::elementSize(quant_storage));
    packed = packed.view({nbytes}).view(quant_storage).view({nbytes / esize, 1});
  }
  return {packed, absmax};
}

template <typename T>
void dequantize_4bit_impl(const uint8_t* packed, const float* absmax, int64_t n,
                          int64_t blocksize, const FourBitTables& t, T* out) {
  const int64_t blocks = detail::ceil_div(n, blocksize);
  at::parallel_for(0, blocks, grain_in_blocks(blocksize), [&](int64_t begin, int64_t end) {
    T lut[16];
    for (int64_t b = begin; b < end; ++b) {
      // Same float product, rounded once to T, as code[q] * absmax then .to(dtype).
      for (int k = 0; k < 16; ++k) lut[k] = round_to<T>(t.values[k] * absmax[b]);
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      const uint8_t* src = packed + start / 2;
      T* dst = out + start;
      const int64_t pairs = len / 2;
      for (int64_t j = 0; j < pairs; ++j) {
        const uint8_t byte = src[j];
        dst[2 * j] = lut[byte >> 4];
        dst[2 * j + 1] = lut[byte & 0x0F];
      }
      if (len & 1) dst[len - 1] = lut[src[pairs] >> 4];
    }
  });
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                               std::string_view quant_type, c10::SymIntArrayRef shape,
                               at::ScalarType dtype) {
  const int64_t n =
      detail::check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype).expect_int();
  TORCH_CHECK(A.device().is_cpu(), "qlora::dequantize_4bit (CPU kernel): A must be on CPU");
  const auto& tables =
      detail::host_tables(detail::parse_quant_type("dequantize_4bit", quant_type));
  const at::Tensor bytes = A.contiguous().view(at::kByte);
  const at::Tensor scales = absmax.contiguous();
  at::Tensor out = at::empty(C10_AS_INTARRAYREF_SLOW(shape), A.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_4bit", [&] {
    dequantize_4bit_impl<scalar_t>(bytes.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(),
                                   n, blocksize, tables, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
}

}  // namespace qlora::cpu
