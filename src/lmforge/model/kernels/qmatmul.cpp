// int4 / int8 weight x int8 activation matmul for the CPU (llama.cpp's trick): activations are quantized per
// 32-column block to int8 with one fp32 scale, the 32-long integer dot products are exact, and only the
// per-block scales are applied in fp32. Built and loaded by lmforge/model/kernels/__init__.py, which also
// holds the pure-PyTorch fallback that must give the same numbers (same q and d bit for bit, same exact
// block dot products; only the fp32 summation order differs).
//
// Packed layouts (made by pack_int4 / pack_int8 in __init__.py): output rows in groups of 16 (N padded with
// zero rows to G = ceil(N / 16) groups), nb = K / 32 blocks. Each 32-bit lane of a 512-bit register holds
// 4 consecutive codes of one of the group's 16 rows, so a vpdpbusd against 4 broadcast activation bytes
// advances 16 output rows at once, and a block's 8 such steps leave the 16 rows' exact block dot products in
// the 16 lanes: the scales then apply lane-wise (one vector load of 16 rows' scales), and no horizontal sum
// is ever needed (a 16-wide store writes 16 outputs).
//   int4: nib (G, nb * 256) uint8, bytes [g][b][t][r][i] (t < 4, r < 16, i < 4) =
//           code[16g + r][32b + 4t + i] | code[16g + r][32b + 16 + 4t + i] << 4
//         (a 64-byte chunk masked with 0x0F gives columns 4t.., shifted by 4 gives columns 16 + 4t..);
//         scale, offset (G, nb * 16): [g][b][r] = s[16g + r][b], fp32, or f16 when every value is exactly
//         representable (GGUF's are f16): the bytes to read, which bound decode speed, shrink by a sixth.
//   int8: codes (G, nb * 512) int8, [g][b][t][r][i] (t < 8) = code[16g + r][32b + 4t + i];
//         scale (G, nb * 16) fp32 or f16; csum (G, nb * 16) int16 = the block's sum of codes (|sum| <= 4096),
//         for the +128 trick (below).
// Code paths, picked at compile time (-march=native): AVX512-VNNI (vpdpbusd), AVX2 (vpmaddubsw + vpmaddwd
// on 8-row halves), and plain C++ for anything else.
//
// Precise mode (the `precise` argument): each block is quantized twice, the second time its residual
// r = x - d1 q1, and y = sum_b s (d1 I1 + d2 I2) (+ o (d1 S1 + d2 S2) for int4): about 14 bits of activation
// precision instead of 7, for a second set of integer dots against the SAME unpacked weight registers (the
// weights, which bound decode, are still read once). Plain int8 activations lose the small channels of a
// block that holds an outlier channel (they round to 0), which wrecks real models' answers.
// Must be compiled with -ffp-contract=off (__init__.py's flags): the residual is two fp32 roundings,
// p = d1 * q1 then x - p, as PyTorch computes it; a fused multiply-subtract would give other bits.
//
// Also here: rms_norm, fp32 RMSNorm over the last dimension in one pass per row. PyTorch's CPU F.rms_norm is a
// composite of ~6 ops (pow, sum, div, add, rsqrt, two muls: ~42 us at decode's (1, 1, 576) on the build
// machine, for ~1 us of arithmetic), and a decode step calls it twice per layer.

#include "kernels.h"

namespace {

// Bumped whenever the packed layout or the Python-visible interface changes; __init__.py refuses another.
constexpr int64_t kAbi = 7;
constexpr int64_t QK = 32;  // block size (input columns per scale)
constexpr int64_t RG = 16;  // output rows per group (lanes of a 512-bit register)
#if defined(QMM_AVX512)
constexpr int kMaxTile = 8;  // activation rows per pass over a group: 8 weight + 8 accumulator registers of 32
#else
constexpr int kMaxTile = 4;  // AVX2 has 16 registers
#endif

inline float to_float(float v) { return v; }
inline float to_float(uint16_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }

inline int32_t load4(const void* p) {  // 4 activation bytes, for a broadcast
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// ---- activations --------------------------------------------------------------------------------------------

// One 32-block of a row: d = max|x| / 127, q = round-half-even(x / d) clamped to +-127, S = sum q; a block
// whose d is not > 0 (all zeros, or NaN) gets q = 0. True division and nearbyint (round-half-even in the default
// rounding mode) give exactly what torch's x / d and torch.round give; the vector code below matches it.
inline void quantize_block_scalar(const float* x, int8_t* q, float& d_out, int32_t& s_out) {
  float amax = 0.0f;
  for (int64_t j = 0; j < QK; ++j) {
    const float a = std::fabs(x[j]);
    if (a > amax || std::isnan(a)) amax = std::isnan(amax) ? amax : a;  // NaN propagates, like torch.amax
  }
  const float d = amax / 127.0f;
  int32_t sum = 0;
  if (d > 0.0f) {
    for (int64_t j = 0; j < QK; ++j) {
      float t = std::nearbyint(x[j] / d);
      t = t > 127.0f ? 127.0f : (t >= -127.0f ? t : -127.0f);  // NaN -> -127: defined, never UB
      q[j] = static_cast<int8_t>(t);
      sum += q[j];
    }
  } else {
    std::memset(q, 0, QK);
  }
  d_out = d;
  s_out = sum;
}

#if defined(QMM_AVX512)
// A finite, NaN-free block's codes for its scale d > 0, bit for bit the scalar code's (per-lane true division,
// round-to-nearest-even by roundscale, the clamp): written to q; returns their sum.
inline int32_t block_codes(__m512 lo, __m512 hi, float d, int8_t* q) {
  constexpr int kRound = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  const __m512 dv = _mm512_set1_ps(d), top = _mm512_set1_ps(127.0f), bottom = _mm512_set1_ps(-127.0f);
  const __m512i a = _mm512_cvtps_epi32(
      _mm512_min_ps(top, _mm512_max_ps(bottom, _mm512_roundscale_ps(_mm512_div_ps(lo, dv), kRound))));
  const __m512i b = _mm512_cvtps_epi32(
      _mm512_min_ps(top, _mm512_max_ps(bottom, _mm512_roundscale_ps(_mm512_div_ps(hi, dv), kRound))));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(a));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(b));
  return _mm512_reduce_add_epi32(_mm512_add_epi32(a, b));
}

