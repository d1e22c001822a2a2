// Quantized matmul for GGUF block formats, AVX2 + FMA + F16C.
//
// y[m, n] = sum_k x[m, k] * W[n, k], with W kept in its GGUF blocks. Each weight block is
// dequantized to float32 exactly as ggml defines it, into a small buffer that stays in L1, and
// dotted with up to MR activation rows in float32: the weights are read from memory once per
// MR rows, at their quantized size, and activations are never rounded to 8 bits.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <cstdlib>
#include <vector>

namespace {

inline float f16(const uint8_t* p) {
    uint16_t h;
    std::memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

// One-row fast path for 32-weight blocks with one scale d (and offset m):
// sum_i (d q_i + m) x_i = d * sum_i q_i x_i + m * sum_i x_i, so the quantized integers are
// converted to float and multiplied by x directly, with no dequantized copy. `xs` is the block's
// sum of x. Rounding differs from dequantize-then-dot only in float32 noise.
inline __m256 dot32(const __m256i q[4], const float* x) {
    __m256 s0 = _mm256_mul_ps(_mm256_cvtepi32_ps(q[0]), _mm256_loadu_ps(x));
    __m256 s1 = _mm256_mul_ps(_mm256_cvtepi32_ps(q[1]), _mm256_loadu_ps(x + 8));
    s0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[2]), _mm256_loadu_ps(x + 16), s0);
    s1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(q[3]), _mm256_loadu_ps(x + 24), s1);
    return _mm256_add_ps(s0, s1);
}

// ---- block dequantizers: (block bytes) -> float y[N] ------------------------------------
// Formulas follow ggml's dequantize_row_* so values equal the gguf package's reference.

struct Q8_0 {
    static constexpr int N = 32, BYTES = 34;
    static constexpr bool DOT32 = true;
    static inline void dot(const uint8_t* b, const float* x, float, __m256& acc, float&) {
        const int8_t* p = reinterpret_cast<const int8_t*>(b + 2);
        __m256i q[4];
        for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 8 * i)));
        acc = _mm256_fmadd_ps(dot32(q, x), _mm256_set1_ps(f16(b)), acc);
    }
    static inline void dequant(const uint8_t* b, float* y) {
        const __m256 d = _mm256_set1_ps(f16(b));
        const int8_t* q = reinterpret_cast<const int8_t*>(b + 2);
        for (int i = 0; i < 32; i += 8) {
            __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + i)));
            _mm256_storeu_ps(y + i, _mm256_mul_ps(_mm256_cvtepi32_ps(v), d));
        }
    }
};

// low nibbles -> y[0..15], high nibbles -> y[16..31], as int32 vectors
inline void nibbles(const uint8_t* qs, __m256i out[4]) {
    __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
    __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
    __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
    out[0] = _mm256_cvtepu8_epi32(lo);
    out[1] = _mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8));
    out[2] = _mm256_cvtepu8_epi32(hi);
    out[3] = _mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8));
}

struct Q4_1 {
    static constexpr int N = 32, BYTES = 20;
    static constexpr bool DOT32 = true;
    static inline void dot(const uint8_t* b, const float* x, float xs, __m256& acc, float& accm) {
        __m256i q[4];
        nibbles(b + 4, q);
        acc = _mm256_fmadd_ps(dot32(q, x), _mm256_set1_ps(f16(b)), acc);
        accm += f16(b + 2) * xs;
    }
    static inline void dequant(const uint8_t* b, float* y) {
        const __m256 d = _mm256_set1_ps(f16(b)), m = _mm256_set1_ps(f16(b + 2));
        __m256i q[4];
        nibbles(b + 4, q);
        for (int i = 0; i < 4; ++i)
            _mm256_storeu_ps(y + 8 * i, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(q[i]), d), m));
    }
};

// bit i of the 32-bit qh field is the fifth bit of weight i
inline void q5_0_ints(const uint8_t* b, __m256i q[4]) {
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    const __m256i bits = _mm256_set1_epi32(int(qh)), one = _mm256_set1_epi32(1);
    nibbles(b + 6, q);
    for (int i = 0; i < 4; ++i) {
        const __m256i shift = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(8 * i));
        q[i] = _mm256_or_si256(q[i], _mm256_slli_epi32(_mm256_and_si256(_mm256_srlv_epi32(bits, shift), one), 4));
    }
}

