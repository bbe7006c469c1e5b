// The decode step's small ops, fused: at one token per row each of them is a few microseconds of arithmetic
// behind tens of microseconds of PyTorch dispatch, allocation and (for a bf16 KV cache) a conversion of every
// cached key and value to fp32 before SDPA can read them. The model's own PyTorch code (model/layers.py) is the
// fallback and the reference: the same math, equal within fp32 rounding (tests/model/test_decode_kernels.py).
//
// decode_attention: one new token per row of a self-attention layer with rotary positions and a KV cache.
//   qkv (B, (H + 2 G) hd) fp32: the fused projection's output, q heads then k heads then v heads;
//   cos, sin (B, hd) fp32: each row's rotary table at its position (half-split layout, as HF Llama);
//   k_cache, v_cache (S, G, L, hd) fp32 or bf16: the layer's cache, slot s column p = position p of slot s;
//   row b is slot first + b at position positions[b]:
//     q, k = rope(q), rope(k);  cache[first + b, :, p] = k, v  (rounded to the cache's dtype, as Tensor.to);
//     y[b, h] = softmax_j(q_h . K_j * scale) V_j over the row's columns j <= p, K and V read back from the cache
//   -> y (B, H hd) fp32. Query head h reads kv head h / (H / G) (grouped-query attention). Rows never see another
//   row's columns or a column past their own position, so no mask is needed.
// silu_mul: x (M, 2F) fp32, gate columns first -> silu(gate) * up (M, F): a gated MLP's middle.
// prefill_attention: a prompt's causal attention from column 0, q (B T, >= H hd) against the keys and values the
//   layer just cached (fp32 or bf16, as SDPA would read them): tiles of 4 query rows x 16 keys (AVX512 only).
// rope_heads: x (M, W) fp32, cos / sin (M, hd) -> the first n_heads heads of each row rotated, (M, n_heads hd):
//   apply_rope's products and sum, for prefill's many tokens per call (PyTorch's cat, neg, two muls and an add
//   made five passes over q and k).
// decode_block: a whole pre-norm block (Llama's) at one token per row, x (B, d) -> (B, d):
//   x += out(decode_attention(qkv(rms_norm(x)))),  x += fc_out(silu_mul(fc_in(rms_norm(x))))
//   with the same calls model/layers.py makes one by one from Python, so the same numbers bit for bit; what it
//   saves is the ~10 Python module calls per block (at 1 token a row, Python, not arithmetic, was half a step).

#include "kernels.h"