// The block's scale d = max|x| / 127, or 0 when it needs the scalar code: a NaN or an infinity (where the clamp's
// NaN handling matters; a NaN in either half, which the vector max would hide) or all zeros.
inline float block_scale(__m512 lo, __m512 hi) {
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  if (!std::isfinite(amax) || _mm512_cmp_ps_mask(lo, hi, _CMP_UNORD_Q)) return 0.0f;
  const float d = amax / 127.0f;
  return d > 0.0f ? d : 0.0f;
}
#endif

// The same with AVX512 where it can (block_scale), the scalar code otherwise. At prefill's sizes the scalar loop
// (a division per value, twice in precise mode) was ~20% of an int4 matmul.
inline void quantize_block(const float* x, int8_t* q, float& d_out, int32_t& s_out) {
#if defined(QMM_AVX512)
  const __m512 lo = _mm512_loadu_ps(x), hi = _mm512_loadu_ps(x + 16);
  const float d = block_scale(lo, hi);
  if (d > 0.0f) {
    d_out = d;
    s_out = block_codes(lo, hi, d, q);
    return;
  }
#endif
  quantize_block_scalar(x, q, d_out, s_out);
}

// The second pass's input: r = x - d q in two fp32 roundings, never fused (see the header). q = 0 where d is
// not > 0, so r = x there (and NaN stays NaN), exactly as in __init__.py's _quantize_torch.
inline void residual_block(const float* x, const int8_t* q, float d, float* r) {
#if defined(QMM_AVX512)
  const __m512 dv = _mm512_set1_ps(d);
  for (int64_t j = 0; j < QK; j += 16) {
    const __m128i q8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j));
    const __m512 qf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q8));
    _mm512_storeu_ps(r + j, _mm512_sub_ps(_mm512_loadu_ps(x + j), _mm512_mul_ps(dv, qf)));
  }
#else
  for (int64_t j = 0; j < QK; ++j) {
    const float p = d * static_cast<float>(q[j]);
    r[j] = x[j] - p;
  }
#endif
}

#if defined(QMM_AVX512)
// quantize_block's vector path for 4 consecutive blocks of a row (x: their 128 values; block k's codes to q[k]),
// all 4 scales first, then their codes, so that their dependent chains (a horizontal max, two divisions, the
// rounding) overlap: one block at a time, a row's quantization waited on them (~200 cycles a block). False, with
// no codes written, when a block needs the scalar code.
inline bool quantize_blocks4(const float* x, int8_t* const* q, float* d_out, int32_t* s_out) {
  __m512 v[8];
  for (int j = 0; j < 8; ++j) v[j] = _mm512_loadu_ps(x + 16 * j);
  bool ok = true;
  for (int k = 0; k < 4; ++k) {
    d_out[k] = block_scale(v[2 * k], v[2 * k + 1]);
    ok = ok && d_out[k] > 0.0f;
  }
  if (!ok) return false;
  for (int k = 0; k < 4; ++k) s_out[k] = block_codes(v[2 * k], v[2 * k + 1], d_out[k], q[k]);
  return true;
}
#endif

// An uninitialised array (std::vector's zero fill was ~1% of a prefill): every element read is written first.
template <typename T>
struct Buffer {
  std::unique_ptr<T[]> p;
  void resize(int64_t n) { p.reset(new T[n]); }
  T* data() { return p.get(); }
  const T* data() const { return p.get(); }
  T& operator[](int64_t i) { return p[i]; }
  const T& operator[](int64_t i) const { return p[i]; }
};

// Quantized activations, tile-major: the kMaxTile rows of a tile are stored block by block, each row's block as its
// pass-1 codes and then (precise) its pass-2 codes, so a tile's pass over a block reads one contiguous run of
// kMaxTile * 32 * P bytes and a tile's whole K is one stream. With row-major rows a tile read 8 (precise: 16)
// streams K bytes apart, which the prefetchers did not follow: at prefill sizes the kernel waited on L2.
// Per-(row, block) scalars use the same order. The last tile's slots past row M are never written nor read.
struct Acts {
  int64_t M = 0, K = 0, nb = 0, P = 1;  // P: passes, 2 when precise
  Buffer<int8_t> q;       // [tile][b][row][pass][32]
  Buffer<uint8_t> u;      // the same, + 128: the unsigned vpdpbusd operand for int8 weights (AVX512 only)
  Buffer<float> d, d2;    // [tile][b][row]: each pass's scale
  Buffer<int32_t> S, S2;  // each pass's sum of codes
  Buffer<float> dS;       // d S (+ d2 S2 when precise): the int4 offset term is sum_b o[n,b] dS[m,b]

  int64_t at(int64_t m, int64_t b) const { return ((m / kMaxTile) * nb + b) * kMaxTile + m % kMaxTile; }
  int64_t row_bytes() const { return QK * P; }  // from one row's block to the next row's in the same block
  const int8_t* codes(int64_t m, int64_t b, int64_t pass) const { return q.data() + at(m, b) * row_bytes() + pass * QK; }
};