inline void q4_0_ints(const uint8_t* b, __m256i q[4]) { nibbles(b + 2, q); }

// 32-weight blocks with one fp16 scale d first and unsigned integers q: y = d * (q - OFFSET).
template <int BYTES_, int OFFSET, void (*INTS)(const uint8_t*, __m256i*)>
struct OffsetBlock {
    static constexpr int N = 32, BYTES = BYTES_;
    static constexpr bool DOT32 = true;
    static inline void dot(const uint8_t* b, const float* x, float xs, __m256& acc, float& accm) {
        __m256i q[4];
        INTS(b, q);
        const float d = f16(b);
        acc = _mm256_fmadd_ps(dot32(q, x), _mm256_set1_ps(d), acc);
        accm -= float(OFFSET) * d * xs;
    }
    static inline void dequant(const uint8_t* b, float* y) {
        const __m256 d = _mm256_set1_ps(f16(b));
        const __m256i off = _mm256_set1_epi32(OFFSET);
        __m256i q[4];
        INTS(b, q);
        for (int i = 0; i < 4; ++i)
            _mm256_storeu_ps(y + 8 * i, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(q[i], off)), d));
    }
};
using Q4_0 = OffsetBlock<18, 8, q4_0_ints>;
using Q5_0 = OffsetBlock<22, 16, q5_0_ints>;

inline void scale_min_k4(int j, const uint8_t* q, uint8_t& d, uint8_t& m) {
    if (j < 4) {
        d = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

inline __m256i u8x8(const uint8_t* p) {
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}

struct Q4_K {
    static constexpr int N = 256, BYTES = 144;
    static constexpr bool DOT32 = false;
    static inline void dequant(const uint8_t* b, float* y) {
        const float d = f16(b), dmin = f16(b + 2);
        const uint8_t* scales = b + 4;
        const uint8_t* q = b + 16;
        const __m256i lo4 = _mm256_set1_epi32(0xF);
        for (int j = 0, is = 0; j < 256; j += 64, is += 2, q += 32) {
            uint8_t sc, m;
            scale_min_k4(is, scales, sc, m);
            const __m256 d1 = _mm256_set1_ps(d * sc), m1 = _mm256_set1_ps(dmin * m);
            scale_min_k4(is + 1, scales, sc, m);
            const __m256 d2 = _mm256_set1_ps(d * sc), m2 = _mm256_set1_ps(dmin * m);
            for (int l = 0; l < 32; l += 8) {
                const __m256i v = u8x8(q + l);
                const __m256 lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, lo4));
                const __m256 hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
                _mm256_storeu_ps(y + j + l, _mm256_sub_ps(_mm256_mul_ps(d1, lo), m1));
                _mm256_storeu_ps(y + j + 32 + l, _mm256_sub_ps(_mm256_mul_ps(d2, hi), m2));
            }
        }
    }
};