namespace lmforge {
namespace {

inline float bf16_to_float(uint16_t bits) {
  const uint32_t u = static_cast<uint32_t>(bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN kept: what Tensor.to(torch.bfloat16) stores.
inline void store(float* dst, float v) { *dst = v; }
inline void store(uint16_t* dst, float v) { *dst = c10::BFloat16(v).x; }
inline float load(const float* p) { return *p; }
inline float load(const uint16_t* p) { return bf16_to_float(*p); }

#if defined(QMM_AVX512)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// exp(x) = 2^n exp(r), n = round(x log2 e), r = x - n ln 2 (ln 2 in two parts, Cephes' expf), exp(r) by its
// degree-7 Taylor-like polynomial: within ~2 ulp of expf; scalef gives 0 below and inf above the range.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), _mm512_min_ps(_mm512_set1_ps(89.0f), x));  // NaN stays NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}
#endif

#if defined(QMM_AVX512)
// The 16 horizontal sums of v[0..15] as one vector (lane t = sum of v[t]'s lanes): pairwise shuffles and adds,
// 45 instructions instead of 16 reductions of ~8 dependent ones each.
inline __m512 sum_lanes16(const __m512* v) {
  __m512 x[8], y[4], z[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit chunk: v2i's and v2i+1's pairwise sums, interleaved
    x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per chunk: the 4 vectors' sums over the chunk, in order
    const __m512d a = _mm512_castps_pd(x[2 * i]), b = _mm512_castps_pd(x[2 * i + 1]);
    y[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  for (int i = 0; i < 2; ++i)  // chunks 0+1 and 2+3 of each: 8 vectors' partial sums
    z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], 0x88), _mm512_shuffle_f32x4(z[0], z[1], 0xDD));
}
#endif

// Per query head, over a head's n cached keys/values (rows of C 16-wide vectors, hd = 16 C; C = 0: any hd, plain
// loops). Keys/values stream from L1/L2 once per head; the head's query and output stay in registers.
// s[j] = (q . K_j) * scale, j < n.
template <int C, typename T>
inline void scores(const float* q, const T* K, int64_t n, int64_t hd, float scale, float* s) {
#if defined(QMM_AVX512)
  if constexpr (C > 0) {
    __m512 qv[C];
    for (int c = 0; c < C; ++c) qv[c] = _mm512_loadu_ps(q + 16 * c);
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {  // 16 keys' lane-wise products, summed across lanes all at once
      __m512 part[16];
      for (int t = 0; t < 16; ++t) {
        const T* kj = K + (j + t) * 16 * C;
        part[t] = _mm512_mul_ps(qv[0], load16(kj));
        for (int c = 1; c < C; ++c) part[t] = _mm512_fmadd_ps(qv[c], load16(kj + 16 * c), part[t]);
      }
      _mm512_storeu_ps(s + j, _mm512_mul_ps(sum_lanes16(part), _mm512_set1_ps(scale)));
    }
    for (; j < n; ++j) {
      const T* kj = K + j * 16 * C;
      __m512 acc[2] = {_mm512_mul_ps(qv[0], load16(kj)), _mm512_setzero_ps()};  // two chains: half the latency
      for (int c = 1; c < C; ++c) acc[c & 1] = _mm512_fmadd_ps(qv[c], load16(kj + 16 * c), acc[c & 1]);
      s[j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1])) * scale;
    }
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) {
    float dot = 0.0f;
    for (int64_t i = 0; i < hd; ++i) dot += q[i] * load(K + j * hd + i);
    s[j] = dot * scale;
  }
}

// y = sum_j p[j] V_j, j < n.
template <int C, typename T>
inline void mix(const float* p, const T* V, int64_t n, int64_t hd, float* y) {
#if defined(QMM_AVX512)
  if constexpr (C > 0) {
    __m512 acc[2][C];  // even and odd keys: two independent chains per vector
    for (int c = 0; c < C; ++c) acc[0][c] = acc[1][c] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 2 <= n; j += 2)
      for (int t = 0; t < 2; ++t) {
        const __m512 pj = _mm512_set1_ps(p[j + t]);
        const T* vj = V + (j + t) * 16 * C;
        for (int c = 0; c < C; ++c) acc[t][c] = _mm512_fmadd_ps(pj, load16(vj + 16 * c), acc[t][c]);
      }
    if (j < n) {
      const __m512 pj = _mm512_set1_ps(p[j]);
      for (int c = 0; c < C; ++c) acc[0][c] = _mm512_fmadd_ps(pj, load16(V + j * 16 * C + 16 * c), acc[0][c]);
    }
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(y + 16 * c, _mm512_add_ps(acc[0][c], acc[1][c]));
    return;
  }
#endif
  std::fill(y, y + hd, 0.0f);
  for (int64_t j = 0; j < n; ++j)
    for (int64_t i = 0; i < hd; ++i) y[i] += p[j] * load(V + j * hd + i);
}

// s[j] = exp(s[j] - max) over n scores; returns their sum.
inline float exp_shifted(float* s, int64_t n) {
  float m = -INFINITY;
  int64_t j = 0;
#if defined(QMM_AVX512)
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (; j + 16 <= n; j += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(s + j));
  m = _mm512_reduce_max_ps(mx);
#endif
  for (; j < n; ++j) m = std::max(m, s[j]);
  float sum = 0.0f;
  j = 0;
#if defined(QMM_AVX512)
  const __m512 mv = _mm512_set1_ps(m);
  __m512 acc = _mm512_setzero_ps();
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + j), mv));
    _mm512_storeu_ps(s + j, e);
    acc = _mm512_add_ps(acc, e);
  }
  sum = _mm512_reduce_add_ps(acc);