at::Tensor as_float_rows(const at::Tensor& x, int64_t k) {
  TORCH_CHECK(x.device().is_cpu(), "qmatmul: x must be a CPU tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k, "qmatmul: x must be (M, ", k, "), got ", x.sizes());
  TORCH_CHECK(k > 0 && k % QK == 0, "qmatmul: K must be a positive multiple of 32, got ", k);
  return x.to(at::kFloat).contiguous();  // bf16 -> fp32 is exact
}

Acts quantize_acts(const at::Tensor& xf, bool need_u, bool precise) {
  Acts a;
  a.M = xf.size(0);
  a.K = xf.size(1);
  a.nb = a.K / QK;
  a.P = precise ? 2 : 1;
  const int64_t slots = (a.M + kMaxTile - 1) / kMaxTile * kMaxTile * a.nb;  // (row, block) pairs, padding included
  a.q.resize(slots * a.row_bytes());
  a.d.resize(slots);
  a.S.resize(slots);
  a.dS.resize(slots);
  if (precise) {
    a.d2.resize(slots);
    a.S2.resize(slots);
  }
#if defined(QMM_AVX512)
  if (need_u) a.u.resize(slots * a.row_bytes());
#else
  need_u = false;
#endif
  const float* x = xf.data_ptr<float>();
  // the slots' last steps: the int4 offset term's d S (+ d2 S2), the int8 operand
  const auto finish = [&](int64_t i) {
    a.dS[i] = a.d[i] * static_cast<float>(a.S[i]);
    if (precise) {
      const float dS2 = a.d2[i] * static_cast<float>(a.S2[i]);
      a.dS[i] = a.dS[i] + dS2;
    }
    if (need_u) {
      const int8_t* qb = a.q.data() + i * a.row_bytes();
      uint8_t* ub = a.u.data() + i * a.row_bytes();
      for (int64_t j = 0; j < a.row_bytes(); ++j) ub[j] = static_cast<uint8_t>(qb[j] + 128);
    }
  };
  at::parallel_for(0, a.M, 16, [&](int64_t m0, int64_t m1) {
    float r[4 * QK];
    for (int64_t m = m0; m < m1; ++m) {
      int64_t b = 0;
#if defined(QMM_AVX512)
      for (; b + 4 <= a.nb; b += 4) {  // 4 blocks at a time where all 4 take the vector path
        const float* xb = x + m * a.K + b * QK;
        int64_t i[4];
        int8_t* qb[4];
        float d[4];
        int32_t S[4];
        for (int k = 0; k < 4; ++k) {
          i[k] = a.at(m, b + k);
          qb[k] = a.q.data() + i[k] * a.row_bytes();
        }
        if (!quantize_blocks4(xb, qb, d, S)) break;  // this row's remaining blocks one at a time, below
        for (int k = 0; k < 4; ++k) {
          a.d[i[k]] = d[k];
          a.S[i[k]] = S[k];
        }
        if (precise) {
          for (int k = 0; k < 4; ++k) residual_block(xb + k * QK, qb[k], d[k], r + k * QK);
          int8_t* q2[4] = {qb[0] + QK, qb[1] + QK, qb[2] + QK, qb[3] + QK};
          if (!quantize_blocks4(r, q2, d, S))
            for (int k = 0; k < 4; ++k) quantize_block(r + k * QK, q2[k], d[k], S[k]);
          for (int k = 0; k < 4; ++k) {
            a.d2[i[k]] = d[k];
            a.S2[i[k]] = S[k];
          }
        }
        for (int k = 0; k < 4; ++k) finish(i[k]);
      }
#endif
      for (; b < a.nb; ++b) {
        const int64_t i = a.at(m, b);
        const float* xb = x + m * a.K + b * QK;
        int8_t* qb = a.q.data() + i * a.row_bytes();
        quantize_block(xb, qb, a.d[i], a.S[i]);
        if (precise) {
          residual_block(xb, qb, a.d[i], r);
          quantize_block(r, qb + QK, a.d2[i], a.S2[i]);
        }
        finish(i);
      }
    }
  });
  return a;
}

// ---- tiles: MT activation rows (m0..) x one group of 16 weight rows -> an (MT, 16) patch of y ---------------
// y points at y[m0][16 g]; ldy is N; `lanes` (1..16) of the patch's columns are real rows, the rest padding.

#if defined(QMM_AVX512)

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline __mmask16 lane_mask(int64_t lanes) {
  return lanes >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << lanes) - 1);
}

// Calls rows(std::integral_constant<int, R>{}, i) over a tile's MT rows: 4 at a time, then 2, then 1.
template <int MT, typename F>
inline void tile_rows(F&& rows) {
  int i = 0;
  for (; i + 4 <= MT; i += 4) rows(std::integral_constant<int, 4>{}, i);
  if (MT - i >= 2) {
    rows(std::integral_constant<int, 2>{}, i);
    i += 2;
  }
  if (i < MT) rows(std::integral_constant<int, 1>{}, i);
}

// The exact int32 block dots of 16 rows' int4 codes (lo, hi: unpacked) with R activation rows' blocks, each
// with its NP passes (qb: the first row's pass 1; rows row_bytes apart, pass 2 at + 32): out[r * NP + p].
// The R NP chains are interleaved step by step so that vpdpbusd's latency is hidden within the tile. With 4 rows
// that is enough (~1.3x two rows of two chains each); with fewer, each dot is two chains (columns 0..15 and
// 16..31) added at the end, half the dependent latency, which decode's single row waits on.
template <int R, int NP>
inline void int4_dots(const __m512i* lo, const __m512i* hi, const int8_t* qb, int64_t row_bytes, __m512i* out) {
  constexpr int C = R * NP, H = R >= 4 ? 1 : 2;  // H: chains per dot
  __m512i chain[H][C];
  for (int h = 0; h < H; ++h)
    for (int j = 0; j < C; ++j) chain[h][j] = _mm512_setzero_si512();
#pragma GCC unroll 8
  for (int t = 0; t < 8; ++t) {  // columns 4t.. (lo) for t < 4, then 16 + 4(t - 4).. (hi)
    const __m512i codes = t < 4 ? lo[t] : hi[t - 4];
    const int64_t col = t < 4 ? 4 * t : 16 + 4 * (t - 4);
    const int h = H == 2 ? t / 4 : 0;
#pragma GCC unroll 8
    for (int j = 0; j < C; ++j) {  // u8 codes x s8 q
      const int8_t* p = qb + (j / NP) * row_bytes + (j % NP) * QK + col;
      chain[h][j] = _mm512_dpbusd_epi32(chain[h][j], codes, _mm512_set1_epi32(load4(p)));
    }
  }
  for (int j = 0; j < C; ++j) out[j] = H == 2 ? _mm512_add_epi32(chain[0][j], chain[H - 1][j]) : chain[0][j];
}