struct Q6_K {
    static constexpr int N = 256, BYTES = 210;
    static constexpr bool DOT32 = false;
    static inline void dequant(const uint8_t* b, float* y) {
        const uint8_t* ql = b;
        const uint8_t* qh = b + 128;
        const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
        const float d = f16(b + 208);
        const __m256i lo4 = _mm256_set1_epi32(0xF), three = _mm256_set1_epi32(3), off = _mm256_set1_epi32(32);
        for (int n = 0; n < 256; n += 128, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; l += 8) {
                const int is = l / 16;
                const __m256i a = u8x8(ql + l), c = u8x8(ql + l + 32), h = u8x8(qh + l);
                const __m256i q1 = _mm256_sub_epi32(_mm256_or_si256(_mm256_and_si256(a, lo4), _mm256_slli_epi32(_mm256_and_si256(h, three), 4)), off);
                const __m256i q2 = _mm256_sub_epi32(_mm256_or_si256(_mm256_and_si256(c, lo4), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 2), three), 4)), off);
                const __m256i q3 = _mm256_sub_epi32(_mm256_or_si256(_mm256_srli_epi32(a, 4), _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(h, 4), three), 4)), off);
                const __m256i q4 = _mm256_sub_epi32(_mm256_or_si256(_mm256_srli_epi32(c, 4), _mm256_slli_epi32(_mm256_srli_epi32(h, 6), 4)), off);
                _mm256_storeu_ps(y + l, _mm256_mul_ps(_mm256_set1_ps(d * sc[is + 0]), _mm256_cvtepi32_ps(q1)));
                _mm256_storeu_ps(y + l + 32, _mm256_mul_ps(_mm256_set1_ps(d * sc[is + 2]), _mm256_cvtepi32_ps(q2)));
                _mm256_storeu_ps(y + l + 64, _mm256_mul_ps(_mm256_set1_ps(d * sc[is + 4]), _mm256_cvtepi32_ps(q3)));
                _mm256_storeu_ps(y + l + 96, _mm256_mul_ps(_mm256_set1_ps(d * sc[is + 6]), _mm256_cvtepi32_ps(q4)));
            }
        }
    }
};

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

constexpr int MR = 4;   // activation rows sharing one dequantized block

// R activation rows against one weight row. FMA latency is 4 cycles: with one accumulator the
// loop would wait on itself, so each row gets A = 4/R independent accumulators.
template <typename B, int R>
inline void row_dot(const uint8_t* row, int64_t nb, const float* x, int64_t K, float* y, int64_t y_stride) {
    constexpr int A = R >= 4 ? 1 : 4 / R;
    static_assert(B::N % (8 * A) == 0, "block must split evenly over the accumulators");
    alignas(64) float buf[B::N];
    __m256 acc[R][A];
    for (int r = 0; r < R; ++r)
        for (int a = 0; a < A; ++a) acc[r][a] = _mm256_setzero_ps();
    for (int64_t blk = 0; blk < nb; ++blk) {
        B::dequant(row + blk * B::BYTES, buf);
        const float* xb = x + blk * B::N;
        for (int i = 0; i < B::N; i += 8 * A)
            for (int a = 0; a < A; ++a) {
                const __m256 wv = _mm256_load_ps(buf + i + 8 * a);
                for (int r = 0; r < R; ++r)
                    acc[r][a] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(xb + r * K + i + 8 * a), acc[r][a]);
            }
    }
    for (int r = 0; r < R; ++r) {
        __m256 s = acc[r][0];
        for (int a = 1; a < A; ++a) s = _mm256_add_ps(s, acc[r][a]);
        y[r * y_stride] = hsum(s);
    }
}

// One activation row against every weight row, without dequantized copies (see dot32).
template <typename B>
void matvec(const float* x, const uint8_t* w, float* y, int64_t N, int64_t K) {
    const int64_t nb = K / B::N, row_bytes = nb * B::BYTES;
    std::vector<float> xsum(nb);
    for (int64_t blk = 0; blk < nb; ++blk) {
        float s = 0.f;
        for (int i = 0; i < B::N; ++i) s += x[blk * B::N + i];
        xsum[blk] = s;
    }
    at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
            const uint8_t* row = w + n * row_bytes;
            __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();   // two chains
            float accm = 0.f;
            int64_t blk = 0;
            for (; blk + 1 < nb; blk += 2) {
                B::dot(row + blk * B::BYTES, x + blk * B::N, xsum[blk], acc0, accm);
                B::dot(row + (blk + 1) * B::BYTES, x + (blk + 1) * B::N, xsum[blk + 1], acc1, accm);
            }
            if (blk < nb) B::dot(row + blk * B::BYTES, x + blk * B::N, xsum[blk], acc0, accm);
            y[n] = hsum(_mm256_add_ps(acc0, acc1)) + accm;
        }
    });
}