#endif
  for (; j < n; ++j) {
    s[j] = std::exp(s[j] - m);
    sum += s[j];
  }
  return sum;
}

// x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[half:], x[:half]): apply_rope's two products and sum.
inline void rope(const float* x, const float* cos, const float* sin, float* out, int64_t hd) {
  const int64_t half = hd / 2;
  for (int64_t i = 0; i < half; ++i) out[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
  for (int64_t i = half; i < hd; ++i) out[i] = x[i] * cos[i] + x[i - half] * sin[i];
}

// One row's kv head: rope its `group` query heads (q, contiguous) and its key, write key and value at column p of
// the slot's cache (kc, vc: (L, hd) of this head), attend over columns 0..p -> y (group, hd).
template <int C, typename T>
void attend(const float* q_in, const float* k_in, const float* v_in, const float* cos, const float* sin, T* kc,
            T* vc, int64_t p, int64_t group, int64_t hd, float scale, float* y, std::vector<float>& buf) {
  const int64_t n = p + 1;
  buf.resize(static_cast<size_t>(hd + n + hd));
  float* q = buf.data();  // (hd) a rotated query head
  float* s = q + hd;      // (n) its scores, then unnormalised probabilities
  float* k = s + n;       // (hd) the rotated key, before its rounding to the cache's dtype
  rope(k_in, cos, sin, k, hd);
  for (int64_t i = 0; i < hd; ++i) {
    store(kc + p * hd + i, k[i]);
    store(vc + p * hd + i, v_in[i]);
  }
  for (int64_t h = 0; h < group; ++h) {
    rope(q_in + h * hd, cos, sin, q, hd);
    scores<C>(q, kc, n, hd, scale, s);
    const float inv = 1.0f / exp_shifted(s, n);
    float* yh = y + h * hd;
    mix<C>(s, vc, n, hd, yh);
    for (int64_t i = 0; i < hd; ++i) yh[i] *= inv;
  }
}

template <int C, typename T>
void attention_rows(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                    const at::Tensor& v_cache, int64_t first, const int64_t* pos, int64_t H, float scale,
                    at::Tensor& y) {
  const int64_t B = qkv.size(0), G = k_cache.size(1), L = k_cache.size(2), hd = k_cache.size(3);
  const int64_t group = H / G, width = qkv.size(1);
  const float* x = qkv.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* sn = sin.data_ptr<float>();
  T* kc = reinterpret_cast<T*>(k_cache.data_ptr());
  T* vc = reinterpret_cast<T*>(v_cache.data_ptr());
  float* out = y.data_ptr<float>();
  int64_t keys = 0;  // the work: keys read over all tasks
  for (int64_t b = 0; b < B; ++b) keys += (pos[b] + 1) * G;
  const auto body = [&](int64_t t0, int64_t t1) {
    std::vector<float> buf;
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / G, g = t % G, p = pos[b];
      const float* row = x + b * width;
      const int64_t cell = ((first + b) * G + g) * L * hd;
      attend<C>(row + g * group * hd, row + (H + g) * hd, row + (H + G + g) * hd, c + b * hd, sn + b * hd, kc + cell,
             vc + cell, p, group, hd, scale, out + b * H * hd + g * group * hd, buf);
    }
  };
  if (keys * group * hd < (int64_t{1} << 15)) {
    body(0, B * G);  // a short context: less work than waking a thread
  } else {
    at::parallel_for(0, B * G, 1, body);
  }
}