// acc += s (d1 I1 (+ d2 I2 when P)) for one row's block: I (and I2) its exact block dots, d / d2 its scales.
template <bool P>
inline __m512 scale_dots(__m512 acc, const __m512i* dots, __m512 s16, float d, float d2) {
  const __m512 dot = _mm512_cvtepi32_ps(dots[0]);
  if constexpr (P) {  // the residual's dots came from the same unpacked weight registers
    const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[1]), _mm512_set1_ps(d2),
                                     _mm512_mul_ps(dot, _mm512_set1_ps(d)));
    return _mm512_fmadd_ps(f, s16, acc);
  } else {
    (void)d2;
    return _mm512_fmadd_ps(_mm512_mul_ps(dot, s16), _mm512_set1_ps(d), acc);
  }
}

template <int MT, bool P, typename ST>
inline void int4_tile(const Acts& a, int64_t m0, const uint8_t* w, const ST* s, const ST* o, float* y, int64_t ldy,
                      int64_t lanes) {
  constexpr int NP = P ? 2 : 1;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < a.nb; ++b) {
    __m512i lo[4], hi[4];  // unpacked once per block, used by every activation row of the tile
    for (int t = 0; t < 4; ++t) {
      const __m512i v = _mm512_loadu_si512(w + b * 256 + t * 64);
      lo[t] = _mm512_and_si512(v, low4);
      hi[t] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    }
    const __m512 s16 = load16(s + b * RG);
    const __m512 o16 = load16(o + b * RG);
    const int64_t ab = a.at(m0, b);  // the tile's rows in this block: ab, ab + 1, ...
    const int8_t* qb = a.q.data() + ab * a.row_bytes();
    const float* d = a.d.data() + ab;
    const float* d2 = P ? a.d2.data() + ab : nullptr;
    const float* dS = a.dS.data() + ab;
    const auto finish = [&](int i, const __m512i* dots) {
      acc[i] = scale_dots<P>(acc[i], dots, s16, d[i], P ? d2[i] : 0.0f);
      acc[i] = _mm512_fmadd_ps(o16, _mm512_set1_ps(dS[i]), acc[i]);  // o d S (+ o d2 S2)
    };
    const auto rows = [&](auto r, int i) {  // r rows from row i, their chains interleaved (int4_dots)
      constexpr int R = decltype(r)::value;
      __m512i dots[R * NP];
      int4_dots<R, NP>(lo, hi, qb + i * a.row_bytes(), a.row_bytes(), dots);
      for (int j = 0; j < R; ++j) finish(i + j, dots + j * NP);
    };
    tile_rows<MT>(rows);
  }
  const __mmask16 k = lane_mask(lanes);
  for (int i = 0; i < MT; ++i) _mm512_mask_storeu_ps(y + i * ldy, k, acc[i]);
}

// int8 weights: vpdpbusd wants one unsigned operand, so the activation side is u = q + 128 and
// sum (q + 128) c = sum q c + 128 sum c; the 128 sum c is removed exactly, in int32, by starting each block's
// accumulator at -128 csum.
// The exact int32 block dots of 16 rows' int8 codes c with R activation rows' blocks u = q + 128 (each with its NP
// passes, laid out as for int4_dots), from corr = -128 csum: out[r * NP + p]; chains as in int4_dots.
template <int R, int NP>
inline void int8_dots(const __m512i* c, const uint8_t* ub, int64_t row_bytes, __m512i corr, __m512i* out) {
  constexpr int C = R * NP, H = R >= 4 ? 1 : 2;
  __m512i chain[H][C];
  for (int j = 0; j < C; ++j) {
    chain[0][j] = corr;
    if (H == 2) chain[H - 1][j] = _mm512_setzero_si512();
  }
#pragma GCC unroll 8
  for (int t = 0; t < 8; ++t) {
    const int h = H == 2 ? t % 2 : 0;
#pragma GCC unroll 8
    for (int j = 0; j < C; ++j) {
      const uint8_t* p = ub + (j / NP) * row_bytes + (j % NP) * QK + 4 * t;
      chain[h][j] = _mm512_dpbusd_epi32(chain[h][j], _mm512_set1_epi32(load4(p)), c[t]);
    }
  }
  for (int j = 0; j < C; ++j) out[j] = H == 2 ? _mm512_add_epi32(chain[0][j], chain[H - 1][j]) : chain[0][j];
}

template <int MT, bool P, typename ST>
inline void int8_tile(const Acts& a, int64_t m0, const int8_t* w, const ST* s, const int16_t* cs, float* y,
                      int64_t ldy, int64_t lanes) {
  constexpr int NP = P ? 2 : 1;
  __m512 acc[MT];
  for (int i = 0; i < MT; ++i) acc[i] = _mm512_setzero_ps();
  for (int64_t b = 0; b < a.nb; ++b) {
    __m512i c[8];
    for (int t = 0; t < 8; ++t) c[t] = _mm512_loadu_si512(w + b * 512 + t * 64);
    const __m512 s16 = load16(s + b * RG);
    const __m512i sum16 = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(cs + b * RG)));
    const __m512i corr = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32(sum16, 7));
    const int64_t ab = a.at(m0, b);
    const uint8_t* ub = a.u.data() + ab * a.row_bytes();
    const float* d = a.d.data() + ab;
    const float* d2 = P ? a.d2.data() + ab : nullptr;
    tile_rows<MT>([&](auto r, int i) {
      constexpr int R = decltype(r)::value;
      __m512i dots[R * NP];
      int8_dots<R, NP>(c, ub + i * a.row_bytes(), a.row_bytes(), corr, dots);
      for (int j = 0; j < R; ++j)
        acc[i + j] = scale_dots<P>(acc[i + j], dots + j * NP, s16, d[i + j], P ? d2[i + j] : 0.0f);
    });
  }
  const __mmask16 k = lane_mask(lanes);
  for (int i = 0; i < MT; ++i) _mm512_mask_storeu_ps(y + i * ldy, k, acc[i]);
}