// ---- batched decode: dequantize a panel of weight rows once, reuse it for every row ---------
// R activation rows x C panel rows: R*C accumulators (12 of AVX2's 16 registers at 4x3), each
// loaded vector feeding several FMAs. The panel stays in L1/L2 while all M rows pass over it.
template <int R, int C>
inline void tile(const float* x, const float* wp, int64_t K, float* y, int64_t N) {
    __m256 acc[R][C];
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) {
        __m256 wv[C];
        for (int c = 0; c < C; ++c) wv[c] = _mm256_load_ps(wp + c * K + k);
        for (int r = 0; r < R; ++r) {
            const __m256 xv = _mm256_loadu_ps(x + r * K + k);
            for (int c = 0; c < C; ++c) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) y[r * N + c] = hsum(acc[r][c]);
}

template <int R>
inline void tile_r(int c, const float* x, const float* wp, int64_t K, float* y, int64_t N) {
    switch (c) {
        case 3: tile<R, 3>(x, wp, K, y, N); break;
        case 2: tile<R, 2>(x, wp, K, y, N); break;
        default: tile<R, 1>(x, wp, K, y, N); break;
    }
}

constexpr int PANEL = 24;   // weight rows per panel (a multiple of the tile's 3)

template <typename B>
void matmul_panel(const float* x, const uint8_t* w, float* y, int64_t M, int64_t N, int64_t K) {
    const int64_t nb = K / B::N, row_bytes = nb * B::BYTES;
    at::parallel_for(0, (N + PANEL - 1) / PANEL, 1, [&](int64_t p0, int64_t p1) {
        float* panel = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * PANEL * K));
        for (int64_t p = p0; p < p1; ++p) {
            const int64_t n0 = p * PANEL, np = std::min<int64_t>(PANEL, N - n0);
            for (int64_t r = 0; r < np; ++r)
                for (int64_t blk = 0; blk < nb; ++blk)
                    B::dequant(w + (n0 + r) * row_bytes + blk * B::BYTES, panel + r * K + blk * B::N);
            for (int64_t m0 = 0; m0 < M; m0 += 4) {
                const int mr = int(std::min<int64_t>(4, M - m0));
                for (int64_t c0 = 0; c0 < np; c0 += 3) {
                    const int c = int(std::min<int64_t>(3, np - c0));
                    const float* xm = x + m0 * K;
                    const float* wp = panel + c0 * K;
                    float* ym = y + m0 * N + n0 + c0;
                    switch (mr) {
                        case 4: tile_r<4>(c, xm, wp, K, ym, N); break;
                        case 3: tile_r<3>(c, xm, wp, K, ym, N); break;
                        case 2: tile_r<2>(c, xm, wp, K, ym, N); break;
                        default: tile_r<1>(c, xm, wp, K, ym, N); break;
                    }
                }
            }
        }
        std::free(panel);
    });
}

constexpr int64_t PANEL_MIN_ROWS = 8;   // from here on a panel is reused enough to pay for itself

template <typename B>
void matmul(const float* x, const uint8_t* w, float* y, int64_t M, int64_t N, int64_t K) {
    if constexpr (B::DOT32) {
        if (M == 1) return matvec<B>(x, w, y, N, K);
    }
    if (M >= PANEL_MIN_ROWS && K % 8 == 0) return matmul_panel<B>(x, w, y, M, N, K);
    const int64_t nb = K / B::N, row_bytes = nb * B::BYTES;
    at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
        for (int64_t m0 = 0; m0 < M; m0 += MR) {
            const int64_t mr = std::min<int64_t>(MR, M - m0);
            const float* xm = x + m0 * K;
            for (int64_t n = n0; n < n1; ++n) {
                const uint8_t* row = w + n * row_bytes;
                float* yn = y + m0 * N + n;
                switch (mr) {
                    case 4: row_dot<B, 4>(row, nb, xm, K, yn, N); break;
                    case 3: row_dot<B, 3>(row, nb, xm, K, yn, N); break;
                    case 2: row_dot<B, 2>(row, nb, xm, K, yn, N); break;
                    default: row_dot<B, 1>(row, nb, xm, K, yn, N); break;
                }
            }
        }
    });
}