#if defined(QMM_AVX512)
// Prefill's causal attention (AVX512 only), in tiles: R query rows of one head against 16 keys at a time, the keys
// transposed (KT: hd x keys, fp32) so that a key block's scores are 16 lanes of R accumulators with no horizontal
// sums, and the values read once per key for all R rows. kt / v: one kv head's keys (transposed, zero-padded to a
// multiple of 16) and values (n x hd); q: row t0's query head, rows `width` apart; s: R x ldS scratch.
constexpr int kPrefillRows = 4;

template <int C>
void prefill_tile(const float* q, int64_t width, const float* kt, int64_t ldk, const float* v, int64_t t0,
                  int64_t rows, float scale, float* s, int64_t lds, float* y, int64_t ldy) {
  constexpr int R = kPrefillRows, hd = 16 * C;
  const int64_t n = t0 + rows;  // keys 0..t0+rows-1; row r sees 0..t0+r
  const __m512 lane = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const float* qr[R];  // a short tile's missing rows repeat its last one: never read past q's end, never stored
  for (int r = 0; r < R; ++r) qr[r] = q + std::min<int64_t>(r, rows - 1) * width;
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int d = 0; d < hd; ++d) {
      const __m512 k16 = _mm512_loadu_ps(kt + d * ldk + j0);
      for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(qr[r][d]), k16, acc[r]);
    }
    const __m512 key = _mm512_add_ps(_mm512_set1_ps(static_cast<float>(j0)), lane);
    for (int r = 0; r < R; ++r) {  // keys past the row's own position: -inf
      const __mmask16 future = _mm512_cmp_ps_mask(key, _mm512_set1_ps(static_cast<float>(t0 + r)), _CMP_GT_OQ);
      _mm512_storeu_ps(s + r * lds + j0,
                       _mm512_mask_blend_ps(future, _mm512_mul_ps(acc[r], _mm512_set1_ps(scale)),
                                            _mm512_set1_ps(-INFINITY)));
    }
  }
  const int64_t padded = (n + 15) / 16 * 16;
  float inv[R];
  for (int r = 0; r < R; ++r) inv[r] = r < rows ? 1.0f / exp_shifted(s + r * lds, padded) : 0.0f;
  constexpr int RO = C > 4 ? 2 : 4;  // rows per pass over the values: RO C accumulators in registers
  for (int r0 = 0; r0 < rows; r0 += RO) {
    __m512 o[RO][C];
    for (int r = 0; r < RO; ++r)
      for (int c = 0; c < C; ++c) o[r][c] = _mm512_setzero_ps();
    const int64_t nr = std::min<int64_t>(n, t0 + r0 + RO);  // the pass's last row sees keys up to t0 + r0 + RO - 1
    for (int64_t j = 0; j < nr; ++j) {
      __m512 vj[C];
      for (int c = 0; c < C; ++c) vj[c] = _mm512_loadu_ps(v + j * hd + 16 * c);
      for (int r = 0; r < RO; ++r) {
        const __m512 p = _mm512_set1_ps(s[(r0 + r) * lds + j]);
        for (int c = 0; c < C; ++c) o[r][c] = _mm512_fmadd_ps(p, vj[c], o[r][c]);
      }
    }
    for (int r = 0; r < RO && r0 + r < rows; ++r)
      for (int c = 0; c < C; ++c)
        _mm512_storeu_ps(y + (r0 + r) * ldy + 16 * c, _mm512_mul_ps(o[r][c], _mm512_set1_ps(inv[r0 + r])));
  }
}