#elif defined(QMM_AVX2)

// The same layout in two 8-row halves: bytes 0..31 of each 64-byte chunk are rows 0..7, 32..63 rows 8..15.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

inline void store_lanes(float* y, const float* v, int64_t lanes) {
  std::memcpy(y, v, static_cast<size_t>(std::min<int64_t>(lanes, RG)) * sizeof(float));
}

// One 4-column step of 8 rows' block dots: u8 codes (<= 15) x s8 q, pair sums <= 2 * 15 * 127 (no int16
// saturation), widened to int32 and added to dot.
inline __m256i int4_step(__m256i dot, __m256i codes, const int8_t* q4, __m256i ones) {
  return _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(codes, _mm256_set1_epi32(load4(q4))), ones));
}

template <int MT, bool P, typename ST>
inline void int4_tile(const Acts& a, int64_t m0, const uint8_t* w, const ST* s, const ST* o, float* y, int64_t ldy,
                      int64_t lanes) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MT][2];
  for (int i = 0; i < MT; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < a.nb; ++b) {
    for (int h = 0; h < 2; ++h) {
      const __m256 s8 = load8(s + b * RG + 8 * h);
      const __m256 o8 = load8(o + b * RG + 8 * h);
      for (int i = 0; i < MT; ++i) {
        const int8_t* qb = a.codes(m0 + i, b, 0);
        const int8_t* rb = P ? a.codes(m0 + i, b, 1) : nullptr;
        __m256i dot = _mm256_setzero_si256(), dot2 = _mm256_setzero_si256();
        for (int t = 0; t < 4; ++t) {
          const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * 256 + t * 64 + 32 * h));
          const __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
          dot = int4_step(int4_step(dot, lo, qb + 4 * t, ones), hi, qb + 16 + 4 * t, ones);
          if constexpr (P) dot2 = int4_step(int4_step(dot2, lo, rb + 4 * t, ones), hi, rb + 16 + 4 * t, ones);
        }
        const int64_t mb = a.at(m0 + i, b);
        if constexpr (P) {  // s (d1 I1 + d2 I2)
          const __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot2), _mm256_set1_ps(a.d2[mb]),
                                           _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(a.d[mb])));
          acc[i][h] = _mm256_fmadd_ps(f, s8, acc[i][h]);
        } else {
          const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), s8);
          acc[i][h] = _mm256_fmadd_ps(f, _mm256_set1_ps(a.d[mb]), acc[i][h]);
        }
        acc[i][h] = _mm256_fmadd_ps(o8, _mm256_set1_ps(a.dS[mb]), acc[i][h]);
      }
    }
  }
  for (int i = 0; i < MT; ++i) {
    alignas(32) float out[RG];
    _mm256_store_ps(out, acc[i][0]);
    _mm256_store_ps(out + 8, acc[i][1]);
    store_lanes(y + i * ldy, out, lanes);
  }
}

// int8 weights: llama.cpp's sign trick keeps vpmaddubsw's pair sums in int16 (|c| x sign(c) q <= 2 * 128 * 127).
template <int MT, bool P, typename ST>
inline void int8_tile(const Acts& a, int64_t m0, const int8_t* w, const ST* s, const int16_t* cs, float* y,
                      int64_t ldy, int64_t lanes) {
  (void)cs;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[MT][2];
  for (int i = 0; i < MT; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
  for (int64_t b = 0; b < a.nb; ++b) {
    for (int h = 0; h < 2; ++h) {
      const __m256 s8 = load8(s + b * RG + 8 * h);
      for (int i = 0; i < MT; ++i) {
        const int8_t* qb = a.codes(m0 + i, b, 0);
        const int8_t* rb = P ? a.codes(m0 + i, b, 1) : nullptr;
        __m256i dot = _mm256_setzero_si256(), dot2 = _mm256_setzero_si256();
        for (int t = 0; t < 8; ++t) {
          const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + b * 512 + t * 64 + 32 * h));
          const __m256i ac = _mm256_sign_epi8(c, c);  // |c|; -128 stays 0x80 = 128 as u8, still right
          const __m256i sq = _mm256_sign_epi8(_mm256_set1_epi32(load4(qb + 4 * t)), c);
          dot = _mm256_add_epi32(dot, _mm256_madd_epi16(_mm256_maddubs_epi16(ac, sq), ones));
          if constexpr (P) {
            const __m256i sr = _mm256_sign_epi8(_mm256_set1_epi32(load4(rb + 4 * t)), c);
            dot2 = _mm256_add_epi32(dot2, _mm256_madd_epi16(_mm256_maddubs_epi16(ac, sr), ones));
          }
        }
        const int64_t mb = a.at(m0 + i, b);
        if constexpr (P) {  // s (d1 I1 + d2 I2)
          const __m256 f = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot2), _mm256_set1_ps(a.d2[mb]),
                                           _mm256_mul_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(a.d[mb])));
          acc[i][h] = _mm256_fmadd_ps(f, s8, acc[i][h]);
        } else {
          const __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(dot), s8);
          acc[i][h] = _mm256_fmadd_ps(f, _mm256_set1_ps(a.d[mb]), acc[i][h]);
        }
      }
    }
  }
  for (int i = 0; i < MT; ++i) {
    alignas(32) float out[RG];
    _mm256_store_ps(out, acc[i][0]);
    _mm256_store_ps(out + 8, acc[i][1]);
    store_lanes(y + i * ldy, out, lanes);
  }
}

#else  // QMM_SCALAR