template <typename B>
void dequant_rows(const uint8_t* w, float* y, int64_t N, int64_t K) {
    const int64_t nb = K / B::N, row_bytes = nb * B::BYTES;
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n)
            for (int64_t blk = 0; blk < nb; ++blk)
                B::dequant(w + n * row_bytes + blk * B::BYTES, y + n * K + blk * B::N);
    });
}

// ggml type ids
enum : int64_t { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q8_0 = 8, T_Q4_K = 12, T_Q6_K = 14 };

template <typename F>
void dispatch(int64_t qtype, F&& f) {
    switch (qtype) {
        case T_Q4_0: f(Q4_0{}); break;
        case T_Q4_1: f(Q4_1{}); break;
        case T_Q5_0: f(Q5_0{}); break;
        case T_Q8_0: f(Q8_0{}); break;
        case T_Q4_K: f(Q4_K{}); break;
        case T_Q6_K: f(Q6_K{}); break;
        default: TORCH_CHECK(false, "qmatmul: unsupported ggml type id ", qtype);
    }
}

void check_weight(const torch::Tensor& w, int64_t K, int64_t block, int64_t bytes) {
    TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(), "weight must be contiguous uint8 [N, row_bytes]");
    TORCH_CHECK(K % block == 0 && w.size(1) == K / block * bytes, "weight row has ", w.size(1), " bytes, expected ", K / block * bytes);
}

}  // namespace

// x: float32 [..., K] -> [..., N]; the leading dimensions are flattened here rather than in
// Python, to save dispatches on the decode path.
torch::Tensor qmatmul(torch::Tensor x, torch::Tensor w, int64_t qtype, int64_t K) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() >= 1 && x.size(-1) == K, "x must be float32 [..., K] with K=", K);
    x = x.contiguous();
    const int64_t M = x.numel() / K, N = w.size(0);
    auto out_shape = x.sizes().vec();
    out_shape.back() = N;
    auto y = torch::empty(out_shape, x.options());
    dispatch(qtype, [&](auto b) {
        using B = decltype(b);
        check_weight(w, K, B::N, B::BYTES);
        matmul<B>(x.data_ptr<float>(), w.data_ptr<uint8_t>(), y.data_ptr<float>(), M, N, K);
    });
    return y;
}

torch::Tensor dequantize(torch::Tensor w, int64_t qtype, int64_t K) {
    const int64_t N = w.size(0);
    auto y = torch::empty({N, K}, torch::dtype(torch::kFloat32));
    dispatch(qtype, [&](auto b) {
        using B = decltype(b);
        check_weight(w, K, B::N, B::BYTES);
        dequant_rows<B>(w.data_ptr<uint8_t>(), y.data_ptr<float>(), N, K);
    });
    return y;
}

// y = x * rsqrt(mean(x^2) + eps) * w over the last dimension, in that order (as transformers
// computes it); one dispatch instead of torch's six.
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && w.dtype() == torch::kFloat32 && w.dim() == 1 &&
                x.size(-1) == w.size(0), "rms_norm: x [..., D] and w [D] must be float32");
    x = x.contiguous();
    w = w.contiguous();
    const int64_t D = w.size(0), rows = x.numel() / D;
    auto y = torch::empty_like(x);
    const float* xp = x.data_ptr<float>();
    const float* wp = w.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    auto body = [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const float* xr = xp + r * D;
            float* yr = yp + r * D;
            __m256 acc = _mm256_setzero_ps();
            int64_t i = 0;
            for (; i + 8 <= D; i += 8) {
                const __m256 v = _mm256_loadu_ps(xr + i);
                acc = _mm256_fmadd_ps(v, v, acc);
            }
            float ss = hsum(acc);
            for (; i < D; ++i) ss += xr[i] * xr[i];
            const float scale = 1.0f / std::sqrt(ss / float(D) + float(eps));
            for (i = 0; i < D; ++i) yr[i] = (xr[i] * scale) * wp[i];
        }
    };
    if (rows < 16) body(0, rows); else at::parallel_for(0, rows, 16, body);
    return y;
}