template <int C, typename T>
void prefill_heads(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t first,
                   int64_t Tn, int64_t H, float scale, at::Tensor& y) {
  constexpr int R = kPrefillRows, hd = 16 * C;
  const int64_t B = q.size(0) / Tn, G = k_cache.size(1), L = k_cache.size(2), group = H / G, width = q.size(1);
  const int64_t ldk = (Tn + 15) / 16 * 16;
  // every (row, kv head)'s keys transposed and values in fp32, once: (B G) x (hd x ldk + Tn x hd)
  std::vector<float> kv(static_cast<size_t>(B * G * (hd * ldk + Tn * hd)), 0.0f);
  const T* kc = reinterpret_cast<const T*>(k_cache.data_ptr());
  const T* vc = reinterpret_cast<const T*>(v_cache.data_ptr());
  at::parallel_for(0, B * G, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / G, g = i % G, cell = ((first + b) * G + g) * L * hd;
      float* kt = kv.data() + i * (hd * ldk + Tn * hd);
      float* vv = kt + hd * ldk;
      for (int64_t j = 0; j < Tn; ++j)
        for (int d = 0; d < hd; ++d) {
          kt[d * ldk + j] = load(kc + cell + j * hd + d);
          vv[j * hd + d] = load(vc + cell + j * hd + d);
        }
    }
  });
  const int64_t blocks = (Tn + R - 1) / R;
  const float* qp = q.data_ptr<float>();
  float* out = y.data_ptr<float>();
  // tasks (row, head, block of R query rows), a head's blocks taken from both ends alternately: any contiguous
  // range of tasks, what a thread gets, holds about its share of the keys
  at::parallel_for(0, B * H * blocks, 4, [&](int64_t i0, int64_t i1) {
    std::vector<float> s(static_cast<size_t>(R * ldk));
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t bh = i / blocks, k = i % blocks, b = bh / H, h = bh % H;
      const int64_t blk = k % 2 == 0 ? k / 2 : blocks - 1 - k / 2, t0 = blk * R, rows = std::min<int64_t>(R, Tn - t0);
      const float* kt = kv.data() + (b * G + h / group) * (hd * ldk + Tn * hd);
      prefill_tile<C>(qp + (b * Tn + t0) * width + h * hd, width, kt, ldk, kt + hd * ldk, t0, rows, scale, s.data(),
                      ldk, out + (b * Tn + t0) * H * hd + h * hd, H * hd);
    }
  });
}
#endif

}  // namespace

at::Tensor decode_attention(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, int64_t first, const at::Tensor& positions, int64_t n_head,
                            double scale) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous() && v_cache.scalar_type() == k_cache.scalar_type() &&
                  (k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16) &&
                  k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "decode_attention: k_cache and v_cache must be contiguous float32 or bfloat16 CPU tensors of one "
              "(slots, kv heads, length, head dim) shape, got ", k_cache.sizes(), " and ", v_cache.sizes());
  const int64_t S = k_cache.size(0), G = k_cache.size(1), L = k_cache.size(2), hd = k_cache.size(3);
  TORCH_CHECK(G > 0 && n_head > 0 && n_head % G == 0 && hd % 2 == 0,
              "decode_attention: ", n_head, " query heads cannot share ", G, " kv heads of size ", hd);
  const auto is_rows = [](const at::Tensor& t, int64_t b, int64_t w) {
    return t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 2 &&
           t.size(0) == b && t.size(1) == w;
  };
  TORCH_CHECK(positions.device().is_cpu() && positions.scalar_type() == at::kLong && positions.dim() == 1 &&
                  positions.is_contiguous(),
              "decode_attention: positions must be a contiguous int64 CPU vector");
  const int64_t B = positions.size(0);
  TORCH_CHECK(is_rows(qkv, B, (n_head + 2 * G) * hd), "decode_attention: qkv must be contiguous float32 (", B, ", ",
              (n_head + 2 * G) * hd, "), got ", qkv.scalar_type(), " ", qkv.sizes());
  TORCH_CHECK(is_rows(cos, B, hd) && is_rows(sin, B, hd), "decode_attention: cos and sin must be contiguous float32 (",
              B, ", ", hd, ")");
  TORCH_CHECK(first >= 0 && first + B <= S, "decode_attention: rows ", first, "..", first + B - 1, " outside the ",
              S, " slots of the cache");
  const int64_t* pos = positions.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(pos[b] >= 0 && pos[b] < L, "decode_attention: position ", pos[b], " outside the cache's ", L,
                " columns");
  at::Tensor y = at::empty({B, n_head * hd}, qkv.options());
  if (B == 0) return y;
  const float sc = static_cast<float>(scale);
  const bool bf16 = k_cache.scalar_type() == at::kBFloat16;
  const auto run = [&](auto c) {  // head sizes of whole 16-wide vectors get unrolled loops, others plain ones
    constexpr int C = decltype(c)::value;
    if (bf16) {
      attention_rows<C, uint16_t>(qkv, cos, sin, k_cache, v_cache, first, pos, n_head, sc, y);
    } else {
      attention_rows<C, float>(qkv, cos, sin, k_cache, v_cache, first, pos, n_head, sc, y);
    }
  };
  switch (hd) {
    case 32: run(std::integral_constant<int, 2>{}); break;
    case 64: run(std::integral_constant<int, 4>{}); break;
    case 128: run(std::integral_constant<int, 8>{}); break;
    default: run(std::integral_constant<int, 0>{}); break;
  }
  return y;
}