// Row r's exact block dot with 32 activations q (block-local pointers).
inline int32_t int4_dot(const uint8_t* w, int64_t r, const int8_t* q) {
  int32_t dot = 0;
  for (int64_t t = 0; t < 4; ++t)
    for (int64_t j = 0; j < 4; ++j) {
      const uint8_t byte = w[t * 64 + r * 4 + j];
      dot += static_cast<int32_t>(byte & 0x0F) * q[4 * t + j];
      dot += static_cast<int32_t>(byte >> 4) * q[16 + 4 * t + j];
    }
  return dot;
}

inline int32_t int8_dot(const int8_t* w, int64_t r, const int8_t* q) {
  int32_t dot = 0;
  for (int64_t t = 0; t < 8; ++t)
    for (int64_t j = 0; j < 4; ++j) dot += static_cast<int32_t>(w[t * 64 + r * 4 + j]) * q[4 * t + j];
  return dot;
}

// d I (+ d2 I2 when precise) for block b of activation row m: the factor that multiplies s.
template <bool P, typename Dot>
inline float scaled_dots(const Acts& a, int64_t m, int64_t b, Dot dot) {
  const int64_t mb = a.at(m, b);
  const float f = static_cast<float>(dot(a.codes(m, b, 0))) * a.d[mb];
  if constexpr (P) return f + static_cast<float>(dot(a.codes(m, b, 1))) * a.d2[mb];
  return f;
}

template <int MT, bool P, typename ST>
inline void int4_tile(const Acts& a, int64_t m0, const uint8_t* w, const ST* s, const ST* o, float* y, int64_t ldy,
                      int64_t lanes) {
  for (int i = 0; i < MT; ++i) {
    for (int64_t r = 0; r < std::min<int64_t>(lanes, RG); ++r) {
      float acc = 0.0f;
      for (int64_t b = 0; b < a.nb; ++b) {
        const float f = scaled_dots<P>(a, m0 + i, b, [&](const int8_t* q) { return int4_dot(w + b * 256, r, q); });
        acc += f * to_float(s[b * RG + r]);
        acc += to_float(o[b * RG + r]) * a.dS[a.at(m0 + i, b)];
      }
      y[i * ldy + r] = acc;
    }
  }
}

template <int MT, bool P, typename ST>
inline void int8_tile(const Acts& a, int64_t m0, const int8_t* w, const ST* s, const int16_t* cs, float* y,
                      int64_t ldy, int64_t lanes) {
  (void)cs;
  for (int i = 0; i < MT; ++i) {
    for (int64_t r = 0; r < std::min<int64_t>(lanes, RG); ++r) {
      float acc = 0.0f;
      for (int64_t b = 0; b < a.nb; ++b) {
        const float f = scaled_dots<P>(a, m0 + i, b, [&](const int8_t* q) { return int8_dot(w + b * 512, r, q); });
        acc += f * to_float(s[b * RG + r]);
      }
      y[i * ldy + r] = acc;
    }
  }
}

#endif

// ---- driver ------------------------------------------------------------------------------------------------

// Groups [g0, g1) of 16 weight rows for every activation row, in chunks of groups whose weights (~128 KiB) stay
// in L2 while every tile of up to kMaxTile activation rows passes over them: a tile's rows stay in L1 across the
// chunk's groups, and its outputs are written as runs of contiguous 64-byte lines. A decode batch of M <= kMaxTile
// rows is one tile: each group comes from memory once, so the batch costs about one weight read. (Groups outermost
// over all rows, as before, re-read every row's activations per group and scattered each group's stores over an
// (M, N) output larger than L2: at prefill sizes that halved the vpdpbusd rate.)
template <bool INT4, bool P, typename ST>
void run_groups(const Acts& a, int64_t g0, int64_t g1, const void* w, const ST* s, const ST* o, const int16_t* cs,
                float* y, int64_t N) {
  const int64_t wstride = a.nb * (INT4 ? 256 : 512), sstride = a.nb * RG;
  const int64_t group_bytes = wstride + 2 * sstride * static_cast<int64_t>(sizeof(ST));
  const int64_t chunk = std::max<int64_t>(1, (int64_t{128} << 10) / group_bytes);
  for (int64_t c0 = g0; c0 < g1; c0 += chunk) {
    const int64_t c1 = std::min(g1, c0 + chunk);
    for (int64_t m0 = 0; m0 < a.M; m0 += kMaxTile) {
      const int mt = static_cast<int>(std::min<int64_t>(kMaxTile, a.M - m0));
      for (int64_t g = c0; g < c1; ++g) {
        const int64_t lanes = std::min<int64_t>(RG, N - g * RG);
        float* yp = y + m0 * N + g * RG;
#define QMM_CASE(T)                                                                                             \
  case T:                                                                                                       \
    if constexpr (T <= kMaxTile) {                                                                              \
      if constexpr (INT4)                                                                                       \
        int4_tile<T, P, ST>(a, m0, static_cast<const uint8_t*>(w) + g * wstride, s + g * sstride,               \
                            o + g * sstride, yp, N, lanes);                                                     \
      else                                                                                                      \
        int8_tile<T, P, ST>(a, m0, static_cast<const int8_t*>(w) + g * wstride, s + g * sstride,                \
                            cs + g * sstride, yp, N, lanes);                                                    \
    }                                                                                                           \
    break;
        switch (mt) {
          QMM_CASE(1)
          QMM_CASE(2)
          QMM_CASE(3)
          QMM_CASE(4)
          QMM_CASE(5)
          QMM_CASE(6)
          QMM_CASE(7)
          QMM_CASE(8)
          default:
            break;
        }
#undef QMM_CASE
      }
    }
  }
}

void check_packed(const at::Tensor& t, const char* what, at::ScalarType dtype, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == dtype && t.dim() == 2 &&
                  t.size(0) == rows && t.size(1) == cols,
              "qmatmul: ", what, " must be a contiguous ", dtype, " (", rows, ", ", cols, ") CPU tensor, got ",
              t.scalar_type(), " ", t.sizes());
}

void check_scales(const at::Tensor& t, const char* what, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf, "qmatmul: ", what,
              " must be float32 or float16, got ", t.scalar_type());
  check_packed(t, what, t.scalar_type(), rows, cols);
}