// Decode attention (one new token per sequence) reading keys and values through the paged
// cache: for sequence b, key j lives in slot gather_slots[b, j]. Query head h uses KV head
// h / (H / KVH) (grouped-query attention). A window > 0 keeps only the last `window` keys.
torch::Tensor paged_attention_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor gather_slots, torch::Tensor context_lens,
                                     double scale, int64_t window) {
    TORCH_CHECK(q.dtype() == torch::kFloat32 && q.dim() == 3, "q must be float32 [B, H, D]");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 3, "caches must be contiguous [S, KVH, D]");
    q = q.contiguous();
    gather_slots = gather_slots.contiguous();
    context_lens = context_lens.contiguous();
    const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1), L = gather_slots.size(1);
    TORCH_CHECK(k_cache.size(2) == D && H % KVH == 0 && D % 8 == 0, "paged_attention_decode: shape mismatch");
    auto out = torch::empty_like(q);
    const float* qp = q.data_ptr<float>();
    const float* kp = k_cache.data_ptr<float>();
    const float* vp = v_cache.data_ptr<float>();
    const int64_t* slots = gather_slots.data_ptr<int64_t>();
    const int64_t* lens = context_lens.data_ptr<int64_t>();
    float* op = out.data_ptr<float>();
    const int64_t group = H / KVH;
    at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
        std::vector<float> scores(L);
        std::vector<float> acc(D);
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t b = t / H, h = t % H, kvh = h / group;
            const int64_t n = lens[b], start = window > 0 ? std::max<int64_t>(0, n - window) : 0;
            const float* qv = qp + (b * H + h) * D;
            float mx = -INFINITY;
            for (int64_t j = start; j < n; ++j) {
                const float* kv = kp + (slots[b * L + j] * KVH + kvh) * D;
                __m256 s = _mm256_setzero_ps();
                for (int64_t i = 0; i < D; i += 8)
                    s = _mm256_fmadd_ps(_mm256_loadu_ps(qv + i), _mm256_loadu_ps(kv + i), s);
                scores[j] = hsum(s) * float(scale);
                mx = std::max(mx, scores[j]);
            }
            float denom = 0.f;
            for (int64_t j = start; j < n; ++j) {
                scores[j] = std::exp(scores[j] - mx);
                denom += scores[j];
            }
            std::fill(acc.begin(), acc.end(), 0.f);
            for (int64_t j = start; j < n; ++j) {
                const float* vv = vp + (slots[b * L + j] * KVH + kvh) * D;
                const __m256 p = _mm256_set1_ps(scores[j] / denom);
                for (int64_t i = 0; i < D; i += 8)
                    _mm256_storeu_ps(acc.data() + i, _mm256_fmadd_ps(p, _mm256_loadu_ps(vv + i), _mm256_loadu_ps(acc.data() + i)));
            }
            std::copy(acc.begin(), acc.end(), op + (b * H + h) * D);
        }
    });
    return out;
}

// Rotary position embedding applied in place to q [B, T, H, D] and k [B, T, KVH, D] with
// cos/sin tables [max_len, D/2] at positions [B, T]. interleaved: pairs (x[2i], x[2i+1]) (llama
// GGUFs); otherwise (x[i], x[i + D/2]) (neox layout, Gemma).
void rope_(torch::Tensor q, torch::Tensor k, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
           bool interleaved) {
    TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && q.dtype() == torch::kFloat32 && k.dtype() == torch::kFloat32 &&
                q.dim() == 4 && k.dim() == 4, "rope_: q and k must be contiguous float32 [B, T, H, D]");
    positions = positions.contiguous();
    const int64_t B = q.size(0), T = q.size(1), D = q.size(3), half = D / 2;
    TORCH_CHECK(cos.size(1) == half && k.size(3) == D && positions.numel() == B * T, "rope_: shape mismatch");
    const int64_t* pos = positions.data_ptr<int64_t>();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    for (torch::Tensor* x : {&q, &k}) {
        const int64_t heads = x->size(2);
        float* xp = x->data_ptr<float>();
        auto body = [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) {          // r = b * T + t
                const float* c = cp + pos[r] * half;
                const float* s = sp + pos[r] * half;
                for (int64_t h = 0; h < heads; ++h) {
                    float* v = xp + (r * heads + h) * D;
                    for (int64_t i = 0; i < half; ++i) {
                        float* a = interleaved ? v + 2 * i : v + i;
                        float* b = interleaved ? v + 2 * i + 1 : v + i + half;
                        const float x0 = *a, x1 = *b;
                        *a = x0 * c[i] - x1 * s[i];
                        *b = x0 * s[i] + x1 * c[i];
                    }
                }
            }
        };
        if (B * T < 16) body(0, B * T); else at::parallel_for(0, B * T, 16, body);
    }
}

