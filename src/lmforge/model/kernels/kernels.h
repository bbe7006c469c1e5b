// Shared by the native kernels' sources (qmatmul.cpp, decode.cpp): includes, the code path picked at compile
// time (-march=native), and the entry points decode.cpp gives qmatmul.cpp's module.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define QMM_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QMM_AVX2 1
#else
#define QMM_SCALAR 1
#endif

namespace lmforge {

at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, int64_t first, const at::Tensor& positions, int64_t n_head,
                            double scale);
at::Tensor silu_mul(const at::Tensor& x);
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t first,
                             int64_t T, int64_t n_head, double scale);
at::Tensor rope_heads(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t n_heads);

// One Linear of a decode block: (kind, a, b, c, bias, n, k, precise); kind 0: fp32 weight a (N, K), at::linear;
// 4: int4 (a, b, c) = (codes, scale, offset); 8: int8 (codes, scale, csum), both qmatmul.cpp's packed layouts.
using Linear = std::tuple<int64_t, at::Tensor, at::Tensor, at::Tensor, std::optional<at::Tensor>, int64_t, int64_t,
                          bool>;
at::Tensor decode_block(const at::Tensor& x, const at::Tensor& attn_norm, const at::Tensor& mlp_norm, double eps,
                        const std::vector<Linear>& linears, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t first,
                        const at::Tensor& positions, int64_t n_head, double scale);

// qmatmul.cpp's matmuls and RMSNorm, for decode_block
at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& nib, const at::Tensor& scale, const at::Tensor& offset,
                       int64_t n, int64_t k, bool precise);
at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& csum,
                       int64_t n, int64_t k, bool precise);
at::Tensor rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps);

}  // namespace lmforge