// Groups per parallel task: at least ~256k multiply-adds (several microseconds), so that a thread's start and
// join (and, on a busy machine, waiting for a descheduled one) is only paid where there is work to split.
int64_t grain_groups(int64_t M, int64_t K) {
  return std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, M * K * RG));
}

// Runs body(std::integral_constant<bool, precise>{}, half_scales_tag) with both as compile-time types.
template <typename F>
void dispatch(bool precise, bool half, F&& body) {
  if (precise) {
    if (half)
      body(std::true_type{}, uint16_t{});
    else
      body(std::true_type{}, float{});
  } else {
    if (half)
      body(std::false_type{}, uint16_t{});
    else
      body(std::false_type{}, float{});
  }
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& nib, const at::Tensor& scale, const at::Tensor& offset,
                   int64_t n, int64_t k, bool precise) {
  const at::Tensor xf = as_float_rows(x, k);
  TORCH_CHECK(n >= 0, "qmatmul: N must be >= 0");
  const int64_t nb = k / QK, G = (n + RG - 1) / RG;
  check_packed(nib, "int4 codes", at::kByte, G, nb * 256);
  check_scales(scale, "scale", G, nb * RG);
  check_scales(offset, "offset", G, nb * RG);
  TORCH_CHECK(offset.scalar_type() == scale.scalar_type(), "qmatmul: scale and offset dtypes differ");
  at::Tensor y = at::empty({xf.size(0), n}, xf.options());
  if (xf.size(0) == 0 || n == 0) return y;
  const Acts a = quantize_acts(xf, false, precise);
  float* yp = y.data_ptr<float>();
  // precise does twice the integer work per weight byte: its grain is that of twice the rows
  const int64_t grain = grain_groups(precise ? 2 * a.M : a.M, k);
  dispatch(precise, scale.scalar_type() == at::kHalf, [&](auto p, auto st) {
    using ST = decltype(st);
    at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
      run_groups<true, decltype(p)::value, ST>(a, g0, g1, nib.data_ptr(), static_cast<const ST*>(scale.data_ptr()),
                                               static_cast<const ST*>(offset.data_ptr()), nullptr, yp, n);
    });
  });
  return y;
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& csum,
                   int64_t n, int64_t k, bool precise) {
  const at::Tensor xf = as_float_rows(x, k);
  TORCH_CHECK(n >= 0, "qmatmul: N must be >= 0");
  const int64_t nb = k / QK, G = (n + RG - 1) / RG;
  check_packed(codes, "int8 codes", at::kChar, G, nb * 512);
  check_scales(scale, "scale", G, nb * RG);
  check_packed(csum, "int8 csum", at::kShort, G, nb * RG);
  at::Tensor y = at::empty({xf.size(0), n}, xf.options());
  if (xf.size(0) == 0 || n == 0) return y;
  const Acts a = quantize_acts(xf, true, precise);
  float* yp = y.data_ptr<float>();
  const int16_t* cs = csum.data_ptr<int16_t>();
  const int64_t grain = grain_groups(precise ? 2 * a.M : a.M, k);
  dispatch(precise, scale.scalar_type() == at::kHalf, [&](auto p, auto st) {
    using ST = decltype(st);
    at::parallel_for(0, G, grain, [&](int64_t g0, int64_t g1) {
      run_groups<false, decltype(p)::value, ST>(a, g0, g1, codes.data_ptr(), static_cast<const ST*>(scale.data_ptr()),
                                                nullptr, cs, yp, n);
    });
  });
  return y;
}

// The activation quantizer alone, so tests can check it against the PyTorch one bit for bit:
// (q, d, S), then (q2, d2, S2) of the residual when precise.
std::vector<at::Tensor> quantize(const at::Tensor& x, bool precise) {
  TORCH_CHECK(x.dim() == 2, "qmatmul: x must be 2-D");
  const at::Tensor xf = as_float_rows(x, x.size(1));
  const Acts a = quantize_acts(xf, false, precise);
  std::vector<at::Tensor> out;
  for (int64_t pass = 0; pass < a.P; ++pass) {  // back to row-major (M, K) / (M, nb) tensors
    at::Tensor q = at::empty({a.M, a.K}, at::kChar), d = at::empty({a.M, a.nb}, at::kFloat),
               S = at::empty({a.M, a.nb}, at::kInt);
    const Buffer<float>& dv = pass == 0 ? a.d : a.d2;
    const Buffer<int32_t>& Sv = pass == 0 ? a.S : a.S2;
    for (int64_t m = 0; m < a.M; ++m)
      for (int64_t b = 0; b < a.nb; ++b) {
        std::memcpy(q.data_ptr<int8_t>() + m * a.K + b * QK, a.codes(m, b, pass), QK);
        d.data_ptr<float>()[m * a.nb + b] = dv[a.at(m, b)];
        S.data_ptr<int32_t>()[m * a.nb + b] = Sv[a.at(m, b)];
      }
    out.insert(out.end(), {q, d, S});
  }
  return out;
}

// ---- rms norm ------------------------------------------------------------------------------------------------

// sum_j x[j]^2 of one row. Several independent accumulators: a single chain of dependent adds would take
// ~4 cycles per vector; the order differs from PyTorch's sum (so do its last bits, within a few ulps).
inline float sum_squares(const float* x, int64_t D) {
  int64_t j = 0;
  float sum = 0.0f;
#if defined(QMM_AVX512)
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (; j + 64 <= D; j += 64)
    for (int t = 0; t < 4; ++t) {
      const __m512 v = _mm512_loadu_ps(x + j + 16 * t);
      acc[t] = _mm512_fmadd_ps(v, v, acc[t]);
    }
  for (; j + 16 <= D; j += 16) {
    const __m512 v = _mm512_loadu_ps(x + j);
    acc[0] = _mm512_fmadd_ps(v, v, acc[0]);
  }
  sum = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
#elif defined(QMM_AVX2)
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  for (; j + 32 <= D; j += 32)
    for (int t = 0; t < 4; ++t) {
      const __m256 v = _mm256_loadu_ps(x + j + 8 * t);
      acc[t] = _mm256_fmadd_ps(v, v, acc[t]);
    }
  for (; j + 8 <= D; j += 8) {
    const __m256 v = _mm256_loadu_ps(x + j);
    acc[0] = _mm256_fmadd_ps(v, v, acc[0]);
  }
  const __m256 a = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  sum = _mm_cvtss_f32(h);
#endif
  for (; j < D; ++j) sum += x[j] * x[j];  // the tail (the whole row on the scalar path)
  return sum;
}

