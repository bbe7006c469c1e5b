// Shared by the native kernels' sources (qmatmul.cpp, decode.cpp): includes, the code path picked at compile
// time (-march=native), and the entry points decode.cpp gives qmatmul.cpp's module.
#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
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

}  // namespace lmforge