at::Tensor silu_mul(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 1 &&
                  x.size(-1) % 2 == 0,
              "silu_mul: x must be a contiguous float32 CPU tensor with an even last dimension, got ",
              x.scalar_type(), " ", x.sizes());
  const int64_t F = x.size(-1) / 2;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = F;
  at::Tensor y = at::empty(shape, x.options());
  const int64_t rows = F > 0 ? x.numel() / (2 * F) : 0;
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // silu(g) u = g / (1 + exp(-g)) * u: PyTorch's silu, then the product
  const auto body = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* g = xp + r * 2 * F;
      const float* u = g + F;
      float* o = yp + r * F;
      int64_t j = 0;
#if defined(QMM_AVX512)
      const __m512 one = _mm512_set1_ps(1.0f);
      for (; j + 16 <= F; j += 16) {
        const __m512 gv = _mm512_loadu_ps(g + j);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv));
        _mm512_storeu_ps(o + j, _mm512_mul_ps(_mm512_div_ps(gv, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + j)));
      }
#endif
      for (; j < F; ++j) o[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
    }
  };
  if (rows * F < (int64_t{1} << 15)) {
    body(0, rows);
  } else {
    at::parallel_for(0, rows, std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(F, 1)), body);
  }
  return y;
}

at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t first,
                             int64_t T, int64_t n_head, double scale) {
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                  v_cache.is_contiguous() && k_cache.scalar_type() == v_cache.scalar_type() &&
                  (k_cache.scalar_type() == at::kFloat || k_cache.scalar_type() == at::kBFloat16) &&
                  k_cache.device().is_cpu() && v_cache.device().is_cpu(),
              "prefill_attention: k_cache and v_cache must be contiguous float32 or bfloat16 (slots, kv_heads, "
              "length, head_dim) CPU tensors of one shape");
  const int64_t S = k_cache.size(0), G = k_cache.size(1), L = k_cache.size(2), hd = k_cache.size(3);
  TORCH_CHECK(G > 0 && n_head > 0 && n_head % G == 0, "prefill_attention: ", n_head, " query heads on ", G,
              " kv heads");
  TORCH_CHECK(q.device().is_cpu() && q.scalar_type() == at::kFloat && q.is_contiguous() && q.dim() == 2 && T > 0 &&
                  q.size(0) % T == 0 && q.size(1) >= n_head * hd,
              "prefill_attention: q must be a contiguous float32 (B T, >= ", n_head * hd, ") CPU tensor, got ",
              q.scalar_type(), " ", q.sizes());
  const int64_t B = q.size(0) / T;
  TORCH_CHECK(first >= 0 && first + B <= S && T <= L, "prefill_attention: ", B, " rows of ", T,
              " tokens from slot ", first, " do not fit the cache's ", S, " slots of ", L);
  TORCH_CHECK(hd == 32 || hd == 64 || hd == 128, "prefill_attention: head_dim ", hd, " is not 32, 64 or 128");
  at::Tensor y = at::empty({B * T, n_head * hd}, q.options());