// One row: y = (x * r) * w with r = 1 / sqrt(sum / D + eps): PyTorch's composite's ops in its order (mean as a
// true division of the sum, rsqrt as 1 / sqrt, both products rounded), so only the sum's order differs.
inline void rms_row(const float* x, const float* w, float* y, int64_t D, float eps) {
  const float mean = sum_squares(x, D) / static_cast<float>(D);
  const float r = 1.0f / std::sqrt(mean + eps);
  int64_t j = 0;
#if defined(QMM_AVX512)
  const __m512 rv = _mm512_set1_ps(r);
  for (; j + 16 <= D; j += 16)
    _mm512_storeu_ps(y + j, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(x + j), rv), _mm512_loadu_ps(w + j)));
#elif defined(QMM_AVX2)
  const __m256 rv = _mm256_set1_ps(r);
  for (; j + 8 <= D; j += 8)
    _mm256_storeu_ps(y + j, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(x + j), rv), _mm256_loadu_ps(w + j)));
#endif
  for (; j < D; ++j) y[j] = (x[j] * r) * w[j];
}

// x (..., D) fp32 contiguous, weight (D,) fp32 contiguous -> a new (..., D) tensor. Rows are independent and each
// is summed by one thread in one order, so the result never depends on the thread count.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1,
              "rms_norm: x must be a contiguous float32 CPU tensor of at least 1 dimension, got ", x.scalar_type(),
              " ", x.sizes());
  const int64_t D = x.size(-1);
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.is_contiguous() &&
                  weight.dim() == 1 && weight.size(0) == D,
              "rms_norm: weight must be a contiguous float32 CPU tensor of shape (", D, "), got ",
              weight.scalar_type(), " ", weight.sizes());
  at::Tensor y = at::empty(x.sizes(), x.options());
  const int64_t rows = D > 0 ? x.numel() / D : 0;
  if (rows == 0) return y;
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps);  // PyTorch adds eps to the fp32 mean as an fp32 value too
  const auto body = [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) rms_row(xp + i * D, wp, yp + i * D, D, e);
  };
  if (rows < 64) {
    body(0, rows);  // decode's one row (and short prompts): a few hundred ns, not worth a thread's wake-up
  } else {
    // tasks of at least ~64k elements (tens of microseconds), so the join is only paid where it pays back
    at::parallel_for(0, rows, std::max<int64_t>(16, (int64_t{1} << 16) / D), body);
  }
  return y;
}

std::string isa() {
#if defined(QMM_AVX512)
  return "avx512vnni";
#elif defined(QMM_AVX2)
  return "avx2";
#else
  return "scalar";
#endif
}

}  // namespace

namespace lmforge {

at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& nib, const at::Tensor& scale, const at::Tensor& offset,
                       int64_t n, int64_t k, bool precise) {
  return int4_mm(x, nib, scale, offset, n, k, precise);
}

at::Tensor int8_matmul(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& csum,
                       int64_t n, int64_t k, bool precise) {
  return int8_mm(x, codes, scale, csum, n, k, precise);
}

at::Tensor rms_norm_rows(const at::Tensor& x, const at::Tensor& weight, double eps) { return rms_norm(x, weight, eps); }

}  // namespace lmforge

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // The GIL is released around the work: the kernels touch no Python objects, and serving threads can go on.
  m.def("int4_mm", &int4_mm, "int4 weights x int8-quantized activations -> fp32 (M, N)",
        py::call_guard<py::gil_scoped_release>());
  m.def("int8_mm", &int8_mm, "int8 weights x int8-quantized activations -> fp32 (M, N)",
        py::call_guard<py::gil_scoped_release>());
  m.def("quantize", &quantize, "per-32-block int8 activation quantization -> (q, d, S) (+ (q2, d2, S2) if precise)",
        py::call_guard<py::gil_scoped_release>());
  // The GIL is kept: at decode's sizes the whole call is a few microseconds, mostly the output's allocation.
  m.def("rms_norm", &rms_norm, "fp32 RMSNorm over the last dimension: x * rsqrt(mean(x^2) + eps) * weight");
  m.def("decode_attention", &lmforge::decode_attention,
        "one token per row: rope, KV cache write and grouped-query attention over the row's columns (decode.cpp)",
        py::call_guard<py::gil_scoped_release>());
  m.def("decode_block", &lmforge::decode_block,
        "a pre-norm Llama-style block at one token per row: norm, qkv, decode_attention, out, residual, norm, "
        "gated MLP, residual (decode.cpp)", py::call_guard<py::gil_scoped_release>());
  m.def("silu_mul", &lmforge::silu_mul, "silu(gate) * up of a gated MLP's (M, 2F) projection -> (M, F)",
        py::call_guard<py::gil_scoped_release>());
  m.def("prefill_attention", &lmforge::prefill_attention,
        "causal attention of T new tokens per slot from column 0 over the keys and values in the cache (decode.cpp)",
        py::call_guard<py::gil_scoped_release>());
  m.def("rope_heads", &lmforge::rope_heads,
        "rotary embedding of the first n_heads heads of each (M, W) row, cos / sin (M, head_dim) (decode.cpp)",
        py::call_guard<py::gil_scoped_release>());
  m.def("isa", &isa, "the compiled code path");
  m.def("abi", []() { return kAbi; }, "packed layout / interface version");
}
