// CPU kernels of the 8-bit blockwise quantizer (dynamic map): the exact
// nearest code by float32 midpoints, i.e. bitsandbytes' reference rule, not
// the 65,536-bin lookup-table approximation of its native CPU library.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <vector>

#include "common/quant_math.h"
#include "cpu/cpu_utils.h"
#include "cpu/nearest_code.h"
#include "ops/checks.h"

namespace qlora::cpu {
namespace {

// Decision boundaries of a sorted 256-entry code, computed as bitsandbytes
// does: (code[:-1] + code[1:]) / 2 in float32.
std::array<float, 255> boundaries_of(const at::Tensor& code) {
  const at::Tensor c = code.contiguous();
  const float* v = c.const_data_ptr<float>();
  std::array<float, 255> bounds{};
  for (int i = 0; i < 255; ++i) {
    TORCH_CHECK(v[i] <= v[i + 1],
                "qlora::quantize_blockwise: code must be sorted ascending, but code[", i,
                "] = ", v[i], " > code[", i + 1, "] = ", v[i + 1]);
    bounds[i] = (v[i] + v[i + 1]) / 2.0f;
  }
  return bounds;
}

template <typename T>
void quantize_blockwise_impl(const T* in, int64_t n, int64_t blocksize,
                             const NearestCodeTable& codes, uint8_t* out, float* absmax) {
  const int64_t blocks = detail::ceil_div(n, blocksize);
  FirstBadBlock bad;
  at::parallel_for(0, blocks, grain_in_blocks(blocksize), [&](int64_t begin, int64_t end) {
    std::vector<float> x(blocksize);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      to_float(in + start, len, x.data());
      uint32_t bits = 0;
      for (int64_t i = 0; i < len; ++i) bits = std::max(bits, detail::abs_bits(x[i]));
      if (bits >= detail::kNonFiniteBits) {
        bad.report(b);
        continue;
      }
      const float amax = detail::bits_float(bits);
      const bool partial = len < blocksize;
      absmax[b] = partial ? std::max(amax, detail::kMinAbsmax) : amax;
      uint8_t* dst = out + start;
      if (partial) {
        for (int64_t i = 0; i < len; ++i)
          dst[i] = codes.encode(detail::normalise_partial(x[i], amax));
      } else {
        const float inv = detail::reciprocal_scale(amax);
        for (int64_t i = 0; i < len; ++i) dst[i] = codes.encode(detail::normalise_full(x[i], inv));
      }
    }
  });
  bad.raise_if_any("quantize_blockwise", blocksize);
}

std::tuple<at::Tensor, at::Tensor> quantize_blockwise_cpu(const at::Tensor& A,
                                                          const at::Tensor& code,
                                                          int64_t blocksize) {
  detail::check_quantize_blockwise(A, code, blocksize);
  TORCH_CHECK(A.device().is_cpu(), "qlora::quantize_blockwise (CPU kernel): A must be on CPU");
  const auto codes = NearestCodeTable::for_bounds(boundaries_of(code));
  const at::Tensor input = A.contiguous();
  const int64_t n = input.numel();
  at::Tensor out = at::empty(input.sizes(), input.options().dtype(at::kByte));
  at::Tensor absmax =
      at::empty({detail::ceil_div(n, blocksize)}, input.options().dtype(at::kFloat));
  dispatch_float_types(input.scalar_type(), "quantize_blockwise", [&](auto tag) {
    using scalar_t = decltype(tag);
    quantize_blockwise_impl<scalar_t>(input.const_data_ptr<scalar_t>(), n, blocksize, *codes,
                                      out.mutable_data_ptr<uint8_t>(),
                                      absmax.mutable_data_ptr<float>());
  });
  return {out, absmax};
}

template <typename T>
void dequantize_blockwise_impl(const uint8_t* in, const float* absmax, const float* code, int64_t n,
                               int64_t blocksize, T* out) {
  const int64_t blocks = detail::ceil_div(n, blocksize);
  at::parallel_for(0, blocks, grain_in_blocks(blocksize), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * blocksize;
      const int64_t len = std::min(blocksize, n - start);
      const float scale = absmax[b];
      for (int64_t i = 0; i < len; ++i) out[start + i] = round_to<T>(code[in[start + i]] * scale);
    }
  });
}

void dequantize_blockwise_into(const at::Tensor& A, const at::Tensor& absmax,
                               const at::Tensor& code, int64_t blocksize, at::Tensor& out) {
  TORCH_CHECK(A.device().is_cpu(), "qlora::dequantize_blockwise (CPU kernel): A must be on CPU");
  const at::Tensor q = A.contiguous();
  const at::Tensor scales = absmax.contiguous();
  const at::Tensor table = code.contiguous();
  dispatch_float_types(out.scalar_type(), "dequantize_blockwise", [&](auto tag) {
    using scalar_t = decltype(tag);
    dequantize_blockwise_impl<scalar_t>(q.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(),
                                        table.const_data_ptr<float>(), q.numel(), blocksize,
                                        out.mutable_data_ptr<scalar_t>());
  });
}

at::Tensor dequantize_blockwise_cpu(const at::Tensor& A, const at::Tensor& absmax,
                                    const at::Tensor& code, int64_t blocksize,
                                    at::ScalarType dtype) {
  detail::check_dequantize_blockwise(A, absmax, code, blocksize, dtype);
  at::Tensor out = at::empty(A.sizes(), A.options().dtype(dtype));
  dequantize_blockwise_into(A, absmax, code, blocksize, out);
  return out;
}

void dequantize_blockwise_out_cpu(const at::Tensor& A, const at::Tensor& absmax,
                                  const at::Tensor& code, int64_t blocksize, at::ScalarType dtype,
                                  at::Tensor& out) {
  detail::check_dequantize_blockwise_out(A, absmax, code, blocksize, dtype, out);
  dequantize_blockwise_into(A, absmax, code, blocksize, out);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("quantize_blockwise", &quantize_blockwise_cpu);
  m.impl("dequantize_blockwise", &dequantize_blockwise_cpu);
  m.impl("dequantize_blockwise.out", &dequantize_blockwise_out_cpu);
}

}  // namespace qlora::cpu