// One transformer block for B decoding sequences (one new token each) in a single call. The
// same kernels the Python block calls, in the same order (so the same numbers), without the
// ~15 Python-level dispatches per block that dominate a small model's decode step otherwise.
// w: attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down (GGUF blocks, types in
// qtypes). norms: attn_norm, ffn_norm, and for Gemma (gemma=true) attn_q_norm, attn_k_norm,
// post_attention_norm, post_ffw_norm; Gemma also uses GELU(tanh) where Llama uses SiLU.
torch::Tensor decode_block(torch::Tensor x, std::vector<torch::Tensor> w, std::vector<int64_t> qtypes,
                           std::vector<torch::Tensor> norms, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                           double eps, torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slot_mapping,
                           torch::Tensor decode_slots, torch::Tensor decode_lens, torch::Tensor positions,
                           torch::Tensor cos, torch::Tensor sin, bool interleaved, double scale, int64_t window,
                           bool gemma) {
    TORCH_CHECK(x.dim() == 2 && w.size() == 7 && qtypes.size() == 7 && norms.size() == (gemma ? 6u : 2u),
                "decode_block: x [B, D], 7 weights, 2 (llama) or 6 (gemma) norms");
    const int64_t B = x.size(0), D = x.size(1), HD = n_heads * head_dim;
    auto h = rms_norm(x, norms[0], eps);
    auto q = qmatmul(h, w[0], qtypes[0], D).view({1, B, n_heads, head_dim});
    auto k = qmatmul(h, w[1], qtypes[1], D).view({1, B, n_kv_heads, head_dim});
    auto v = qmatmul(h, w[2], qtypes[2], D).view({B, n_kv_heads, head_dim});
    if (gemma) {
        q = rms_norm(q, norms[2], eps);
        k = rms_norm(k, norms[3], eps);
    }
    rope_(q, k, positions, cos, sin, interleaved);
    k_cache.index_copy_(0, slot_mapping, k.view({B, n_kv_heads, head_dim}));
    v_cache.index_copy_(0, slot_mapping, v);
    auto a = paged_attention_decode(q.view({B, n_heads, head_dim}), k_cache, v_cache, decode_slots, decode_lens,
                                    scale, window);
    auto o = qmatmul(a.view({B, HD}), w[3], qtypes[3], HD);
    if (gemma) o = rms_norm(o, norms[4], eps);
    x = x + o;
    h = rms_norm(x, norms[1], eps);
    auto g = qmatmul(h, w[4], qtypes[4], D);
    auto u = qmatmul(h, w[5], qtypes[5], D);
    g = (gemma ? at::gelu(g, "tanh") : at::silu(g)) * u;
    auto d = qmatmul(g, w[6], qtypes[6], g.size(1));
    if (gemma) d = rms_norm(d, norms[5], eps);
    return x + d;
}

// The ops hold no Python objects while they compute, so they let go of the GIL: the server's
// event loop (another thread) keeps serving while the engine thread is inside a kernel.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    using release = py::call_guard<py::gil_scoped_release>;
    m.def("rope_", &rope_, "rotary embedding, in place on q and k", release());
    m.def("decode_block", &decode_block, "one transformer block for decoding sequences", release());
    m.def("paged_attention_decode", &paged_attention_decode, "one-token attention through block tables", release());
    m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension", release());
    m.def("qmatmul", &qmatmul, "y = x @ dequant(W)^T for GGUF-quantized W", release());
    m.def("dequantize", &dequantize, "GGUF blocks -> float32 [N, K]", release());
}