#if defined(QMM_AVX512)
  if (B == 0) return y;
  const float sc = static_cast<float>(scale);
  const auto run = [&](auto c) {
    constexpr int C = decltype(c)::value;
    if (k_cache.scalar_type() == at::kFloat)
      prefill_heads<C, float>(q, k_cache, v_cache, first, T, n_head, sc, y);
    else
      prefill_heads<C, uint16_t>(q, k_cache, v_cache, first, T, n_head, sc, y);
  };
  if (hd == 32) run(std::integral_constant<int, 2>{});
  else if (hd == 64) run(std::integral_constant<int, 4>{});
  else run(std::integral_constant<int, 8>{});
  return y;
#else
  TORCH_CHECK(false, "prefill_attention: needs AVX512 (this build: another code path)");
  return y;
#endif
}

at::Tensor rope_heads(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t n_heads) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2,
              "rope_heads: x must be a contiguous float32 (M, W) CPU tensor, got ", x.scalar_type(), " ", x.sizes());
  const int64_t M = x.size(0), hd = cos.dim() == 2 ? cos.size(1) : 0;
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                    t->size(0) == M && t->size(1) == hd && hd > 0 && hd % 2 == 0,
                "rope_heads: cos and sin must be contiguous float32 (", M, ", head_dim) CPU tensors with an even "
                "head_dim, got ", t->scalar_type(), " ", t->sizes());
  TORCH_CHECK(n_heads > 0 && n_heads * hd <= x.size(1), "rope_heads: ", n_heads, " heads of ", hd,
              " do not fit in rows of ", x.size(1));
  at::Tensor y = at::empty({M, n_heads * hd}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t W = x.size(1);
  const auto body = [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t h = 0; h < n_heads; ++h) rope(xp + r * W + h * hd, cp + r * hd, sp + r * hd, yp + (r * n_heads + h) * hd, hd);
  };
  if (M * n_heads * hd < (int64_t{1} << 15)) {
    body(0, M);
  } else {
    at::parallel_for(0, M, std::max<int64_t>(1, (int64_t{1} << 14) / (n_heads * hd)), body);
  }
  return y;
}

namespace {

at::Tensor project(const Linear& linear, const at::Tensor& x) {
  const auto& [kind, a, b, c, bias, n, k, precise] = linear;
  if (kind == 0) return at::linear(x, a, bias);
  TORCH_CHECK(kind == 4 || kind == 8, "decode_block: unknown Linear kind ", kind);
  at::Tensor y = kind == 4 ? int4_matmul(x, a, b, c, n, k, precise) : int8_matmul(x, a, b, c, n, k, precise);
  return bias ? y + *bias : y;  // QuantLinear's y + bias
}

}  // namespace

at::Tensor decode_block(const at::Tensor& x, const at::Tensor& attn_norm, const at::Tensor& mlp_norm, double eps,
                        const std::vector<Linear>& linears, const at::Tensor& cos, const at::Tensor& sin,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t first,
                        const at::Tensor& positions, int64_t n_head, double scale) {
  TORCH_CHECK(linears.size() == 4, "decode_block: expected 4 Linears (qkv, out, fc_in, fc_out), got ",
              linears.size());
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "decode_block: x must be contiguous float32 (B, d), got ", x.scalar_type(), " ", x.sizes());
  const at::Tensor qkv = project(linears[0], rms_norm_rows(x, attn_norm, eps));
  const at::Tensor h = x + project(linears[1], decode_attention(qkv, cos, sin, k_cache, v_cache, first, positions,
                                                               n_head, scale));
  return h + project(linears[3], silu_mul(project(linears[2], rms_norm_rows(h, mlp_norm, eps))));
}

}  // namespace lmforge
