// CPU kernels of quantize_4bit / dequantize_4bit: blocks in parallel, each
// block a branch-free loop the compiler vectorises. The per-element rules
// come from common/quant_math.h, shared with the CUDA kernels.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/cpu_utils.h"
#include "cpu/dequant_range.h"
#include "cpu/isa_kernels.h"
#include "ops/checks.h"
#include "ops/code_tables.h"

namespace qlora::cpu {
namespace {

using detail::FourBitTables;

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
  const IsaKernels& k = isa_kernels();
  FirstBadBlock bad;
  at::parallel_for(0, blocks, grain_in_blocks(blocksize), [&](int64_t begin, int64_t end) {
    std::vector<float> x(blocksize);
    std::vector<uint8_t> codes(blocksize);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      to_float(in + start, len, x.data());
      const bool partial = len < blocksize;
      const uint32_t bits = k.max_abs_bits(x.data(), len);
      if (bits >= detail::kNonFiniteBits) {
        bad.report(b);
        continue;
      }
      const float amax = detail::bits_float(bits);
      // bitsandbytes stores the clamped absmax only for the partial block.
      absmax[b] = partial ? std::max(amax, detail::kMinAbsmax) : amax;
      if (!partial) {  // full blocks are multiples of 32
        k.encode_pack(x.data(), len, detail::reciprocal_scale(amax), t, packed + start / 2);
      } else {
        encode_block(x.data(), len, amax, partial, t, codes.data());
        pack_block(codes.data(), len, pad_code, packed + start / 2);
      }
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
  at::Tensor absmax =
      at::empty({detail::ceil_div(n, blocksize)}, input.options().dtype(at::kFloat));
  dispatch_float_types(input.scalar_type(), "quantize_4bit", [&](auto tag) {
    using scalar_t = decltype(tag);
    quantize_4bit_impl<scalar_t>(input.const_data_ptr<scalar_t>(), n, blocksize, tables,
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
void dequantize_4bit_impl(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize,
                          const FourBitTables& t, T* out) {
  const int64_t blocks = detail::ceil_div(n, blocksize);
  const IsaKernels& k = isa_kernels();
  at::parallel_for(0, blocks, grain_in_blocks(blocksize), [&](int64_t begin, int64_t end) {
    const int64_t first = begin * blocksize;
    dequantize_range<T, T>(packed, absmax, blocksize, t, first, std::min(n, end * blocksize),
                           out + first, k);
  });
}

// Writes dequant(A) into out (contiguous, shape and dtype already checked).
void dequantize_4bit_into(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                          std::string_view quant_type, int64_t n, at::Tensor& out) {
  TORCH_CHECK(A.device().is_cpu(), "qlora::dequantize_4bit (CPU kernel): A must be on CPU");
  const auto& tables = detail::host_tables(detail::parse_quant_type("dequantize_4bit", quant_type));
  const at::Tensor bytes = A.contiguous().view(at::kByte);
  const at::Tensor scales = absmax.contiguous();
  dispatch_float_types(out.scalar_type(), "dequantize_4bit", [&](auto tag) {
    using scalar_t = decltype(tag);
    dequantize_4bit_impl<scalar_t>(bytes.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(),
                                   n, blocksize, tables, out.mutable_data_ptr<scalar_t>());
  });
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                               std::string_view quant_type, c10::SymIntArrayRef shape,
                               at::ScalarType dtype) {
  const int64_t n =
      detail::check_dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype).expect_int();
  at::Tensor out = at::empty(C10_AS_INTARRAYREF_SLOW(shape), A.options().dtype(dtype));
  advise_huge_pages(out.data_ptr(), out.nbytes());
  dequantize_4bit_into(A, absmax, blocksize, quant_type, n, out);
  return out;
}

void dequantize_4bit_out_cpu(const at::Tensor& A, const at::Tensor& absmax, int64_t blocksize,
                             std::string_view quant_type, c10::SymIntArrayRef shape,
                             at::ScalarType dtype, at::Tensor& out) {
  const int64_t n =
      detail::check_dequantize_4bit_out(A, absmax, blocksize, quant_type, shape, dtype, out)
          .expect_int();
  dequantize_4bit_into(A, absmax, blocksize, quant_type, n, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
  m.impl("dequantize_4bit.out", &dequantize_4bit_out_cpu);
}

}  // namespace qlora::cpu
