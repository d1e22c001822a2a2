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
#include <memory>
#include <cstdlib>
#include <type_traits>
#include <vector>
#include <atomic>
#include <sys/syscall.h>
#include <unistd.h>

// Built with -mavx512f/bw/vl/dq -mavx512vnni on CPUs that have them (see __init__.py): integer
// dot products then use VNNI, and many rows take the int16 GEMM below.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && defined(__AVX512VNNI__)
#define JISU_AVX512 1
#endif
// and with -mavx512bf16 -mamx-tile -mamx-bf16 where the CPU has AMX: many rows take bf16 tiles
#if defined(JISU_AVX512) && defined(__AVX512BF16__) && defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define JISU_AMX 1
#endif

#ifdef JISU_AVX512
inline __m512 act_of(__m512 x, bool gelu);   // act_mul_'s activation (defined with vexp, below)
#endif

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

// ---- int8 activations: the activation row is quantized per 32 values to int8 (as ggml's Q8_0
// does for its own dot products), and each weight block is dotted with it in integers: AVX2's
// maddubs multiplies 32 unsigned weight bytes by 32 signed activation bytes in one instruction,
// where float32 needs four FMAs plus the conversions. Per 32-value block b the row carries the
// scale d[b] (x ~ d q), the exact float sum f[b] = sum x, and with s = sum q the offset terms
// the weight types need (g8, c8, c16 below). Unsigned weight codes u with a midpoint (Q4: 8,
// Q5: 16) are dotted as sum u q - mid * s, so the rounding error of q is weighed by the
// centred u - mid, not by u.
constexpr int BASE = 254;   // second digit: x = d (q + q2 / BASE), |q2| <= 127

struct XQ {
    const int8_t* q;
    const int8_t* q2;   // second digit (16-bit mode only)
    const float* d;
    const float* f;
    const float* g8;    // 8 (f - d s): Q4_1 / Q4_K's midpoint terms
    const float* c8;    // -8 d s
    const float* c16;   // -16 d s
    // 16-bit mode, AVX-512: each code BASE q + q2 as one int16, blocks in pairs (2p, 2p + 1) of
    // 64 words: values 0-15 of block 2p, 0-15 of 2p + 1, then 16-31 of each (see words_dot)
    const int16_t* w16;
};

struct XQBuffer {
    int digits = 1;
    std::vector<int8_t> q, q2;
    std::vector<float> d, f, g8, c8, c16;
    std::vector<int16_t> w16;
    XQ view() const { return {q.data(), q2.data(), d.data(), f.data(), g8.data(), c8.data(), c16.data(), w16.data()}; }
};

inline int32_t hsum_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

inline __m256i pack_i8(const __m256i qi[4]) {
    const __m256i p16a = _mm256_packs_epi32(qi[0], qi[1]), p16b = _mm256_packs_epi32(qi[2], qi[3]);
    return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(p16a, p16b), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

// K must be a multiple of 32. digits 1: x ~ d q (8 bits); 2: x ~ d (q + q2 / BASE) (~16 bits),
// stored as the integer code BASE q + q2 with scale d / BASE.
void quantize_x8(const float* x, int64_t K, XQBuffer& out, int digits) {
    const int64_t nb = K / 32;
    out.digits = digits;
    out.q.resize(K);
    if (digits == 2) out.q2.resize(K);
#ifdef JISU_AVX512
    if (digits == 2) out.w16.resize(64 * ((nb + 1) / 2));   // an odd last block's partner words are never read
#endif
    for (auto* v : {&out.d, &out.f, &out.g8, &out.c8, &out.c16}) v->resize(nb);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t b = 0; b < nb; ++b) {
        const float* xb = x + 32 * b;
        __m256 v[4];
        __m256 mx = _mm256_setzero_ps(), sum = _mm256_setzero_ps(), inf = _mm256_setzero_ps();
        for (int i = 0; i < 4; ++i) {
            v[i] = _mm256_loadu_ps(xb + 8 * i);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
            sum = _mm256_add_ps(sum, v[i]);
            inf = _mm256_or_ps(inf, _mm256_sub_ps(v[i], v[i]));    // NaN where v is NaN or +-inf
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        // a non-finite value: the block's scale is NaN, so every product with it is (the max
        // above can drop a NaN, and the codes of NaN or inf are any integer)
        const bool finite = _mm256_movemask_ps(_mm256_cmp_ps(inf, inf, _CMP_UNORD_Q)) == 0;
        const float amax = finite ? _mm_cvtss_f32(m4) : 0.f;
        const float d = finite ? amax / 127.f : NAN, id = amax > 0.f ? 127.f / amax : 0.f;
        const __m256 vid = _mm256_set1_ps(id);
        __m256i qi[4], ri[4];
        __m256i codes = _mm256_setzero_si256();
        for (int i = 0; i < 4; ++i) {
            const __m256 t = _mm256_mul_ps(v[i], vid);
            const __m256 r = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            qi[i] = _mm256_cvtps_epi32(r);
            if (digits == 2) {
                ri[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(t, r), _mm256_set1_ps(float(BASE))),
                                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                const __m256i c = _mm256_add_epi32(_mm256_mullo_epi32(qi[i], _mm256_set1_epi32(BASE)), ri[i]);
                codes = _mm256_add_epi32(codes, c);
#ifdef JISU_AVX512
                // the code as one word too: |BASE q + q2| <= 127 BASE + 127 < 32768
                _mm_storeu_si128(reinterpret_cast<__m128i*>(out.w16.data() + 64 * (b / 2) + 16 * (b % 2) + 32 * (i / 2) + 8 * (i % 2)),
                                 _mm256_cvtepi32_epi16(c));
#endif
            } else {
                codes = _mm256_add_epi32(codes, qi[i]);
            }
        }
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + 32 * b), pack_i8(qi));
        if (digits == 2) _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q2.data() + 32 * b), pack_i8(ri));
        const float unit = digits == 2 ? d / float(BASE) : d;
        const float ds = unit * float(hsum_i32(codes));
        out.d[b] = unit;
        out.f[b] = hsum(sum);
        out.g8[b] = 8.f * (out.f[b] - ds);
        out.c8[b] = -8.f * ds;
        out.c16[b] = -16.f * ds;
    }
}

inline __m256i load32(const int8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }

#ifdef JISU_AVX512
// BASE r as two shifts and a subtraction, where vpmulld cost 2-4% of a one-row Q5_0 matvec (Zen 5)
static_assert(BASE == 254, "times_base computes 256 r - 2 r");
inline __m256i times_base(__m256i r) { return _mm256_sub_epi32(_mm256_slli_epi32(r, 8), _mm256_slli_epi32(r, 1)); }
inline __m512i times_base(__m512i r) { return _mm512_sub_epi32(_mm512_slli_epi32(r, 8), _mm512_slli_epi32(r, 1)); }
#endif

// unsigned weight bytes u (<= 63) against activation block i: int32 x 8 in units of x.d[i]
// Lane j of the int32 results below sums the products of bytes 4j..4j+3. AVX2 gets there in two
// steps (maddubs: byte pairs -> int16, madd: int16 pairs -> int32); VNNI's dpbusd in one, and
// it accumulates, so the second digit is added onto BASE times the first.
template <int DIG>
inline __m256i xdot_u(__m256i u, const XQ& x, int64_t i) {
#ifdef JISU_AVX512
    __m256i r = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, load32(x.q + 32 * i));
    if constexpr (DIG == 2) r = _mm256_dpbusd_epi32(times_base(r), u, load32(x.q2 + 32 * i));
    return r;
#else
    const __m256i p = _mm256_maddubs_epi16(u, load32(x.q + 32 * i));
    if constexpr (DIG == 1) {
        return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
    } else {
        const __m256i p2 = _mm256_maddubs_epi16(u, load32(x.q2 + 32 * i));
        return _mm256_add_epi32(_mm256_madd_epi16(p, _mm256_set1_epi16(BASE)), _mm256_madd_epi16(p2, _mm256_set1_epi16(1)));
    }
#endif
}

// signed weight bytes w against activation block i; SCALED: the first 16 products weighted by
// s0, the next 16 by s1 (Q6_K's scales per 16 values)
template <int DIG, bool SCALED>
inline __m256i xdot_s(__m256i w, const XQ& x, int64_t i, int s0 = 1, int s1 = 1) {
    const __m256i aw = _mm256_sign_epi8(w, w);
#ifdef JISU_AVX512
    __m256i r = _mm256_dpbusd_epi32(_mm256_setzero_si256(), aw, _mm256_sign_epi8(load32(x.q + 32 * i), w));
    if constexpr (DIG == 2)
        r = _mm256_dpbusd_epi32(times_base(r), aw, _mm256_sign_epi8(load32(x.q2 + 32 * i), w));
    if constexpr (SCALED) r = _mm256_mullo_epi32(r, _mm256_setr_m128i(_mm_set1_epi32(s0), _mm_set1_epi32(s1)));
    return r;
#else
    const __m256i sc = SCALED ? _mm256_setr_m128i(_mm_set1_epi16(int16_t(s0)), _mm_set1_epi16(int16_t(s1))) : _mm256_set1_epi16(1);
    const __m256i p = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(load32(x.q + 32 * i), w));
    if constexpr (DIG == 1) {
        return _mm256_madd_epi16(p, sc);
    } else {
        const __m256i sc_base = SCALED ? _mm256_setr_m128i(_mm_set1_epi16(int16_t(BASE * s0)), _mm_set1_epi16(int16_t(BASE * s1)))
                                       : _mm256_set1_epi16(BASE);
        const __m256i p2 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(load32(x.q2 + 32 * i), w));
        return _mm256_add_epi32(_mm256_madd_epi16(p, sc_base), _mm256_madd_epi16(p2, sc));
    }
#endif
}

// 16 bytes of nibbles -> 32 bytes: low nibbles first (values 0..15), then the high ones
inline __m256i nibbles32(const uint8_t* p) {
#ifdef JISU_AVX512
    // both halves loaded as one broadcast, the upper shifted by 4 per 16-bit lane: no shuffle
    const __m256i both = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_and_si256(_mm256_srlv_epi16(both, _mm256_setr_epi64x(0, 0, 0x0004000400040004, 0x0004000400040004)),
                            _mm256_set1_epi8(0x0F));
#else
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(raw, 4), raw);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
#endif
}

// bit i of a 32-bit field -> byte i = 0x10 where set (Q5_0's fifth bit)
inline __m256i bit5_32(uint32_t bits) {
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(int(bits)),
        _mm256_setr_epi64x(0x0000000000000000, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303));
    const __m256i mask = _mm256_set1_epi64x(int64_t(0x8040201008040201ULL));
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(spread, mask), mask), _mm256_set1_epi8(0x10));
}

// 32-value block types: B::unpack gives the block's 32 weight bytes, B::dotu their integer dot
// with activation block i, B::mid1 / B::mid8 the offset terms for one block (scalar) or eight
// (vector, given the eight scales d).
struct Q8_0x8 {
    static constexpr int N = 32, BYTES = 34;
    static inline __m256i unpack(const uint8_t* b) { return load32(reinterpret_cast<const int8_t*>(b + 2)); }
    template <int DIG>
    static inline __m256i dotu(__m256i w, const XQ& x, int64_t i) {
        return xdot_s<DIG, false>(w, x, i);
    }
    static inline float mid1(const uint8_t*, const XQ&, int64_t, float) { return 0.f; }
    static inline void mid8(const uint8_t*, const XQ&, int64_t, __m256, __m256&) {}
};

template <int BYTES>
inline __m256 halves8(const uint8_t* p);   // the fp16 at p in eight consecutive blocks (below)

struct Q4_1x8 {
    static constexpr int N = 32, BYTES = 20;
    // d u + m = d (u - 8) + (m + 8 d)
    static inline __m256i unpack(const uint8_t* b) { return nibbles32(b + 4); }
    template <int DIG>
    static inline __m256i dotu(__m256i u, const XQ& x, int64_t i) { return xdot_u<DIG>(u, x, i); }
    static inline float mid1(const uint8_t* b, const XQ& x, int64_t i, float d) { return f16(b + 2) * x.f[i] + d * x.g8[i]; }
    static inline void mid8(const uint8_t* b, const XQ& x, int64_t i, __m256 d, __m256& accm) {
        accm = _mm256_fmadd_ps(halves8<BYTES>(b + 2), _mm256_loadu_ps(x.f + i), _mm256_fmadd_ps(d, _mm256_loadu_ps(x.g8 + i), accm));
    }
};

template <int BYTES_, int MID, bool FIFTH>
struct MidBlockx8 {   // Q4_0 (MID 8) and Q5_0 (MID 16, fifth bits in a 32-bit field): d (u - MID)
    static constexpr int N = 32, BYTES = BYTES_;
    static inline __m256i unpack(const uint8_t* b) {
        if constexpr (FIFTH) {
            uint32_t qh;
            std::memcpy(&qh, b + 2, 4);
#ifdef JISU_AVX512
            const __m256i u = nibbles32(b + 6);       // + 16 where the fifth bit is set: a mask, no shuffles
            return _mm256_mask_add_epi8(u, __mmask32(qh), u, _mm256_set1_epi8(16));
#else
            return _mm256_or_si256(nibbles32(b + 6), bit5_32(qh));
#endif
        } else {
            return nibbles32(b + 2);
        }
    }
    template <int DIG>
    static inline __m256i dotu(__m256i u, const XQ& x, int64_t i) { return xdot_u<DIG>(u, x, i); }
    static inline const float* c(const XQ& x) { return MID == 8 ? x.c8 : x.c16; }
    static inline float mid1(const uint8_t*, const XQ& x, int64_t i, float d) { return d * c(x)[i]; }
    static inline void mid8(const uint8_t*, const XQ& x, int64_t i, __m256 d, __m256& accm) {
        accm = _mm256_fmadd_ps(d, _mm256_loadu_ps(c(x) + i), accm);
    }
};
using Q4_0x8 = MidBlockx8<18, 8, false>;
using Q5_0x8 = MidBlockx8<22, 16, true>;

template <int BYTES>
inline __m256 halves8(const uint8_t* p) {
    auto u16 = [](const uint8_t* q) { uint16_t h; std::memcpy(&h, q, 2); return int(h); };
    __m128i v = _mm_cvtsi32_si128(u16(p));
    v = _mm_insert_epi16(v, u16(p + BYTES), 1);
    v = _mm_insert_epi16(v, u16(p + 2 * BYTES), 2);
    v = _mm_insert_epi16(v, u16(p + 3 * BYTES), 3);
    v = _mm_insert_epi16(v, u16(p + 4 * BYTES), 4);
    v = _mm_insert_epi16(v, u16(p + 5 * BYTES), 5);
    v = _mm_insert_epi16(v, u16(p + 6 * BYTES), 6);
    v = _mm_insert_epi16(v, u16(p + 7 * BYTES), 7);
    return _mm256_cvtph_ps(v);
}

// One 32-value block (row tails).
template <typename B, int DIG>
inline void dot1(const uint8_t* b, const XQ& x, int64_t i, __m256& acc, float& accm) {
    const float d = f16(b);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(B::template dotu<DIG>(B::unpack(b), x, i)), _mm256_set1_ps(d * x.d[i]), acc);
    accm += B::mid1(b, x, i, d);
}

// Eight 32-value blocks: their scales are converted and multiplied as one vector, and the
// offset terms accumulate as a vector, where one block at a time spends more instructions on
// these scalars than on its 32 products.
template <typename B, int DIG>
inline void dot8(const uint8_t* b, const XQ& x, int64_t i, __m256 acc[2], __m256& accm) {
    const __m256 d = halves8<B::BYTES>(b);
    const __m256 s = _mm256_mul_ps(d, _mm256_loadu_ps(x.d + i));
    B::mid8(b, x, i, d, accm);
    for (int j = 0; j < 8; ++j) {     // two chains: an FMA waits on the one before it
        const __m256 sj = _mm256_permutevar8x32_ps(s, _mm256_set1_epi32(j));
        acc[j & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(B::template dotu<DIG>(B::unpack(b + j * B::BYTES), x, i + j)), sj, acc[j & 1]);
    }
}

struct Q4_Kx8 {
    static constexpr int N = 256, BYTES = 144;
    // sub-block j: d sc_j u - dmin m_j = d sc_j (u - 8) + (8 d sc_j - dmin m_j)
    template <int DIG>
    static inline void dot(const uint8_t* b, const XQ& x, int64_t i, __m256& acc, float& accm) {
        const float d = f16(b), dmin = f16(b + 2);
        const uint8_t* scales = b + 4;
        const uint8_t* qs = b + 16;
        const int64_t x0 = 8 * i;    // first 32-value activation block of this super-block
        const __m256i lo4 = _mm256_set1_epi8(0x0F);
        for (int j = 0; j < 4; ++j, qs += 32) {
            const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs));
            const __m256i ul = _mm256_and_si256(raw, lo4), uh = _mm256_and_si256(_mm256_srli_epi16(raw, 4), lo4);
            for (int h = 0; h < 2; ++h) {
                const int sub = 2 * j + h;
                const int64_t xb = x0 + sub;
                uint8_t sc, m;
                scale_min_k4(sub, scales, sc, m);
                const float ds = d * sc, s = ds * x.d[xb];
                const __m256i p = xdot_u<DIG>(h ? uh : ul, x, xb);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(s), acc);
                accm += ds * x.g8[xb] - dmin * m * x.f[xb];
            }
        }
    }
};

struct Q6_Kx8 {
    static constexpr int N = 256, BYTES = 210;
    // q = u - 32 in [-32, 31], scales per 16 values; int16 madd applies the two scales of a
    // 32-value block (lanes 0-7: first 16 values, lanes 8-15: the next 16)
    template <int DIG>
    static inline void dot(const uint8_t* b, const XQ& x, int64_t i, __m256& acc, float&) {
        const uint8_t* ql = b;
        const uint8_t* qh = b + 128;
        const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
        const float d = f16(b + 208);
        const __m256i lo4 = _mm256_set1_epi8(0x0F), three = _mm256_set1_epi8(3), off = _mm256_set1_epi8(32);
        int64_t xb = 8 * i;
        for (int half = 0; half < 2; ++half, ql += 64, qh += 32, sc += 8) {
            const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
            const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
            const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
            __m256i u[4];
            u[0] = _mm256_or_si256(_mm256_and_si256(a, lo4), _mm256_slli_epi16(_mm256_and_si256(h, three), 4));
            u[1] = _mm256_or_si256(_mm256_and_si256(c, lo4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), three), 4));
            u[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(a, 4), lo4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), three), 4));
            u[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(c, 4), lo4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), three), 4));
            for (int k = 0; k < 4; ++k, ++xb) {
                const __m256i w = _mm256_sub_epi8(u[k], off);
                const __m256i p = xdot_s<DIG, true>(w, x, xb, sc[2 * k], sc[2 * k + 1]);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_set1_ps(d * x.d[xb]), acc);
            }
        }
    }
};

constexpr int PREFETCH_ROWS = 4;   // rows ahead whose bytes are requested from memory early

inline void prefetch_row(const uint8_t* p, int64_t bytes) {
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + o), _MM_HINT_T0);
}

// part i of the `lines` 64-byte lines at p, `per` lines a part: a prefetch spread over a loop
inline void prefetch_part(const uint8_t* p, int64_t lines, int64_t per, int64_t i) {
    const int64_t l0 = i * per;
    prefetch_row(p + 64 * l0, 64 * (std::min(lines, l0 + per) - l0));
}

// One row: 32-value types in groups of eight blocks (dot8) then single blocks; super-block
// types (Q4_K, Q6_K) one super-block at a time.
template <typename B, int DIG>
inline float row8(const uint8_t* row, const XQ& x, int64_t nb) {
    __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()}, accv = _mm256_setzero_ps();
    float accm = 0.f;
    int64_t blk = 0;
    if constexpr (B::N == 32) {
        for (; blk + 8 <= nb; blk += 8) dot8<B, DIG>(row + blk * B::BYTES, x, blk, acc, accv);
        for (; blk < nb; ++blk) dot1<B, DIG>(row + blk * B::BYTES, x, blk, acc[blk & 1], accm);
    } else {
        for (; blk < nb; ++blk) B::template dot<DIG>(row + blk * B::BYTES, x, blk, acc[blk & 1], accm);
    }
    return hsum(_mm256_add_ps(acc[0], acc[1])) + hsum(accv) + accm;
}

#ifdef JISU_AVX512
// 16 rows of 16 int32 -> their transpose (row i of the result: element i of every row)
inline void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {      // u[4a + c], 128-bit lane L: element 4L + c of rows 4a..4a+3
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int c = 0; c < 4; ++c) {
        const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
        const __m512i w0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xDD), w1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xDD);
        r[c] = _mm512_shuffle_i32x4(v0, v1, 0x88);
        r[8 + c] = _mm512_shuffle_i32x4(v0, v1, 0xDD);
        r[4 + c] = _mm512_shuffle_i32x4(w0, w1, 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(w0, w1, 0xDD);
    }
}

// ---- one row on 512-bit registers: two 32-value blocks per integer dot ----------------------
// Zen 5 (and Intel cores) execute 512-bit integer and float ops at full width, so a zmm dot of
// two blocks (64 weight bytes against 64 activation bytes, 16 int32 lanes: lanes 0-7 the first
// block, 8-15 the second) costs what one ymm block costs; the per-block scale is applied lane-wise.
// Activation blocks i, i+1 are contiguous, so their codes load as one 64-byte vector.

// Unsigned weight bytes u against activation blocks i, i+1 (see xdot_u).
template <int DIG>
inline __m512i zdot_u(__m512i u, const XQ& x, int64_t i) {
    __m512i r = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_loadu_si512(x.q + 32 * i));
    if constexpr (DIG == 2)
        r = _mm512_dpbusd_epi32(times_base(r), u, _mm512_loadu_si512(x.q2 + 32 * i));
    return r;
}

// Signed weight bytes w: |w| against x with w's sign (AVX-512 has no sign_epi8: a masked negate).
template <int DIG>
inline __m512i zdot_s(__m512i w, const XQ& x, int64_t i) {
    const __mmask64 neg = _mm512_movepi8_mask(w);
    const __m512i aw = _mm512_abs_epi8(w), zero = _mm512_setzero_si512();
    auto signed_x = [&](const int8_t* p) {
        const __m512i v = _mm512_loadu_si512(p);
        return _mm512_mask_sub_epi8(v, neg, zero, v);
    };
    __m512i r = _mm512_dpbusd_epi32(zero, aw, signed_x(x.q + 32 * i));
    if constexpr (DIG == 2)
        r = _mm512_dpbusd_epi32(times_base(r), aw, signed_x(x.q2 + 32 * i));
    return r;
}

// 16 bytes of nibbles at p0 and at p1 -> [p0 low, p0 high, p1 low, p1 high] nibbles as bytes
inline __m512i nibbles64(const uint8_t* p0, const uint8_t* p1) {
    const __m512i dup = _mm512_mask_broadcast_i32x4(_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p0))),
                                                    0xFF00, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p1)));
    return _mm512_and_si512(_mm512_srlv_epi64(dup, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4)), _mm512_set1_epi8(0x0F));
}

// Two blocks' 16 bytes of nibbles (p0, p1) against their activations as int16 codes (w: a pair
// of x.w16): lanes 0-7 block p0, 8-15 block p1, the same sums as zdot_u<2> (whose codes are
// BASE q + q2 in two digits). Words take a zero-extension and two vpdpwssd where the digits
// take a nibble split, two vpdpbusd and BASE r: measured on Sapphire Rapids (two 512-bit integer
// ports), a pair of Q4_1 blocks 4.4 -> 3.1 ns on one thread in a harness; one-row matvecs 1.15-
// 1.30x (Q4_1, Q4_0), SmolLM2 decode 1.15x. Q5_0's fifth bits (two masked adds) ate the gain:
// 0.98-1.01x, so it keeps the digits.
inline __m512i words_dot(const uint8_t* p0, const uint8_t* p1, const int16_t* w) {
    const __m512i wd = _mm512_cvtepu8_epi16(_mm256_inserti128_si256(
        _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p0))), _mm_loadu_si128(reinterpret_cast<const __m128i*>(p1)), 1));
    const __m512i lo = _mm512_and_si512(wd, _mm512_set1_epi16(0x0F)), hi = _mm512_srli_epi16(wd, 4);
    return _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(w)), hi, _mm512_loadu_si512(w + 32));
}

// lanes 0-7: v[a], lanes 8-15: v[a + 1]
inline __m512 pair_lanes(__m512 v, int a) {
    return _mm512_permutexvar_ps(_mm512_add_epi32(_mm512_set1_epi32(a), _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)), v);
}

// The first four bytes (fp16 scale, and Q4_1's offset) of NBLK <= 16 consecutive blocks as
// dword lanes, from plain loads of the span: output word w is input word (BYTES / 2) (w / 2) +
// w % 2 (every block size here is even), picked out of each 128-byte window by a two-source
// word permute. A 16-lane gather did the same in one instruction but took about a third of a
// one-row matvec here (Zen 5: SmolLM2's gate 35 -> 23 us on one core with the gather removed).
template <int BYTES, int NBLK>
struct HeadWords {
    static constexpr int HW = BYTES / 2, SPAN = HW * (NBLK - 1) + 2, WIN = (SPAN + 63) / 64;
    alignas(64) int16_t idx[WIN][32];
    uint32_t mask[WIN];
    constexpr HeadWords() : idx{}, mask{} {
        for (int w = 0; w < 2 * NBLK; ++w) {
            const int src = HW * (w / 2) + w % 2;
            idx[src / 64][w] = int16_t(src % 64);
            mask[src / 64] |= 1u << w;
        }
    }
};

template <int BYTES, int NBLK>
inline __m512i heads16(const uint8_t* p) {
    static_assert(BYTES % 2 == 0 && NBLK >= 1 && NBLK <= 16);
    using H = HeadWords<BYTES, NBLK>;
    static constexpr H h{};
    const int16_t* q = reinterpret_cast<const int16_t*>(p);
    auto load = [&](int base) {          // words base .. base + 31 of the span; none read past it
        const int n = H::SPAN - base;
        return n >= 32 ? _mm512_loadu_si512(q + base)
             : n > 0 ? _mm512_maskz_loadu_epi16(__mmask32((1u << n) - 1), q + base) : _mm512_setzero_si512();
    };
    __m512i r = _mm512_setzero_si512();
    for (int k = 0; k < H::WIN; ++k)
        r = _mm512_or_si512(r, _mm512_maskz_permutex2var_epi16(h.mask[k], load(64 * k),
                                                                _mm512_load_si512(h.idx[k]), load(64 * k + 32)));
    return r;
}
inline __m512 low_halves(__m512i h) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(h)); }
inline __m512 high_halves(__m512i h) { return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(h, 16))); }

// Per 32-value type: unpack2 (blocks b and b + BYTES as 64 bytes), dot2 (their integer dot),
// mid16 (the offset terms of 16 blocks, as mid8 does for 8).
template <typename B> struct Zmm;
template <> struct Zmm<Q8_0x8> {
    static inline __m512i unpack2(const uint8_t* b) {
        return _mm512_inserti64x4(_mm512_castsi256_si512(Q8_0x8::unpack(b)), Q8_0x8::unpack(b + Q8_0x8::BYTES), 1);
    }
    template <int DIG> static inline __m512i dot2(const uint8_t* b, const XQ& x, int64_t i) { return zdot_s<DIG>(unpack2(b), x, i); }
    static inline void mid16(__m512i, const XQ&, int64_t, __mmask16, __m512, __m512&) {}
};
template <> struct Zmm<Q4_1x8> {
    static inline __m512i unpack2(const uint8_t* b) { return nibbles64(b + 4, b + Q4_1x8::BYTES + 4); }
    template <int DIG> static inline __m512i dot2(const uint8_t* b, const XQ& x, int64_t i) {
        if constexpr (DIG == 2) return words_dot(b + 4, b + Q4_1x8::BYTES + 4, x.w16 + 32 * i);
        else return zdot_u<DIG>(unpack2(b), x, i);
    }
    static inline void mid16(__m512i heads, const XQ& x, int64_t i, __mmask16 m, __m512 d, __m512& accm) {
        accm = _mm512_fmadd_ps(high_halves(heads), _mm512_maskz_loadu_ps(m, x.f + i),
                               _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(m, x.g8 + i), accm));
    }
};
template <int BYTES, int MID, bool FIFTH> struct Zmm<MidBlockx8<BYTES, MID, FIFTH>> {
    static inline __m512i unpack2(const uint8_t* b) {
        if constexpr (FIFTH) {   // the 32 fifth bits of each block are a byte mask
            uint32_t h0, h1;
            std::memcpy(&h0, b + 2, 4);
            std::memcpy(&h1, b + BYTES + 2, 4);
            const __m512i u = nibbles64(b + 6, b + BYTES + 6);
            return _mm512_mask_add_epi8(u, _cvtu64_mask64(uint64_t(h0) | (uint64_t(h1) << 32)), u, _mm512_set1_epi8(0x10));
        } else {
            return nibbles64(b + 2, b + BYTES + 2);
        }
    }
    template <int DIG> static inline __m512i dot2(const uint8_t* b, const XQ& x, int64_t i) {
        if constexpr (DIG == 2 && !FIFTH) return words_dot(b + 2, b + BYTES + 2, x.w16 + 32 * i);
        else return zdot_u<DIG>(unpack2(b), x, i);
    }
    static inline void mid16(__m512i, const XQ& x, int64_t i, __mmask16 m, __m512 d, __m512& accm) {
        accm = _mm512_fmadd_ps(d, _mm512_maskz_loadu_ps(m, MidBlockx8<BYTES, MID, FIFTH>::c(x) + i), accm);
    }
};

// 2P consecutive 32-value blocks (P pair dots, P <= 8), their scales converted as one vector;
// lanes past the last block are masked off (scale 0, nothing read). P is a compile-time
// constant so that the loop unrolls and the two accumulators stay in registers.
template <typename B, int DIG, int P>
inline void dot16(const uint8_t* b, const XQ& x, int64_t i, __m512& acc0, __m512& acc1, __m512& accm) {
    constexpr __mmask16 m = __mmask16((1u << (2 * P)) - 1);
    const __m512i heads = heads16<B::BYTES, 2 * P>(b);
    const __m512 d = low_halves(heads);
    const __m512 s = _mm512_mul_ps(d, _mm512_maskz_loadu_ps(m, x.d + i));
    Zmm<B>::mid16(heads, x, i, m, d, accm);
    for (int j = 0; j < P; ++j) {
        const __m512i p = Zmm<B>::template dot2<DIG>(b + 2 * j * B::BYTES, x, i + 2 * j);
        __m512& acc = j & 1 ? acc1 : acc0;
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), pair_lanes(s, 2 * j), acc);
    }
}

// Two blocks, scales converted one at a time (cheaper than a gather for one or two pairs)
template <typename B, int DIG>
inline void dot2(const uint8_t* b, const XQ& x, int64_t i, __m512& acc, float& accm) {
    const float d0 = f16(b), d1 = f16(b + B::BYTES);
    const __m512 s = _mm512_insertf32x8(_mm512_set1_ps(d0 * x.d[i]), _mm256_set1_ps(d1 * x.d[i + 1]), 1);
    const __m512i p = Zmm<B>::template dot2<DIG>(b, x, i);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s, acc);
    accm += B::mid1(b, x, i, d0) + B::mid1(b + B::BYTES, x, i + 1, d1);
}

// the last group of a row: `pairs` (3..7) pair dots; one or two pairs go through dot2, whose
// scalar scales cost less than the masked gather (measured: Q5_0 K = 640, 7-14% faster)
template <typename B, int DIG>
inline void dot16_tail(const uint8_t* b, const XQ& x, int64_t i, int pairs, __m512& acc0, __m512& acc1, __m512& accm) {
    switch (pairs) {
        case 3: return dot16<B, DIG, 3>(b, x, i, acc0, acc1, accm);
        case 4: return dot16<B, DIG, 4>(b, x, i, acc0, acc1, accm);
        case 5: return dot16<B, DIG, 5>(b, x, i, acc0, acc1, accm);
        case 6: return dot16<B, DIG, 6>(b, x, i, acc0, acc1, accm);
        case 7: return dot16<B, DIG, 7>(b, x, i, acc0, acc1, accm);
        default: return;
    }
}

// Q4_K, one super-block: its 32-byte quarter j holds sub-blocks 2j (low nibbles) and 2j + 1
// (high nibbles), whose activations are contiguous: one zmm dot per quarter.
template <int DIG>
inline void q4k_dot(const uint8_t* b, const XQ& x, int64_t i, __m512& acc, __m256& accm) {
    const __m256 d = _mm256_set1_ps(f16(b)), dmin = _mm256_set1_ps(f16(b + 2));
    // the eight 6-bit scales and mins (scale_min_k4) as bytes of two 64-bit words, computed
    // in general registers: byte stores then a vector load would stall on store forwarding
    uint32_t q0, q1, q2;
    std::memcpy(&q0, b + 4, 4);
    std::memcpy(&q1, b + 8, 4);
    std::memcpy(&q2, b + 12, 4);
    constexpr uint32_t low6 = 0x3F3F3F3F, low4 = 0x0F0F0F0F, top2 = 0x03030303;
    const uint64_t sc = (q0 & low6) | uint64_t((q2 & low4) | (((q0 >> 6) & top2) << 4)) << 32;
    const uint64_t mn = (q1 & low6) | uint64_t(((q2 >> 4) & low4) | (((q1 >> 6) & top2) << 4)) << 32;
    auto floats8 = [](uint64_t v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(int64_t(v)))); };
    const int64_t x0 = 8 * i;
    const __m256 ds = _mm256_mul_ps(d, floats8(sc));
    // d sc_j (u - 8) + (8 d sc_j - dmin m_j), as Q4_Kx8
    accm = _mm256_fmadd_ps(ds, _mm256_loadu_ps(x.g8 + x0),
                           _mm256_fnmadd_ps(_mm256_mul_ps(dmin, floats8(mn)), _mm256_loadu_ps(x.f + x0), accm));
    const __m512 s = _mm512_castps256_ps512(_mm256_mul_ps(ds, _mm256_loadu_ps(x.d + x0)));
    const __m512i shift = _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4), lo4 = _mm512_set1_epi8(0x0F);
    const uint8_t* qs = b + 16;
    for (int j = 0; j < 4; ++j) {
        const __m512i raw = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * j)));
        const __m512i u = _mm512_and_si512(_mm512_srlv_epi64(raw, shift), lo4);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(zdot_u<DIG>(u, x, x0 + 2 * j)), pair_lanes(s, 2 * j), acc);
    }
}

// Q6_K, one super-block: each 128-value half is two 64-value dots (values 0-63: low nibbles of
// ql[0..63] with qh's bits 0-1 / 2-3; values 64-127: the high nibbles with bits 4-5 / 6-7), each
// 16 values weighted by their int8 scale in the integer sums, as the 256-bit Q6_Kx8::dot does
// with half as many instructions.
template <int DIG>
inline void q6k_dot(const uint8_t* b, const XQ& x, int64_t i, __m512& acc) {
    const float d = f16(b + 208);
    const __m512i lo4 = _mm512_set1_epi8(0x0F), three = _mm512_set1_epi8(3), off = _mm512_set1_epi8(32);
    const __m512i quad = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    const __m512 s = _mm512_castps256_ps512(_mm256_mul_ps(_mm256_set1_ps(d), _mm256_loadu_ps(x.d + 8 * i)));
    for (int half = 0; half < 2; ++half) {
        const uint8_t* ql = b + 64 * half;
        const __m512i L = _mm512_loadu_si512(ql);
        const __m512i H = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * half)));
        // qh's bits for values 32 k + l: (qh[l] >> 2 k) & 3; the two 32-byte halves of a zmm
        // take shifts 0 / 2 (values 0-63) or 4 / 6 (values 64-127): a 64-bit lane shifted by
        // less than 7 keeps each byte's own two bits at the bottom
        const __m512i sh01 = _mm512_setr_epi64(0, 0, 0, 0, 2, 2, 2, 2), sh23 = _mm512_setr_epi64(4, 4, 4, 4, 6, 6, 6, 6);
        const __m512i w01 = _mm512_sub_epi8(_mm512_or_si512(_mm512_and_si512(L, lo4),
                                            _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi64(H, sh01), three), 4)), off);
        const __m512i w23 = _mm512_sub_epi8(_mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(L, 4), lo4),
                                            _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi64(H, sh23), three), 4)), off);
        // the eight scales of this half, each over four int32 lanes (16 values)
        int64_t sc8;
        std::memcpy(&sc8, b + 192 + 8 * half, 8);
        const __m128i sc = _mm_cvtepi8_epi32(_mm_cvtsi64_si128(sc8));
        const __m128i sc_hi = _mm_cvtepi8_epi32(_mm_cvtsi64_si128(sc8 >> 32));
        const __m512i s01 = _mm512_permutexvar_epi32(quad, _mm512_castsi128_si512(sc));
        const __m512i s23 = _mm512_permutexvar_epi32(quad, _mm512_castsi128_si512(sc_hi));
        const int64_t xb = 8 * i + 4 * half;
        const __m512i p01 = _mm512_mullo_epi32(zdot_s<DIG>(w01, x, xb), s01);
        const __m512i p23 = _mm512_mullo_epi32(zdot_s<DIG>(w23, x, xb + 2), s23);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p01), pair_lanes(s, 4 * half), acc);
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p23), pair_lanes(s, 4 * half + 2), acc);
    }
}

// One row: 32-value types sixteen blocks at a time, a tail of three to seven pairs as one
// part-full group, of one or two pairs through dot2, then an odd last block; Q4_K per
// super-block and Q6_K per super-block (q4k_dot, q6k_dot), two accumulator chains each. The
// result is a vector whose 16 lanes sum to the row's dot: matvec8_rows adds 16 rows' lanes with
// one transpose (a horizontal reduction per row, a chain of dependent shuffles and adds, drew
// ~20% of a SmolLM2 matvec's samples on Sapphire Rapids, where K 576 is only 18 blocks a row).
template <typename B, int DIG>
inline __m512 row16(const uint8_t* row, const XQ& x, int64_t nb) {
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()}, accv = _mm512_setzero_ps();
    float accm = 0.f;
    if constexpr (B::N == 32) {
        int64_t blk = 0;
        for (; blk + 16 <= nb; blk += 16) dot16<B, DIG, 8>(row + blk * B::BYTES, x, blk, acc[0], acc[1], accv);
        if (nb - blk >= 6) {
            dot16_tail<B, DIG>(row + blk * B::BYTES, x, blk, int((nb - blk) / 2), acc[0], acc[1], accv);
        } else {
            if (nb - blk >= 2) dot2<B, DIG>(row + blk * B::BYTES, x, blk, acc[0], accm);
            if (nb - blk >= 4) dot2<B, DIG>(row + (blk + 2) * B::BYTES, x, blk + 2, acc[1], accm);
        }
        if (nb & 1) {
            __m256 a1 = _mm256_setzero_ps();
            dot1<B, DIG>(row + (nb - 1) * B::BYTES, x, nb - 1, a1, accm);
            accm += hsum(a1);
        }
        const __m512 v = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), accv);
        return _mm512_mask_add_ps(v, 1, v, _mm512_set1_ps(accm));
    } else if constexpr (std::is_same_v<B, Q4_Kx8>) {
        __m256 am = _mm256_setzero_ps();
        int64_t blk = 0;
        for (; blk + 2 <= nb; blk += 2) {   // two chains, each accumulator in a register
            q4k_dot<DIG>(row + blk * B::BYTES, x, blk, acc[0], am);
            q4k_dot<DIG>(row + (blk + 1) * B::BYTES, x, blk + 1, acc[1], am);
        }
        if (blk < nb) q4k_dot<DIG>(row + blk * B::BYTES, x, blk, acc[0], am);
        return _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_zextps256_ps512(am));
    } else if constexpr (std::is_same_v<B, Q6_Kx8>) {
        int64_t blk = 0;
        for (; blk + 2 <= nb; blk += 2) {
            q6k_dot<DIG>(row + blk * B::BYTES, x, blk, acc[0]);
            q6k_dot<DIG>(row + (blk + 1) * B::BYTES, x, blk + 1, acc[1]);
        }
        if (blk < nb) q6k_dot<DIG>(row + blk * B::BYTES, x, blk, acc[0]);
        return _mm512_add_ps(acc[0], acc[1]);
    } else {
        return _mm512_zextps128_ps512(_mm_set_ss(row8<B, DIG>(row, x, nb)));
    }
}
#endif

// Weight rows n0 .. n1 in pairs, the pair PREFETCH_ROWS ahead requested from memory early.
// AVX-512: 16 rows' lane vectors (row16) summed at once, by a transpose.
template <typename B, int DIG>
void matvec8_rows(const XQ& x, const uint8_t* w, float* y, int64_t n0, int64_t n1, int64_t K) {
    const int64_t nb = K / B::N, row_bytes = nb * B::BYTES;
#ifdef JISU_AVX512
    for (int64_t n = n0; n < n1; n += 16) {
        const int rows = int(std::min<int64_t>(16, n1 - n));
        __m512i v[16];
        for (int r = 0; r < 16; ++r) {
            if (r >= rows) {
                v[r] = _mm512_setzero_si512();
                continue;
            }
            const uint8_t* row = w + (n + r) * row_bytes;
            if (r % 2 == 0 && n + r + PREFETCH_ROWS + 2 <= n1) prefetch_row(row + PREFETCH_ROWS * row_bytes, 2 * row_bytes);
            v[r] = _mm512_castps_si512(row16<B, DIG>(row, x, nb));
        }
        transpose16(v);                  // v[i]: lane i of every row
        __m512 sum = _mm512_castsi512_ps(v[0]);
        for (int i = 1; i < 16; ++i) sum = _mm512_add_ps(sum, _mm512_castsi512_ps(v[i]));
        _mm512_mask_storeu_ps(y + n, __mmask16((1u << rows) - 1), sum);
    }
#else
    for (int64_t n = n0; n < n1; n += 2) {
        const int rows = int(std::min<int64_t>(2, n1 - n));
        const uint8_t* r0 = w + n * row_bytes;
        if (n + PREFETCH_ROWS + 2 <= n1) prefetch_row(r0 + PREFETCH_ROWS * row_bytes, 2 * row_bytes);
        for (int r = 0; r < rows; ++r) y[n + r] = row8<B, DIG>(r0 + r * row_bytes, x, nb);
    }
#endif
}

// Two activation rows against every weight row, 32-value types: each block is unpacked and its
// eight-block scales converted once for both rows. Measured on SmolLM2's matrices: 1.2x the
// float kernel at two rows; three or four rows were slower (the per-row registers spill), so
// qmatmul sends only two rows here.
template <typename B, int DIG>
void rows2(const XQ* xs, const uint8_t* w, float* y, int64_t N, int64_t K) {
    constexpr int R = 2;
    const int64_t nb = K / 32, row_bytes = nb * B::BYTES;
    at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) {
            const uint8_t* row = w + n * row_bytes;
            if (n + PREFETCH_ROWS < n1) prefetch_row(row + PREFETCH_ROWS * row_bytes, row_bytes);
            __m256 acc[R], accv[R], s[R];
            float accm[R];
            for (int r = 0; r < R; ++r) { acc[r] = accv[r] = _mm256_setzero_ps(); accm[r] = 0.f; }
            int64_t blk = 0;
            for (; blk + 8 <= nb; blk += 8) {
                const uint8_t* b = row + blk * B::BYTES;
                const __m256 d = halves8<B::BYTES>(b);
                for (int r = 0; r < R; ++r) {
                    s[r] = _mm256_mul_ps(d, _mm256_loadu_ps(xs[r].d + blk));
                    B::mid8(b, xs[r], blk, d, accv[r]);
                }
                for (int j = 0; j < 8; ++j) {
                    const __m256i u = B::unpack(b + j * B::BYTES);
                    const __m256i lane = _mm256_set1_epi32(j);
                    for (int r = 0; r < R; ++r)
                        acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(B::template dotu<DIG>(u, xs[r], blk + j)),
                                                 _mm256_permutevar8x32_ps(s[r], lane), acc[r]);
                }
            }
            for (; blk < nb; ++blk)
                for (int r = 0; r < R; ++r) dot1<B, DIG>(row + blk * B::BYTES, xs[r], blk, acc[r], accm[r]);
            for (int r = 0; r < R; ++r) y[r * N + n] = hsum(acc[r]) + hsum(accv[r]) + accm[r];
        }
    });
}

// x [2, K] -> y [2, N] through rows2, each row rounded to integers first.
template <typename B>
void two_rows(const float* x, const uint8_t* w, float* y, int64_t N, int64_t K, int digits) {
    XQBuffer buf[2];
    quantize_x8(x, K, buf[0], digits);
    quantize_x8(x + K, K, buf[1], digits);
    const XQ xs[2] = {buf[0].view(), buf[1].view()};
    if (digits == 2) rows2<B, 2>(xs, w, y, N, K);
    else rows2<B, 1>(xs, w, y, N, K);
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

#ifdef JISU_AVX512
// f(take) on `workers` threads (at most n; by default every thread), each calling take() for the
// next index of 0 .. n - 1 that no thread has taken, -1 once none is left (per-thread setup goes
// in f before its loop). Work from a shared counter rather than split in halves ahead: on this
// project's shared VM one thread is often slowed, and with halves the other waited for it (6-12%
// of a 32-row Gemma step's GEMM and screen thread time, AMX prompt attention's tasks 1:3 where
// they were in query order; RESULTS.md, twenty-first session).
template <typename F>
void take_turns(int64_t n, const F& f, int64_t workers = -1) {
    if (n <= 0) return;
    std::atomic<int64_t> next{0};
    auto take = [&] {
        const int64_t i = next.fetch_add(1, std::memory_order_relaxed);
        return i < n ? i : int64_t(-1);
    };
    const int64_t T = std::max<int64_t>(1, std::min<int64_t>(n, workers < 0 ? at::get_num_threads() : workers));
    at::parallel_for(0, T, 1, [&](int64_t, int64_t) { f(take); });
}

// ---- many rows (batched decode, prefill), AVX-512 VNNI: int16 activations x int16 weights ----
// Each activation row is rounded per 32 values to int16, x ~ dx q with |q| <= 32767 (about as
// exact as the two-digit decode path), and each weight to the small integer its block stores,
// W = s w + mn per block of KB values (exact). Then
//     y[m, n] = sum_b s[n, b] dx[m, b] sum_k w q  +  mn[n, b] f[m, b]      (f: exact sum of x)
// vpdpwssd multiplies 32 int16 pairs and adds them into 16 int32 lanes in one instruction; the
// integer sums are exact, and once per block each (row, 16 columns) converts its int32 vector
// and adds it with one FMA. Columns are the vector lanes: a panel of 32 weight rows is
// unpacked once per call into [k pair][column] int16 pairs, and each row's pair of activations
// is broadcast to all lanes. Measured against float32 weights (dequantize + MKL or the panel
// kernel): see RESULTS.md.

// Activation rows rounded to int16 per 32-value block. The scales are powers of two, 2^e with
// codes up to qmax (a block's largest code is above qmax / 2: at most one bit below an exact
// scale), so gemm_tile scales a block's int32 sums with vscalefps (x 2^e exactly, on the pipes
// vpdpwssd leaves free) where it would multiply by the activation's scale: a multiply competes
// with vpdpwssd for the same two pipes (measured in a tile with Q4_1's offsets: 6.8 -> 7.3 G
// vpdpwssd/s of 8.4, without offsets 7.2 -> 7.8). The product is exact either way, so readers
// that multiply by d = 2^e instead (the greedy screen's recompute, p8_tile, panel_column) get the
// same numbers. A block with a NaN or an infinity has d = f = e = NaN: its row's outputs are NaN
// (vscalefps by NaN is NaN), the other rows' as without it.
inline float pow2f(int e) {                     // 2^e for e in [-126, 127]
    const int32_t bits = (e + 127) << 23;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}
struct XQ16 {
    std::vector<int16_t> q;      // [M, K]
    std::vector<float> d, f, e;  // [M, K / 32]: scale 2^e, exact sum and e (a float) of each 32-value block
};

void quantize_x16(const float* x, int64_t M, int64_t K, XQ16& out, float qmax = 32767.f) {
    const int64_t nb = K / 32;
    out.q.resize(M * K);
    out.d.resize(M * nb);
    out.f.resize(M * nb);
    out.e.resize(M * nb);
    const float inv_qmax = 1.f / qmax;
    auto body = [&](int64_t m0, int64_t m1) {
        for (int64_t i = m0 * nb; i < m1 * nb; ++i) {
            const __m512 a = _mm512_loadu_ps(x + 32 * i), b = _mm512_loadu_ps(x + 32 * i + 16);
            if (_mm512_fpclass_ps_mask(a, 0x99) | _mm512_fpclass_ps_mask(b, 0x99)) {   // a NaN or +-inf
                std::memset(out.q.data() + 32 * i, 0, 64);
                out.d[i] = out.f[i] = out.e[i] = NAN;
                continue;
            }
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
            // amax / qmax < 2^e <= 2 amax / qmax (frexp's exponent, from the float's bits; at
            // least -126: an all-zero block, or one below 2^-126 qmax, takes 2^-126)
            int32_t bits;
            const float ratio = amax * inv_qmax;
            std::memcpy(&bits, &ratio, 4);
            const int e = std::max(((bits >> 23) & 0xFF) - 126, -126);
            const __m512 id = _mm512_set1_ps(pow2f(-e));
            const __m256i qa = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(a, id)));
            const __m256i qb = _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(b, id)));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + 32 * i), qa);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.q.data() + 32 * i + 16), qb);
            out.d[i] = pow2f(e);
            out.e[i] = float(e);
            out.f[i] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
        }
    };
    if (M < 4) body(0, M); else at::parallel_for(0, M, 4, body);
}

// Per type: the 32 weights of 32-value block j of a row as int8 (ints), with KB values per
// scale; s[t] and mn[t] for the 32 / KB scale blocks in it. Integers are centred where the
// type has an offset (Q4: u - 8), so activation rounding is weighed by small numbers.
// 32-value types: the decode kernels' unpack (I::unpack) gives the block's bytes u, one fp16
// scale d first; y = d (u - MID), and Q4_1 (MINS) adds its fp16 offset m: d (u - 8) + (m + 8 d).
// GEMM_KB: values per scale in the int16 panels (pack_panel, gemm_tile), QMAX: the largest
// activation code they take (quantize_x16); KB stays the type's own scale block (pack_panel8).
template <typename I, int MID, bool MINS_>
struct G32 {
    static constexpr int KB = 32, GEMM_KB = 32;
    static constexpr float QMAX = 32767.f;
    static constexpr bool MINS = MINS_;
    static inline __m256i ints(const uint8_t* row, int64_t j, float* s, float* mn) {
        const uint8_t* b = row + j * I::BYTES;
        s[0] = f16(b);
        if constexpr (MINS) mn[0] = f16(b + 2) + float(MID) * s[0];
        return MID ? _mm256_sub_epi8(I::unpack(b), _mm256_set1_epi8(MID)) : I::unpack(b);
    }
};
using G_Q4_0 = G32<Q4_0x8, 8, false>;
using G_Q4_1 = G32<Q4_1x8, 8, true>;
using G_Q5_0 = G32<Q5_0x8, 16, false>;
using G_Q8_0 = G32<Q8_0x8, 0, false>;
struct G_Q4_K {
    static constexpr int KB = 32, GEMM_KB = 32;
    static constexpr float QMAX = 32767.f;
    static constexpr bool MINS = true;
    static inline __m256i ints(const uint8_t* row, int64_t j, float* s, float* mn) {
        const uint8_t* b = row + (j / 8) * 144;
        const int sub = int(j % 8);
        uint8_t sc, m;
        scale_min_k4(sub, b + 4, sc, m);
        s[0] = f16(b) * sc;
        mn[0] = 8.f * s[0] - f16(b + 2) * m;   // d sc u - dmin m = d sc (u - 8) + (8 d sc - dmin m)
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 16 + (sub / 2) * 32));
        const __m256i u = _mm256_and_si256(sub & 1 ? _mm256_srli_epi16(raw, 4) : raw, _mm256_set1_epi8(0x0F));
        return _mm256_sub_epi8(u, _mm256_set1_epi8(8));
    }
};
// Q6_K's int16 panels hold sc (u - 32) (|.| <= 128 x 32 = 4096), so a 32-value block has one
// scale d and gemm_tile folds half as often (Gemma ffn_down, 512 rows: 1.95 -> 1.79 ms); with codes
// |q| <= 16383 a block's sums stay within int32: 16 x 2 x 4096 x 16383 < 2^31.
struct G_Q6_K {
    static constexpr int KB = 16, GEMM_KB = 32;
    static constexpr float QMAX = 16383.f;
    static constexpr bool MINS = false;
    static inline __m256i ints(const uint8_t* row, int64_t j, float* s, float*) {
        const uint8_t* b = row + (j / 8) * 210;
        const int sub = int(j % 8), half = sub / 4, k = sub % 4;
        const __m256i ql = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + half * 64 + (k & 1) * 32));
        const __m256i qh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + half * 32));
        const __m256i lo = _mm256_and_si256(k < 2 ? ql : _mm256_srli_epi16(ql, 4), _mm256_set1_epi8(0x0F));
        const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(qh, 2 * k), _mm256_set1_epi8(3));
        const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192 + half * 8 + 2 * k);
        const float d = f16(b + 208);
        s[0] = d * sc[0];
        s[1] = d * sc[1];
        return _mm256_sub_epi8(_mm256_or_si256(lo, _mm256_slli_epi16(hi, 4)), _mm256_set1_epi8(32));
    }
};

constexpr int GP = 32;   // weight rows (output columns) per panel: two vectors of 16 lanes

// The 32-value nibble types: byte offsets of the scale d, the offset m (Q4_1), the fifth bits
// (Q5_0) and the 16 bytes of nibbles in a block; weights d (u - MID) (+ m + MID d with MINS).
template <typename G> struct NibbleBlock { static constexpr bool ok = false; };
template <> struct NibbleBlock<G_Q4_0> { static constexpr bool ok = true, MINS = false, FIFTH = false; static constexpr int BYTES = 18, QS = 2, MID = 8; };
template <> struct NibbleBlock<G_Q4_1> { static constexpr bool ok = true, MINS = true, FIFTH = false; static constexpr int BYTES = 20, QS = 4, MID = 8; };
template <> struct NibbleBlock<G_Q5_0> { static constexpr bool ok = true, MINS = false, FIFTH = true; static constexpr int BYTES = 22, QS = 6, MID = 16; };

// 16 bytes at rows[c] + off for 16 columns c, as four vectors o[q] holding bytes 4q .. 4q + 3 of
// column c in 32-bit lane c: each column's bytes are loaded into one 128-bit lane (vector p
// holds columns p, 4 + p, 8 + p, 12 + p) and a 4 x 4 transpose of 32-bit words follows.
inline void lanes16(const uint8_t* const rows[16], int64_t off, __m512i o[4]) {
    auto ld = [&](int c) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[c] + off)); };
    __m512i v[4];
    for (int p = 0; p < 4; ++p)
        v[p] = _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(ld(p)), ld(4 + p), 1),
                                                     ld(8 + p), 2), ld(12 + p), 3);
    const __m512i t0 = _mm512_unpacklo_epi32(v[0], v[1]), t1 = _mm512_unpackhi_epi32(v[0], v[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(v[2], v[3]), t3 = _mm512_unpackhi_epi32(v[2], v[3]);
    o[0] = _mm512_unpacklo_epi64(t0, t2);
    o[1] = _mm512_unpackhi_epi64(t0, t2);
    o[2] = _mm512_unpacklo_epi64(t1, t3);
    o[3] = _mm512_unpackhi_epi64(t1, t3);
}

// 16 columns c0 .. c0 + 15 of a panel: their weight rows, and `zeros` (as long as one block of
// the type, superblock for the K types) standing in for the columns past np
struct Columns16 {
    const uint8_t* rows[16];
    const uint8_t* none;
    Columns16(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t np, int64_t c0, const uint8_t* zeros) : none(zeros) {
        for (int c = 0; c < 16; ++c) rows[c] = c0 + c < np ? w + (n0 + c0 + c) * row_bytes : none;
    }
    void at(int64_t off, const uint8_t* out[16]) const {      // each row `off` bytes on (the zeros stay)
        for (int c = 0; c < 16; ++c) out[c] = rows[c] == none ? none : rows[c] + off;
    }
};

// The 16-column packers' walk: for each half of the panel (columns c0 = 0 and 16) and each unit
// of BYTES bytes along its rows (a block, or a K type's superblock), f(c0, u, at), at[c] the
// unit's bytes in column c0 + c (zeros past np).
template <int BYTES, typename F>
inline void columns16_units(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t np, int64_t units, F&& f) {
    alignas(64) static const uint8_t none[BYTES] = {};
    for (int64_t c0 = 0; c0 < GP; c0 += 16) {
        const Columns16 cols(w, row_bytes, n0, np, c0, none);
        for (int64_t u = 0; u < units; ++u) {
            const uint8_t* at[16];
            cols.at(u * BYTES, at);
            f(c0, u, at);
        }
    }
}

// A vector of quads (bytes 4q .. 4q + 3 of 16 columns, as values plus `mid`) into the panel as
// the int16 pairs g and g + 1 of block j, zero-extended and less mid
// (times `scale`, int16 lanes, where given)
template <bool SCALED = false>
inline void store_pairs(int32_t* pw, int64_t j, int g, int64_t c0, __m512i u, __m512i mid, __m512i scale = __m512i()) {
    const __m512i pair0 = _mm512_set4_epi32(int(0x800D800Cu), int(0x80098008u), int(0x80058004u), int(0x80018000u));
    const __m512i pair1 = _mm512_set4_epi32(int(0x800F800Eu), int(0x800B800Au), int(0x80078006u), int(0x80038002u));
    __m512i v0 = _mm512_sub_epi16(_mm512_shuffle_epi8(u, pair0), mid), v1 = _mm512_sub_epi16(_mm512_shuffle_epi8(u, pair1), mid);
    if constexpr (SCALED) {
        v0 = _mm512_mullo_epi16(v0, scale);
        v1 = _mm512_mullo_epi16(v1, scale);
    }
    _mm512_store_si512(pw + ((j * 16 + g) * GP + c0), v0);
    _mm512_store_si512(pw + ((j * 16 + g + 1) * GP + c0), v1);
}

// pack_panel for the nibble types, 16 columns at a time: lanes16 puts every column's block side
// by side (its first 16 bytes: d, m or qh; and its 16 bytes of nibbles), so that every later
// step (nibbles, fifth bits, offset, int16 pairs, scales) works on 16 columns at once. The
// per-column unpacking and 16 x 16 transpose of int16 pairs took ~17 instructions a column and
// block, a quarter of a 32-row GEMM's time.
template <typename G>
void pack_nibbles(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t np, int64_t K,
                  int32_t* pw, float* ps, float* pm, const uint8_t* next, int64_t next_bytes) {
    using L = NibbleBlock<G>;
    const int64_t nb = K / 32, steps = GP / 16 * nb;
    const int64_t lines = (next_bytes + 63) / 64, per_step = (lines + steps - 1) / steps;
    const __m512i low4 = _mm512_set1_epi8(0x0F), mid = _mm512_set1_epi16(L::MID), sixteen = _mm512_set1_epi8(16);
    const __m512i word = _mm512_set4_epi32(12 * 0x01010101, 8 * 0x01010101, 4 * 0x01010101, 0);
    columns16_units<L::BYTES>(w, row_bytes, n0, np, nb, [&](int64_t c0, int64_t j, const uint8_t* const at[16]) {
        prefetch_part(next, lines, per_step, c0 / 16 * nb + j);
        __m512i o[4], hd[4];
        lanes16(at, L::QS, o);
        lanes16(at, 0, hd);        // d (low half of word 0); m (Q4_1) or qh (Q5_0) from byte 2
        const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(hd[0]));
        _mm512_storeu_ps(ps + j * GP + c0, d);
        if constexpr (L::MINS)
            _mm512_storeu_ps(pm + j * GP + c0, _mm512_fmadd_ps(_mm512_set1_ps(float(L::MID)), d,
                                                             _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(hd[0], 16)))));
        const __m512i qh = _mm512_or_si512(_mm512_srli_epi32(hd[0], 16), _mm512_slli_epi32(hd[1], 16));
        for (int half = 0; half < 2; ++half) {
            for (int q = 0; q < 4; ++q) {
                __m512i u = _mm512_and_si512(half ? _mm512_srli_epi16(o[q], 4) : o[q], low4);   // k = 16 half + 4 q + t
                if constexpr (L::FIFTH) {
                    // bit 16 half + 4 q + t of the column's qh, into byte t of its word
                    const __m512i spread = _mm512_shuffle_epi8(qh, _mm512_add_epi8(word, _mm512_set1_epi8(char(2 * half + q / 2))));
                    const __m512i bit = _mm512_set1_epi32(int(0x08040201u << (4 * (q % 2))));
                    u = _mm512_mask_add_epi8(u, _mm512_test_epi8_mask(spread, bit), u, sixteen);
                }
                store_pairs(pw, j, 8 * half + 2 * q, c0, u, mid);
            }
        }
    });
}

// pack_panel for Q6_K, 16 columns at a time as pack_nibbles: per half of a 256-value superblock
// its 32 bytes of high bits are read once for its four 32-value blocks, and each 32 bytes of
// low nibbles once for the two blocks that share them; scales for 16 columns at once, each
// 16-value scale sc multiplied into its weights (see G_Q6_K) and d as the block's scale.
// Block j = 8 sb + 4 half + k holds values 32 k .. 32 k + 31 of the half: nibbles (k < 2 low, else
// high) of ql[64 half + 32 (k % 2) ..], bits 2k, 2k + 1 of qh[128 + 32 half ..], scales sc[8 half + 2k, + 1].
inline void pack_q6k(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t np, int64_t K,
                     int32_t* pw, float* ps, const uint8_t* next, int64_t next_bytes) {
    constexpr int SB = 210;
    const int64_t nb = K / 32, steps = GP / 16 * nb;
    const int64_t lines = (next_bytes + 63) / 64, per_step = (lines + steps - 1) / steps;
    const __m512i low4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30), off = _mm512_set1_epi16(32);
    columns16_units<SB>(w, row_bytes, n0, np, K / 256, [&](int64_t c0, int64_t sb, const uint8_t* const at[16]) {
        __m512i sc[4], tail[4];
        lanes16(at, 192, sc);          // scales 0 .. 15 as int8, four to a word
        lanes16(at, 194, tail);        // word 3: bytes 206 .. 209, d in the upper half
        const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(tail[3], 16)));
        for (int half = 0; half < 2; ++half) {
            __m512i qh[8];
            lanes16(at, 128 + 32 * half, qh);
            lanes16(at, 128 + 32 * half + 16, qh + 4);
            for (int odd = 0; odd < 2; ++odd) {
                __m512i ql[8];
                lanes16(at, 64 * half + 32 * odd, ql);
                lanes16(at, 64 * half + 32 * odd + 16, ql + 4);
                for (int k = odd; k < 4; k += 2) {
                    const int64_t j = sb * 8 + 4 * half + k;
                    prefetch_part(next, lines, per_step, c0 / 16 * nb + j);
                    _mm512_storeu_ps(ps + j * GP + c0, d);
                    __m512i s16[2];             // scales of values 0-15 and 16-31, in both int16 halves of a lane
                    for (int t = 0; t < 2; ++t) {
                        const int i = 8 * half + 2 * k + t;     // byte i % 4 of word i / 4, sign-extended
                        const __m512i s8 = _mm512_srai_epi32(_mm512_slli_epi32(sc[i / 4], 24 - 8 * (i % 4)), 24);
                        s16[t] = _mm512_or_si512(_mm512_and_si512(s8, _mm512_set1_epi32(0xFFFF)), _mm512_slli_epi32(s8, 16));
                    }
                    for (int q = 0; q < 8; ++q) {               // values 4q .. 4q + 3 of the block
                        const __m512i lo = _mm512_and_si512(k >= 2 ? _mm512_srli_epi16(ql[q], 4) : ql[q], low4);
                        // bits 2k, 2k + 1 of each byte to bits 4, 5 (16-bit shifts: what crosses bytes is masked)
                        const __m512i hb = k == 3 ? _mm512_srli_epi16(qh[q], 2) : _mm512_slli_epi16(qh[q], 4 - 2 * k);
                        const __m512i u = _mm512_ternarylogic_epi32(lo, hb, m30, 0xF8);   // lo | (hb & m30)
                        store_pairs<true>(pw, j, 2 * q, c0, u, off, s16[q / 4]);
                    }
                }
            }
        }
    });
}

// pack_panel for Q4_K, 16 columns at a time as pack_nibbles: a superblock's d, dmin and twelve
// bytes of 6-bit scales and minimums come in one lanes16, each 32 bytes of nibbles once for the
// two 32-value blocks sharing them (block 2p low nibbles, 2p + 1 high); as G_Q4_K::ints, weights
// d sc (u - 8) with the offset d sc 8 - dmin m.
inline void pack_q4k(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t np, int64_t K,
                     int32_t* pw, float* ps, float* pm, const uint8_t* next, int64_t next_bytes) {
    constexpr int SB = 144;
    const int64_t nb = K / 32, steps = GP / 16 * nb;
    const int64_t lines = (next_bytes + 63) / 64, per_step = (lines + steps - 1) / steps;
    const __m512i low4 = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi16(8);
    columns16_units<SB>(w, row_bytes, n0, np, K / 256, [&](int64_t c0, int64_t sb, const uint8_t* const at[16]) {
        __m512i hd[4];
        lanes16(at, 0, hd);            // word 0: d, dmin; words 1 .. 3: the twelve scale bytes
        const __m512 d = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(hd[0]));
        const __m512 dmin = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_srli_epi32(hd[0], 16)));
        auto byte = [&](int i) { return _mm512_and_si512(_mm512_srli_epi32(hd[1 + i / 4], 8 * (i % 4)), _mm512_set1_epi32(0xFF)); };
        for (int p = 0; p < 4; ++p) {
            __m512i raw[8];
            lanes16(at, 16 + 32 * p, raw);
            lanes16(at, 32 + 32 * p, raw + 4);
            for (int odd = 0; odd < 2; ++odd) {
                const int sub = 2 * p + odd;
                const int64_t j = sb * 8 + sub;
                prefetch_part(next, lines, per_step, c0 / 16 * nb + j);
                __m512i sc, mn;            // scale_min_k4, 16 columns at once
                if (sub < 4) {
                    sc = _mm512_and_si512(byte(sub), _mm512_set1_epi32(63));
                    mn = _mm512_and_si512(byte(sub + 4), _mm512_set1_epi32(63));
                } else {
                    sc = _mm512_or_si512(_mm512_and_si512(byte(sub + 4), _mm512_set1_epi32(0xF)),
                                         _mm512_slli_epi32(_mm512_srli_epi32(byte(sub - 4), 6), 4));
                    mn = _mm512_or_si512(_mm512_srli_epi32(byte(sub + 4), 4), _mm512_slli_epi32(_mm512_srli_epi32(byte(sub), 6), 4));
                }
                const __m512 s = _mm512_mul_ps(d, _mm512_cvtepi32_ps(sc));
                _mm512_storeu_ps(ps + j * GP + c0, s);
                _mm512_storeu_ps(pm + j * GP + c0, _mm512_fmsub_ps(_mm512_set1_ps(8.f), s, _mm512_mul_ps(dmin, _mm512_cvtepi32_ps(mn))));
                for (int q = 0; q < 8; ++q) {               // values 4q .. 4q + 3 of the block
                    store_pairs(pw, j, 2 * q, c0, _mm512_and_si512(odd ? _mm512_srli_epi16(raw[q], 4) : raw[q], low4), eight);
                }
            }
        }
    });
}

// Weight rows n0 .. n0 + np of W unpacked into a panel: pw [K / 2][GP] int16 pairs, ps and pm
// [K / KB][GP] scales and offsets (zero beyond np, so a part-full panel computes zeros).
// `next` (`next_bytes` long) is requested from memory meanwhile, a slice per block column:
// sixteen rows read side by side defeat the hardware prefetcher, and a matrix larger than the
// last-level cache then packed at a fifth of the rate it does from cache (Gemma's 262k-row
// output projection: 24 ms at 4 rows, against 3.8 ms for one row).
template <typename G>
void pack_panel(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t np, int64_t K,
                int32_t* pw, float* ps, float* pm, const uint8_t* next, int64_t next_bytes) {
    if constexpr (NibbleBlock<G>::ok) {
        pack_nibbles<G>(w, row_bytes, n0, np, K, pw, ps, pm, next, next_bytes);
        return;
    } else if constexpr (std::is_same_v<G, G_Q6_K>) {
        pack_q6k(w, row_bytes, n0, np, K, pw, ps, next, next_bytes);
        return;
    } else if constexpr (std::is_same_v<G, G_Q4_K>) {
        pack_q4k(w, row_bytes, n0, np, K, pw, ps, pm, next, next_bytes);
        return;
    }
    constexpr int SUB = 32 / G::GEMM_KB;
    const int64_t nb = K / 32, steps = GP / 16 * nb;
    const int64_t lines = (next_bytes + 63) / 64, per_step = (lines + steps - 1) / steps;
    for (int h = 0; h < GP / 16; ++h) {
        for (int64_t j = 0; j < nb; ++j) {
            prefetch_part(next, lines, per_step, h * nb + j);
            __m512i r[16];
            for (int c = 0; c < 16; ++c) {
                const int64_t col = h * 16 + c;
                float s[SUB] = {}, mn[SUB] = {};
                r[c] = col < np ? _mm512_cvtepi8_epi16(G::ints(w + (n0 + col) * row_bytes, j, s, mn)) : _mm512_setzero_si512();
                for (int t = 0; t < SUB; ++t) {
                    ps[(j * SUB + t) * GP + col] = s[t];
                    if constexpr (G::MINS) pm[(j * SUB + t) * GP + col] = mn[t];
                }
            }
            transpose16(r);
            for (int g = 0; g < 16; ++g) _mm512_store_si512(pw + ((j * 16 + g) * GP + h * 16), r[g]);
        }
    }
}

// lanes of the vector of a panel's columns c0 .. c0 + 15 that hold one of its np columns
inline __mmask16 cols16(int64_t np, int64_t c0) {
    const int64_t n = std::clamp<int64_t>(np - c0, 0, 16);
    return n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
}

// One scale block of R rows into their float accumulators: acc[r] += ai[r] (the block's int32
// sums for 16 + 16 columns) x the columns' weight scales (ps, ps + 16) x row r's activation
// scale d[r * stride]. The int16 GEMM, p8_tile and the screen fold their blocks this way.
template <int R>
inline void fold_block(__m512 (&acc)[R][2], const __m512i (&ai)[R][2], const float* ps, const float* d, int64_t stride) {
    const __m512 s0 = _mm512_loadu_ps(ps), s1 = _mm512_loadu_ps(ps + 16);
    for (int r = 0; r < R; ++r) {
        const __m512 dx = _mm512_set1_ps(d[r * stride]);
        acc[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai[r][0]), _mm512_mul_ps(s0, dx), acc[r][0]);
        acc[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai[r][1]), _mm512_mul_ps(s1, dx), acc[r][1]);
    }
}

// R activation rows against one packed panel: R x 2 vectors of int32 sums per scale block,
// folded into R x 2 float accumulators: a block's sums are scaled by its activations' power of
// two (vscalefps) and folded with one FMA by the weights' scales (see quantize_x16).
template <typename G, int R>
inline void gemm_tile(const XQ16& x, int64_t m0, int64_t K, const int32_t* pw, const float* ps, const float* pm,
                      float* y, int64_t N, int64_t np, const uint8_t* next = nullptr, int64_t next_bytes = 0,
                      int act = -1) {
    // act 0 / 1: y holds the gate's outputs, and becomes act(y) times these sums (SiLU / GELU,
    // act_mul_'s arithmetic: the same numbers as storing the sums and calling it); the tile's
    // gate values are requested now, to be at hand when it stores
    constexpr int KB = G::GEMM_KB, SUB = 32 / KB;
    const int64_t nb = K / KB, xb = K / 32;
    if (act >= 0)
        for (int r = 0; r < R; ++r) {
            _mm_prefetch(reinterpret_cast<const char*>(y + (m0 + r) * N), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(y + (m0 + r) * N + 16), _MM_HINT_T0);
        }
    const int16_t* xq = x.q.data() + m0 * K;
    const int64_t lines = next_bytes / 64, per_block = (lines + nb - 1) / nb;   // of `next`, requested per block
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        prefetch_part(next, lines, per_block, b);
        __m512i ai[R][2];
        for (int r = 0; r < R; ++r) ai[r][0] = ai[r][1] = _mm512_setzero_si512();
        const int32_t* wp = pw + b * (KB / 2) * GP;
        // unrolled: as a loop GCC copied every accumulator between two registers on each step
        // (two moves per dpwssd) and the tile ran at 60% of vpdpwssd's rate; unrolled, 1.35x
#pragma GCC unroll 16
        for (int g = 0; g < KB / 2; ++g) {
            const __m512i w0 = _mm512_load_si512(wp + g * GP), w1 = _mm512_load_si512(wp + g * GP + 16);
            for (int r = 0; r < R; ++r) {
                int32_t pair;
                std::memcpy(&pair, xq + r * K + b * KB + 2 * g, 4);
                const __m512i a = _mm512_set1_epi32(pair);
                ai[r][0] = _mm512_dpwssd_epi32(ai[r][0], a, w0);
                ai[r][1] = _mm512_dpwssd_epi32(ai[r][1], a, w1);
            }
        }
        {
            const __m512 s0 = _mm512_loadu_ps(ps + b * GP), s1 = _mm512_loadu_ps(ps + b * GP + 16);
            for (int r = 0; r < R; ++r) {
                const __m512 e = _mm512_set1_ps(x.e[(m0 + r) * xb + b / SUB]);
                acc[r][0] = _mm512_fmadd_ps(_mm512_scalef_ps(_mm512_cvtepi32_ps(ai[r][0]), e), s0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(_mm512_scalef_ps(_mm512_cvtepi32_ps(ai[r][1]), e), s1, acc[r][1]);
            }
        }
        if constexpr (G::MINS) {
            const float* f = x.f.data() + m0 * xb + b;
            const __m512 mn0 = _mm512_loadu_ps(pm + b * GP), mn1 = _mm512_loadu_ps(pm + b * GP + 16);
            for (int r = 0; r < R; ++r) {
                const __m512 fr = _mm512_set1_ps(f[r * xb]);
                acc[r][0] = _mm512_fmadd_ps(mn0, fr, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(mn1, fr, acc[r][1]);
            }
        }
    }
    const __mmask16 k0 = cols16(np, 0), k1 = cols16(np, 16);
    for (int r = 0; r < R; ++r) {
        float* yr = y + (m0 + r) * N;
        if (act >= 0) {
            acc[r][0] = _mm512_mul_ps(act_of(_mm512_maskz_loadu_ps(k0, yr), act == 1), acc[r][0]);
            acc[r][1] = _mm512_mul_ps(act_of(_mm512_maskz_loadu_ps(k1, yr + 16), act == 1), acc[r][1]);
        }
        _mm512_mask_storeu_ps(yr, k0, acc[r][0]);
        _mm512_mask_storeu_ps(yr + 16, k1, acc[r][1]);
    }
}

constexpr int GR = 6;   // activation rows per tile (measured: 4-8% over 4 once unrolled)

// f(integral_constant<R>, m) over rows 0..M-1 in tiles of T rows, the last R = M % T (T <= 8).
// A tile of 7 still holds its 7 x 2 int32 and float accumulators in registers; 8 spills.
template <int T = GR, typename F>
inline void by_tiles(int64_t M, F&& f) {
    static_assert(T >= 1 && T <= 8, "tiles of 1 to 8 rows");
    int64_t m = 0;
    for (; m + T <= M; m += T) f(std::integral_constant<int, T>{}, m);
    auto rest = [&](auto r) {
        if constexpr (decltype(r)::value < T) if (M - m == decltype(r)::value) f(r, m);
    };
    rest(std::integral_constant<int, 1>{});
    rest(std::integral_constant<int, 2>{});
    rest(std::integral_constant<int, 3>{});
    rest(std::integral_constant<int, 4>{});
    rest(std::integral_constant<int, 5>{});
    rest(std::integral_constant<int, 6>{});
    rest(std::integral_constant<int, 7>{});
}

// f(integral_constant<R>, m) over rows 0..M-1 in tiles of 6 and 7 rows where M allows it (M =
// 6a + 7b, M >= 30), so no tile is short, else as by_tiles<T>. Gemma's 32-row step as 7 7 6 6 6:
// its block matrices 10.98-11.05 -> 10.61-10.88 ms against 6 6 6 6 6 2 (tiles of 7 with a last of
// 4 lost 2-3% at 16 and 64 rows); its screen about 2% faster than 7 7 7 7 4 (which beat tiles of
// 6 there: 10.1 -> 9.8 ms).
template <int T = GR, typename F>
inline void by_tiles67(int64_t M, F&& f) {
    const int64_t sevens = M % 6;
    if (M < 30 || 7 * sevens > M) {
        by_tiles<T>(M, f);
        return;
    }
    int64_t m = 0;
    for (int64_t i = 0; i < sevens; ++i, m += 7) f(std::integral_constant<int, 7>{}, m);
    for (; m < M; m += 6) f(std::integral_constant<int, 6>{}, m);
}

// The share [l0, l1) of `lines` that the tile of rows m .. m + R - 1 (of M) requests: in
// proportion to its rows
inline std::pair<int64_t, int64_t> tile_lines(int64_t m, int64_t R, int64_t M, int64_t lines) {
    return {m * lines / M, (m + R) * lines / M};
}

// Every row of x against one packed panel (pw, ps, pm): y [M, row stride N], np columns; the
// tiles request the `lines` 64-byte lines at `next` (the next panel), a share each
template <typename G>
inline void panel_tiles(const XQ16& xq, int64_t M, int64_t K, const int32_t* pw, const float* ps, const float* pm,
                        float* y, int64_t N, int64_t np, const uint8_t* next, int64_t lines, int act = -1) {
    by_tiles67(M, [&](auto R, int64_t m) {
        const auto [l0, l1] = tile_lines(m, decltype(R)::value, M, lines);
        gemm_tile<G, decltype(R)::value>(xq, m, K, pw, ps, pm, y, N, np, next + 64 * l0, 64 * (l1 - l0), act);
    });
}

// Panel p of W (weight rows p * GP ..) against every row of x: y [M, N] (act: see gemm_tile).
template <typename G>
void gemm_panel(const XQ16& xq, const uint8_t* w, float* y, int64_t M, int64_t N, int64_t K, int64_t row_bytes,
                int64_t p, int32_t* pw, float* ps, float* pm, int act = -1) {
    const int64_t n0 = p * GP, np = std::min<int64_t>(GP, N - n0);
    const int64_t next_rows = std::max<int64_t>(0, std::min<int64_t>(GP, N - n0 - GP));
    // the next panel's rows are requested while this one is used: by the tiles, a share each,
    // where there are two or more (decode batches: its packing 3.6 -> 2.9 ms of a 32-row Gemma
    // step), else while packing
    const uint8_t* next = w + (n0 + GP) * row_bytes;
    const int64_t tiles = (M + GR - 1) / GR, lines = (next_rows * row_bytes + 63) / 64;
    pack_panel<G>(w, row_bytes, n0, np, K, pw, ps, pm, next, tiles > 1 ? 0 : next_rows * row_bytes);
    panel_tiles<G>(xq, M, K, pw, ps, pm, y + n0, N, np, next, tiles > 1 ? lines : 0, act);
}

#ifdef JISU_AMX
// ---- many rows on AMX: bf16 tiles, two or three products per pair of values ---------------
// Sapphire Rapids and later multiply 16 x 32 by 32 x 16 bf16 tiles into 16 x 16 float32 sums
// in one instruction (tdpbf16ps, ~16x vpdpwssd's multiply-adds). bf16 keeps 8 bits of each
// value, too few for activations (bf16 activations and weights move SmolLM2's top-1 token on ~1%
// of positions), so activations are split into two bf16, x = xh + xl with xl = bf16(x - xh)
// (16 bits), and each dequantized weight is rounded once to bf16 (wh):
//     x w ~ xh wh + xl wh                  (each weight within 2^-8 of itself, relative: see amx_exact)
// or, with amx_exact, the weights split too, about as exact as the int16 GEMM (relative error
// ~5e-6 on random data):
//     x w ~ xh wh + xl wh + xh wl          (the xl wl term is below 2^-16 of the product)
// The weights are the tiles' first operand (A: 16 rows of 32 values of k), the activations the
// second (B: 16 pairs of k by 16 columns), so the product is y^T: a panel of 32 weight rows is
// dequantized (exactly, the Float kernel's dequant) block by block straight into A's layout,
// each block's 32 values one tile row, and the transposes (pairs of k by columns) fall on x, once
// per call, and on each 32 x 32 block of y as it is stored. The other way round (weights as B,
// transposed while packing, each row dequantized through a float scratch) packed 1.3-1.9x slower
// and made 512-token prefills 1.03x (SmolLM2) / 1.08x (Gemma 3) slower (RESULTS.md, twenty-first
// session). Each 32 x 32 block of y is four accumulator tiles; per 32 values of k it loads 6
// tiles and issues 8 products (8 and 12 exact: stepT). Tile loads from L2 cost: a
// microbenchmark of this loop ran at 10-11 ns a product where the same products on data in L1
// took 7 (K in chunks whose tiles stay in L1, accumulators stored between chunks, was slower
// still: 12-15 ns).
// Below this, packing a panel costs more than AMX saves: 4 matrices of SmolLM2 / Gemma 3 shapes,
// 7 alternating rounds, AMX's speed (two products) over the int16 GEMM's at 32 / 64 / 96 / 128 /
// 160 / 256 rows, two runs minutes apart (AMX's speed on this VM moves by 2x with its phase):
// 0.83 / 0.99 / 1.08 / 1.14 / 1.18 / 1.69 and 1.03 / 1.32 / 1.37 / 1.52 / 1.60 / 1.75
// (RESULTS.md, twentieth session; with three products, seventeenth session, 0.55 / 0.70 / 0.77
// / 1.05 at 32 / 64 / 96 / 128 rows: 160 was this limit then). With packing by table (Bf::words)
// 32-stream decode steps gained on AMX, alternating 4 rounds in one process: Gemma 3 704 -> 765
// tok/s, SmolLM2 845 -> 995 (medians; twenty-second session), so batched decode steps of 32 rows
// and more take AMX too.
constexpr int64_t AMX_MIN_ROWS = 32;

// On where the CPU and the kernel allow it; JISU_AMX=0 (or set_amx_min_rows(0)) keeps the int16
// GEMM. On this project's AMX machine (a VM whose cores other tenants share, so that AMX ran at
// full or half speed by turns), 512-token prefills alternating in one process, with three
// products: 1.32x (SmolLM2) and 1.26x (Gemma 3) the int16 GEMM's speed, medians of 16 pairs
// (RESULTS.md, seventeenth session; the sixteenth session's design, one thread packing for the
// other, had been 0.62x / 0.75x there); two products take 1.16-1.27x less time again.
std::atomic<int64_t> amx_min_rows{[] {
    const char* e = std::getenv("JISU_AMX");
    return e && std::strcmp(e, "0") == 0 ? int64_t(0) : AMX_MIN_ROWS;
}()};

// Two products per pair by default: xh wh + xl wh, the weights rounded once to bf16 (8 bits of
// each dequantized value) and the activations kept at 16 bits. JISU_AMX=exact (or
// set_amx_exact(true)) adds xh wl, the weights' own 16 bits, as before. Measured on the AMX VM,
// logits of the 669 / 651-token test text against transformers' (tests/test_real_models.py):
// three products mean KL 4.4e-7 / 1.6e-6, top-1 100% / 100% (SmolLM2 / Gemma 3); two products
// 2.8e-5 / 2.7e-5, 99.4% / 99.85%; llama.cpp (8-bit activations) 3.2e-3 / 4.4e-3, 94.9% /
// 95.7%. One product (bf16 activations too) moved top-1 to 98.95% on SmolLM2. The third product
// is a third of the tile work, and its weight tiles half the packing (RESULTS.md, twentieth
// session).
std::atomic<bool> amx_exact{[] {
    const char* e = std::getenv("JISU_AMX");
    return e && std::strcmp(e, "exact") == 0;
}()};

bool amx_ready() {   // the kernel must grant this process the tile state once (Linux 5.16+)
    static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    return ok;
}

struct TileConfig {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

inline void tiles_on() {   // every tile 16 rows x 64 bytes, in this thread
    TileConfig c;
    for (int t = 0; t < 8; ++t) c.colsb[t] = 64, c.rows[t] = 16;
    _tile_loadconfig(&c);
}

// One step of a 32 x 32 block of prompt attention: C tiles 0-3 (rows 0-15 / 16-31 of x against
// columns of b0 / b1) += xl bh + xh bh + xh bl, 8 tile loads for 12 products, in that order so
// that only two tiles change between groups. x0 / x1: rows 0-15 / 16-31 of x's hi
// and lo tiles (x_stride bytes a row); b: 16 pairs x 16 columns (64 bytes a row).
inline void step3(const uint16_t* xh0, const uint16_t* xh1, const uint16_t* xl0, const uint16_t* xl1, int64_t x_stride,
                  const uint16_t* bh0, const uint16_t* bh1, const uint16_t* bl0, const uint16_t* bl1) {
    _tile_loadd(4, xl0, x_stride); _tile_loadd(5, xl1, x_stride);
    _tile_loadd(6, bh0, 64); _tile_loadd(7, bh1, 64);
    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(4, xh0, x_stride); _tile_loadd(5, xh1, x_stride);
    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(6, bl0, 64); _tile_loadd(7, bl1, 64);
    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
}

// 16 floats -> bf16 (round to nearest even) hi, and the float value of hi
inline __m256i bf16_hi(__m512 v, __m512& hi_f) {
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    hi_f = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return h;
}
// 32 floats (a, then b) -> 32 bf16 hi and 32 bf16 lo (v - hi), as two vectors of 32 x 16 bits
inline void split32(__m512 a, __m512 b, __m512i& hi, __m512i& lo) {
    __m512 ha, hb;
    const __m256i h0 = bf16_hi(a, ha), h1 = bf16_hi(b, hb);
    hi = _mm512_inserti64x4(_mm512_castsi256_si512(h0), h1, 1);
    lo = _mm512_inserti64x4(_mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(a, ha))),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(b, hb)), 1);
}
inline void split32(const float* p, __m512i& hi, __m512i& lo) { split32(_mm512_loadu_ps(p), _mm512_loadu_ps(p + 16), hi, lo); }
// 16 rows of 16 pairs, split (hi, lo), into two B tiles [16 pairs][16 rows][2] at dh and dl
inline void store_pair_tiles(__m512i hi[16], __m512i lo[16], uint16_t* dh, uint16_t* dl) {
    transpose16(hi);
    transpose16(lo);
    for (int kp = 0; kp < 16; ++kp) {
        _mm512_store_si512(dh + kp * 32, hi[kp]);
        _mm512_store_si512(dl + kp * 32, lo[kp]);
    }
}

// x [M, K] split into B tiles: [M/32 blocks][K/32 steps][hi, lo][rows 0-15, 16-31][16 pairs of
// k][16 rows][2] (4 KB a step); rows past M are zero. A whole block takes the bytes of its 32 float rows, so x
// that nobody else holds is split in place (split_in_place): the tiles of a 512-row prompt's
// MLP input then take no memory of their own where a copy took 3 MB (SmolLM2's peak RSS).
struct XB {
    uint16_t* a = nullptr;      // the whole blocks
    uint16_t* tail = nullptr;   // the last block where it is part-full and a is x's storage
    bool owned = true;          // a was allocated here (else it is x's storage)
    int64_t M = 0, blocks = 0, K = 0;
    XB() = default;
    XB(const XB&) = delete;
    XB& operator=(const XB&) = delete;
    ~XB() {
        if (owned) std::free(a);
        std::free(tail);
    }
    // rows (n <= 32 of them, row stride K) into one block's tiles at dst
    static void split_block(const float* rows, int64_t n, int64_t K, uint16_t* dst) {
        for (int64_t s = 0; s < K / 32; ++s)
            for (int h = 0; h < 2; ++h) {
                __m512i hi[16], lo[16];
                for (int c = 0; c < 16; ++c) {
                    hi[c] = lo[c] = _mm512_setzero_si512();
                    if (16 * h + c < n) split32(rows + (16 * h + c) * K + 32 * s, hi[c], lo[c]);
                }
                uint16_t* d = dst + s * 2048 + h * 512;
                store_pair_tiles(hi, lo, d, d + 1024);
            }
    }
    void split(const float* x, int64_t M_, int64_t K_) {
        M = M_, K = K_, blocks = (M + 31) / 32;
        a = static_cast<uint16_t*>(std::aligned_alloc(64, sizeof(uint16_t) * blocks * (K / 32) * 2048));
        at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
            for (int64_t b = b0; b < b1; ++b)
                split_block(x + b * 32 * K, std::min<int64_t>(32, M - 32 * b), K, a + b * (K / 32) * 2048);
        });
    }
    // x (64-byte aligned, M_ K_ floats, nobody else reading it) becomes the tiles: each whole
    // block is copied out (32 rows) and written back as tiles; a part-full last block goes to tail
    void split_in_place(float* x, int64_t M_, int64_t K_) {
        M = M_, K = K_, blocks = (M + 31) / 32, owned = false;
        a = reinterpret_cast<uint16_t*>(x);
        const int64_t whole = M / 32, block_floats = 32 * K;
        if (whole < blocks) {
            tail = static_cast<uint16_t*>(std::aligned_alloc(64, sizeof(uint16_t) * (K / 32) * 2048));
            split_block(x + whole * block_floats, M - 32 * whole, K, tail);
        }
        const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), whole));
        float* copies = static_cast<float*>(std::aligned_alloc(64, sizeof(float) * block_floats * T));
        std::atomic<int64_t> seat{0};
        at::parallel_for(0, whole, std::max<int64_t>(1, (whole + T - 1) / T), [&](int64_t b0, int64_t b1) {
            float* rows = copies + block_floats * seat.fetch_add(1, std::memory_order_relaxed);
            for (int64_t b = b0; b < b1; ++b) {
                std::memcpy(rows, x + b * block_floats, sizeof(float) * block_floats);
                split_block(rows, 32, K, a + b * (K / 32) * 2048);
            }
        });
        std::free(copies);
    }
    const uint16_t* step(int64_t blk, int64_t s) const {
        return (tail && blk == blocks - 1 ? tail : a + blk * (K / 32) * 2048) + s * 2048;
    }
};

// 32 weights of a row, values 32 j .. 32 j + 31, as floats (a: the first 16, b: the rest): the
// Float kernel's dequant (the same formula and rounding steps) in 512-bit vectors straight from
// the block's bytes, where the packer had dequantized whole rows into a float scratch and read
// them back (1.1-1.33x slower for 32-value types, RESULTS.md, twenty-first session)
template <typename F> struct Bf;
// 16 bytes -> 16 int32 lanes
inline __m512i u8x16(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// Types whose blocks take at most 32 distinct values (Q4_K: each 32-value sub-block) also give
// the 32 bf16 words straight (Bf::words): the block's 16 or 32 values are computed once as
// floats, the same formula, rounded to bf16 into one table, and vpermw picks each weight's word
// by its code. Per weight that is a byte widened to a word and a lookup, where Bf::floats
// widened to a dword, converted and scaled (bit-identical; ns a weight packed from L2, one core:
// Q5_0 0.151 -> 0.109, Q4_K 0.211 -> 0.117, Q4_1 0.133 -> 0.122, Q4_0 0.116 -> 0.113;
// RESULTS.md, twenty-second session). Q6_K (a scale per 16 values, 64 codes) and Q8_0 (256
// codes) keep floats.
inline __m512 lanes16() { return _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15); }
// The table of v(j) = (j - off) d for j = 0 .. 31 (off: Q4_0 8, Q5_0 16; codes 0 .. 15 or 31)
inline __m512i offset_table(float d, float off) {
    const __m512 j0 = lanes16();
    const __m512 dv = _mm512_set1_ps(d), o = _mm512_set1_ps(off);
    const __m512 t0 = _mm512_mul_ps(_mm512_sub_ps(j0, o), dv);
    const __m512 t1 = _mm512_mul_ps(_mm512_sub_ps(_mm512_add_ps(j0, _mm512_set1_ps(16.f)), o), dv);
    return (__m512i)_mm512_cvtne2ps_pbh(t1, t0);
}
// The table of v(j) = d j + m (Q4_1) or d j - m (Q4_K) for j = 0 .. 15, in both halves
template <bool MINUS>
inline __m512i affine_table(float d, float m) {
    const __m512 p = _mm512_mul_ps(lanes16(), _mm512_set1_ps(d));
    const __m512 t = MINUS ? _mm512_sub_ps(p, _mm512_set1_ps(m)) : _mm512_add_ps(p, _mm512_set1_ps(m));
    return (__m512i)_mm512_cvtne2ps_pbh(t, t);
}
// 16 bytes of nibbles as 32 word codes: the low nibbles (values 0 .. 15), then the high ones
inline __m512i nibble_codes(const uint8_t* p) {
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    const __m512i shift = _mm512_set_epi64(0x0004000400040004LL, 0x0004000400040004LL, 0x0004000400040004LL,
                                           0x0004000400040004LL, 0, 0, 0, 0);
    return _mm512_and_si512(_mm512_srlv_epi16(w, shift), _mm512_set1_epi16(0xF));
}
template <> struct Bf<Q8_0> {
    inline void floats(const uint8_t* row, int64_t j, __m512& a, __m512& b) {
        const uint8_t* blk = row + j * 34;
        const __m512 d = _mm512_set1_ps(f16(blk));
        a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 2)))), d);
        b = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 18)))), d);
    }
};
template <> struct Bf<Q4_1> {
    inline void floats(const uint8_t* row, int64_t j, __m512& a, __m512& b) {
        const uint8_t* blk = row + j * 20;
        const __m512 d = _mm512_set1_ps(f16(blk)), m = _mm512_set1_ps(f16(blk + 2));
        const __m512i v = u8x16(blk + 4), lo4 = _mm512_set1_epi32(0xF);
        a = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, lo4)), d), m);
        b = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), d), m);
    }
    inline __m512i words(const uint8_t* row, int64_t j) {
        const uint8_t* blk = row + j * 20;
        return _mm512_permutexvar_epi16(nibble_codes(blk + 4), affine_table<false>(f16(blk), f16(blk + 2)));
    }
};
template <int BYTES, int OFFSET, void (*INTS)(const uint8_t*, __m256i*)>
struct Bf<OffsetBlock<BYTES, OFFSET, INTS>> {     // Q4_0 (18 bytes), Q5_0 (22: 32 fifth bits first)
    inline void floats(const uint8_t* row, int64_t j, __m512& a, __m512& b) {
        const uint8_t* blk = row + j * BYTES;
        const __m512 d = _mm512_set1_ps(f16(blk));
        const __m512i v = u8x16(blk + BYTES - 16), lo4 = _mm512_set1_epi32(0xF), off = _mm512_set1_epi32(OFFSET);
        __m512i qa = _mm512_and_si512(v, lo4), qb = _mm512_srli_epi32(v, 4);
        if constexpr (BYTES == 22) {
            uint32_t qh;
            std::memcpy(&qh, blk + 2, 4);
            const __m512i sixteen = _mm512_set1_epi32(16);
            qa = _mm512_mask_or_epi32(qa, __mmask16(qh), qa, sixteen);
            qb = _mm512_mask_or_epi32(qb, __mmask16(qh >> 16), qb, sixteen);
        }
        a = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(qa, off)), d);
        b = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(qb, off)), d);
    }
    inline __m512i words(const uint8_t* row, int64_t j) {
        const uint8_t* blk = row + j * BYTES;
        __m512i q = nibble_codes(blk + BYTES - 16);
        if constexpr (BYTES == 22) {     // the fifth bits, one per weight in order
            uint32_t qh;
            std::memcpy(&qh, blk + 2, 4);
            q = _mm512_mask_add_epi16(q, __mmask32(qh), q, _mm512_set1_epi16(16));
        }
        return _mm512_permutexvar_epi16(q, offset_table(f16(blk), float(OFFSET)));
    }
};
// (the K-quants decode a super-block's scales when its first block is asked for, and widen the
// bytes that blocks share when the first of them is: blocks come in order. Per block, Q4_K's
// packing took 0.32 ns a weight, Q6_K's 0.39)
template <> struct Bf<Q4_K> {
    float d1[8], m1[8];
    __m512i e[2];     // the bytes of blocks 2i and 2i + 1 (low and high nibbles)
    __m512i wide;     // the same 32 bytes as words (words())
    inline void scales(const uint8_t* blk) {     // scale_min_k4 for the 8 blocks at once, four bytes to a word
        uint32_t w[3];
        std::memcpy(w, blk + 4, 12);
        const uint32_t sc[2] = {w[0] & 0x3F3F3F3Fu, (w[2] & 0x0F0F0F0Fu) | (((w[0] >> 6) & 0x03030303u) << 4)};
        const uint32_t mn[2] = {w[1] & 0x3F3F3F3Fu, ((w[2] >> 4) & 0x0F0F0F0Fu) | (((w[1] >> 6) & 0x03030303u) << 4)};
        const __m256 s8 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc))));
        const __m256 m8 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn))));
        _mm256_storeu_ps(d1, _mm256_mul_ps(_mm256_set1_ps(f16(blk)), s8));
        _mm256_storeu_ps(m1, _mm256_mul_ps(_mm256_set1_ps(f16(blk + 2)), m8));
    }
    inline void floats(const uint8_t* row, int64_t j, __m512& a, __m512& b) {
        const uint8_t* blk = row + (j / 8) * 144;
        const int sub = int(j % 8);
        if (sub == 0) scales(blk);
        if (sub % 2 == 0) {
            const uint8_t* q = blk + 16 + (sub / 2) * 32;
            e[0] = u8x16(q);
            e[1] = u8x16(q + 16);
        }
        const __m512 d = _mm512_set1_ps(d1[sub]), m = _mm512_set1_ps(m1[sub]);
        const int shift = (sub & 1) * 4;
        const __m512i lo4 = _mm512_set1_epi32(0xF);
        a = _mm512_sub_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(e[0], shift), lo4))), m);
        b = _mm512_sub_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(e[1], shift), lo4))), m);
    }
    inline __m512i words(const uint8_t* row, int64_t j) {
        const uint8_t* blk = row + (j / 8) * 144;
        const int sub = int(j % 8);
        if (sub == 0) scales(blk);
        if (sub % 2 == 0)     // blocks 2i and 2i + 1 share 32 bytes (low and high nibbles)
            wide = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16 + (sub / 2) * 32)));
        const __m512i q = _mm512_and_si512(_mm512_srli_epi16(wide, (sub & 1) * 4), _mm512_set1_epi16(0xF));
        return _mm512_permutexvar_epi16(q, affine_table<true>(d1[sub], m1[sub]));
    }
};
template <> struct Bf<Q6_K> {
    float scale[16];
    __m512i ql[2][2], qh[2];  // a half's bytes: ql[0..31], ql[32..63] and qh[0..31], as 16 x 2
    inline void floats(const uint8_t* row, int64_t j, __m512& a, __m512& b) {
        const uint8_t* blk = row + (j / 8) * 210;
        const int sub = int(j % 8), half = sub / 4, k = sub % 4;
        if (sub == 0)
            _mm512_storeu_ps(scale, _mm512_mul_ps(_mm512_set1_ps(f16(blk + 208)),
                                                  _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192))))));
        if (k == 0) {
            const uint8_t* l = blk + half * 64;
            const uint8_t* h = blk + 128 + half * 32;
            for (int i = 0; i < 2; ++i) {
                ql[0][i] = u8x16(l + 16 * i);
                ql[1][i] = u8x16(l + 32 + 16 * i);
                qh[i] = u8x16(h + 16 * i);
            }
        }
        const __m512i lo4 = _mm512_set1_epi32(0xF), three = _mm512_set1_epi32(3), off = _mm512_set1_epi32(32);
        auto q = [&](int i) {
            const __m512i l = _mm512_and_si512(_mm512_srli_epi32(ql[k & 1][i], k < 2 ? 0 : 4), lo4);
            const __m512i h = _mm512_and_si512(_mm512_srli_epi32(qh[i], 2 * k), three);
            return _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_or_si512(l, _mm512_slli_epi32(h, 4)), off));
        };
        a = _mm512_mul_ps(_mm512_set1_ps(scale[half * 8 + 2 * k]), q(0));
        b = _mm512_mul_ps(_mm512_set1_ps(scale[half * 8 + 2 * k + 1]), q(1));
    }
};

template <typename F, typename = void> constexpr bool HAS_WORDS = false;     // Bf<F>::words exists
template <typename F> constexpr bool HAS_WORDS<F, std::void_t<decltype(&Bf<F>::words)>> = true;

// Weight rows n0 .. n0 + np - 1 (np <= 32) into A tiles pb: [K/32 steps][hi, (lo)][rows 0-15,
// 16-31][16 rows][32 values] (4 KB a step, or 2 KB without lo: amx_exact off); rows past np are
// zero. Every other block a line a few blocks ahead is prefetched (a panel's rows are 32 short
// runs; a prefetch took 20% off the packer before, twenty-first session).
template <typename F>
void pack_panel_bf16(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t np, int64_t K, uint16_t* pb, bool lo_too) {
    const int64_t step = lo_too ? 2048 : 1024, steps = K / 32;
    constexpr int64_t AHEAD = 256;
    for (int64_t r = 0; r < 32; ++r) {
        uint16_t* d = pb + (r / 16) * 512 + (r % 16) * 32;
        if (r >= np) {
            for (int64_t s = 0; s < steps; ++s) {
                _mm512_store_si512(d + s * step, _mm512_setzero_si512());
                if (lo_too) _mm512_store_si512(d + s * step + 1024, _mm512_setzero_si512());
            }
            continue;
        }
        const uint8_t* row = w + (n0 + r) * row_bytes;
        Bf<F> bf;
        for (int64_t s = 0; s < steps; ++s) {
            const int64_t at = s * 32 / F::N * F::BYTES + AHEAD;
            if (at < row_bytes && (s & 1) == 0) _mm_prefetch(reinterpret_cast<const char*>(row + at), _MM_HINT_T0);
            if constexpr (HAS_WORDS<F>) {
                if (!lo_too) {
                    _mm512_store_si512(d + s * step, bf.words(row, s));
                    continue;
                }
            }
            __m512 a, b;
            bf.floats(row, s, a, b);
            if (lo_too) {
                __m512i hi, lo;
                split32(a, b, hi, lo);
                _mm512_store_si512(d + s * step, hi);
                _mm512_store_si512(d + s * step + 1024, lo);
            } else {
                _mm512_store_si512(d + s * step, (__m512i)_mm512_cvtne2ps_pbh(b, a));
            }
        }
    }
}

// One step of a 32 x 32 block of y^T: C tiles 0-3 ([weight rows 0-15, 16-31][x rows 0-15,
// 16-31]) += wh xl + wh xh (6 tile loads for 8 products), and with wl (exact) + wl xh (8 loads
// for 12), in that order so that only two tiles change between groups
inline void stepT(const uint16_t* w0, const uint16_t* w1, const uint16_t* xh0, const uint16_t* xh1, const uint16_t* xl0,
                  const uint16_t* xl1, const uint16_t* wl0, const uint16_t* wl1) {
    _tile_loadd(4, w0, 64); _tile_loadd(5, w1, 64);
    _tile_loadd(6, xl0, 64); _tile_loadd(7, xl1, 64);
    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    _tile_loadd(6, xh0, 64); _tile_loadd(7, xh1, 64);
    _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    if (wl0) {
        _tile_loadd(4, wl0, 64); _tile_loadd(5, wl1, 64);
        _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
    }
}

// Rows 32 blk .. 32 blk + 31 of y [M, row stride N], columns n0 .. n0 + np - 1, = x W^T for
// one packed panel pb, with or without its lo tiles (exact; act: as gemm_tile)
inline void amx_block(const XB& xb, int64_t blk, const uint16_t* pb, bool exact, float* y, int64_t N, int64_t n0, int64_t np,
                      int act) {
    alignas(64) float c[32 * 32], ct[32 * 32];
    const int64_t steps = xb.K / 32;
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    const int64_t wstep = exact ? 2048 : 1024;
    for (int64_t s = 0; s < steps; ++s) {
        const uint16_t* a = xb.step(blk, s);     // [hi, lo][m 0-15, 16-31][16 pairs][16 m][2]
        const uint16_t* w = pb + s * wstep;      // [hi, (lo)][n 0-15, 16-31][16 n][32 k]
        stepT(w, w + 512, a, a + 512, a + 1024, a + 1536, exact ? w + 1024 : nullptr, exact ? w + 1536 : nullptr);
    }
    // c [weight row][x row] -> ct [x row][weight row], a 16 x 16 quarter at a time
    _tile_stored(0, c, 128); _tile_stored(1, c + 16, 128); _tile_stored(2, c + 512, 128); _tile_stored(3, c + 528, 128);
    for (int qn = 0; qn < 2; ++qn)
        for (int qm = 0; qm < 2; ++qm) {
            __m512i v[16];
            for (int i = 0; i < 16; ++i) v[i] = _mm512_load_si512(c + (16 * qn + i) * 32 + 16 * qm);
            transpose16(v);
            for (int i = 0; i < 16; ++i) _mm512_store_si512(ct + (16 * qm + i) * 32 + 16 * qn, v[i]);
        }
    const __mmask16 k0 = cols16(np, 0), k1 = cols16(np, 16);
    const int64_t rows = std::min<int64_t>(32, xb.M - 32 * blk);
    for (int64_t r = 0; r < rows; ++r) {
        float* yr = y + (32 * blk + r) * N + n0;
        __m512 v0 = _mm512_load_ps(ct + 32 * r), v1 = _mm512_load_ps(ct + 32 * r + 16);
        if (act >= 0) {
            v0 = _mm512_mul_ps(act_of(_mm512_maskz_loadu_ps(k0, yr), act == 1), v0);
            v1 = _mm512_mul_ps(act_of(_mm512_maskz_loadu_ps(k1, yr + 16), act == 1), v1);
        }
        _mm512_mask_storeu_ps(yr, k0, v0);
        _mm512_mask_storeu_ps(yr + 16, k1, v1);
    }
}

#endif
#else
// AVX2 builds have no integer GEMM: many rows take the float32 kernels (Kernels::Gemm unused).
struct G_Q4_0 {}; struct G_Q4_1 {}; struct G_Q5_0 {}; struct G_Q8_0 {}; struct G_Q4_K {}; struct G_Q6_K {};
#endif

// ggml type ids
enum : int64_t { T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q8_0 = 8, T_Q4_K = 12, T_Q6_K = 14 };

// f(Kernels<...>{}): `Float` dots float32 activations, `Int` integer ones (XQ) for one or two
// rows, `Gemm` int16 ones for many rows (AVX-512 builds)
template <typename F_, typename I_, typename G_>
struct Kernels {
    using Float = F_;
    using Int = I_;
    using Gemm = G_;
};

template <typename F>
void dispatch(int64_t qtype, F&& f) {
    switch (qtype) {
        case T_Q4_0: f(Kernels<Q4_0, Q4_0x8, G_Q4_0>{}); break;
        case T_Q4_1: f(Kernels<Q4_1, Q4_1x8, G_Q4_1>{}); break;
        case T_Q5_0: f(Kernels<Q5_0, Q5_0x8, G_Q5_0>{}); break;
        case T_Q8_0: f(Kernels<Q8_0, Q8_0x8, G_Q8_0>{}); break;
        case T_Q4_K: f(Kernels<Q4_K, Q4_Kx8, G_Q4_K>{}); break;
        case T_Q6_K: f(Kernels<Q6_K, Q6_Kx8, G_Q6_K>{}); break;
        default: TORCH_CHECK(false, "qmatmul: unsupported ggml type id ", qtype);
    }
}

void check_weight(const torch::Tensor& w, int64_t K, int64_t block, int64_t bytes) {
    TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous(), "weight must be contiguous uint8 [N, row_bytes]");
    TORCH_CHECK(K % block == 0 && w.size(1) == K / block * bytes, "weight row has ", w.size(1), " bytes, expected ", K / block * bytes);
}

}  // namespace

// One activation row already rounded to integers (xq) against several matrices with the same
// K (q/k/v, gate/up): y_i [N_i]. One parallel region over all their rows: a decode step's
// small matrices are too short to split well one at a time, and each region costs a fork/join.
std::vector<torch::Tensor> matvec_i8(const XQBuffer& xq, const std::vector<torch::Tensor>& ws,
                                     const std::vector<int64_t>& qtypes, int64_t K, const torch::Tensor* out = nullptr) {
    std::vector<torch::Tensor> ys;
    std::vector<int64_t> first{0};
    for (size_t i = 0; i < ws.size(); ++i) {
        dispatch(qtypes[i], [&](auto k) {
            using B = typename decltype(k)::Int;
            check_weight(ws[i], K, B::N, B::BYTES);
        });
        ys.push_back(out ? out->view({-1}) : torch::empty({ws[i].size(0)}, torch::dtype(torch::kFloat32)));
        first.push_back(first.back() + ws[i].size(0));
    }
    const XQ x = xq.view();
    at::parallel_for(0, first.back(), 8, [&](int64_t a, int64_t b) {
        for (size_t i = 0; i < ws.size(); ++i) {
            const int64_t lo = std::max(a, first[i]) - first[i], hi = std::min(b, first[i + 1]) - first[i];
            if (lo >= hi) continue;
            const uint8_t* w = ws[i].data_ptr<uint8_t>();
            float* y = ys[i].data_ptr<float>();
            dispatch(qtypes[i], [&](auto k) {
                using B = typename decltype(k)::Int;
                if (xq.digits == 2) matvec8_rows<B, 2>(x, w, y, lo, hi, K);
                else matvec8_rows<B, 1>(x, w, y, lo, hi, K);
            });
        }
    });
    return ys;
}

constexpr int64_t GEMM_MIN_ROWS = 3;

#ifdef JISU_AMX
// The panels of several matrices reading the same x (gemm_i16_xq's, in its order): panel p is
// columns n0 .. n0 + np - 1 of matrix i.
struct AmxPanels {
    const std::vector<torch::Tensor>& ws;
    const std::vector<int64_t>& qtypes;
    const std::vector<int64_t>& first;   // matrix i's panels start at first[i]
    std::vector<torch::Tensor>& ys;
    int64_t K;
    int act;
    bool exact;   // lo tiles too (amx_exact, read once per call)
    int64_t count() const { return first.back(); }
    void pack(int64_t p, uint16_t* pb) const {
        int64_t i, n0, np;
        locate(p, i, n0, np);
        dispatch(qtypes[i], [&](auto k) {
            pack_panel_bf16<typename decltype(k)::Float>(ws[i].data_ptr<uint8_t>(), ws[i].size(1), n0, np, K, pb, exact);
        });
    }
    void locate(int64_t p, int64_t& i, int64_t& n0, int64_t& np) const {
        i = 0;
        while (p >= first[i + 1]) ++i;
        n0 = (p - first[i]) * GP, np = std::min<int64_t>(GP, ws[i].size(0) - n0);
    }
    // every 32-row block of x against panels g0 .. g1 - 1, panel p packed in slots[p - g0]
    void compute(const XB& xb, int64_t g0, int64_t g1, uint16_t* const* slots) const {
        for (int64_t blk = 0; blk < xb.blocks; ++blk)
            for (int64_t p = g0; p < g1; ++p) {
                int64_t i, n0, np;
                locate(p, i, n0, np);
                amx_block(xb, blk, slots[p - g0], exact, ys[i].data_ptr<float>(), ws[i].size(0), n0, np, act);
            }
    }
};

// x W_i^T on AMX. Every thread takes groups of G panels from a shared counter (a faster core takes
// more of them), dequantizes and packs a group's panels, then passes every 32-row block of x over
// them (the group's packed weights stay in L2: a block of x is read from memory once per group,
// not once per panel; K 1536: 112 -> 166 G multiply-adds/s). The sixteenth session had one thread
// multiply while the other packed ahead of it, measured when two copies of a tile loop ran at
// half speed each (one AMX unit for both vCPUs); on the same kind of VM later, two copies ran at
// full speed each, and this design made 512-token prefills 1.32x (SmolLM2) / 1.26x (Gemma 3) the
// int16 GEMM's speed where packing ahead had been 0.62x / 0.75x (RESULTS.md, seventeenth session).
// The panels go in groups of at most G, as many groups as a multiple of the threads: Gemma 3's
// o and down matrices (20 panels) made 5 groups of 4, so one thread took 3 and the other
// waited a group's time for it (16% of those calls' thread time idle); 6 groups of 3 or 4 left
// 12.7 ms of a 512-token prefill's thread time idle where 17-24 had been (RESULTS.md,
// twenty-first session). One block of x (32 rows or fewer: a batched decode step) is read again
// for every panel anyway, so there the groups are of 2: Gemma 3's down matrices (20 panels, 6
// groups of 3 or 4) had left 14-28% of their thread time idle; 32-stream Gemma steps, alternating
// 4 rounds in one process, 700 -> 733 tok/s (medians; twenty-second session).
void amx_gemm(const XB& xb, const AmxPanels& job) {
    const int64_t P = job.count(), K = job.K;
    constexpr int64_t GMAX = 4;   // measured: groups of 4 over 2 and 8, at K 576 and 1536 (512 rows)
    const int64_t G = xb.blocks == 1 ? 2 : GMAX;
    const int64_t T = at::in_parallel_region() ? 1 : std::min<int64_t>(at::get_num_threads(), (P + G - 1) / G);
    const int64_t groups = T * ((P + G * T - 1) / (G * T));     // group g: panels g P / groups ..
    // each thread's G packed panels (64 K bf16 each, or 32 K without lo tiles), allocated here in
    // one piece, on the calling thread's heap rather than in the pool threads' arenas
    const int64_t panel_bytes = (job.exact ? 64 : 32) * K * 2;
    const int64_t per = G * panel_bytes;
    uint8_t* scratch = static_cast<uint8_t*>(std::aligned_alloc(64, per * T));
    std::atomic<int64_t> seat{0};
    take_turns(groups, [&](auto take) {
        uint8_t* mine = scratch + per * seat.fetch_add(1, std::memory_order_relaxed);
        uint16_t* slots[GMAX];
        for (int64_t g = 0; g < G; ++g) slots[g] = reinterpret_cast<uint16_t*>(mine + g * panel_bytes);
        tiles_on();
        for (int64_t g; (g = take()) >= 0;) {
            const int64_t g0 = g * P / groups, g1 = (g + 1) * P / groups;
            for (int64_t p = g0; p < g1; ++p) job.pack(p, slots[p - g0]);
            job.compute(xb, g0, g1, slots);
        }
        _tile_release();
    }, T);
    std::free(scratch);
}
#endif

#ifdef JISU_AVX512
// x [M, K] rounded to int16 once for each code range (G::QMAX) that the matrices reading it
// take: one rounding, or two where a Q6_K sits among other types (a Q4_K_M file's attn_v), so
// every matrix gets its own type's codes and the same numbers as alone
struct Rounded {
    std::vector<std::pair<float, XQ16>> by_qmax;
#ifdef JISU_AMX
    XB xb;               // or, for AMX_MIN_ROWS rows and more on AMX, x split into bf16 tiles
#endif
    bool amx = false;
#ifdef JISU_AMX
    torch::Tensor storage;   // x, split in place into xb
#endif
    // x (contiguous float32 [M, K]) rounded, or for AMX split into tiles: in place where nothing
    // else holds x (then this keeps it), so callers that release x once rounded pass it moved
    Rounded(torch::Tensor&& x, int64_t M, int64_t K, const std::vector<int64_t>& qtypes) {
#ifdef JISU_AMX
        const int64_t amx_rows = amx_min_rows.load();
        if (amx_rows > 0 && M >= amx_rows && amx_ready()) {
            amx = true;
            if (x.is_contiguous() && x.use_count() == 1 && x.storage().use_count() == 1 && x.storage_offset() == 0 &&
                reinterpret_cast<uintptr_t>(x.data_ptr<float>()) % 64 == 0) {
                storage = std::move(x);
                xb.split_in_place(storage.data_ptr<float>(), M, K);
            } else {
                xb.split(x.data_ptr<float>(), M, K);
            }
            return;
        }
#endif
        for (int64_t t : qtypes) {
            const float q = qmax_of(t);
            if (std::none_of(by_qmax.begin(), by_qmax.end(), [&](const auto& e) { return e.first == q; })) {
                by_qmax.emplace_back(q, XQ16{});
                quantize_x16(x.data_ptr<float>(), M, K, by_qmax.back().second, q);
            }
        }
    }
    static float qmax_of(int64_t qtype) {
        float q = 0.f;
        dispatch(qtype, [&](auto k) { q = decltype(k)::Gemm::QMAX; });
        return q;
    }
    const XQ16& of(int64_t qtype) const {
        const float q = qmax_of(qtype);
        for (const auto& e : by_qmax) if (e.first == q) return e.second;
        TORCH_CHECK(false, "int16 GEMM: x was not rounded for ggml type ", qtype);
    }
};

// y_i [M, N_i] = x W_i^T for several matrices reading the same x (q/k/v, gate/up), x [M, K]
// already rounded (xr, for these types): the panels of all of them (GP weight rows each,
// unpacked once, passed over by every row of x) are split over the threads in one parallel
// region.
// act 0 / 1 (one matrix, out given): out holds act's input and becomes act(out) times x W^T
// (gate and up: gated_ffn_i16).
std::vector<torch::Tensor> gemm_i16_xq(const Rounded& xr, int64_t M, const std::vector<torch::Tensor>& ws,
                                       const std::vector<int64_t>& qtypes, int64_t K, const torch::Tensor* out = nullptr,
                                       int act = -1) {
    TORCH_CHECK(act < 0 || (out && ws.size() == 1), "int16 GEMM: an activation needs one matrix and its input in out");
    std::vector<torch::Tensor> ys;
    std::vector<int64_t> first{0};
    std::vector<const XQ16*> xqs;
    for (size_t i = 0; i < ws.size(); ++i) {
        dispatch(qtypes[i], [&](auto k) {
            using F = typename decltype(k)::Float;
            check_weight(ws[i], K, F::N, F::BYTES);
        });
        if (!xr.amx) xqs.push_back(&xr.of(qtypes[i]));
        ys.push_back(out ? out->view({M, -1}) : torch::empty({M, ws[i].size(0)}, torch::dtype(torch::kFloat32)));
        first.push_back(first.back() + (ws[i].size(0) + GP - 1) / GP);
    }
#ifdef JISU_AMX
    if (xr.amx) {
        amx_gemm(xr.xb, AmxPanels{ws, qtypes, first, ys, K, act, amx_exact.load()});
        return ys;
    }
#endif
    take_turns(first.back(), [&](auto take) {
        int32_t* pw = static_cast<int32_t*>(std::aligned_alloc(64, sizeof(int32_t) * (K / 2) * GP));
        std::vector<float> ps(K / 16 * GP), pm(K / 16 * GP);    // room for the smallest scale block
        for (int64_t p; (p = take()) >= 0;) {
            size_t i = 0;
            while (p >= first[i + 1]) ++i;
            dispatch(qtypes[i], [&](auto k) {
                using G = typename decltype(k)::Gemm;
                gemm_panel<G>(*xqs[i], ws[i].data_ptr<uint8_t>(), ys[i].data_ptr<float>(), M, ws[i].size(0), K, ws[i].size(1),
                              p - first[i], pw, ps.data(), pm.data(), act);
            });
        }
        std::free(pw);
    });
    return ys;
}

// gemm_i16_xq with x rounded here, once for all the matrices (once per code range)
// (x is released once rounded: a caller that passes it moved frees it before the GEMM, as a
// prompt's MLP does with g, 3 MB at 512 rows)
std::vector<torch::Tensor> gemm_i16(torch::Tensor x, const std::vector<torch::Tensor>& ws,
                                    const std::vector<int64_t>& qtypes, int64_t K, const torch::Tensor* out = nullptr) {
    const int64_t M = x.numel() / K;
    const Rounded xr(std::move(x), M, K, qtypes);
    x.reset();
    return gemm_i16_xq(xr, M, ws, qtypes, K, out);
}

// ---- greedy rows: gemm_i16's argmax per row, without computing every logit ------------------
// A greedy decode row needs only the index of its largest logit, and the output projection is
// the largest GEMM of a batched step (Gemma 3: 262k x 640, half of a 32-row step). Each row is
// also rounded to int8 (x8 = d8 a8: per 32 values d8 = D 2^k, one D per row, see screen_tile)
// and a first pass computes y8 = x8 W^T with vpdpbusd, which multiplies 64 byte pairs per
// instruction where the int16 GEMM's vpdpwssd multiplies 32, together with a bound on how far y8
// can be from the int16 GEMM's y16 (Cauchy-Schwarz, W[n] the column's values as the tiles scale
// them):
//     |y8 - y16| <= |W[n]| (|x8 - x16| + g (|x8| + |x16|))  =  B[n] for the row
// where g (the "rounding room") covers both sides' float rounding (quantize_x8s). Column n can be
// argmax(y16) only if y8[n] + B[n] >= max_j (y8[j] - B[j]). Those few candidates (160 of Gemma's
// decode rows: 2.4 of 262k on average, a median of 1) are computed again the way the int16 GEMM's
// tile computes them, so their values are its values to the bit, and their first maximum is
// argmax(y16). Types with offsets per block (Q4_1, Q4_K) are not screened (their offset terms
// would need their own room); the caller computes their logits.
struct XQ8S {
    std::vector<int8_t> q;      // [M, K]: x8 = d q
    std::vector<float> row;     // [M]: D, the row's scale: each block's d is D 2^k
    std::vector<float> mf;      // [M, K / 32]: 1.5 2^(23 + k), the block's float offset (see screen_tile)
    std::vector<int32_t> c;     // [M, K / 16]: offset bits - 128 * (sum of 16 codes): the weights enter as w + 128
    std::vector<int32_t> c32;   // [M, K / 32]: the same per 32 codes
    std::vector<float> delta;   // [M]: |x8 - x16| + g (|x8| + |x16|), rounded up: B = |W[n]| delta
    std::vector<float> n8;      // [M]: |x8| (1 + 2^-10), rounded up (the panels' six-bit screen)
    std::vector<uint8_t> bad;   // [M]: the row has a non-finite value
};

// the smallest k with r <= 2^k, for r > 0
inline int log2_ceil(float r) {
    int e;
    const float m = std::frexp(r, &e);   // r = m 2^e, m in [0.5, 1)
    return m == 0.5f ? e - 1 : e;
}

// Rounding room: y16 is a chain of n <= K / 16 fused multiply-adds of terms s dx I (I an exact
// integer sum, rounded once to float, s dx once), y8 one of n multiply-adds of 2^k I s and a last
// multiply by D. Each is within (n + 2) 2^-24 sum_k |W[n]_k x_k| <= (n + 2) 2^-24 |W[n]| |x| of
// its exact value; y8 +- B and B's own product add a few roundings of the same size: g takes
// n + 8, and delta a factor 1 + 2^-12 beyond (the norms themselves are summed in double).
void quantize_x8s(const float* x, int64_t M, int64_t K, const XQ16& x16, XQ8S& out) {
    const int64_t nb = K / 32;
    out.q.resize(M * K);
    out.row.resize(M);
    out.mf.resize(M * nb);
    out.c.resize(M * K / 16);
    out.c32.resize(M * nb);
    out.delta.resize(M);
    out.n8.resize(M);
    out.bad.assign(M, 0);
    const double g = double(K / 16 + 8) * 0x1p-24;
    auto body = [&](int64_t m0, int64_t m1) {
        std::vector<float> amaxes(nb);
        std::vector<int> ks(nb);
        for (int64_t m = m0; m < m1; ++m) {
            float rmax = 0.f;
            for (int64_t j = 0; j < nb; ++j) {
                const int64_t i = m * nb + j;
                const __m512 a = _mm512_loadu_ps(x + 32 * i), b = _mm512_loadu_ps(x + 32 * i + 16);
                const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
                // NaN or +-inf (the max above drops NaN), or a block so small that the GEMM's
                // scale products s dx could be subnormal, where the rounding room, relative, is
                // not room enough: such rows are left to the caller
                if (_mm512_fpclass_ps_mask(a, 0x99) | _mm512_fpclass_ps_mask(b, 0x99) || (amax > 0.f && amax < 0x1p-60f)) out.bad[m] = 1;
                amaxes[j] = amax;
                rmax = std::max(rmax, amax);
            }
            // the row's scale D = max / 127, and per block the smallest d = D 2^k (k <= 0) that
            // holds its values; a block 2^60 below the row's max is left to the caller too (the
            // products 2^k s stay normal floats)
            const float D = rmax / 127.f;
            out.row[m] = D;
            for (int64_t j = 0; j < nb; ++j) {
                ks[j] = amaxes[j] > 0.f ? log2_ceil(amaxes[j] / rmax) : 0;   // amax / rmax <= 2^k
                if (ks[j] < -60) out.bad[m] = 1;
            }
            if (out.bad[m]) {
                std::memset(out.q.data() + m * K, 0, K);
                for (int64_t j = 0; j < nb; ++j) {
                    const int64_t i = m * nb + j;
                    out.mf[i] = 0x1.8p23f;
                    out.c[2 * i] = out.c[2 * i + 1] = out.c32[i] = 0x4B400000;
                }
                out.delta[m] = out.n8[m] = 0.f;
                continue;
            }
            __m512d dd = _mm512_setzero_pd(), s8 = _mm512_setzero_pd(), s16 = _mm512_setzero_pd();
            for (int64_t j = 0; j < nb; ++j) {
                const int64_t i = m * nb + j;
                const __m512 a = _mm512_loadu_ps(x + 32 * i), b = _mm512_loadu_ps(x + 32 * i + 16);
                const float amax = amaxes[j];
                const int k = ks[j];
                const float d = std::ldexp(D, k);
                const float mf = std::ldexp(1.5f, 23 + k);
                int32_t bits;
                std::memcpy(&bits, &mf, 4);
                const __m512 id = _mm512_set1_ps(amax > 0.f ? 1.f / d : 0.f);
                // saturated: a value rounded past 127 is clipped, and delta measures the clip
                const __m128i ca = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(a, id)));
                const __m128i cb = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(b, id)));
                _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + 32 * i), ca);
                _mm_storeu_si128(reinterpret_cast<__m128i*>(out.q.data() + 32 * i + 16), cb);
                const __m512i sa = _mm512_cvtepi8_epi32(ca), sb = _mm512_cvtepi8_epi32(cb);
                out.mf[i] = mf;
                const int32_t ta = -128 * _mm512_reduce_add_epi32(sa), tb = -128 * _mm512_reduce_add_epi32(sb);
                out.c[2 * i] = bits + ta;
                out.c[2 * i + 1] = bits + tb;
                out.c32[i] = bits + ta + tb;
                // |x8 - x16|, |x8|, |x16| squared, in double: each product d q is exact there
                const __m512d d8 = _mm512_set1_pd(d), d16 = _mm512_set1_pd(x16.d[i]);
                const __m512i q16 = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16.q.data() + 32 * i)));
                const __m512i r16 = _mm512_cvtepi16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x16.q.data() + 32 * i + 16)));
                const __m256i parts8[4] = {_mm512_castsi512_si256(sa), _mm512_extracti64x4_epi64(sa, 1),
                                           _mm512_castsi512_si256(sb), _mm512_extracti64x4_epi64(sb, 1)};
                const __m256i parts16[4] = {_mm512_castsi512_si256(q16), _mm512_extracti64x4_epi64(q16, 1),
                                            _mm512_castsi512_si256(r16), _mm512_extracti64x4_epi64(r16, 1)};
                for (int h = 0; h < 4; ++h) {
                    const __m512d v8 = _mm512_mul_pd(_mm512_cvtepi32_pd(parts8[h]), d8);
                    const __m512d v16 = _mm512_mul_pd(_mm512_cvtepi32_pd(parts16[h]), d16);
                    const __m512d e = _mm512_sub_pd(v8, v16);
                    dd = _mm512_fmadd_pd(e, e, dd);
                    s8 = _mm512_fmadd_pd(v8, v8, s8);
                    s16 = _mm512_fmadd_pd(v16, v16, s16);
                }
            }
            const double n8 = std::sqrt(_mm512_reduce_add_pd(s8));
            const double delta = std::sqrt(_mm512_reduce_add_pd(dd)) + g * (n8 + std::sqrt(_mm512_reduce_add_pd(s16)));
            out.delta[m] = float(delta * (1.0 + 0x1p-12));
            out.n8[m] = float(n8 * (1.0 + 0x1p-10));
        }
    };
    if (M < 4) body(0, M); else at::parallel_for(0, M, 4, body);
}

// Weight rows n0 .. n0 + np as a panel of bytes w + 128: pw [K / 4][GP] (four consecutive k per
// int32 lane), ps [K / KB][GP] scales, norms [GP] |W[n]| (the columns' values as ps scales them,
// rounded up; 0 past np). Two 32-value blocks of 16 rows are transposed at a time; the sums of
// squares are taken after the transpose, one vector of 16 columns per quad.
template <typename G>
void pack_panel8(const uint8_t* w, int64_t row_bytes, int64_t n0, int64_t np, int64_t K,
                 int32_t* pw, float* ps, float* norms, const uint8_t* next, int64_t next_bytes) {
    constexpr int KB = G::KB, SUB = 32 / KB;
    const int64_t nb = K / 32, pairs = (nb + 1) / 2, steps = GP / 16 * pairs;
    const int64_t lines = (next_bytes + 63) / 64, per_step = (lines + steps - 1) / steps;
    const __m512i flip = _mm512_set1_epi8(char(0x80));
    for (int h = 0; h < GP / 16; ++h) {
        __m512d n2[2] = {_mm512_setzero_pd(), _mm512_setzero_pd()};   // sum of (s w)^2, columns 0-7, 8-15
        for (int64_t jp = 0; jp < pairs; ++jp) {
            prefetch_part(next, lines, per_step, h * pairs + jp);
            const int two = 2 * jp + 1 < nb ? 2 : 1;
            __m512i r[16];
            if (two == 2 && h * 16 + 16 <= np) {       // the common case, straight-line
                const int64_t j = 2 * jp;
                for (int c = 0; c < 16; ++c) {
                    const int64_t col = h * 16 + c;
                    const uint8_t* row = w + (n0 + col) * row_bytes;
                    float s0[SUB], s1[SUB], mn[SUB];
                    const __m256i lo = G::ints(row, j, s0, mn), hi = G::ints(row, j + 1, s1, mn);
                    for (int t = 0; t < SUB; ++t) {
                        ps[(j * SUB + t) * GP + col] = s0[t];
                        ps[((j + 1) * SUB + t) * GP + col] = s1[t];
                    }
                    r[c] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                }
            } else {
                for (int c = 0; c < 16; ++c) {
                    const int64_t col = h * 16 + c;
                    __m256i half[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
                    for (int u = 0; u < two; ++u) {
                        const int64_t j = 2 * jp + u;
                        float s[SUB] = {}, mn[SUB] = {};
                        if (col < np) half[u] = G::ints(w + (n0 + col) * row_bytes, j, s, mn);
                        for (int t = 0; t < SUB; ++t) ps[(j * SUB + t) * GP + col] = s[t];
                    }
                    r[c] = _mm512_inserti64x4(_mm512_castsi256_si512(half[0]), half[1], 1);
                }
            }
            transpose16(r);                 // r[g]: quad g of the two blocks, for the 16 columns
            for (int u = 0; u < two; ++u) {
                for (int t = 0; t < SUB; ++t) {
                    // the squares of each lane's four signed bytes, as two int16 pairs (exact)
                    __m512i sq = _mm512_setzero_si512();
                    for (int g = 0; g < KB / 4; ++g) {
                        const __m512i q = r[8 * u + (KB / 4) * t + g];
                        const __m512i lo = _mm512_srai_epi16(_mm512_slli_epi16(q, 8), 8), hi = _mm512_srai_epi16(q, 8);
                        sq = _mm512_dpwssd_epi32(_mm512_dpwssd_epi32(sq, lo, lo), hi, hi);
                    }
                    const int64_t at = ((2 * jp + u) * SUB + t) * GP + h * 16;
                    const __m512 sc = _mm512_loadu_ps(ps + at);
                    for (int e = 0; e < 2; ++e) {
                        const __m512d s8 = _mm512_cvtps_pd(e ? _mm512_extractf32x8_ps(sc, 1) : _mm512_castps512_ps256(sc));
                        const __m512d w8 = _mm512_cvtepi32_pd(e ? _mm512_extracti64x4_epi64(sq, 1) : _mm512_castsi512_si256(sq));
                        n2[e] = _mm512_fmadd_pd(_mm512_mul_pd(s8, s8), w8, n2[e]);
                    }
                }
            }
            for (int g = 0; g < 8 * two; ++g) _mm512_store_si512(pw + ((2 * jp * 8 + g) * GP + h * 16), _mm512_xor_si512(r[g], flip));
        }
        // rounded up: 2^-20 covers the double sums' and the conversion's rounding
        const __m512d up = _mm512_set1_pd(1.0 + 0x1p-20);
        _mm256_storeu_ps(norms + h * 16, _mm512_cvt_roundpd_ps(_mm512_mul_pd(_mm512_sqrt_pd(n2[0]), up), _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
        _mm256_storeu_ps(norms + h * 16 + 8, _mm512_cvt_roundpd_ps(_mm512_mul_pd(_mm512_sqrt_pd(n2[1]), up), _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
    }
}

// One row's screening state on one thread: t, the largest lower bound y8 - B seen so far, and
// the columns whose upper bound y8 + B reached the t of their time (a superset of the final set).
struct Screen {
    float t = -INFINITY;
    bool bad = false;
    std::vector<std::pair<int32_t, float>> cand;   // (column, y8 + B)
    size_t limit = 4096;                            // prune when the list reaches it
    void prune() {
        cand.erase(std::remove_if(cand.begin(), cand.end(), [&](const auto& c) { return c.second < t; }), cand.end());
        // many columns at the threshold (an all-zero row: every y8 and B are 0) survive
        // pruning; doubling the limit keeps the work linear in the list
        limit = std::max<size_t>(4096, 2 * cand.size());
    }
};

// The upper bounds y + B of 32 columns (hi0, hi1), with the row's threshold raised to their
// largest lower bound y - B and the row marked bad at a NaN
inline void bounds32(Screen& st, __m512 y0, __m512 b0, __m512 y1, __m512 b1, __mmask16 k0, __mmask16 k1,
                     __m512& hi0, __m512& hi1) {
    hi0 = _mm512_add_ps(y0, b0);
    hi1 = _mm512_add_ps(y1, b1);
    const __m512 lo0 = _mm512_sub_ps(y0, b0), lo1 = _mm512_sub_ps(y1, b1);
    // NaN in y or B reaches both sums (and inf - inf is NaN too): the row is left to the caller
    if (_mm512_mask_cmp_ps_mask(k0, hi0, lo0, _CMP_UNORD_Q) | _mm512_mask_cmp_ps_mask(k1, hi1, lo1, _CMP_UNORD_Q)) st.bad = true;
    const __m512 none = _mm512_set1_ps(-INFINITY);
    const float lmax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_mask_mov_ps(none, k0, lo0), _mm512_mask_mov_ps(none, k1, lo1)));
    if (lmax > st.t) st.t = lmax;
}

// Columns n .. n + 31 of one row (y8 and bound B, two vectors; lanes k0 / k1 hold columns): the
// row's threshold, then the columns whose upper bound reaches it. One maximum over both vectors.
inline void screen_cols(Screen& st, __m512 y0, __m512 b0, __m512 y1, __m512 b1, __mmask16 k0, __mmask16 k1, int64_t n) {
    if (!(k0 | k1)) return;
    __m512 hi0, hi1;
    bounds32(st, y0, b0, y1, b1, k0, k1, hi0, hi1);
    const __m512 t = _mm512_set1_ps(st.t);
    const __mmask16 keep[2] = {_mm512_mask_cmp_ps_mask(k0, hi0, t, _CMP_GE_OQ), _mm512_mask_cmp_ps_mask(k1, hi1, t, _CMP_GE_OQ)};
    if (!(keep[0] | keep[1])) return;
    alignas(64) float v[32];
    _mm512_store_ps(v, hi0);
    _mm512_store_ps(v + 16, hi1);
    for (int h = 0; h < 2; ++h)
        for (__mmask16 k = keep[h]; k; k &= k - 1) {
            const int c = 16 * h + __builtin_ctz(k);
            st.cand.emplace_back(int32_t(n + c), v[c]);
        }
    if (st.cand.size() >= st.limit) st.prune();
}

// Row m's threshold over the threads' screens; false where the row is left to the caller (a
// non-finite value, or no finite threshold)
inline bool final_threshold(const std::vector<std::vector<Screen>>& st, const XQ8S& x8, int64_t m, float& t) {
    t = -INFINITY;
    bool bad = x8.bad[m];
    for (auto& s : st) { t = std::max(t, s[m].t); bad |= s[m].bad; }
    return !bad && std::isfinite(t);
}

// Row m's candidates over the threads' screens, in column order; false where the row is left to
// the caller: final_threshold's rows, and a row with more than `cap` candidates (a flat row:
// near-uniform logits, e.g. after a random prompt): each candidate is computed alone, ~1.5 us
// (its bytes lie scattered), so past N / 64 of them the screen costs more than full logits (a
// flat Gemma row's candidates under the six-bit bound took 144-160 ms, full logits 10).
bool survivors(const std::vector<std::vector<Screen>>& st, const XQ8S& x8, int64_t m, std::vector<int32_t>& cols,
               int64_t cap = INT64_MAX) {
    float t;
    if (!final_threshold(st, x8, m, t)) return false;
    for (auto& s : st)
        for (const auto& c : s[m].cand)
            if (c.second >= t) cols.push_back(c.first);
    if (int64_t(cols.size()) > cap) return false;
    std::sort(cols.begin(), cols.end());
    return true;
}

// survivors for the six-bit screen: row m's columns whose stored upper bound (up [N]) reaches
// the final threshold, in column order
bool stored_survivors(const std::vector<std::vector<Screen>>& st, const XQ8S& x8, int64_t m, const float* up, int64_t N,
                      std::vector<int32_t>& cols, int64_t cap) {
    float t;
    if (!final_threshold(st, x8, m, t)) return false;
    const __m512 tv = _mm512_set1_ps(t);
    for (int64_t n = 0; n < N; n += 16) {
        const __mmask16 valid = N - n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (N - n)) - 1);
        for (__mmask16 k = _mm512_mask_cmp_ps_mask(valid, _mm512_loadu_ps(up + n), tv, _CMP_GE_OQ); k; k &= k - 1) {
            cols.push_back(int32_t(n + __builtin_ctz(k)));
            if (int64_t(cols.size()) > cap) return false;
        }
    }
    return true;
}

// R rows of x8 against one packed panel (columns n0 ..): y8 and its bound, into the rows' states.
// 16 scales at p: floats, or the panels' fp16 (converted as they are read)
inline __m512 scales16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 scales16(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }

template <typename G, int R, typename S = float>
inline void screen_tile(const XQ8S& x, int64_t m0, int64_t K, const int32_t* pw, const S* ps, const float* norms,
                        Screen* st, int64_t n0, int64_t np, const uint8_t* next = nullptr, int64_t next_bytes = 0) {
    constexpr int KB = G::KB, SUB = 32 / KB;
    const int64_t nb = K / KB, xb = K / 32, cb = K / 16;
    const int8_t* xq = x.q.data() + m0 * K;
    const int64_t lines = next_bytes / 64, per_block = (lines + nb - 1) / nb;   // of `next`, requested per block
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        prefetch_part(next, lines, per_block, b);
        __m512i ai[R][2];
        for (int r = 0; r < R; ++r)
            ai[r][0] = ai[r][1] = _mm512_set1_epi32(KB == 32 ? x.c32[(m0 + r) * xb + b] : x.c[(m0 + r) * cb + b]);
        const int32_t* wp = pw + b * (KB / 4) * GP;
#pragma GCC unroll 8
        for (int g = 0; g < KB / 4; ++g) {
            const __m512i w0 = _mm512_load_si512(wp + g * GP), w1 = _mm512_load_si512(wp + g * GP + 16);
            for (int r = 0; r < R; ++r) {
                int32_t quad;
                std::memcpy(&quad, xq + r * K + b * KB + 4 * g, 4);
                const __m512i a = _mm512_set1_epi32(quad);
                ai[r][0] = _mm512_dpbusd_epi32(ai[r][0], w0, a);
                ai[r][1] = _mm512_dpbusd_epi32(ai[r][1], w1, a);
            }
        }
        // the sums began at the offset's bits: as floats they are 2^k (1.5 2^23 + sum), exactly,
        // so one subtraction gives 2^k sum (no conversion, and no multiply by the activation
        // scale: 2^k is in it), then one multiply-add by the weights' scales
        const __m512 s0 = scales16(ps + b * GP), s1 = scales16(ps + b * GP + 16);
        for (int r = 0; r < R; ++r) {
            const __m512 mf = _mm512_set1_ps(x.mf[(m0 + r) * xb + b / SUB]);
            acc[r][0] = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_castsi512_ps(ai[r][0]), mf), s0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_castsi512_ps(ai[r][1]), mf), s1, acc[r][1]);
        }
    }
    for (int r = 0; r < R; ++r) {   // times the row's scale D
        const __m512 D = _mm512_set1_ps(x.row[m0 + r]);
        acc[r][0] = _mm512_mul_ps(acc[r][0], D);
        acc[r][1] = _mm512_mul_ps(acc[r][1], D);
    }
    const __m512 n0v = _mm512_loadu_ps(norms), n1v = _mm512_loadu_ps(norms + 16);
    __m512 bnd[R][2];
    for (int r = 0; r < R; ++r) {
        const __m512 dr = _mm512_set1_ps(x.delta[m0 + r]);
        bnd[r][0] = _mm512_mul_ps(n0v, dr);
        bnd[r][1] = _mm512_mul_ps(n1v, dr);
    }
    const __mmask16 k0 = cols16(np, 0), k1 = cols16(np, 16);
    for (int r = 0; r < R; ++r) {
        screen_cols(st[m0 + r], acc[r][0], bnd[r][0], acc[r][1], bnd[r][1], k0, k1, n0);
    }
}

template <typename G>
void screen_panel(const XQ8S& x8, const uint8_t* w, int64_t M, int64_t N, int64_t K, int64_t row_bytes, int64_t p,
                  int32_t* pw, float* ps, float* norms, Screen* st) {
    const int64_t n0 = p * GP, np = std::min<int64_t>(GP, N - n0);
    const int64_t next_rows = std::max<int64_t>(0, std::min<int64_t>(GP, N - n0 - GP));
    pack_panel8<G>(w, row_bytes, n0, np, K, pw, ps, norms, w + (n0 + GP) * row_bytes, next_rows * row_bytes);
    by_tiles67<7>(M, [&](auto R, int64_t m) { screen_tile<G, decltype(R)::value>(x8, m, K, pw, ps, norms, st, n0, np); });
}

// argmax over n of gemm_i16(x, w)[m, n] for every row m of x [M, K]: int64 [M], -1 where it is
// not decided here (a non-finite value, or a type with block offsets): the caller then computes
// the row's logits. Ties go to the first column, as torch.argmax.
torch::Tensor greedy_rows(torch::Tensor x, torch::Tensor w, int64_t qtype, int64_t K) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == K && K % 32 == 0 && x.size(0) > 0,
                "greedy_rows: x must be float32 [M > 0, K], K a multiple of 32");
    x = x.contiguous();
    const int64_t M = x.size(0), N = w.size(0);
    auto out = torch::full({M}, int64_t(-1), torch::dtype(torch::kInt64));
    int64_t* o = out.data_ptr<int64_t>();
    dispatch(qtype, [&](auto k) {
        using F = typename decltype(k)::Float;
        using G = typename decltype(k)::Gemm;
        check_weight(w, K, F::N, F::BYTES);
        if constexpr (!G::MINS) {
            const uint8_t* wb = w.data_ptr<uint8_t>();
            const int64_t row_bytes = w.size(1), panels = (N + GP - 1) / GP;
            XQ16 x16;
            quantize_x16(x.data_ptr<float>(), M, K, x16, G::QMAX);
            XQ8S x8;
            quantize_x8s(x.data_ptr<float>(), M, K, x16, x8);
            std::vector<std::vector<Screen>> st(at::get_num_threads(), std::vector<Screen>(M));
            at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
                int32_t* pw = static_cast<int32_t*>(std::aligned_alloc(64, sizeof(int32_t) * (K / 4) * GP));
                std::vector<float> ps(K / 16 * GP), norms(GP);
                Screen* mine = st[at::get_thread_num()].data();
                for (int64_t p = p0; p < p1; ++p) screen_panel<G>(x8, wb, M, N, K, row_bytes, p, pw, ps.data(), norms.data(), mine);
                std::free(pw);
            });
            // per row: the candidates above the final threshold, in column order, through gemm_tile
            at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
                int32_t* pw = static_cast<int32_t*>(std::aligned_alloc(64, sizeof(int32_t) * (K / 2) * GP));
                std::vector<float> ps(K / 16 * GP), pm(K / 16 * GP);
                std::vector<uint8_t> rows(GP * row_bytes);
                for (int64_t m = m0; m < m1; ++m) {
                    std::vector<int32_t> cols;
                    if (!survivors(st, x8, m, cols)) continue;
                    float best = -INFINITY;
                    int64_t arg = -1;
                    bool nan = false;
                    for (size_t c0 = 0; c0 < cols.size(); c0 += GP) {
                        const int64_t np = std::min<int64_t>(GP, int64_t(cols.size() - c0));
                        for (int64_t c = 0; c < np; ++c) std::memcpy(rows.data() + c * row_bytes, wb + cols[c0 + c] * row_bytes, row_bytes);
                        pack_panel<G>(rows.data(), row_bytes, 0, np, K, pw, ps.data(), pm.data(), nullptr, 0);
                        alignas(64) float y[GP];
                        gemm_tile<G, 1>(x16, m, K, pw, ps.data(), pm.data(), y, 0, np);   // N = 0: row m lands in y
                        for (int64_t c = 0; c < np; ++c) {
                            if (std::isnan(y[c])) nan = true;
                            if (y[c] > best || arg < 0) { best = y[c]; arg = cols[c0 + c]; }
                        }
                    }
                    if (!nan) o[m] = arg;
                }
                std::free(pw);
            });
        }
    });
    return out;
}

// ---- Q8_0 in panels: a large output matrix repacked once, at load --------------------------
// Gemma's tied 262k x 640 Q8_0 embedding is the largest matrix of a decode step, and the batched
// step (the GEMM and the greedy screen alike) transposed it 32 rows at a time into panels, the
// same way every step (the screen: a fixed ~4-5 ms of its 13 at 32 rows). Repacked at load into exactly those panels it
// takes as many bytes as the file's blocks (1088 per 32 values and GP rows), so the file's pages
// can be let go behind it. Panel p (rows p GP ..) is, for its nb = K / 32 blocks,
//     nb x 1024 bytes: block b's eight quads for the GP rows, w + 128 (pack_panel8's pw layout)
//     nb x GP fp16 scales
// though stored split in two (PanelAt below: the screen of one to three rows reads 832 of the
// 1088 bytes a block) and decoded back a block at a time: p8_tile below for 1-15 rows (exact integer sums with no
// horizontal sums: one row of SmolLM2's matrix 3x faster), the int16 GEMM's own tile on widened
// panels from 16 rows (widen_panel, PANEL_I16_ROWS), the greedy screen, and row lookups for the
// embedding.
constexpr int64_t P8_QUADS = 8 * GP * 4, P8_SCALES = GP * 2, P8_BLOCK = P8_QUADS + P8_SCALES;

// As stored, each byte u = w + 128 of those quads is split: its top six bits u >> 2 into one
// part of the tensor that holds every panel's six-bit codes and scales, its two low bits u & 3
// into another. The greedy screen reads only the first (832 of 1088 bytes a block; a decode
// step's head is memory-bound, Gemma's 45% of it), the rest decode a panel back to quads
// first (unsplit_panel). The tensor [panels, K / 32 * P8_BLOCK] holds, for P panels:
//     P x nb x (768 six-bit bytes + 64 scale bytes), then P x nb x 256 two-bit bytes
// A block's 768: for t = 0, 1 and half h = 0, 1 (columns 16 h ..), quads 4 t .. 4 t + 3 of those
// 16 columns as three vectors (pack6); its 256: the same four quads' low bits as one vector.
constexpr int64_t P6_HI = 768, P6_LO = 256, P6_PART = P6_HI + P8_SCALES;

struct PanelAt {
    const uint8_t* hi;   // nb x P6_HI six-bit codes, then nb x GP fp16 scales
    const uint8_t* lo;   // nb x P6_LO two-bit codes
};
inline PanelAt panel_at(const uint8_t* w, int64_t panels, int64_t nb, int64_t p) {
    return {w + p * nb * P6_PART, w + panels * nb * P6_PART + p * nb * P6_LO};
}

// ternlog 0xE4: c ? a : b, bit by bit
inline __m512i select_bits(__m512i c, __m512i a, __m512i b) { return _mm512_ternarylogic_epi32(a, b, c, 0xE4); }

// Four vectors of bytes u0 .. u3 as three in place, p_j = (u_j & ~3) | two bits of u3's top six
// (bits 2 j + 2, 2 j + 3), and one of their low bits, lo = sum_j (u_j & 3) << 2 j. The screen
// takes p_j & ~3 = 4 (u_j >> 2) as they lie and u3's top six from the three (top6); a decode puts
// the low bits back (unsplit_block). The epi16 shifts move bits across a byte boundary only where
// the selects then drop them.
inline void pack6(const __m512i (&u)[4], uint8_t* hi, uint8_t* lo) {
    const __m512i m3 = _mm512_set1_epi8(3);
    __m512i low = _mm512_and_si512(u[0], m3);
    for (int j = 0; j < 3; ++j) {
        _mm512_store_si512(hi + 64 * j, select_bits(m3, _mm512_srli_epi16(u[3], 2 * j + 2), u[j]));
        if (j) low = _mm512_or_si512(low, _mm512_slli_epi16(_mm512_and_si512(u[j], m3), 2 * j));
    }
    _mm512_store_si512(lo, _mm512_or_si512(low, _mm512_slli_epi16(_mm512_and_si512(u[3], m3), 6)));
}

// u3's top six bits in place (bits 2-7), from the three vectors' low bits, over `base`'s bits 0-1
inline __m512i top6(__m512i p0, __m512i p1, __m512i p2, __m512i base) {
    return select_bits(_mm512_set1_epi8(0x0C), _mm512_slli_epi16(p0, 2),
                       select_bits(_mm512_set1_epi8(0x30), _mm512_slli_epi16(p1, 4),
                                   select_bits(_mm512_set1_epi8(char(0xC0)), _mm512_slli_epi16(p2, 6), base)));
}

// the screen's weights 4 (u_j >> 2) of four quads (bytes <= 252) from their three vectors at s
inline void unpack6(const uint8_t* s, __m512i (&v)[4]) {
    const __m512i p0 = _mm512_load_si512(s), p1 = _mm512_load_si512(s + 64), p2 = _mm512_load_si512(s + 128);
    const __m512i top = _mm512_set1_epi8(char(0xFC));
    v[0] = _mm512_and_si512(p0, top);
    v[1] = _mm512_and_si512(p1, top);
    v[2] = _mm512_and_si512(p2, top);
    v[3] = top6(p0, p1, p2, _mm512_setzero_si512());
}

// block b of a stored panel back to its 1024 bytes of quads (pack_panel8's pw layout) at out
inline void unsplit_block(const PanelAt& v, int64_t b, uint8_t* out) {
    const __m512i m3 = _mm512_set1_epi8(3);
    for (int t = 0; t < 2; ++t)
        for (int h = 0; h < 2; ++h) {
            const uint8_t* s = v.hi + b * P6_HI + (2 * t + h) * 192;
            const __m512i p0 = _mm512_load_si512(s), p1 = _mm512_load_si512(s + 64), p2 = _mm512_load_si512(s + 128);
            const __m512i lo = _mm512_load_si512(v.lo + b * P6_LO + (2 * t + h) * 64);
            uint8_t* o = out + 4 * t * GP * 4 + 64 * h;   // quad 4 t + i at o + i GP 4
            _mm512_store_si512(o, select_bits(m3, lo, p0));
            _mm512_store_si512(o + GP * 4, select_bits(m3, _mm512_srli_epi16(lo, 2), p1));
            _mm512_store_si512(o + 2 * GP * 4, select_bits(m3, _mm512_srli_epi16(lo, 4), p2));
            _mm512_store_si512(o + 3 * GP * 4, top6(p0, p1, p2, _mm512_srli_epi16(lo, 6)));
        }
}

// a stored panel back to the P8 layout (nb x 1024 bytes of quads, then the scales) at out
// (64-byte aligned, nb P8_BLOCK bytes)
inline void unsplit_panel(const PanelAt& v, int64_t nb, uint8_t* out) {
    for (int64_t b = 0; b < nb; ++b) unsplit_block(v, b, out + b * P8_QUADS);
    std::memcpy(out + nb * P8_QUADS, v.hi + nb * P6_HI, nb * P8_SCALES);
}

// the calling thread's buffer for one decoded panel
inline uint8_t* panel_scratch(int64_t nb) {
    struct Buf {
        uint8_t* p = nullptr;
        int64_t n = 0;
        ~Buf() { std::free(p); }
    };
    static thread_local Buf buf;
    if (buf.n < nb * P8_BLOCK) {
        std::free(buf.p);
        buf.p = static_cast<uint8_t*>(std::aligned_alloc(64, nb * P8_BLOCK));
        buf.n = nb * P8_BLOCK;
    }
    return buf.p;
}

// prefetch block b of a stored panel (both parts; at b = 0 also its scales)
inline void prefetch_block(const PanelAt& v, int64_t nb, int64_t b) {
    prefetch_row(v.hi + b * P6_HI, P6_HI);
    prefetch_row(v.lo + b * P6_LO, P6_LO);
    if (b == 0) prefetch_row(v.hi + nb * P6_HI, nb * P8_SCALES);
}
// p8_tile's activation codes split into two signed bytes q = 256 h + l for vpdpbusd, which
// needs |q| <= 32639 (h in [-127, 127]): the int16 rounding's 32767 levels become 32639.
constexpr float QMAX2 = 32639.f;

struct XQ2 {
    XQ16 x16;                        // the codes q and scales d
    std::vector<int8_t> h, l;        // [M, K]
    std::vector<int32_t> ch, cl;     // [M, K / 32]: -128 * the block's sum of h (l): bytes enter as w + 128
};

void quantize_x2(const float* x, int64_t M, int64_t K, XQ2& out) {
    quantize_x16(x, M, K, out.x16, QMAX2);
    const int64_t nb = K / 32;
    out.h.resize(M * K);
    out.l.resize(M * K);
    out.ch.resize(M * nb);
    out.cl.resize(M * nb);
    for (int64_t i = 0; i < M * nb; ++i) {
        const __m512i q = _mm512_loadu_si512(out.x16.q.data() + 32 * i);
        const __m512i h = _mm512_srai_epi16(_mm512_add_epi16(q, _mm512_set1_epi16(128)), 8);
        const __m512i l = _mm512_sub_epi16(q, _mm512_slli_epi16(h, 8));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.h.data() + 32 * i), _mm512_cvtepi16_epi8(h));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.l.data() + 32 * i), _mm512_cvtepi16_epi8(l));
        const __m512i one = _mm512_set1_epi16(1);
        out.ch[i] = -128 * _mm512_reduce_add_epi32(_mm512_madd_epi16(h, one));
        out.cl[i] = -128 * _mm512_reduce_add_epi32(_mm512_madd_epi16(l, one));
    }
}

// a panel's fp16 scales (nb x GP at s) as floats [nb][GP]
inline void panel_scales(const uint8_t* s, int64_t nb, float* ps) {
    for (int64_t i = 0; i < nb * GP; i += 16)
        _mm512_storeu_ps(ps + i, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + 2 * i))));
}

// ai[r] += the sums (w + 128) d over one block of the panel (wp), d one digit's 32 bytes of row r
// (xd + r K)
template <int R>
inline void p8_digit(const int32_t* wp, const int8_t* xd, int64_t K, __m512i (&ai)[R][2]) {
#pragma GCC unroll 8
    for (int g = 0; g < 8; ++g) {
        const __m512i w0 = _mm512_load_si512(wp + g * GP), w1 = _mm512_load_si512(wp + g * GP + 16);
        for (int r = 0; r < R; ++r) {
            int32_t quad;
            std::memcpy(&quad, xd + r * K + 4 * g, 4);
            const __m512i a = _mm512_set1_epi32(quad);
            ai[r][0] = _mm512_dpbusd_epi32(ai[r][0], w0, a);
            ai[r][1] = _mm512_dpbusd_epi32(ai[r][1], w1, a);
        }
    }
}

// R rows of x against one panel: y (row m0's column of the panel's first row; row stride ldy)
// for the lanes in k0 / k1. The integer sums are exactly the int16 GEMM's sum w q: per block the
// h digit first, shifted up by 8, then the l digit into the same accumulator. The float steps
// are gemm_tile's.
template <int R>
inline void p8_tile(const XQ2& x, int64_t m0, int64_t K, const PanelAt& panel, const float* ps, float* y, int64_t ldy,
                    __mmask16 k0, __mmask16 k1, const PanelAt* next = nullptr) {
    const int64_t nb = K / 32;
    const int8_t* xh = x.h.data() + m0 * K;
    const int8_t* xl = x.l.data() + m0 * K;
    __m512 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    alignas(64) uint8_t quads[P8_QUADS];
    const int32_t* wp = reinterpret_cast<const int32_t*>(quads);
    for (int64_t b = 0; b < nb; ++b) {
        unsplit_block(panel, b, quads);   // streamed a block at a time, with the next panel's block requested
        if (next) prefetch_block(*next, nb, b);
        __m512i ai[R][2];
        for (int r = 0; r < R; ++r) ai[r][0] = ai[r][1] = _mm512_set1_epi32(x.ch[(m0 + r) * nb + b]);
        p8_digit<R>(wp, xh + b * 32, K, ai);
        for (int r = 0; r < R; ++r) {
            const __m512i c = _mm512_set1_epi32(x.cl[(m0 + r) * nb + b]);
            ai[r][0] = _mm512_add_epi32(_mm512_slli_epi32(ai[r][0], 8), c);
            ai[r][1] = _mm512_add_epi32(_mm512_slli_epi32(ai[r][1], 8), c);
        }
        p8_digit<R>(wp, xl + b * 32, K, ai);
        fold_block<R>(acc, ai, ps + b * GP, x.x16.d.data() + m0 * nb + b, nb);
    }
    for (int r = 0; r < R; ++r) {
        _mm512_mask_storeu_ps(y + r * ldy, k0, acc[r][0]);
        _mm512_mask_storeu_ps(y + r * ldy + 16, k1, acc[r][1]);
    }
}

// A stored panel's weights as gemm_tile's int16 pairs pw [K / 2][GP], from its quads (decoded a
// block at a time): per 16 columns and
// quad, the bytes back to signed, widened, and the two pairs of each column's four values split
// into two vectors (a few instructions per 64 weights, where packing from the file's blocks costs
// a transpose). Many rows then take the int16 GEMM's own tile: the same sums, the same numbers.
inline void widen_panel(const PanelAt& v, int64_t nb, int32_t* pw) {
    alignas(64) uint8_t panel[P8_QUADS];
    const __m512i flip = _mm512_set1_epi8(char(0x80));
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for (int64_t b = 0; b < nb; ++b) {
        unsplit_block(v, b, panel);
        for (int g = 0; g < 8; ++g) {
            for (int h = 0; h < 2; ++h) {
                const __m512i q = _mm512_xor_si512(_mm512_load_si512(panel + (g * GP + 16 * h) * 4), flip);
                const __m512i lo = _mm512_cvtepi8_epi16(_mm512_castsi512_si256(q));         // columns 0-7: pairs 0, 1
                const __m512i hi = _mm512_cvtepi8_epi16(_mm512_extracti64x4_epi64(q, 1));   // columns 8-15
                int32_t* at = pw + (b * 16 + 2 * g) * GP + 16 * h;
                _mm512_store_si512(at, _mm512_permutex2var_epi32(lo, even, hi));
                _mm512_store_si512(at + GP, _mm512_permutex2var_epi32(lo, odd, hi));
            }
        }
    }
}

// From this many rows the panels' GEMM widens them for the int16 GEMM's tile; fewer take p8_tile
// (measured, Gemma / SmolLM2 full logits: p8_tile 1.5x faster at 8 rows, even at 12, the int16
// tile 1.1x faster at 16 and 24, 1.25x at 64 rows of SmolLM2)
constexpr int64_t PANEL_I16_ROWS = 16;

void check_panels(const torch::Tensor& w, int64_t N, int64_t K) {
    TORCH_CHECK(K > 0 && K % 32 == 0 && N > 0, "panels: K must be a positive multiple of 32 and N positive");
    TORCH_CHECK(w.dtype() == torch::kUInt8 && w.dim() == 2 && w.is_contiguous() && w.size(0) == (N + GP - 1) / GP &&
                w.size(1) == K / 32 * P8_BLOCK,
                "panels: expected contiguous uint8 [", (N + GP - 1) / GP, ", ", K / 32 * P8_BLOCK, "] for N=", N, ", K=", K);
    TORCH_CHECK(reinterpret_cast<uintptr_t>(w.data_ptr()) % 64 == 0, "panels: the tensor must start on a 64-byte boundary "
                "(the tiles read it with aligned loads)");
}

void check_norms(const torch::Tensor& norms, const torch::Tensor& w) {
    TORCH_CHECK(norms.dtype() == torch::kFloat32 && norms.dim() == 2 && norms.is_contiguous() && norms.size(0) == w.size(0) &&
                norms.size(1) == 2 * GP, "panels: norms must be contiguous float32 [", w.size(0), ", ", 2 * GP, "]");
}

// Panels p0 .. p1 - 1 of out from the Q8_0 matrix w [N, K / 32 * 34] (rows p0 GP ..), stored
// split (PanelAt), and per panel 2 GP norms: its columns' |W[n]| and |R[n]|, R[n] the column's
// values less the screen's (u - 2 - 126.5 = (u & 3) - 1.5, times the block's scale), both
// rounded up (the greedy screen's bound). The loader packs a large matrix a slice at a time and
// lets the file's pages go behind it.
void pack_panels(torch::Tensor w, int64_t K, int64_t p0, int64_t p1, torch::Tensor out, torch::Tensor norms) {
    const int64_t N = w.size(0), nb = K / 32;
    check_weight(w, K, 32, 34);
    check_panels(out, N, K);
    check_norms(norms, out);
    TORCH_CHECK(0 <= p0 && p0 <= p1 && p1 <= out.size(0), "pack_panels: panel range ", p0, "..", p1, " out of 0..", out.size(0));
    const uint8_t* wb = w.data_ptr<uint8_t>();
    uint8_t* ob = out.data_ptr<uint8_t>();
    float* nb_out = norms.data_ptr<float>();
    const int64_t panels = out.size(0);
    at::parallel_for(p0, p1, 1, [&](int64_t a, int64_t b) {
        int32_t* pw = static_cast<int32_t*>(std::aligned_alloc(64, P8_QUADS * nb));
        std::vector<float> ps(nb * GP);
        const __m512i m3 = _mm512_set1_epi8(3);
        for (int64_t p = a; p < b; ++p) {
            const int64_t n0 = p * GP, np = std::min<int64_t>(GP, N - n0);
            pack_panel8<G_Q8_0>(wb, w.size(1), n0, np, K, pw, ps.data(), nb_out + p * 2 * GP, nullptr, 0);
            const PanelAt v = panel_at(ob, panels, nb, p);
            uint8_t* hi = const_cast<uint8_t*>(v.hi);
            uint8_t* lo = const_cast<uint8_t*>(v.lo);
            __m512d r2[4] = {_mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd(), _mm512_setzero_pd()};
            for (int64_t j = 0; j < nb; ++j) {
                const uint8_t* q = reinterpret_cast<const uint8_t*>(pw) + j * P8_QUADS;
                for (int t = 0; t < 2; ++t)
                    for (int h = 0; h < 2; ++h) {
                        __m512i u[4], sq = _mm512_setzero_si512();
                        for (int i = 0; i < 4; ++i) {
                            u[i] = _mm512_load_si512(q + (4 * t + i) * GP * 4 + 64 * h);
                            // |2 (u & 3) - 3| in {1, 3}: four squares per column lane
                            const __m512i l = _mm512_and_si512(u[i], m3);
                            const __m512i e = _mm512_abs_epi8(_mm512_sub_epi8(_mm512_add_epi8(l, l), m3));
                            sq = _mm512_dpbusd_epi32(sq, e, e);
                        }
                        pack6(u, hi + j * P6_HI + (2 * t + h) * 192, lo + j * P6_LO + (2 * t + h) * 64);
                        // s^2 (2 l - 3)^2 summed per column in double: (2 |R[n]|)^2
                        const __m512 sc = _mm512_loadu_ps(ps.data() + j * GP + 16 * h);
                        for (int e = 0; e < 2; ++e) {
                            const __m512d s8 = _mm512_cvtps_pd(e ? _mm512_extractf32x8_ps(sc, 1) : _mm512_castps512_ps256(sc));
                            const __m512d w8 = _mm512_cvtepi32_pd(e ? _mm512_extracti64x4_epi64(sq, 1) : _mm512_castsi512_si256(sq));
                            r2[2 * h + e] = _mm512_fmadd_pd(_mm512_mul_pd(s8, s8), w8, r2[2 * h + e]);
                        }
                    }
            }
            const __m512d up = _mm512_set1_pd(0.5 * (1.0 + 0x1p-20));   // |R[n]|, rounded up
            float* rn = nb_out + p * 2 * GP + GP;
            for (int c = 0; c < 4; ++c)
                _mm256_storeu_ps(rn + 8 * c, _mm512_cvt_roundpd_ps(_mm512_mul_pd(_mm512_sqrt_pd(r2[c]), up), _MM_FROUND_TO_POS_INF | _MM_FROUND_NO_EXC));
            for (int64_t i = 0; i < nb * GP; i += 16)   // the scales came from fp16: exact
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi + nb * P6_HI + 2 * i),
                                    _mm512_cvtps_ph(_mm512_loadu_ps(ps.data() + i), _MM_FROUND_TO_NEAREST_INT));
        }
        std::free(pw);
    });
}

// y [..., end - start] = (x [..., K] W^T)[..., start:end] for W in panels, N rows, any row count:
// p8_tile below PANEL_I16_ROWS rows, the int16 GEMM's tile from there (the same values within
// integer rounding; within either path a row's values do not depend on the other rows)
torch::Tensor panel_matmul(torch::Tensor x, torch::Tensor w, int64_t N, int64_t K, int64_t start, int64_t end,
                           c10::optional<torch::Tensor> out) {
    check_panels(w, N, K);
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() >= 1 && x.size(-1) == K, "x must be float32 [..., K] with K=", K);
    TORCH_CHECK(0 <= start && start < end && end <= N, "panel_matmul: columns ", start, "..", end, " out of 0..", N);
    x = x.contiguous();
    const int64_t M = x.numel() / K, cols = end - start, nb = K / 32, panels = w.size(0);
    auto shape = x.sizes().vec();
    shape.back() = cols;
    TORCH_CHECK(!out || (out->dtype() == torch::kFloat32 && out->is_contiguous() && out->numel() == M * cols),
                "panel_matmul: out must be contiguous float32 with ", M * cols, " elements");
    auto y = out ? out->view(shape) : torch::empty(shape, x.options());
    if (M == 0) return y;
    const uint8_t* wb = w.data_ptr<uint8_t>();
    float* yb = y.data_ptr<float>();
    if (M >= PANEL_I16_ROWS) {
        // many rows: the int16 GEMM on widened panels (its numbers, as for any other matrix)
        XQ16 xq;
        quantize_x16(x.data_ptr<float>(), M, K, xq);
        at::parallel_for(start / GP, (end + GP - 1) / GP, 1, [&](int64_t p0, int64_t p1) {
            int32_t* pw = static_cast<int32_t*>(std::aligned_alloc(64, sizeof(int32_t) * (K / 2) * GP));
            std::vector<float> ps(nb * GP);
            const int64_t lines = nb * P6_PART / 64;
            for (int64_t p = p0; p < p1; ++p) {
                const PanelAt panel = panel_at(wb, panels, nb, p);
                panel_scales(panel.hi + nb * P6_HI, nb, ps.data());
                widen_panel(panel, nb, pw);
                // the next panel: its six-bit part a share per tile, its two-bit part at once
                const PanelAt next = panel_at(wb, panels, nb, std::min(p + 1, panels - 1));
                if (p + 1 < p1) prefetch_row(next.lo, nb * P6_LO);
                const int64_t np = std::min<int64_t>(end - p * GP, GP), share = p + 1 < p1 ? lines : 0;
                const int64_t lo = std::max<int64_t>(start - p * GP, 0);
                // a panel that starts before `start`: its tiles into a buffer, the columns wanted copied
                std::vector<float> part(lo > 0 ? M * GP : 0);
                float* yp = lo > 0 ? part.data() : yb + (p * GP - start);
                const int64_t ldy = lo > 0 ? GP : cols;
                panel_tiles<G_Q8_0>(xq, M, K, pw, ps.data(), nullptr, yp, ldy, np, next.hi, share);
                for (int64_t m = 0; lo > 0 && m < M; ++m)
                    std::copy(part.data() + m * GP + lo, part.data() + m * GP + np, yb + m * cols);
            }
            std::free(pw);
        });
        return y;
    }
    XQ2 xq;
    quantize_x2(x.data_ptr<float>(), M, K, xq);
    at::parallel_for(start / GP, (end + GP - 1) / GP, 1, [&](int64_t p0, int64_t p1) {
        std::vector<float> ps(nb * GP);
        for (int64_t p = p0; p < p1; ++p) {
            const int64_t lo = std::max<int64_t>(start - p * GP, 0), hi = std::min<int64_t>(end - p * GP, GP);
            const uint32_t lanes = uint32_t((uint64_t(1) << hi) - 1) & ~uint32_t((uint64_t(1) << lo) - 1);
            const PanelAt panel = panel_at(wb, panels, nb, p);
            panel_scales(panel.hi + nb * P6_HI, nb, ps.data());
            // column p GP of row 0; lanes before `start` are masked off and never touched
            float* yp = yb + (p * GP - start);
            // the next panel is requested during this one's first tile: without it the panels
            // stream from memory at a third of the rate (Gemma's 262k rows, 8 rows: 13.6 -> 5.3 ms)
            const PanelAt after = panel_at(wb, panels, nb, std::min(p + 1, panels - 1));
            const PanelAt* next = p + 1 < p1 ? &after : nullptr;
            by_tiles(M, [&](auto R, int64_t m) {
                p8_tile<decltype(R)::value>(xq, m, K, panel, ps.data(), yp + m * cols, cols, __mmask16(lanes), __mmask16(lanes >> 16),
                                            m == 0 ? next : nullptr);
            });
        }
    });
    return y;
}

// rows `ids` of W in panels, dequantized: float32 [len(ids), K] (the embedding lookup), each
// value d (w) as the file's blocks give it
torch::Tensor panel_rows(torch::Tensor w, torch::Tensor ids, int64_t N, int64_t K) {
    check_panels(w, N, K);
    TORCH_CHECK(!ids.is_floating_point() && !ids.is_complex() && ids.dim() == 1, "panel_rows: ids must be integers [n]");
    ids = ids.to(torch::kInt64).contiguous();
    const int64_t n = ids.size(0), nb = K / 32;
    const int64_t* id = ids.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) TORCH_CHECK(id[i] >= 0 && id[i] < N, "panel_rows: row ", id[i], " out of 0..", N - 1);
    auto y = torch::empty({n, K}, torch::dtype(torch::kFloat32));
    const uint8_t* wb = w.data_ptr<uint8_t>();
    float* yb = y.data_ptr<float>();
    const int64_t panels = w.size(0);
    at::parallel_for(0, n, 16, [&](int64_t a, int64_t b) {
        uint8_t* panel = panel_scratch(nb);
        int64_t held = -1;   // the panel decoded into it
        for (int64_t i = a; i < b; ++i) {
            const int64_t c = id[i] % GP;
            if (id[i] / GP != held) unsplit_panel(panel_at(wb, panels, nb, held = id[i] / GP), nb, panel);
            float* out = yb + i * K;
            for (int64_t j = 0; j < nb; ++j) {
                const float d = f16(panel + nb * P8_QUADS + (j * GP + c) * 2);
                for (int g = 0; g < 8; ++g) {
                    const uint8_t* q = panel + j * P8_QUADS + (g * GP + c) * 4;
                    for (int t = 0; t < 4; ++t) out[j * 32 + 4 * g + t] = d * float(int(q[t]) - 128);
                }
            }
        }
    });
    return y;
}

// Column c of a panel for row m of x: the value gemm_tile and p8_tile give it, to the bit. Per
// block the exact integer sum of w q, then their float steps in their order: the block's fp16
// scale times the row's activation scale, multiplied and added into the running sum.
float panel_column(const PanelAt& v, int64_t nb, int c, const XQ16& x, int64_t m, int64_t K) {
    const int h = c / 16, l = c % 16;
    float acc = 0.f;
    for (int64_t b = 0; b < nb; ++b) {
        // the column's four bytes of each stored vector (lane l), its quads put back as in
        // unsplit_block with 32-bit words for vectors; then the values as signed bytes
        alignas(32) uint32_t quads[8];
        for (int t = 0; t < 2; ++t) {
            uint32_t p[3], lo;
            for (int j = 0; j < 3; ++j) std::memcpy(&p[j], v.hi + b * P6_HI + (2 * t + h) * 192 + 64 * j + 4 * l, 4);
            std::memcpy(&lo, v.lo + b * P6_LO + (2 * t + h) * 64 + 4 * l, 4);
            const uint32_t m3 = 0x03030303u, top = ~m3;
            for (int j = 0; j < 3; ++j) quads[4 * t + j] = (p[j] & top) | ((lo >> (2 * j)) & m3);
            quads[4 * t + 3] = ((p[0] & m3) << 2) | ((p[1] & m3) << 4) | ((p[2] & m3) << 6) | ((lo >> 6) & m3);
        }
        const __m256i flip = _mm256_set1_epi8(char(0x80));
        const __m512i w = _mm512_cvtepi8_epi16(_mm256_xor_si256(_mm256_load_si256(reinterpret_cast<const __m256i*>(quads)), flip));
        const __m512i q = _mm512_loadu_si512(x.q.data() + m * K + 32 * b);
        const int32_t sum = _mm512_reduce_add_epi32(_mm512_madd_epi16(w, q));
        const float s = f16(v.hi + nb * P6_HI + (b * GP + c) * 2);
        acc = std::fma(float(sum), s * x.d[m * nb + b], acc);
    }
    return acc;
}

// screen_cols for the six-bit screen: every column's upper bound y + B is stored (up[0 .. 32),
// -inf in lanes past the panel's columns) and the row's threshold kept, no candidate list: its
// bound leaves many columns above a running threshold (one that has not yet met the row's
// largest logit), and a list of them, pruned as it grew, cost a flat row 9.6 ms where the
// stores cost nothing to speak of. The candidates are read off once the threshold is final.
inline void store_cols(Screen& st, float* up, __m512 y0, __m512 b0, __m512 y1, __m512 b1, __mmask16 k0, __mmask16 k1) {
    __m512 hi0, hi1;
    bounds32(st, y0, b0, y1, b1, k0, k1, hi0, hi1);
    const __m512 none = _mm512_set1_ps(-INFINITY);
    _mm512_storeu_ps(up, _mm512_mask_mov_ps(none, k0, hi0));
    _mm512_storeu_ps(up + 16, _mm512_mask_mov_ps(none, k1, hi1));
}

// R rows of x8 against the six-bit part of one stored panel (columns n0 ..): y6, the row's
// logits with every weight byte u taken as (u & ~3) + 1.5 (the middle of what its two low bits
// allow), and its bound, into the rows' states. Twice the weight, 8 (u >> 2) - 253, is an
// integer: vpdpbusd sums 4 (u >> 2) (unpack6) against the codes, the sum shifted up by 1 is
// added to c6 (the float offset's bits less 253 times the block's sum of codes, see
// screen_tile), and the row's scale D is halved. The bound adds |R[n]| |x8| to the screen's
// |W[n]| delta:
//     |y6 - y16| <= |x8 (W6 - W)[n]| + |y8' - y16|  <=  |R[n]| |x8| + |W[n]| delta
// (y8' as screen_tile's y8; the float rounding of y6 against |W6[n]| <= |W[n]| + |R[n]| is
// below the 2^-10 that n8 carries).
template <int R>
inline void screen_tile6(const XQ8S& x, const int32_t* c6, int64_t m0, int64_t K, const uint8_t* hi,
                         const c10::Half* ps, const float* norms, Screen* st, float* upper, int64_t ldu,
                         int64_t n0, int64_t np, const uint8_t* next, int64_t next_bytes) {
    const int64_t nb = K / 32;
    const int8_t* xq = x.q.data() + m0 * K;
    const int64_t lines = next_bytes / 64, per_block = (lines + nb - 1) / nb;
    // the float sums live in memory between blocks: 2 R integer sums, 8 unpacked vectors and
    // 2 R float sums (7 rows: 36) do not fit in the 32 registers
    alignas(64) float accm[R][2][16] = {};
    for (int64_t b = 0; b < nb; ++b) {
        prefetch_part(next, lines, per_block, b);
        __m512i ai[R][2];
        for (int r = 0; r < R; ++r) ai[r][0] = ai[r][1] = _mm512_setzero_si512();
        for (int t = 0; t < 2; ++t) {
            __m512i v0[4], v1[4];
            unpack6(hi + b * P6_HI + (2 * t) * 192, v0);
            unpack6(hi + b * P6_HI + (2 * t + 1) * 192, v1);
            for (int i = 0; i < 4; ++i)
                for (int r = 0; r < R; ++r) {
                    int32_t quad;
                    std::memcpy(&quad, xq + r * K + b * 32 + 4 * (4 * t + i), 4);
                    const __m512i a = _mm512_set1_epi32(quad);
                    ai[r][0] = _mm512_dpbusd_epi32(ai[r][0], v0[i], a);
                    ai[r][1] = _mm512_dpbusd_epi32(ai[r][1], v1[i], a);
                }
        }
        const __m512 s0 = scales16(ps + b * GP), s1 = scales16(ps + b * GP + 16);
        for (int r = 0; r < R; ++r) {
            const __m512i c = _mm512_set1_epi32(c6[(m0 + r) * nb + b]);
            const __m512 mf = _mm512_set1_ps(x.mf[(m0 + r) * nb + b]);
            const __m512 f0 = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(ai[r][0], 1), c));
            const __m512 f1 = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(ai[r][1], 1), c));
            _mm512_store_ps(accm[r][0], _mm512_fmadd_ps(_mm512_sub_ps(f0, mf), s0, _mm512_load_ps(accm[r][0])));
            _mm512_store_ps(accm[r][1], _mm512_fmadd_ps(_mm512_sub_ps(f1, mf), s1, _mm512_load_ps(accm[r][1])));
        }
    }
    const __m512 w0 = _mm512_loadu_ps(norms), w1 = _mm512_loadu_ps(norms + 16);
    const __m512 r0 = _mm512_loadu_ps(norms + GP), r1 = _mm512_loadu_ps(norms + GP + 16);
    const __mmask16 k0 = cols16(np, 0), k1 = cols16(np, 16);
    for (int r = 0; r < R; ++r) {
        const __m512 D = _mm512_set1_ps(0.5f * x.row[m0 + r]);
        const __m512 dr = _mm512_set1_ps(x.delta[m0 + r]), e = _mm512_set1_ps(x.n8[m0 + r]);
        store_cols(st[m0 + r], upper + (m0 + r) * ldu + n0, _mm512_mul_ps(_mm512_load_ps(accm[r][0]), D),
                   _mm512_fmadd_ps(r0, e, _mm512_mul_ps(w0, dr)), _mm512_mul_ps(_mm512_load_ps(accm[r][1]), D),
                   _mm512_fmadd_ps(r1, e, _mm512_mul_ps(w1, dr)), k0, k1);
    }
}

// Below this many rows the panels' screen reads their six-bit part only (screen_tile6): a decode
// step's output matrix is memory-bound there, and it leaves tens to ~1600 candidates a row (Gemma
// 3), each computed alone. From here the rows' products, not the bytes, bound the screen, and the
// eight-bit screen on decoded panels (2.4 candidates a row) is the faster.
constexpr int64_t SCREEN6_MAX_ROWS = 4;

// f(p0, p1) over chunks of n taken in turns (take_turns): the screen's panels come SCREEN_CHUNK at a
// time, so that each still prefetches its next panel within its chunk
constexpr int64_t SCREEN_CHUNK = 64;
template <typename F>
void chunked_for(int64_t n, int64_t chunk, const F& f) {
    take_turns((n + chunk - 1) / chunk, [&](auto take) {
        for (int64_t c; (c = take()) >= 0;) f(c * chunk, std::min(n, (c + 1) * chunk));
    });
}

// greedy_rows for W in panels: argmax over the first N columns of panel_matmul(x, W) per row,
// -1 where a row has a non-finite value (or a block below 2^-60, or 2^-60 below the row's
// largest), or more than cap candidates (cap < 0: N / 64, at least 256; see survivors). One
// to three rows screen the panels' six-bit part only (screen_tile6), more the eight-bit values
// of each panel unsplit (screen_tile), both with the norms pack_panels gave; each candidate is
// then computed from its column's bytes (panel_column).
torch::Tensor panel_greedy(torch::Tensor x, torch::Tensor w, torch::Tensor norms, int64_t rows, int64_t N, int64_t K,
                           int64_t cap) {
    check_panels(w, rows, K);
    check_norms(norms, w);
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.size(1) == K && x.size(0) > 0,
                "panel_greedy: x must be float32 [M > 0, K]");
    TORCH_CHECK(0 < N && N <= rows, "panel_greedy: N=", N, " columns out of 1..", rows);
    x = x.contiguous();
    const int64_t M = x.size(0), nb = K / 32, panels = (N + GP - 1) / GP, stored = w.size(0);
    auto out = torch::full({M}, int64_t(-1), torch::dtype(torch::kInt64));
    int64_t* o = out.data_ptr<int64_t>();
    const uint8_t* wb = w.data_ptr<uint8_t>();
    const float* nw = norms.data_ptr<float>();
    // the codes of panel_matmul's path for M rows: its candidates are recomputed as that path's tile
    const bool i16 = M >= PANEL_I16_ROWS;
    XQ2 x2;
    XQ16 x16;
    if (i16) quantize_x16(x.data_ptr<float>(), M, K, x16);
    else quantize_x2(x.data_ptr<float>(), M, K, x2);
    XQ8S x8;
    quantize_x8s(x.data_ptr<float>(), M, K, i16 ? x16 : x2.x16, x8);
    std::vector<std::vector<Screen>> st(at::get_num_threads(), std::vector<Screen>(M));
    // one to three rows: every column's upper bound, [M][panels GP] in the calling thread's buffer
    // (1 MB a row of Gemma's), and c6, the offset's bits less 253 times each block's sum of codes
    // (c32 holds bits - 128 sum)
    static thread_local std::vector<float> upper_buf;
    const int64_t ldu = panels * GP;
    float* upper = nullptr;     // upper_buf's data, taken here: in the workers the name is their own buffer
    std::vector<int32_t> c6;
    if (M >= SCREEN6_MAX_ROWS) {
        // many rows: the eight-bit screen (screen_tile) on each panel decoded, few candidates
        chunked_for(panels, SCREEN_CHUNK, [&](int64_t p0, int64_t p1) {
            Screen* mine = st[at::get_thread_num()].data();
            uint8_t* panel = panel_scratch(nb);
            for (int64_t p = p0; p < p1; ++p) {
                const int64_t n0 = p * GP, np = std::min<int64_t>(GP, N - n0);
                unsplit_panel(panel_at(wb, stored, nb, p), nb, panel);
                const PanelAt next = panel_at(wb, stored, nb, std::min(p + 1, stored - 1));
                if (p + 1 < p1) prefetch_row(next.lo, nb * P6_LO);
                const int64_t lines = p + 1 < p1 ? nb * P6_PART / 64 : 0;
                by_tiles67<7>(M, [&](auto R, int64_t m) {
                    const auto [l0, l1] = tile_lines(m, decltype(R)::value, M, lines);
                    screen_tile<G_Q8_0, decltype(R)::value>(x8, m, K, reinterpret_cast<const int32_t*>(panel),
                                                            reinterpret_cast<const c10::Half*>(panel + nb * P8_QUADS),
                                                            nw + p * 2 * GP, mine, n0, np, next.hi + 64 * l0, 64 * (l1 - l0));
                });
            }
        });
    } else {
        if (int64_t(upper_buf.size()) < M * ldu) upper_buf.resize(M * ldu);
        upper = upper_buf.data();
        c6.resize(M * nb);
        for (int64_t i = 0; i < M * nb; ++i) {
            int32_t bits;
            std::memcpy(&bits, &x8.mf[i], 4);
            c6[i] = bits - 253 * ((bits - x8.c32[i]) / 128);
        }
        chunked_for(panels, SCREEN_CHUNK, [&](int64_t p0, int64_t p1) {
            Screen* mine = st[at::get_thread_num()].data();
            for (int64_t p = p0; p < p1; ++p) {
                const uint8_t* hi = panel_at(wb, stored, nb, p).hi;
                const c10::Half* ps = reinterpret_cast<const c10::Half*>(hi + nb * P6_HI);   // read by the tiles
                const int64_t n0 = p * GP, np = std::min<int64_t>(GP, N - n0);
                // the next panel is requested a share per tile: all of it in the first tile stalled on
                // full miss buffers (32 rows: 11.7 -> 11.5 ms); its scales, read first, at once
                const uint8_t* next = hi + nb * P6_PART;
                if (p + 1 < p1) prefetch_row(next + nb * P6_HI, nb * P8_SCALES);
                const int64_t lines = p + 1 < p1 ? nb * P6_HI / 64 : 0;
                by_tiles67<7>(M, [&](auto R, int64_t m) {
                    const auto [l0, l1] = tile_lines(m, decltype(R)::value, M, lines);
                    screen_tile6<decltype(R)::value>(x8, c6.data(), m, K, hi, ps, nw + p * 2 * GP, mine, upper, ldu,
                                                     n0, np, next + 64 * l0, 64 * (l1 - l0));
                });
            }
        });
    }
    // per row: the candidates above the final threshold, each computed alone as the tiles of
    // panel_matmul's path would (panel_column)
    const XQ16& xq = i16 ? x16 : x2.x16;
    at::parallel_for(0, M, 1, [&](int64_t m0, int64_t m1) {
        for (int64_t m = m0; m < m1; ++m) {
            std::vector<int32_t> cols;
            const int64_t most = cap < 0 ? std::max<int64_t>(256, N / 64) : cap;
            if (M >= SCREEN6_MAX_ROWS ? !survivors(st, x8, m, cols, most)
                                      : !stored_survivors(st, x8, m, upper + m * ldu, N, cols, most))
                continue;
            float best = -INFINITY;
            int64_t arg = -1;
            bool nan = false;
            for (int32_t col : cols) {
                const float v = panel_column(panel_at(wb, stored, nb, col / GP), nb, col % GP, xq, m, K);
                if (std::isnan(v)) nan = true;
                if (v > best || arg < 0) { best = v; arg = col; }
            }
            if (!nan) o[m] = arg;
        }
    });
    return out;
}
#endif

// One activation row rounded to integers (quantize_x8) into the calling thread's buffer: a
// decode block rounds four rows (q/k/v, output, gate/up, down input), each into seven vectors,
// and allocating them afresh each time was 28 allocations and frees a block. Valid until the
// thread rounds its next row; the matvec that reads it never calls back in here.
const XQBuffer& rounded_row(const float* x, int64_t K, int64_t digits) {
    static thread_local XQBuffer buf;
    quantize_x8(x, K, buf, int(digits));
    return buf;
}

// x: float32 [..., K] -> [..., N]; the leading dimensions are flattened here rather than in
// Python, to save dispatches on the decode path. digits 1 (int8) or 2 (int16): one row, and
// two rows of the 32-value types, have their activations rounded per 32 values (see XQ);
// more rows take the int16 GEMM on AVX-512 builds (int16 for either digits setting), and
// float32 on AVX2 ones (each dequantized weight block is reused enough to win there).
// digits 0: float32 throughout.
torch::Tensor qmatmul(torch::Tensor x, torch::Tensor w, int64_t qtype, int64_t K, int64_t digits,
                      c10::optional<torch::Tensor> out) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() >= 1 && x.size(-1) == K, "x must be float32 [..., K] with K=", K);
    x = x.contiguous();
    const int64_t M = x.numel() / K, N = w.size(0);
    auto out_shape = x.sizes().vec();
    out_shape.back() = N;
    TORCH_CHECK(digits >= 0 && digits <= 2, "qmatmul: digits must be 0 (float32), 1 (int8) or 2 (int16)");
    // out: a caller's buffer for y (a decode batch's logits are tens of MB: allocating them
    // each step cost page faults and zeroing where malloc maps them fresh)
    TORCH_CHECK(!out || (out->dtype() == torch::kFloat32 && out->is_contiguous() && out->numel() == M * N),
                "qmatmul: out must be contiguous float32 with ", M * N, " elements");
    const torch::Tensor* o = out ? &*out : nullptr;
    if (digits > 0 && M == 1 && K % 32 == 0) {
        return matvec_i8(rounded_row(x.data_ptr<float>(), K, digits), {w}, {qtype}, K, o)[0].view(out_shape);
    }
#ifdef JISU_AVX512
    if (digits > 0 && M >= GEMM_MIN_ROWS && K % 32 == 0) return gemm_i16(x, {w}, {qtype}, K, o)[0].view(out_shape);
#endif
    auto y = o ? o->view(out_shape) : torch::empty(out_shape, x.options());
    dispatch(qtype, [&](auto k) {
        using F = typename decltype(k)::Float;
        using I = typename decltype(k)::Int;
        check_weight(w, K, F::N, F::BYTES);
        if constexpr (I::N == 32) {
            if (digits > 0 && M == 2) return two_rows<I>(x.data_ptr<float>(), w.data_ptr<uint8_t>(), y.data_ptr<float>(), N, K, int(digits));
        }
        matmul<F>(x.data_ptr<float>(), w.data_ptr<uint8_t>(), y.data_ptr<float>(), M, N, K);
    });
    return y;
}

// y_i = x W_i^T [M, N_i] for matrices reading the same rows x [M, K] (contiguous; q/k/v,
// gate/up) with integer activations: x rounded once for all of them (one row: int8 digits,
// matvec_i8; 3+ rows on AVX-512: int16 once per code range, gemm_i16, one parallel region over
// all their panels); else one qmatmul each. Each result is the single call's, to the bit.
std::vector<torch::Tensor> linear_rows(torch::Tensor x, const std::vector<torch::Tensor>& ws,
                                       const std::vector<int64_t>& qtypes, int64_t M, int64_t K, int64_t digits) {
    std::vector<torch::Tensor> ys;
    if (digits > 0 && M == 1 && K % 32 == 0) {
        for (auto& y : matvec_i8(rounded_row(x.data_ptr<float>(), K, digits), ws, qtypes, K)) ys.push_back(y.view({1, -1}));
        return ys;
    }
#ifdef JISU_AVX512
    if (digits > 0 && M >= GEMM_MIN_ROWS && K % 32 == 0) return gemm_i16(std::move(x), ws, qtypes, K);
#endif
    for (size_t i = 0; i < ws.size(); ++i) ys.push_back(qmatmul(x, ws[i], qtypes[i], K, digits, c10::nullopt).view({M, -1}));
    return ys;
}

// linear_rows for x [..., K] of any layout, each y_i [..., N_i] (a Gemma prefill rounded its
// 512 x 640 input three times for q/k/v, ~30 us each)
std::vector<torch::Tensor> qmatmul_many(torch::Tensor x, std::vector<torch::Tensor> ws, std::vector<int64_t> qtypes,
                                        int64_t K, int64_t digits) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() >= 1 && x.size(-1) == K, "x must be float32 [..., K] with K=", K);
    TORCH_CHECK(!ws.empty() && ws.size() == qtypes.size(), "qmatmul_many: one type per matrix");
    TORCH_CHECK(digits >= 0 && digits <= 2, "qmatmul: digits must be 0 (float32), 1 (int8) or 2 (int16)");
    x = x.contiguous();
    const int64_t M = x.numel() / K;
    auto ys = linear_rows(x, ws, qtypes, M, K, digits);
    for (auto& y : ys) {
        auto shape = x.sizes().vec();
        shape.back() = y.size(-1);
        y = y.view(shape);
    }
    return ys;
}

torch::Tensor dequantize(torch::Tensor w, int64_t qtype, int64_t K) {
    const int64_t N = w.size(0);
    auto y = torch::empty({N, K}, torch::dtype(torch::kFloat32));
    dispatch(qtype, [&](auto k) {
        using B = typename decltype(k)::Float;
        check_weight(w, K, B::N, B::BYTES);
        dequant_rows<B>(w.data_ptr<uint8_t>(), y.data_ptr<float>(), N, K);
    });
    return y;
}

// e^x for x <= 0 .. 88, 8 lanes: x = n ln2 + r with |r| <= ln2/2, e^r by its Taylor series to
// r^7 (relative error < 1e-8 before float rounding), times 2^n built in the exponent bits.
inline __m256 exp_ps(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);      // ln2 split in two
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.f / 5040.f);
    for (float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// ---- prefill attention: one sequence's new tokens against its keys in the paged cache -------
// Flash-style: per (KV head, block of queries) task, the G query heads sharing the KV head are
// rows of one tile (each key and value row read once for all of them); keys go in blocks of PKB
// with a running max and sum per row (online softmax), so no [T, L] score matrix is made, and
// key blocks past a query block's last position are never visited: torch's CPU flash attention
// computed the whole square at T = 512 (causal cost what full did, measured). Rows are the
// vector lanes of the scores: the task's queries are transposed once (Qt [D][rows]) and each
// key row is used as it lies in the cache, so masking, max, exp and the running sums are
// vector ops across rows; O += P V then runs with head dimensions as lanes.
#ifdef JISU_AVX512
using vf = __m512;
constexpr int VL = 16;
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vload(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline float vhmax(vf v) { return _mm512_reduce_max_ps(v); }
inline float vhsum(vf v) { return _mm512_reduce_add_ps(v); }
inline vf vexp(vf x) {   // as exp_ps, 16 lanes
    x = _mm512_max_ps(_mm512_min_ps(x, vset1(88.0f)), vset1(-87.0f));
    const vf n = _mm512_roundscale_ps(vmul(x, vset1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf r = _mm512_fnmadd_ps(n, vset1(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, vset1(-2.12194440e-4f), r);
    vf p = vset1(1.f / 5040.f);
    for (float c : {1.f / 720.f, 1.f / 120.f, 1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) p = vfma(p, r, vset1(c));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return vmul(p, _mm512_castsi512_ps(e));
}
#else
using vf = __m256;
constexpr int VL = 8;
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vload(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline vf vset1(float x) { return _mm256_set1_ps(x); }
inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline float vhmax(vf v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}
inline float vhsum(vf v) { return hsum(v); }
inline vf vexp(vf x) { return exp_ps(x); }
#endif
// SiLU or GELU (tanh) as x / (1 + e^{-y}): y = x for SiLU, y = 2z for GELU since
// 0.5 (1 + tanh z) = 1 / (1 + e^{-2z}) (no cancellation where tanh z is near -1)
inline vf act_of(vf x, bool gelu) {
    const vf y = gelu ? vmul(vset1(1.5957691216057308f), vfma(vmul(vset1(0.044715f), x), vmul(x, x), x)) : x;
    return vdiv(x, vadd(vset1(1.f), vexp(vsub(vzero(), y))));
}

#ifdef JISU_AVX512
using vm = __mmask16;
inline vm vvisible(const int32_t* rpos, int32_t kpos, int32_t window) {   // kpos <= rpos, > rpos - window
    const __m512i r = _mm512_loadu_si512(rpos), k = _mm512_set1_epi32(kpos);
    vm m = _mm512_cmp_epi32_mask(k, r, _MM_CMPINT_LE);
    if (window > 0) m &= _mm512_cmp_epi32_mask(k, _mm512_sub_epi32(r, _mm512_set1_epi32(window)), _MM_CMPINT_NLE);
    return m;
}
inline vf vselect(vm m, vf a, vf b) { return _mm512_mask_blend_ps(m, b, a); }
#else
using vm = __m256i;
inline vm vvisible(const int32_t* rpos, int32_t kpos, int32_t window) {
    const __m256i r = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rpos)), k = _mm256_set1_epi32(kpos);
    vm m = _mm256_andnot_si256(_mm256_cmpgt_epi32(k, r), _mm256_set1_epi32(-1));
    if (window > 0) m = _mm256_and_si256(m, _mm256_cmpgt_epi32(k, _mm256_sub_epi32(r, _mm256_set1_epi32(window))));
    return m;
}
inline vf vselect(vm m, vf a, vf b) { return _mm256_blendv_ps(b, a, _mm256_castsi256_ps(m)); }
#endif

// y = x / rms(x) * w for one row of D (y may be x): the squares summed in four chains of
// vectors (one chain was bound by the multiply-adds' latency: a 512 x 640 norm took 65 us)
inline void rms_row(const float* xr, const float* wp, float* yr, int64_t D, double eps) {
    vf acc[4] = {vzero(), vzero(), vzero(), vzero()};
    int64_t i = 0;
    for (; i + 4 * VL <= D; i += 4 * VL)
        for (int c = 0; c < 4; ++c) {
            const vf v = vload(xr + i + c * VL);
            acc[c] = vfma(v, v, acc[c]);
        }
    for (; i + VL <= D; i += VL) {
        const vf v = vload(xr + i);
        acc[0] = vfma(v, v, acc[0]);
    }
    float ss = vhsum(vadd(vadd(acc[0], acc[1]), vadd(acc[2], acc[3])));
    for (; i < D; ++i) ss += xr[i] * xr[i];
    const float scale = 1.0f / std::sqrt(ss / float(D) + float(eps));
    const vf sv = vset1(scale);
    for (i = 0; i + VL <= D; i += VL) vstore(yr + i, vmul(vmul(vload(xr + i), sv), vload(wp + i)));
    for (; i < D; ++i) yr[i] = (xr[i] * scale) * wp[i];
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
        for (int64_t r = r0; r < r1; ++r) rms_row(xp + r * D, wp, yp + r * D, D, eps);
    };
    if (rows * D < (1 << 16)) body(0, rows); else at::parallel_for(0, rows, 16, body);
    return y;
}

constexpr int PKB = 32;          // keys per block
constexpr int64_t PREFILL_COPY_MAX = int64_t(16) << 20;   // bytes: float32 keys and values of a prefill call
constexpr int PDC = 4 * VL;      // head dimensions per pass of O += P V
constexpr int64_t PREFILL_I16_MAX = int64_t(32) << 20;   // bytes: integer keys and values of a prefill call

// S^T [PKB keys][MV vectors of rows] = K [keys][D] x Qt [D][rows], four keys at a time
template <int MV>
inline void prefill_scores(const float* const* krows, int n, const float* qt, int64_t D, float* st) {
    constexpr int MP = MV * VL;
    for (int j0 = 0; j0 < n; j0 += 4) {
        const int nk = std::min(4, n - j0);
        vf acc[4][MV];
        for (int k = 0; k < 4; ++k) for (int v = 0; v < MV; ++v) acc[k][v] = vzero();
        const float* kr[4];
        for (int k = 0; k < 4; ++k) kr[k] = krows[j0 + std::min(k, nk - 1)];   // past n: repeat (unused)
        for (int64_t d = 0; d < D; ++d) {
            vf q[MV];
            for (int v = 0; v < MV; ++v) q[v] = vload(qt + d * MP + v * VL);
            for (int k = 0; k < 4; ++k) {
                const vf kd = vset1(kr[k][d]);
                for (int v = 0; v < MV; ++v) acc[k][v] = vfma(kd, q[v], acc[k][v]);
            }
        }
        // all four rows, the unused ones too (st has PKB rows): a partial store kept acc in memory
        for (int k = 0; k < 4; ++k) for (int v = 0; v < MV; ++v) vstore(st + (j0 + k) * MP + v * VL, acc[k][v]);
    }
}

// O [R rows][D] += P [n keys][rows] (transposed, MP rows a key) x V [n keys][D] (rows vrows[j])
template <int R>
inline void prefill_values(const float* pt, int64_t MP, const float* const* vrows, int n, int64_t D, float* o) {
    for (int64_t d0 = 0; d0 < D; d0 += PDC) {
        vf acc[R][4];
        for (int r = 0; r < R; ++r) for (int c = 0; c < 4; ++c) acc[r][c] = vload(o + r * D + d0 + c * VL);
        for (int j = 0; j < n; ++j) {
            vf v[4];
            for (int c = 0; c < 4; ++c) v[c] = vload(vrows[j] + d0 + c * VL);
            for (int r = 0; r < R; ++r) {
                const vf pr = vset1(pt[j * MP + r]);
                for (int c = 0; c < 4; ++c) acc[r][c] = vfma(pr, v[c], acc[r][c]);
            }
        }
        for (int r = 0; r < R; ++r) for (int c = 0; c < 4; ++c) vstore(o + r * D + d0 + c * VL, acc[r][c]);
    }
}

template <typename F>
inline void by_rows4(int64_t M, F&& f) {   // f(row0, R) over M rows, four at a time
    int64_t r = 0;
    for (; r + 4 <= M; r += 4) f(r, std::integral_constant<int, 4>{});
    switch (M - r) {
        case 3: f(r, std::integral_constant<int, 3>{}); break;
        case 2: f(r, std::integral_constant<int, 2>{}); break;
        case 1: f(r, std::integral_constant<int, 1>{}); break;
        default: break;
    }
}

template <typename F>
inline void one_to_four(int64_t n, F&& f) {   // f(integral_constant<n>) for n in 1..4 (more: 4)
    switch (n) {
        case 1: f(std::integral_constant<int, 1>{}); break;
        case 2: f(std::integral_constant<int, 2>{}); break;
        case 3: f(std::integral_constant<int, 3>{}); break;
        default: f(std::integral_constant<int, 4>{}); break;
    }
}

// qt [D][MP] = sc x the rows src[0 .. MP) [D] transposed (a null row: zeros); MP a multiple of VL
inline void transpose_scaled(const float* const* src, int64_t MP, int64_t D, float sc, float* qt) {
#ifdef JISU_AVX512
    if (D % 16 == 0) {        // 16 x 16 tiles
        const vf s = vset1(sc);
        for (int64_t r0 = 0; r0 < MP; r0 += 16) {
            for (int64_t d0 = 0; d0 < D; d0 += 16) {
                __m512i t[16];
                for (int i = 0; i < 16; ++i)
                    t[i] = src[r0 + i] ? _mm512_castps_si512(vmul(vload(src[r0 + i] + d0), s)) : _mm512_setzero_si512();
                transpose16(t);
                for (int i = 0; i < 16; ++i) vstore(qt + (d0 + i) * MP + r0, _mm512_castsi512_ps(t[i]));
            }
        }
        return;
    }
#endif
    for (int64_t r = 0; r < MP; ++r)
        for (int64_t d = 0; d < D; ++d) qt[d * MP + r] = src[r] ? src[r][d] * sc : 0.f;
}

// q [T, H, D] at absolute positions [T]; key j of the sequence lives in slot key_slots[j]. Query
// t sees keys j <= positions[t] (and j > positions[t] - window when window > 0).
void check_caches(const torch::Tensor& k_cache, const torch::Tensor& v_cache) {
    TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() &&
                (k_cache.scalar_type() == torch::kFloat32 || k_cache.scalar_type() == torch::kHalf),
                "KV caches must both be float32 or both float16");
}

// Task `task` of a prefill attention call: KV head kvh and the queries tq0 .. tq0 + M / G - 1
// as M rows (query r / G, head r % G), in MV vectors of MP rows. Pairs of tasks take a short and
// a long query block, so that halves of the range balance.
struct PrefillTask {
    int64_t kvh, tq0, M, MV, MP;
    PrefillTask(int64_t task, int64_t KVH, int64_t nqb, int64_t QB, int64_t T, int64_t G) {
        kvh = task % KVH;
        const int64_t i = task / KVH, qb = i % 2 == 0 ? i / 2 : nqb - 1 - i / 2;
        tq0 = qb * QB;
        M = std::min<int64_t>(QB, T - tq0) * G;
        MV = (M + VL - 1) / VL;
        MP = MV * VL;
    }
};

#ifdef JISU_AVX512
// ---- prefill attention in integers (float16 caches, AVX-512 VNNI) ---------------------------
// The float kernel above spends its time in two products, S = Q K^T and O += P V, on the float32
// multiply-add units; vpdpwssd does twice as many multiply-adds per instruction. So here every
// query row (per head), key row and value row is rounded to int16 codes with a scale of its own
// (x ~ s c), and so is P per row and block of keys, with each key's value scale folded into its
// column of P. The codes are bounded so that int32 sums cannot wrap: scores sum SF head dims in
// integers before they go to float (SF x CQK^2 < 2^31), P V a block of PKB keys (PKB x CPV^2 <
// 2^31). 13-bit codes round a key or value to within 1/16382 of its row's largest, about the
// float16 cache's own rounding (1/4096 of each value's power of two). Against transformers this
// moves the logits' mean KL from 4.6e-7 to 8.6e-7 (SmolLM2) and from 3.8e-7 to 1.7e-6 (Gemma 3);
// 12.5-bit codes for the scores (SF = 64) were as fast and gave twice Gemma's KL.
constexpr int SF = 32;
constexpr float CQK = 8191.f, CPV = 8191.f;
static_assert(double(SF) * 8191.0 * 8191.0 < 2147483648.0 && double(PKB) * 8191.0 * 8191.0 < 2147483648.0,
              "int32 sums of the integer attention would wrap");

// acc += the int16 pair products of a and b. GCC's intrinsic leaves the accumulator untied in a
// loop: it copied every accumulator to another register and to the stack on each step (the
// kernels below ran at a quarter of vpdpwssd's rate); the asm ties it to its register.
inline __m512i dpwssd(__m512i acc, __m512i a, __m512i b) {
    asm("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}

// n values (a multiple of 16) at p: their largest magnitude (NaN when one is not finite)
template <typename T>
inline float amax16(const T* p, int64_t n) {
    __m512 mx = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t d = 0; d < n; d += 16) {
        const __m512 v = vload(p + d);
        bad |= _mm512_fpclass_ps_mask(v, 0x99);
        mx = _mm512_max_ps(mx, _mm512_abs_ps(v));
    }
    return bad ? NAN : _mm512_reduce_max_ps(mx);
}

// 16 values at p as int32 codes, x * id rounded to nearest
template <typename T>
inline __m512i codes32(const T* p, __m512 id) { return _mm512_cvtps_epi32(_mm512_mul_ps(vload(p), id)); }

inline float inv_or_zero(float amax, float c) { return amax > 0.f && std::isfinite(amax) ? c / amax : 0.f; }

// n values (a multiple of 16) at p as int16 codes of at most c at dst; returns their largest
// magnitude (the row's scale is that / c; NaN when a value is not finite)
template <typename T>
inline float round_row16(const T* p, int64_t n, float c, int16_t* dst) {
    const float amax = amax16(p, n);
    const __m512 id = _mm512_set1_ps(inv_or_zero(amax, c));
    for (int64_t d = 0; d < n; d += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), _mm512_cvtsepi32_epi16(codes32(p + d, id)));
    return amax;
}

// int32 codes of two keys (|c| < 2^15) as the int16 pairs vpdpwssd takes: c0 low, c1 high
inline __m512i pairs16(__m512i c0, __m512i c1) {
    return _mm512_or_si512(_mm512_and_si512(c0, _mm512_set1_epi32(0xFFFF)), _mm512_slli_epi32(c1, 16));
}

// S^T [n keys][MV vectors of rows] from int16 keys (scales ks) and the rows' codes as pairs qt
// [D / 2][MP] (scales qs, the softmax scale included), four keys at a time
template <int MV>
inline void scores_i16(const int16_t* const* krows, const float* ks, int n, const int32_t* qt, const float* qs,
                       int64_t D, float* st) {
    constexpr int MP = MV * VL;
    __m512 qsv[MV];
    for (int v = 0; v < MV; ++v) qsv[v] = _mm512_loadu_ps(qs + v * VL);
    for (int j0 = 0; j0 < n; j0 += 4) {
        const int nk = std::min(4, n - j0);
        const int16_t* kr[4];
        for (int k = 0; k < 4; ++k) kr[k] = krows[j0 + std::min(k, nk - 1)];   // past n: repeat (unused)
        for (int64_t f0 = 0; f0 < D; f0 += SF) {
            __m512i ai[4][MV];
            for (int k = 0; k < 4; ++k) for (int v = 0; v < MV; ++v) ai[k][v] = _mm512_setzero_si512();
            for (int64_t dp = f0 / 2; dp < (f0 + SF) / 2; ++dp) {
                __m512i q[MV];
                for (int v = 0; v < MV; ++v) q[v] = _mm512_load_si512(qt + dp * MP + v * VL);
                for (int k = 0; k < 4; ++k) {
                    int32_t pair;
                    std::memcpy(&pair, kr[k] + 2 * dp, 4);
                    const __m512i kd = _mm512_set1_epi32(pair);
                    for (int v = 0; v < MV; ++v) ai[k][v] = dpwssd(ai[k][v], kd, q[v]);
                }
            }
            const bool first = f0 == 0, last = f0 + SF >= D;
            for (int k = 0; k < 4; ++k)
                for (int v = 0; v < MV; ++v) {
                    float* p = st + (j0 + k) * MP + v * VL;
                    __m512 s = _mm512_cvtepi32_ps(ai[k][v]);
                    if (!first) s = _mm512_add_ps(s, _mm512_loadu_ps(p));
                    if (last) s = _mm512_mul_ps(s, _mm512_mul_ps(qsv[v], _mm512_set1_ps(ks[j0 + std::min(k, nk - 1)])));
                    _mm512_storeu_ps(p, s);
                }
        }
    }
}

// O [R rows][D] = corr O + sp P V for one block: P as int16 pairs of keys pp [pairs][MP] (rows
// from r0 on), values as pairs vpairs[i] [D] (keys 2i, 2i + 1 of the block, interleaved)
template <int R>
inline void values_i16(const int32_t* pp, int64_t MP, const int32_t* const* vpairs, int npairs, int64_t D,
                       const float* sp, const float* corr, float* o) {
    for (int64_t d0 = 0; d0 < D; d0 += 4 * VL) {
        __m512i ai[R][4];
        for (int r = 0; r < R; ++r) for (int c = 0; c < 4; ++c) ai[r][c] = _mm512_setzero_si512();
        for (int i = 0; i < npairs; ++i) {
            __m512i v[4];
            for (int c = 0; c < 4; ++c) v[c] = _mm512_loadu_si512(vpairs[i] + d0 + c * VL);
            for (int r = 0; r < R; ++r) {
                const __m512i p = _mm512_set1_epi32(pp[i * MP + r]);
                for (int c = 0; c < 4; ++c) ai[r][c] = dpwssd(ai[r][c], p, v[c]);
            }
        }
        for (int r = 0; r < R; ++r) {
            const __m512 s = _mm512_set1_ps(sp[r]), cr = _mm512_set1_ps(corr[r]);
            for (int c = 0; c < 4; ++c) {
                float* p = o + r * D + d0 + c * VL;
                _mm512_storeu_ps(p, _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai[r][c]), s, _mm512_mul_ps(_mm512_loadu_ps(p), cr)));
            }
        }
    }
}

// exp(x) for softmax weights that are rounded to 13 bits next: a degree-5 polynomial on
// x - n ln2 (relative error < 3e-6) scaled by 2^n; x <= -88 gives ~6e-39 (not 0)
inline __m512 exp_p5(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-88.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.f / 120.f);
    for (float c : {1.f / 24.f, 1.f / 6.f, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    return _mm512_scalef_ps(p, n);
}

// Online softmax of one key block for one vector of rows (st: scores [n keys][stride MP], lanes
// the rows), P rounded: the running max m, sum l and the factor corr for O; P times each key's
// value scale as int16 pairs of keys pp [n / 2][stride MP] with the rows' scale sp. The largest
// of P vs per row is exp(max(s + log vs) - max s), known before P is, so each P is rounded as
// it is computed. MASK: keys outside a row's causal window (which st still holds) are excluded.
template <bool MASK>
inline void softmax_i16(float* st, int64_t MP, int n, int64_t kb, const int32_t* rpos, int64_t window,
                        const float* lvs, const float* vs, float* m, float* l, float* corr, float* sp, int32_t* pp) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 mx = _mm512_loadu_ps(m), tmax = ninf;
    const __m512 mold = mx;
    for (int j = 0; j < n; ++j) {
        __m512 s = _mm512_loadu_ps(st + j * MP);
        if constexpr (MASK) {
            s = vselect(vvisible(rpos, int32_t(kb + j), int32_t(window)), s, ninf);
            _mm512_storeu_ps(st + j * MP, s);
        }
        mx = _mm512_max_ps(mx, s);
        tmax = _mm512_max_ps(tmax, _mm512_add_ps(s, _mm512_set1_ps(lvs[j])));
    }
    const __m512 pmax = exp_p5(_mm512_sub_ps(tmax, mx));
    const __mmask16 some = _mm512_cmp_ps_mask(pmax, _mm512_set1_ps(1e-30f), _CMP_GT_OQ);
    const __m512 ip = _mm512_maskz_div_ps(some, _mm512_set1_ps(CPV), pmax);
    __m512 sum = _mm512_setzero_ps();
    for (int j = 0; j < n; j += 2) {
        const __m512 e0 = exp_p5(_mm512_sub_ps(_mm512_loadu_ps(st + j * MP), mx));
        const __m512 e1 = j + 1 < n ? exp_p5(_mm512_sub_ps(_mm512_loadu_ps(st + (j + 1) * MP), mx)) : _mm512_setzero_ps();
        sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
        const __m512i c0 = _mm512_cvtps_epi32(_mm512_mul_ps(e0, _mm512_mul_ps(ip, _mm512_set1_ps(vs[j]))));
        const __m512i c1 = j + 1 < n ? _mm512_cvtps_epi32(_mm512_mul_ps(e1, _mm512_mul_ps(ip, _mm512_set1_ps(vs[j + 1]))))
                                     : _mm512_setzero_si512();
        _mm512_storeu_si512(pp + j / 2 * MP, pairs16(c0, c1));
    }
    const __m512 c = exp_p5(_mm512_sub_ps(mold, mx));
    _mm512_storeu_ps(corr, c);
    _mm512_storeu_ps(l, _mm512_fmadd_ps(_mm512_loadu_ps(l), c, sum));
    _mm512_storeu_ps(m, mx);
    _mm512_storeu_ps(sp, _mm512_mul_ps(pmax, _mm512_set1_ps(1.f / CPV)));
}

// Keys (per KV head, numbered from the call's first held key) whose key or value row has an inf
// or NaN: the prompt attention kernels hold such rows as zeros and mark them, and a query row
// that sees a marked key is NaN, as a float softmax makes it, while no other row changes (in
// the products P = 0 times inf would be NaN for rows that only share a block with the key).
// mark() from any thread (one byte per key), count() once after, then seen().
struct MarkedKeys {
    int64_t n;
    std::vector<uint8_t> bad;       // [KVH][n]
    std::vector<int32_t> before;    // [KVH][n + 1]: marked keys before j
    MarkedKeys(int64_t KVH, int64_t n_) : n(n_), bad(KVH * n_, 0) {}
    void mark(int64_t h, int64_t j) { bad[h * n + j] = 1; }
    void count() {
        const int64_t KVH = int64_t(bad.size()) / n;
        before.assign(KVH * (n + 1), 0);
        for (int64_t h = 0; h < KVH; ++h)
            for (int64_t j = 0; j < n; ++j) before[h * (n + 1) + j + 1] = before[h * (n + 1) + j] + bad[h * n + j];
    }
    bool seen(int64_t h, int64_t first, int64_t last) const {   // a marked key among first .. last
        const int32_t* b = before.data() + h * (n + 1);
        return b[last + 1] != b[first];
    }
};

// paged_attention_prefill for float16 caches through the integer products: keys klo .. khi - 1
// rounded once per call, then tasks as in the float kernel, key blocks starting at even keys so
// that value pairs are the same for every task. Keys are held from kbase = klo rounded down to
// even: where that is klo - 1, a key no query sees, it is held as zeros rather than read.
void prefill_attention_i16(const float* qp, const c10::Half* khp, const c10::Half* vhp, const int64_t* slots,
                           const int64_t* pos, int64_t T, int64_t H, int64_t D, int64_t KVH, float sc, int64_t window,
                           int64_t klo, int64_t khi, bool parallel, float* op) {
    const int64_t G = H / KVH, QB = std::max<int64_t>(1, 4 * VL / G), nqb = (T + QB - 1) / QB, tasks = KVH * nqb;
    const int64_t kbase = klo & ~int64_t(1), nkeys = khi - kbase, npairs_all = (nkeys + 1) / 2;
    std::vector<int16_t> kq(nkeys * KVH * D);
    std::vector<float> ks(nkeys * KVH), vs(2 * npairs_all * KVH, 0.f), lvs(vs.size());   // lvs: log vs
    std::vector<int32_t> vp(npairs_all * KVH * D);
    MarkedKeys marked(KVH, 2 * npairs_all);
    auto convert = [&](int64_t i0, int64_t i1) {      // key pairs i0 .. i1 - 1
        for (int64_t i = i0; i < i1; ++i)
            for (int64_t h = 0; h < KVH; ++h) {
                const int64_t j = 2 * i, j1 = j + 1;
                // key kbase + jj as it lies in the cache; null: zeros (the key before klo, or past khi)
                auto at = [&](const c10::Half* cache, int64_t jj) -> const c10::Half* {
                    return jj < nkeys && kbase + jj >= klo ? cache + (slots[kbase + jj] * KVH + h) * D : nullptr;
                };
                for (int64_t jj = j; jj <= std::min(j1, nkeys - 1); ++jj) {
                    const c10::Half* k = at(khp, jj);
                    int16_t* dst = kq.data() + (jj * KVH + h) * D;
                    const float amax = k ? round_row16(k, D, CQK, dst) : 0.f;   // NaN: an inf or NaN in the row
                    const bool held = k && std::isfinite(amax);
                    if (k && !held) marked.mark(h, jj);          // held as zeros
                    if (!held) std::fill(dst, dst + D, int16_t(0));
                    ks[jj * KVH + h] = held ? amax / CQK : 0.f;
                }
                const c10::Half* v0 = at(vhp, j);
                const c10::Half* v1 = at(vhp, j1);
                float a0 = v0 ? amax16(v0, D) : 0.f, a1 = v1 ? amax16(v1, D) : 0.f;
                if (!std::isfinite(a0)) marked.mark(h, j), v0 = nullptr, a0 = 0.f;
                if (!std::isfinite(a1)) marked.mark(h, j1), v1 = nullptr, a1 = 0.f;
                const __m512 id0 = _mm512_set1_ps(inv_or_zero(a0, CPV)), id1 = _mm512_set1_ps(inv_or_zero(a1, CPV));
                vs[j * KVH + h] = a0 / CPV;
                vs[j1 * KVH + h] = a1 / CPV;
                lvs[j * KVH + h] = std::log(a0 / CPV);       // -inf for a zero row
                lvs[j1 * KVH + h] = std::log(a1 / CPV);
                int32_t* dst = vp.data() + (i * KVH + h) * D;
                for (int64_t d = 0; d < D; d += VL)
                    _mm512_storeu_si512(dst + d, pairs16(v0 ? codes32(v0 + d, id0) : _mm512_setzero_si512(),
                                                         v1 ? codes32(v1 + d, id1) : _mm512_setzero_si512()));
            }
    };
    if (parallel) at::parallel_for(0, npairs_all, 8, convert); else convert(0, npairs_all);
    marked.count();
    auto first_key = [&](int64_t p) { return window > 0 ? std::max<int64_t>(0, p - window + 1) : int64_t(0); };
    auto body = [&](int64_t t0, int64_t t1) {
        const int64_t MPmax = (QB * G + VL - 1) / VL * VL;
        std::vector<int16_t> qc(MPmax * D);
        std::vector<float> o(MPmax * D), st(PKB * MPmax), m(MPmax), l(MPmax), corr(MPmax), qs(MPmax), sp(MPmax);
        std::vector<int32_t> rpos(MPmax);
        // 64-byte aligned: qt is read with aligned loads
        std::unique_ptr<int32_t[], void (*)(void*)> qt(static_cast<int32_t*>(std::aligned_alloc(64, D / 2 * MPmax * 4)), std::free);
        std::vector<int32_t> pp(PKB / 2 * MPmax);
        const int16_t* krows[PKB];
        const int32_t* vrows[PKB / 2];
        for (int64_t task = t0; task < t1; ++task) {
            const PrefillTask tk(task, KVH, nqb, QB, T, G);
            const int64_t kvh = tk.kvh, tq0 = tk.tq0, M = tk.M, MV = tk.MV, MP = tk.MP;
            int64_t lo = khi, hi = 0;
            for (int64_t r = 0; r < MP; ++r) {      // row r: query r / G, head r % G; padding: zero codes
                const int64_t a = std::min(r, M - 1) / G, g = std::min(r, M - 1) % G, p = pos[tq0 + a];
                rpos[r] = int32_t(p);
                hi = std::max(hi, p + 1);
                lo = std::min(lo, first_key(p));
                int16_t* dst = qc.data() + r * D;
                if (r >= M) {
                    std::fill(dst, dst + D, int16_t(0));
                    qs[r] = 0.f;
                    continue;
                }
                qs[r] = round_row16(qp + ((tq0 + a) * H + kvh * G + g) * D, D, CQK, dst) / CQK * sc;
            }
            // codes as int32 pairs, transposed: qt [D / 2][MP], 16 x 16 tiles
            for (int64_t r0 = 0; r0 < MP; r0 += 16)
                for (int64_t c0 = 0; c0 < D / 2; c0 += 16) {
                    __m512i t[16];
                    for (int k = 0; k < 16; ++k)
                        t[k] = _mm512_loadu_si512(qc.data() + (r0 + k) * D + 2 * c0);
                    transpose16(t);
                    for (int k = 0; k < 16; ++k) _mm512_store_si512(qt.get() + (c0 + k) * MP + r0, t[k]);
                }
            int32_t rmin[4], rmax[4];      // per vector of rows: the first and last position
            for (int64_t v = 0; v < MV; ++v) {
                rmin[v] = *std::min_element(rpos.begin() + v * VL, rpos.begin() + (v + 1) * VL);
                rmax[v] = *std::max_element(rpos.begin() + v * VL, rpos.begin() + (v + 1) * VL);
            }
            std::fill(o.begin(), o.begin() + MP * D, 0.f);
            std::fill(m.begin(), m.begin() + MP, -1e30f);
            std::fill(l.begin(), l.begin() + MP, 0.f);
            for (int64_t kb = lo & ~int64_t(1); kb < hi; kb += PKB) {
                const int n = int(std::min<int64_t>(PKB, hi - kb)), np2 = (n + 1) / 2;
                float kscale[PKB], vscale[PKB], lvscale[PKB];
                for (int j = 0; j < n; ++j) {
                    const int64_t at = (kb + j - kbase) * KVH + kvh;     // key kb + j of this KV head
                    krows[j] = kq.data() + at * D;
                    kscale[j] = ks[at];
                    vscale[j] = vs[at];
                    lvscale[j] = lvs[at];
                }
                for (int p2 = 0; p2 < np2; ++p2) vrows[p2] = vp.data() + (((kb - kbase) / 2 + p2) * KVH + kvh) * D;
                one_to_four(MV, [&](auto mv) { scores_i16<decltype(mv)::value>(krows, kscale, n, qt.get(), qs.data(), D, st.data()); });
                for (int64_t v = 0; v < MV; ++v) {
                    // every key of the block visible to every row of the vector: no mask
                    const bool all = kb + n - 1 <= rmin[v] && (window <= 0 || kb > rmax[v] - window);
                    auto soft = [&](auto mask) {
                        softmax_i16<decltype(mask)::value>(st.data() + v * VL, MP, n, kb, rpos.data() + v * VL, window, lvscale,
                                                           vscale, m.data() + v * VL, l.data() + v * VL, corr.data() + v * VL,
                                                           sp.data() + v * VL, pp.data() + v * VL);
                    };
                    if (all) soft(std::false_type{}); else soft(std::true_type{});
                }
                by_rows4(M, [&](int64_t r0, auto rr) {
                    values_i16<decltype(rr)::value>(pp.data() + r0, MP, vrows, np2, D, sp.data() + r0, corr.data() + r0, o.data() + r0 * D);
                });
            }
            for (int64_t r = 0; r < M; ++r) {
                const float inv = marked.seen(kvh, first_key(rpos[r]) - kbase, rpos[r] - kbase) ? NAN : 1.f / l[r];
                float* dst = op + ((tq0 + r / G) * H + kvh * G + r % G) * D;
                for (int64_t d = 0; d < D; ++d) dst[d] = o[r * D + d] * inv;
            }
        }
    };
    if (parallel) at::parallel_for(0, tasks, 1, body); else body(0, tasks);
}

#ifdef JISU_AMX
// ---- prefill attention on AMX: bf16 tiles, three products per pair of values ---------------
// The exact GEMM's scheme (step3, what JISU_AMX=exact runs) applied to both products of
// attention, in two passes per task (the G heads of one KV head for up to 64 / G queries):
// S = (sc Q) K^T for every key the task sees, then each row's softmax over all of S at once
// (no running max, no rescaling of O):
// P = exp(S - max), O = P V / sum. Each operand is split into two bf16, v = hi + lo, and each product
// takes hi hi + hi lo + lo hi: float16 keys and values are exact as hi + lo, and q and P keep
// 16 bits, about as exact as the int16 path's codes. Keys and values are split once per call
// into tiles: keys as [16 pairs of d][16 keys][2] per 32 d, values as [16 pairs of keys][16 d][2].
// S and P take 12 bytes per row and key per thread, so calls over more keys take the int16 path.
// A non-finite key or value makes exactly the rows that see it NaN (MarkedKeys).
// Error against float64 on random data: <1e-4 (the int16 path: ~2e-3). Measured on the AMX VM
// (RESULTS.md, eighteenth session), 512 tokens, 2 threads, in-process pairs against the int16
// path: head dim 64 (SmolLM2) 1.18-1.35x the attention alone and 1.10-1.13x the whole prefill;
// head dim 256 (Gemma 3) 1.24-1.51x alone but even in the model. There the tasks were split in
// halves, and Gemma's one KV head gave one thread the first queries and the other the last (1:3
// of the work); with the heaviest tasks first from a shared counter, Gemma's prompt attention
// takes 22 ms of a 512-token prefill where the int16 path takes 30-34 (twenty-first session), so
// head dims up to 256 take this path. JISU_AMX=0 (set_amx_min_rows(0)) turns this off with the
// AMX GEMM.
constexpr int64_t AMX_ATTN_MAX_KEYS = 4096;
constexpr int64_t AMX_ATTN_MIN_ROWS = 32;   // fewer new tokens: the int16 path
constexpr int64_t AMX_ATTN_MAX_D = 256;

// 16 floats of each of two rows (keys 2i, 2i + 1) -> hi and lo as 16 pairs of bf16
inline void split_pairs(__m512 a, __m512 b, __m512i& hi, __m512i& lo) {
    __m512 ha, hb;
    const __m256i h0 = bf16_hi(a, ha), h1 = bf16_hi(b, hb);
    const __m256i l0 = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(a, ha)), l1 = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(b, hb));
    hi = _mm512_or_si512(_mm512_cvtepu16_epi32(h0), _mm512_slli_epi32(_mm512_cvtepu16_epi32(h1), 16));
    lo = _mm512_or_si512(_mm512_cvtepu16_epi32(l0), _mm512_slli_epi32(_mm512_cvtepu16_epi32(l1), 16));
}

void prefill_attention_amx(const float* qp, const c10::Half* khp, const c10::Half* vhp, const int64_t* slots,
                           const int64_t* pos, int64_t T, int64_t H, int64_t D, int64_t KVH, float sc, int64_t window,
                           int64_t klo, int64_t khi, bool parallel, float* op) {
    const int64_t G = H / KVH, QB = std::max<int64_t>(1, 64 / G), nqb = (T + QB - 1) / QB, tasks = KVH * nqb;
    const int64_t kbase = klo & ~int64_t(31), nkeys = (khi - kbase + 31) / 32 * 32, S = D / 32, DT = D / 16;
    const int64_t kgroups = nkeys / 16, vblocks = nkeys / 32;
    // kt [KVH][kgroups][S][hi, lo][512]; vt [KVH][vblocks][DT][hi, lo][512] (bf16 as uint16)
    std::unique_ptr<uint16_t[], void (*)(void*)> kt(
        static_cast<uint16_t*>(std::aligned_alloc(64, sizeof(uint16_t) * KVH * kgroups * S * 1024)), std::free);
    std::unique_ptr<uint16_t[], void (*)(void*)> vt(
        static_cast<uint16_t*>(std::aligned_alloc(64, sizeof(uint16_t) * KVH * vblocks * DT * 1024)), std::free);
    // key kbase + j of KV head h as it lies in the cache, or null outside klo .. khi - 1 (zeros)
    auto row = [&](const c10::Half* cache, int64_t j, int64_t h) -> const c10::Half* {
        return kbase + j >= klo && kbase + j < khi ? cache + (slots[kbase + j] * KVH + h) * D : nullptr;
    };
    // a key or value with an inf or NaN enters the tiles as zeros, its key marked
    MarkedKeys marked(KVH, nkeys);
    auto finite = [&](__m512 v, int64_t h, int64_t j) {
        const __mmask16 nf = _mm512_fpclass_ps_mask(v, 0x99);     // QNaN, SNaN, +inf, -inf
        if (nf) marked.mark(h, j);
        return _mm512_maskz_mov_ps(__mmask16(~nf), v);
    };
    auto convert = [&](int64_t b0, int64_t b1) {      // blocks of 32 keys b0 .. b1 - 1, every KV head
        for (int64_t b = b0; b < b1; ++b)
            for (int64_t h = 0; h < KVH; ++h) {
                for (int64_t kg = 2 * b; kg < 2 * b + 2; ++kg)
                    for (int64_t s = 0; s < S; ++s) {
                        __m512i hi[16], lo[16];
                        for (int k = 0; k < 16; ++k) {
                            const c10::Half* r = row(khp, 16 * kg + k, h);
                            if (!r) { hi[k] = lo[k] = _mm512_setzero_si512(); continue; }
                            // d pairs of one key: a split of 32 consecutive values
                            split32(finite(vload(r + 32 * s), h, 16 * kg + k), finite(vload(r + 32 * s + 16), h, 16 * kg + k),
                                    hi[k], lo[k]);
                        }
                        uint16_t* dst = kt.get() + ((h * kgroups + kg) * S + s) * 1024;
                        store_pair_tiles(hi, lo, dst, dst + 512);
                    }
                for (int64_t dt = 0; dt < DT; ++dt) {
                    uint16_t* dst = vt.get() + ((h * vblocks + b) * DT + dt) * 1024;
                    for (int kp = 0; kp < 16; ++kp) {
                        const c10::Half* r0 = row(vhp, 32 * b + 2 * kp, h);
                        const c10::Half* r1 = row(vhp, 32 * b + 2 * kp + 1, h);
                        __m512i hi, lo;
                        split_pairs(r0 ? finite(vload(r0 + 16 * dt), h, 32 * b + 2 * kp) : _mm512_setzero_ps(),
                                    r1 ? finite(vload(r1 + 16 * dt), h, 32 * b + 2 * kp + 1) : _mm512_setzero_ps(), hi, lo);
                        _mm512_store_si512(dst + kp * 32, hi);
                        _mm512_store_si512(dst + 512 + kp * 32, lo);
                    }
                }
            }
    };
    if (parallel) at::parallel_for(0, vblocks, 1, convert); else convert(0, vblocks);
    marked.count();
    auto first_key = [&](int64_t p) { return window > 0 ? std::max<int64_t>(0, p - window + 1) : int64_t(0); };
    // tasks taken in turns, those that see the most keys first (the last query blocks)
    auto body = [&](auto take) {
        const int64_t MPmax = 64;
        auto alloc16 = [](int64_t n) {
            return std::unique_ptr<uint16_t[], void (*)(void*)>(static_cast<uint16_t*>(std::aligned_alloc(64, sizeof(uint16_t) * n)), std::free);
        };
        auto qh = alloc16(MPmax * D), ql = alloc16(MPmax * D), ph = alloc16(MPmax * nkeys), pl = alloc16(MPmax * nkeys);
        std::unique_ptr<float[], void (*)(void*)> st(static_cast<float*>(std::aligned_alloc(64, sizeof(float) * MPmax * nkeys)), std::free);
        alignas(64) float c[32 * 32];
        int64_t rpos[64];
        float inv[64];     // 1 / sum, or NaN where the row sees a marked key
        tiles_on();
        for (int64_t task; (task = take()) >= 0;) {
            const int64_t kvh = task % KVH, tq0 = (nqb - 1 - task / KVH) * QB, M = std::min(QB, T - tq0) * G, MP = (M + 31) / 32 * 32;
            int64_t lo = khi, hi = 0;
            for (int64_t r = 0; r < MP; ++r) {     // row r: query r / G, head r % G; padding: zeros
                uint16_t* dh = qh.get() + r * D;
                uint16_t* dl = ql.get() + r * D;
                if (r >= M) {
                    std::memset(dh, 0, sizeof(uint16_t) * D);
                    std::memset(dl, 0, sizeof(uint16_t) * D);
                    continue;
                }
                const int64_t a = r / G, g = r % G, p = pos[tq0 + a];
                rpos[r] = p;
                hi = std::max(hi, p + 1);
                lo = std::min(lo, first_key(p));
                const float* q = qp + ((tq0 + a) * H + kvh * G + g) * D;
                const __m512 scv = _mm512_set1_ps(sc);
                for (int64_t s = 0; s < S; ++s) {
                    __m512i h16, l16;
                    split32(_mm512_mul_ps(_mm512_loadu_ps(q + 32 * s), scv), _mm512_mul_ps(_mm512_loadu_ps(q + 32 * s + 16), scv),
                            h16, l16);
                    _mm512_storeu_si512(dh + 32 * s, h16);
                    _mm512_storeu_si512(dl + 32 * s, l16);
                }
            }
            // keys k0 .. k0 + nk - 1 (relative to kbase), whole blocks of 32
            const int64_t k0 = (lo - kbase) & ~int64_t(31), nk = (hi - kbase + 31) / 32 * 32 - k0;
            float* stp = st.get();
            // S [MP][nk] = (sc Q) K^T, 32 rows x 32 keys at a time
            for (int64_t r0 = 0; r0 < MP; r0 += 32)
                for (int64_t kb = 0; kb < nk; kb += 32) {
                    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                    const uint16_t* k_a = kt.get() + ((kvh * kgroups + (k0 + kb) / 16) * S) * 1024;
                    const uint16_t* k_b = k_a + S * 1024;
                    for (int64_t s = 0; s < S; ++s) {
                        const uint16_t *xh = qh.get() + r0 * D + 32 * s, *xl = ql.get() + r0 * D + 32 * s;
                        const uint16_t *wa = k_a + s * 1024, *wb = k_b + s * 1024;
                        step3(xh, xh + 16 * D, xl, xl + 16 * D, D * 2, wa, wb, wa + 512, wb + 512);
                    }
                    float* sb = stp + r0 * nk + kb;
                    _tile_stored(0, sb, nk * 4); _tile_stored(1, sb + 16, nk * 4);
                    _tile_stored(2, sb + 16 * nk, nk * 4); _tile_stored(3, sb + 16 * nk + 16, nk * 4);
                }
            // each row's softmax over its visible keys: e = exp(s - max) split into ph + pl, 1 / sum
            // applied to O; blocks of keys wholly visible (most) without masks
            const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            for (int64_t r = 0; r < MP; ++r) {
                uint16_t* dh = ph.get() + r * nk;
                uint16_t* dl = pl.get() + r * nk;
                if (r >= M) {
                    std::memset(dh, 0, sizeof(uint16_t) * nk);
                    std::memset(dl, 0, sizeof(uint16_t) * nk);
                    continue;
                }
                const float* sr = stp + r * nk;
                const int64_t j0 = first_key(rpos[r]) - kbase - k0, j1 = rpos[r] - kbase - k0;   // visible: j0 .. j1
                const __m512i vlo = _mm512_set1_epi32(int32_t(j0)), vhi = _mm512_set1_epi32(int32_t(j1));
                auto visible = [&](int64_t j) {
                    const __m512i idx = _mm512_add_epi32(lane, _mm512_set1_epi32(int32_t(j)));
                    return __mmask16(_mm512_cmp_epi32_mask(idx, vlo, _MM_CMPINT_NLT) & _mm512_cmp_epi32_mask(idx, vhi, _MM_CMPINT_LE));
                };
                __m512 mx = _mm512_set1_ps(-INFINITY);
                for (int64_t j = 0; j < nk; j += 16) {
                    const __m512 v = _mm512_load_ps(sr + j);
                    mx = j >= j0 && j + 15 <= j1 ? _mm512_max_ps(mx, v) : _mm512_mask_max_ps(mx, visible(j), mx, v);
                }
                const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
                __m512 sum = _mm512_setzero_ps();
                for (int64_t j = 0; j < nk; j += 32) {
                    __m512i h16 = _mm512_setzero_si512(), l16 = _mm512_setzero_si512();
                    if (j + 31 >= j0 && j <= j1) {
                        __m512 e0 = exp_p5(_mm512_sub_ps(_mm512_load_ps(sr + j), m));
                        __m512 e1 = exp_p5(_mm512_sub_ps(_mm512_load_ps(sr + j + 16), m));
                        if (j < j0 || j + 31 > j1) {
                            e0 = _mm512_maskz_mov_ps(visible(j), e0);
                            e1 = _mm512_maskz_mov_ps(visible(j + 16), e1);
                        }
                        sum = _mm512_add_ps(sum, _mm512_add_ps(e0, e1));
                        split32(e0, e1, h16, l16);
                    }
                    _mm512_storeu_si512(dh + j, h16);
                    _mm512_storeu_si512(dl + j, l16);
                }
                inv[r] = marked.seen(kvh, k0 + j0, k0 + j1) ? NAN : 1.f / _mm512_reduce_add_ps(sum);
            }
            // O [32 rows][32 d] = P V / sum per 32 rows and 32 d, as pass 1 (16 rows at a time,
            // 6 tile loads for 6 products, measured 1.11-1.38x / 0.75-1.13x the int16 path's speed
            // at head dims 64 / 256, where this takes 1.18-1.26x / 1.24-1.51x)
            for (int64_t r0 = 0; r0 < M; r0 += 32)
                for (int64_t dc = 0; dc < D / 32; ++dc) {
                    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
                    for (int64_t kb = 0; kb < nk; kb += 32) {
                        const uint16_t* v0 = vt.get() + ((kvh * vblocks + (k0 + kb) / 32) * DT + 2 * dc) * 1024;
                        const uint16_t* v1 = v0 + 1024;
                        const uint16_t *xh = ph.get() + r0 * nk + kb, *xl = pl.get() + r0 * nk + kb;
                        step3(xh, xh + 16 * nk, xl, xl + 16 * nk, nk * 2, v0, v1, v0 + 512, v1 + 512);
                    }
                    _tile_stored(0, c, 128); _tile_stored(1, c + 16, 128); _tile_stored(2, c + 512, 128); _tile_stored(3, c + 528, 128);
                    for (int64_t r = r0; r < std::min(r0 + 32, M); ++r) {
                        float* dst = op + ((tq0 + r / G) * H + kvh * G + r % G) * D + 32 * dc;
                        const __m512 iv = _mm512_set1_ps(inv[r]);
                        _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_load_ps(c + (r - r0) * 32), iv));
                        _mm512_storeu_ps(dst + 16, _mm512_mul_ps(_mm512_load_ps(c + (r - r0) * 32 + 16), iv));
                    }
                }
        }
        _tile_release();
    };
    take_turns(tasks, body, parallel ? -1 : 1);
}
#endif
#endif


torch::Tensor paged_attention_prefill(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                      torch::Tensor key_slots, torch::Tensor positions, double scale, int64_t window,
                                      bool integer) {
    TORCH_CHECK(q.dtype() == torch::kFloat32 && q.dim() == 3, "q must be float32 [T, H, D]");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 3, "caches must be contiguous [S, KVH, D]");
    check_caches(k_cache, v_cache);
    q = q.contiguous();
    key_slots = key_slots.contiguous();
    positions = positions.reshape(-1).contiguous();
    const int64_t T = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1), L = key_slots.numel();
    TORCH_CHECK(k_cache.size(2) == D && H % KVH == 0 && D % PDC == 0 && positions.numel() == T,
                "paged_attention_prefill: shape mismatch (head dim must be a multiple of ", PDC, ")");
    TORCH_CHECK(L < (int64_t(1) << 30) && window < (int64_t(1) << 30), "paged_attention_prefill: context too long");
    TORCH_CHECK(H / std::max<int64_t>(KVH, 1) <= 4 * VL, "paged_attention_prefill: more than ", 4 * VL,
                " query heads per KV head");     // a task's rows must fit four vectors
    if (T == 0) return torch::empty_like(q);
    const int64_t* slots = key_slots.data_ptr<int64_t>();
    const int64_t* pos = positions.data_ptr<int64_t>();
    for (int64_t t = 0; t < T; ++t)
        TORCH_CHECK(pos[t] >= 0 && pos[t] < L, "paged_attention_prefill: position ", pos[t], " has no key (", L, " keys)");
    auto out = torch::empty_like(q);
    const float* qp = q.data_ptr<float>();
    float* op = out.data_ptr<float>();
    // a task: the G heads of one KV head for QB queries, at most four vectors of rows
    const int64_t G = H / KVH, QB = std::max<int64_t>(1, 4 * VL / G), nqb = (T + QB - 1) / QB, tasks = KVH * nqb;
    const float sc = float(scale);
    const bool parallel = tasks > 1 && T * (pos[T - 1] + 1) * H * D >= (1 << 18);
    // key j's row for KV head h: in the cache (float32), or for float16 caches in a float32 copy
    // of keys klo .. khi - 1 made once here (each task converting its blocks itself converted
    // every key once per query block: Gemma's 512-token prefill attention 1.53 -> 1.39-1.42 ms a
    // layer). A copy past PREFILL_COPY_MAX bytes (a long context) is not made: then each task
    // converts its blocks of keys into scratch of its own, as before.
    const bool half = k_cache.scalar_type() == torch::kHalf;
    const c10::Half* khp = half ? static_cast<const c10::Half*>(k_cache.data_ptr()) : nullptr;
    const c10::Half* vhp = half ? static_cast<const c10::Half*>(v_cache.data_ptr()) : nullptr;
    auto first_key = [&](int64_t p) { return window > 0 ? std::max<int64_t>(0, p - window + 1) : int64_t(0); };  // p's first visible key
    int64_t klo = L, khi = 0;
    for (int64_t t = 0; t < T; ++t) {
        khi = std::max(khi, pos[t] + 1);
        klo = std::min(klo, first_key(pos[t]));
    }
    for (int64_t j = klo; j < khi; ++j)
        TORCH_CHECK(slots[j] >= 0 && slots[j] < k_cache.size(0), "paged_attention_prefill: key ", j, " in slot ", slots[j],
                    " outside the cache's ", k_cache.size(0));
#ifdef JISU_AVX512
#ifdef JISU_AMX
    if (half && integer && T >= AMX_ATTN_MIN_ROWS && D <= AMX_ATTN_MAX_D && khi - (klo & ~int64_t(31)) <= AMX_ATTN_MAX_KEYS &&
        amx_min_rows.load() > 0 && amx_ready()) {
        prefill_attention_amx(qp, khp, vhp, slots, pos, T, H, D, KVH, float(scale), window, klo, khi, parallel, op);
        return out;
    }
#endif
    if (half && integer && (khi - (klo & ~int64_t(1)) + 1) * KVH * D * 4 <= PREFILL_I16_MAX) {   // codes from an even key
        prefill_attention_i16(qp, khp, vhp, slots, pos, T, H, D, KVH, float(scale), window, klo, khi, parallel, op);
        return out;
    }
#endif
    const bool copy = half && (khi - klo) * KVH * D * 2 * int64_t(sizeof(float)) <= PREFILL_COPY_MAX;
    // n float16 values of the key and value caches at `at` into float32 at kd, vd (n a multiple of VL)
    auto to_float = [&](float* kd, float* vd, int64_t at, int64_t n) {
        for (int64_t d = 0; d < n; d += VL) {
            vstore(kd + d, vload(khp + at + d));
            vstore(vd + d, vload(vhp + at + d));
        }
    };
    std::vector<float> kconv(copy ? (khi - klo) * KVH * D : 0), vconv(kconv.size());
    if (copy) {
        auto convert = [&](int64_t j0, int64_t j1) {
            for (int64_t j = j0; j < j1; ++j)
                to_float(kconv.data() + (j - klo) * KVH * D, vconv.data() + (j - klo) * KVH * D, slots[j] * KVH * D, KVH * D);
        };
        if (parallel) at::parallel_for(klo, khi, 16, convert); else convert(klo, khi);
    }
    const float* kbase = copy ? kconv.data() : half ? nullptr : k_cache.data_ptr<float>();
    const float* vbase = copy ? vconv.data() : half ? nullptr : v_cache.data_ptr<float>();
    auto body = [&](int64_t t0, int64_t t1) {
        const int64_t MPmax = (QB * G + VL - 1) / VL * VL;
        std::vector<float> qt(D * MPmax), o(MPmax * D), st(PKB * MPmax), m(MPmax), l(MPmax), corr(MPmax);
        std::vector<int32_t> rpos(MPmax);
        std::vector<float> kblock(half && !copy ? PKB * D : 0), vblock(kblock.size());   // one block, converted
        const float* krows[PKB];
        const float* vrows[PKB];
        for (int64_t task = t0; task < t1; ++task) {
            const PrefillTask tk(task, KVH, nqb, QB, T, G);
            const int64_t kvh = tk.kvh, tq0 = tk.tq0, M = tk.M, MV = tk.MV, MP = tk.MP;
            int64_t lo = L, hi = 0;
            const float* src[4 * VL];
            for (int64_t r = 0; r < MP; ++r) {      // row r: query r / G, head r % G; padding repeats the last
                const int64_t a = std::min(r, M - 1) / G, g = std::min(r, M - 1) % G, p = pos[tq0 + a];
                src[r] = r < M ? qp + ((tq0 + a) * H + kvh * G + g) * D : nullptr;
                rpos[r] = int32_t(p);
                hi = std::max(hi, p + 1);
                lo = std::min(lo, first_key(p));
            }
            transpose_scaled(src, MP, D, sc, qt.data());
            std::fill(o.begin(), o.begin() + MP * D, 0.f);
            std::fill(m.begin(), m.begin() + MP, -1e30f);     // finite: a fully masked block gives exp(-inf) = 0
            std::fill(l.begin(), l.begin() + MP, 0.f);
            for (int64_t kb = lo; kb < hi; kb += PKB) {
                const int n = int(std::min<int64_t>(PKB, hi - kb));
                for (int j = 0; j < n; ++j) {
                    if (!half || copy) {
                        const int64_t at = ((copy ? kb + j - klo : slots[kb + j]) * KVH + kvh) * D;
                        krows[j] = kbase + at;
                        vrows[j] = vbase + at;
                        continue;
                    }
                    to_float(kblock.data() + j * D, vblock.data() + j * D, (slots[kb + j] * KVH + kvh) * D, D);
                    krows[j] = kblock.data() + j * D;
                    vrows[j] = vblock.data() + j * D;
                }
                one_to_four(MV, [&](auto mv) { prefill_scores<decltype(mv)::value>(krows, n, qt.data(), D, st.data()); });
                const vf ninf = vset1(-INFINITY);
                for (int64_t v = 0; v < MV; ++v) {
                    // mask, the block's max per row, then P = exp(S - max) with masked keys exactly 0
                    vf mx = vload(m.data() + v * VL);
                    const vf mold = mx;
                    for (int j = 0; j < n; ++j) {
                        float* s = st.data() + j * MP + v * VL;
                        const vf sv = vselect(vvisible(rpos.data() + v * VL, int32_t(kb + j), int32_t(window)), vload(s), ninf);
                        vstore(s, sv);
                        mx = vmax(mx, sv);
                    }
                    vf sum = vzero();
                    for (int j = 0; j < n; ++j) {
                        float* s = st.data() + j * MP + v * VL;
                        const vf e = vselect(vvisible(rpos.data() + v * VL, int32_t(kb + j), int32_t(window)),
                                             vexp(vsub(vload(s), mx)), vzero());
                        vstore(s, e);
                        sum = vadd(sum, e);
                    }
                    const vf c = vexp(vsub(mold, mx));
                    vstore(corr.data() + v * VL, c);
                    vstore(l.data() + v * VL, vfma(vload(l.data() + v * VL), c, sum));
                    vstore(m.data() + v * VL, mx);
                }
                for (int64_t r = 0; r < M; ++r) {
                    if (corr[r] == 1.f) continue;
                    const vf cv = vset1(corr[r]);
                    for (int64_t d = 0; d < D; d += VL) vstore(o.data() + r * D + d, vmul(vload(o.data() + r * D + d), cv));
                }
                by_rows4(M, [&](int64_t r0, auto rr) {
                    prefill_values<decltype(rr)::value>(st.data() + r0, MP, vrows, n, D, o.data() + r0 * D);
                });
            }
            for (int64_t r = 0; r < M; ++r) {
                const float inv = 1.f / l[r];
                float* dst = op + ((tq0 + r / G) * H + kvh * G + r % G) * D;
                for (int64_t d = 0; d < D; ++d) dst[d] = o[r * D + d] * inv;
            }
        }
    };
    if (parallel) at::parallel_for(0, tasks, 1, body); else body(0, tasks);
    return out;
}

// VL vectors -> one: lane l holds the sum of p[l]'s lanes (a transpose-and-add tree, ~3 ops a
// vector where a horizontal sum of each costs ~6)
#ifdef JISU_AVX512
inline vf sum_each(const vf* p) {
    vf a[8], b[4], c[2];
    for (int i = 0; i < 8; ++i)   // per 128-bit lane: [x0+x2, y0+y2, x1+x3, y1+y3]
        a[i] = _mm512_add_ps(_mm512_unpacklo_ps(p[2 * i], p[2 * i + 1]), _mm512_unpackhi_ps(p[2 * i], p[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {  // per 128-bit lane: four keys' partial sums
        const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
        b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; ++i)   // 128-bit lanes folded in pairs
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
}
#else
inline vf sum_each(const vf* p) {
    vf a[4], b[2];
    for (int i = 0; i < 4; ++i) a[i] = _mm256_add_ps(_mm256_unpacklo_ps(p[2 * i], p[2 * i + 1]), _mm256_unpackhi_ps(p[2 * i], p[2 * i + 1]));
    for (int i = 0; i < 2; ++i) {
        const __m256d x = _mm256_castps_pd(a[2 * i]), y = _mm256_castps_pd(a[2 * i + 1]);
        b[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(x, y)), _mm256_castpd_ps(_mm256_unpackhi_pd(x, y)));
    }
    return _mm256_add_ps(_mm256_permute2f128_ps(b[0], b[1], 0x20), _mm256_permute2f128_ps(b[0], b[1], 0x31));
}
#endif

// Decode attention (one new token per sequence) reading keys and values through the paged
// cache: for sequence b, key j lives in slot gather_slots[b, j]. Query head h uses KV head
// h / (H / KVH) (grouped-query attention). A window > 0 keeps only the last `window` keys.
// One task per (sequence, KV head): each key and value row is read once for all the query
// heads sharing it. Scores come VL keys at a time: each key's products stay a vector and
// sum_each turns VL of them into one vector of scores. Small steps run on the calling thread
// (waking the pool costs more).
// n values from p requested into L1 (the cache rows of a sequence are scattered over its blocks
// and each task reads a few hundred bytes a row: the hardware prefetcher does not follow)
template <typename KT>
inline void prefetch_values(const KT* p, int64_t n) {
    prefetch_row(reinterpret_cast<const uint8_t*>(p), n * int64_t(sizeof(KT)));
}

constexpr int PF_KEYS = 2 * VL;     // keys ahead: measured on SmolLM2, 32 sequences
constexpr int SK = VL == 16 ? 4 : 2; // keys per step of the scores: SK x 4 heads' sums plus 4 query
                                     // vectors in registers (AVX2 has 16 of them, AVX-512 32)

template <typename KT>
torch::Tensor attention_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                               torch::Tensor gather_slots, torch::Tensor context_lens, double scale, int64_t window) {
    TORCH_CHECK(q.dtype() == torch::kFloat32 && q.dim() == 3, "q must be float32 [B, H, D]");
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.dim() == 3, "caches must be contiguous [S, KVH, D]");
    q = q.contiguous();
    gather_slots = gather_slots.contiguous();
    context_lens = context_lens.contiguous();
    const int64_t B = q.size(0), H = q.size(1), D = q.size(2), KVH = k_cache.size(1), L = gather_slots.size(1);
    TORCH_CHECK(k_cache.size(2) == D && H % KVH == 0 && D % 16 == 0,
                "paged_attention_decode: shape mismatch (head dim must be a multiple of 16)");
    auto out = torch::empty_like(q);
    const float* qp = q.data_ptr<float>();
    const KT* kp = static_cast<const KT*>(k_cache.data_ptr());
    const KT* vp = static_cast<const KT*>(v_cache.data_ptr());
    const int64_t* slots = gather_slots.data_ptr<int64_t>();
    const int64_t* lens = context_lens.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b)
        TORCH_CHECK(lens[b] >= 1 && lens[b] <= L, "paged_attention_decode: context length ", lens[b], " outside 1..", L);
    float* op = out.data_ptr<float>();
    const int64_t G = H / KVH, stride = L + VL;
    int64_t work = 0, longest = 0;   // key rows read
    for (int64_t b = 0; b < B; ++b) {
        const int64_t len = window > 0 ? std::min(lens[b], window) : lens[b];
        work += len;
        longest = std::max(longest, len);
    }
    const bool parallel = work * KVH * G * D >= (1 << 18);
    // Few (sequence, KV head) tasks (one long chat: SmolLM2 has 3, Gemma 1) leave threads idle:
    // then each task's keys are split in S parts of >= 128 keys, each part's softmax is kept
    // unnormalized (its max m, sum l, output O), and the parts are merged at the end.
    const int64_t threads = at::get_num_threads();
    const int64_t S = !parallel || B * KVH >= 2 * threads ? 1
        : std::max<int64_t>(1, std::min<int64_t>((2 * threads + B * KVH - 1) / (B * KVH), longest / 128));
    std::vector<float> part_o(S > 1 ? B * KVH * S * G * D : 0), part_ml(S > 1 ? B * KVH * S * G * 2 : 0);
    auto body = [&](int64_t t0, int64_t t1) {
        std::vector<float> scores(G * stride), qs(G * D), denom(G);
        auto keys_of = [&](int64_t t, int64_t& b, int64_t& kvh, int64_t& k0, int64_t& k1) {
            const int64_t bk = t / S, part = t % S;
            b = bk / KVH;
            kvh = bk % KVH;
            const int64_t n = lens[b], start = window > 0 ? std::max<int64_t>(0, n - window) : 0;
            const int64_t chunk = ((n - start + S - 1) / S + VL - 1) / VL * VL;
            k0 = std::min(n, start + part * chunk);
            k1 = std::min(n, k0 + chunk);
        };
        int64_t next_b = 0, next_kvh = 0, next_j = 0, next_end = 0;    // the next task's keys to request
        for (int64_t t = t0; t < t1; ++t) {
            int64_t b, kvh, k0, k1;
            keys_of(t, b, kvh, k0, k1);
            const int64_t len = k1 - k0;
            if (t + 1 < t1) {                                 // the next task's first keys
                int64_t nb_, nkvh, nk0, nk1;
                keys_of(t + 1, nb_, nkvh, nk0, nk1);
                for (int64_t j = nk0; j < std::min(nk1, nk0 + PF_KEYS); ++j)
                    prefetch_values(kp + (slots[nb_ * L + j] * KVH + nkvh) * D, D);
                next_b = nb_;
                next_kvh = nkvh;
                next_j = std::min(nk1, nk0 + PF_KEYS);
                next_end = nk1;
            } else {
                next_j = next_end = 0;
            }
            // the rest of the next task's keys and values, requested into L2 a share per group of
            // VL keys of this task's scores (with the four-key scores below, a 32-sequence,
            // 18-layer Gemma step's attention from memory 2.26-2.45 -> 1.91-1.94 ms; SmolLM2's 30
            // layers 2.34-2.44 -> 1.78-1.84) and of each pass over its values: requested during
            // the scores alone, twice as fast as the memory delivers them, the reads did not
            // overlap the arithmetic (32 Gemma-shaped sequences of 430 keys from memory, 18
            // layers: 9.9-10.8 -> 9.1-9.4 ms; SmolLM2-shaped 6.3-7.4 -> 6.0-6.7 ms; switched in one
            // process: SmolLM2 decoding after 1800 tokens x1.02-1.05, Gemma 32 x 400 tokens x1.03)
            const int64_t groups = std::max<int64_t>(1, (len + VL - 1) / VL);
            const int64_t ticks = groups * (1 + (D % (4 * VL) == 0 ? D / (4 * VL) : 0));
            const int64_t next_per = (next_end - next_j + ticks - 1) / ticks;
            auto request_next = [&]() {
                for (const int64_t e = std::min(next_end, next_j + next_per); next_j < e; ++next_j) {
                    const int64_t at = (slots[next_b * L + next_j] * KVH + next_kvh) * D;
                    for (int64_t o = 0; o < D * int64_t(sizeof(KT)); o += 64) {
                        _mm_prefetch(reinterpret_cast<const char*>(kp + at) + o, _MM_HINT_T1);
                        _mm_prefetch(reinterpret_cast<const char*>(vp + at) + o, _MM_HINT_T1);
                    }
                }
            };
            const float* qv = qp + (b * H + kvh * G) * D;     // the G query heads of this KV head
            float* ov = S > 1 ? part_o.data() + t * G * D : op + (b * H + kvh * G) * D;
            float* ml = S > 1 ? part_ml.data() + t * G * 2 : nullptr;
            if (len == 0) {                                   // an empty part: weight 0 in the merge
                for (int64_t g = 0; g < G; ++g) { ml[2 * g] = -INFINITY; ml[2 * g + 1] = 0.f; }
                std::fill(ov, ov + G * D, 0.f);
                continue;
            }
            for (int64_t i = 0; i < G * D; ++i) qs[i] = qv[i] * float(scale);
            for (int64_t j0 = k0; j0 < k1; j0 += VL) {
                request_next();
                const int nk = int(std::min<int64_t>(VL, k1 - j0));
                const KT* kr[VL];
                for (int l = 0; l < nk; ++l) kr[l] = kp + (slots[b * L + j0 + l] * KVH + kvh) * D;
                for (int64_t j = j0 + PF_KEYS; j < std::min(k1, j0 + PF_KEYS + VL); ++j)
                    prefetch_values(kp + (slots[b * L + j] * KVH + kvh) * D, D);
                if (j0 + VL >= k1)                 // the last keys: the first values next
                    for (int64_t j = k0; j < std::min(k1, k0 + PF_KEYS); ++j)
                        prefetch_values(vp + (slots[b * L + j] * KVH + kvh) * D, D);
                // up to four query heads at a time: each key vector is loaded (and converted from
                // float16) once for them, not once per head
                for (int64_t g0 = 0; g0 < G; g0 += 4) {
                    auto heads = [&](auto ghc) {
                        constexpr int GH = decltype(ghc)::value;
                        const float* qg = qs.data() + g0 * D;
                        vf part_v[GH][VL];
                        // SK keys at a time, each query vector loaded once for them (one key at a
                        // time loaded GH query vectors per key vector: 20 loads per 16 FMAs; four
                        // keys: the cached 18-layer step 1.13 -> 0.93 ms); keys past nk repeat the last
                        for (int l0 = 0; l0 < nk; l0 += SK) {
                            const KT* ks[SK];
                            for (int e = 0; e < SK; ++e) ks[e] = kr[std::min(l0 + e, nk - 1)];
                            vf acc[SK][GH];
                            for (int e = 0; e < SK; ++e) for (int h = 0; h < GH; ++h) acc[e][h] = vzero();
                            for (int64_t d = 0; d < D; d += VL) {
                                vf qv[GH];
                                for (int h = 0; h < GH; ++h) qv[h] = vload(qg + h * D + d);
                                for (int e = 0; e < SK; ++e) {
                                    const vf kv = vload(ks[e] + d);
                                    for (int h = 0; h < GH; ++h) acc[e][h] = vfma(qv[h], kv, acc[e][h]);
                                }
                            }
                            for (int e = 0; e < SK; ++e) for (int h = 0; h < GH; ++h) part_v[h][l0 + e] = acc[e][h];
                        }
                        for (int l = nk; l < VL; ++l) for (int h = 0; h < GH; ++h) part_v[h][l] = vzero();
                        for (int h = 0; h < GH; ++h) vstore(scores.data() + (g0 + h) * stride + (j0 - k0), sum_each(part_v[h]));
                    };
                    switch (std::min<int64_t>(4, G - g0)) {
                        case 1: heads(std::integral_constant<int, 1>{}); break;
                        case 2: heads(std::integral_constant<int, 2>{}); break;
                        case 3: heads(std::integral_constant<int, 3>{}); break;
                        default: heads(std::integral_constant<int, 4>{}); break;
                    }
                }
            }
            const int64_t full = (len + VL - 1) / VL * VL;
            for (int64_t g = 0; g < G; ++g) {
                float* sc = scores.data() + g * stride;
                for (int64_t j = len; j < full; ++j) sc[j] = -INFINITY;
                vf mx = vload(sc);
                for (int64_t j = VL; j < full; j += VL) mx = vmax(mx, vload(sc + j));
                const float mmax = vhmax(mx);
                const vf m = vset1(mmax);
                for (int64_t j = 0; j < full; j += VL) vstore(sc + j, vexp(vsub(vload(sc + j), m)));
                for (int64_t j = len; j < full; ++j) sc[j] = 0.f;      // exp clamps: padding exactly 0
                float sum = 0.f;
                for (int64_t j = 0; j < full; j += VL) sum += vhsum(vload(sc + j));
                denom[g] = sum;
                if (ml) { ml[2 * g] = mmax; ml[2 * g + 1] = sum; }
            }
            // out_g = sum_j p_gj v_j (divided by the sum unless parts are merged later): up to four
            // heads x four vectors of output held in registers over all keys, each value row loaded
            // once for them (one head at a time, the four accumulators' FMA latency set the pace)
            int64_t g_done = 0;
            if (D % (4 * VL) == 0) {
                for (; g_done < G; g_done += 4) {
                    const int gh = int(std::min<int64_t>(4, G - g_done));
                    auto tile = [&](auto ghc) {
                        constexpr int GH = decltype(ghc)::value;
                        const float* pg[GH];
                        vf inv[GH];
                        for (int h = 0; h < GH; ++h) {
                            pg[h] = scores.data() + (g_done + h) * stride - k0;
                            inv[h] = vset1(ml ? 1.f : 1.f / denom[g_done + h]);
                        }
                        for (int64_t i0 = 0; i0 < D; i0 += 4 * VL) {
                            vf acc[GH][4];
                            for (int h = 0; h < GH; ++h) for (int v = 0; v < 4; ++v) acc[h][v] = vzero();
                            for (int64_t jb = k0; jb < k1; jb += VL) {
                                if (g_done == 0) request_next();   // the passes `ticks` counts
                                for (int64_t jj = jb, je = std::min(k1, jb + VL); jj < je; ++jj) {
                                    const KT* vv = vp + (slots[b * L + jj] * KVH + kvh) * D + i0;
                                    if (i0 == 0 && jj + PF_KEYS < k1)
                                        prefetch_values(vp + (slots[b * L + jj + PF_KEYS] * KVH + kvh) * D, D);
                                    vf x[4];
                                    for (int v = 0; v < 4; ++v) x[v] = vload(vv + v * VL);
                                    for (int h = 0; h < GH; ++h) {
                                        const vf p = vset1(pg[h][jj]);
                                        for (int v = 0; v < 4; ++v) acc[h][v] = vfma(p, x[v], acc[h][v]);
                                    }
                                }
                            }
                            for (int h = 0; h < GH; ++h)
                                for (int v = 0; v < 4; ++v) vstore(ov + (g_done + h) * D + i0 + v * VL, vmul(acc[h][v], inv[h]));
                        }
                    };
                    one_to_four(gh, tile);
                }
            }
            for (int64_t g = g_done; g < G; ++g) {     // head dims not a multiple of four vectors
                const float* pg = scores.data() + g * stride - k0;
                const vf inv = vset1(ml ? 1.f : 1.f / denom[g]);
                for (int64_t i0 = 0; i0 < D; i0 += 4 * VL) {
                    const int nv = int(std::min<int64_t>(4, (D - i0) / VL));
                    vf acc[4] = {vzero(), vzero(), vzero(), vzero()};
                    for (int64_t jj = k0; jj < k1; ++jj) {
                        const KT* vv = vp + (slots[b * L + jj] * KVH + kvh) * D + i0;
                        const vf p = vset1(pg[jj]);
                        for (int v = 0; v < nv; ++v) acc[v] = vfma(p, vload(vv + v * VL), acc[v]);
                    }
                    for (int v = 0; v < nv; ++v) vstore(ov + g * D + i0 + v * VL, vmul(acc[v], inv));
                }
            }
        }
    };
    if (parallel) at::parallel_for(0, B * KVH * S, 1, body);
    else body(0, B * KVH * S);
    if (S > 1) {   // merge: out = sum_s e^{m_s - m} O_s / sum_s e^{m_s - m} l_s
        for (int64_t bk = 0; bk < B * KVH; ++bk)
            for (int64_t g = 0; g < G; ++g) {
                float m = -INFINITY, l = 0.f;
                for (int64_t p = 0; p < S; ++p) m = std::max(m, part_ml[((bk * S + p) * G + g) * 2]);
                float* dst = op + ((bk / KVH) * H + (bk % KVH) * G + g) * D;
                std::fill(dst, dst + D, 0.f);
                for (int64_t p = 0; p < S; ++p) {
                    const float* mlp = part_ml.data() + ((bk * S + p) * G + g) * 2;
                    if (mlp[1] == 0.f) continue;
                    const float wgt = std::exp(mlp[0] - m);
                    l += wgt * mlp[1];
                    const float* src = part_o.data() + ((bk * S + p) * G + g) * D;
                    for (int64_t d = 0; d < D; ++d) dst[d] += wgt * src[d];
                }
                for (int64_t d = 0; d < D; ++d) dst[d] /= l;
            }
    }
    return out;
}


// The caches hold float32 or float16 (converted to float32 as loaded: decode attention reads
// every key and value of every sequence once a step and is bound by that traffic).
torch::Tensor paged_attention_decode(torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                                     torch::Tensor gather_slots, torch::Tensor context_lens,
                                     double scale, int64_t window) {
    check_caches(k_cache, v_cache);
    if (k_cache.scalar_type() == torch::kHalf)
        return attention_decode<c10::Half>(q, k_cache, v_cache, gather_slots, context_lens, scale, window);
    return attention_decode<float>(q, k_cache, v_cache, gather_slots, context_lens, scale, window);
}

// g = act(g) * u in place, one pass: SiLU (Llama) or GELU with tanh (Gemma), act_of. ATen took
// two ops (and for a decode row, two
// dispatches that cost more than the arithmetic). g may be a column slice of a wider matrix (rows strided, each row
// contiguous): the prefill MLP computes up's output a slice of columns at a time into u. A tail
// shorter than a vector goes through the vector code too, padded, so that a value's result
// does not depend on where a slice or a thread's range ends.
void act_mul_(torch::Tensor g, torch::Tensor u, bool gelu) {
    TORCH_CHECK(g.dtype() == torch::kFloat32 && u.dtype() == torch::kFloat32 && u.is_contiguous() &&
                g.sizes() == u.sizes() && (g.is_contiguous() || (g.dim() == 2 && g.stride(1) == 1)),
                "act_mul_: g and u must be float32 of one shape, u contiguous, g contiguous or rows of a wider matrix");
    auto vec = [gelu](float* gp, const float* up) { vstore(gp, vmul(act_of(vload(gp), gelu), vload(up))); };
    auto run = [&vec](float* gp, const float* up, int64_t i, int64_t i1) {
        for (; i + VL <= i1; i += VL) vec(gp + i, up + i);
        if (i < i1) {
            float gb[VL] = {}, ub[VL] = {};
            std::memcpy(gb, gp + i, (i1 - i) * sizeof(float));
            std::memcpy(ub, up + i, (i1 - i) * sizeof(float));
            vec(gb, ub);
            std::memcpy(gp + i, gb, (i1 - i) * sizeof(float));
        }
    };
    float* gp = g.data_ptr<float>();
    const float* up = u.data_ptr<float>();
    if (g.is_contiguous()) {
        const int64_t n = g.numel();
        auto body = [&](int64_t i0, int64_t i1) { run(gp, up, i0, i1); };
        if (n < (1 << 15)) body(0, n); else at::parallel_for(0, n, 1 << 13, body);
        return;
    }
    const int64_t rows = g.size(0), cols = g.size(1), ld = g.stride(0);
    at::parallel_for(0, rows, std::max<int64_t>(1, (1 << 13) / std::max<int64_t>(cols, 1)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) run(gp + r * ld, up + r * cols, 0, cols);
    });
}

#ifdef JISU_AVX512
// act(h W_gate^T) * (h W_up^T) [M, d_ff] for many rows, h [M, K] rounded to int16 once (Rounded): the
// gate's GEMM into the result, then up's, whose tiles turn each result value g into act(g) u as
// they store u (act_mul_'s arithmetic, so its numbers). Up's output once took a buffer of 512
// columns at a time and a pass of act_mul_ after each: a parallel region and a pass over g each,
// 1.9% of SmolLM2's 512-token prefill for act_mul_ alone.
torch::Tensor gated_ffn_i16(torch::Tensor h, torch::Tensor w_gate, torch::Tensor w_up, int64_t qtype_gate, int64_t qtype_up,
                            int64_t K, bool gelu) {
    TORCH_CHECK(h.dtype() == torch::kFloat32 && h.dim() == 2 && h.size(1) == K && K % 32 == 0 && h.size(0) > 0,
                "gated_ffn_i16: h must be float32 [M > 0, K], K a multiple of 32");
    TORCH_CHECK(w_gate.size(0) == w_up.size(0), "gated_ffn_i16: gate and up must have the same rows");
    h = h.contiguous();
    const int64_t M = h.size(0);
    const Rounded xr(std::move(h), M, K, {qtype_gate, qtype_up});
    h.reset();        // freed here where the caller passed it moved (decode_block)
    auto g = gemm_i16_xq(xr, M, {w_gate}, {qtype_gate}, K)[0];
    gemm_i16_xq(xr, M, {w_up}, {qtype_up}, K, &g, gelu ? 1 : 0);
    return g;
}
#endif

// y = a + b over n floats (y may be a or b)
inline void add_row(const float* ap, const float* bp, float* yp, int64_t n) {
    int64_t i = 0;
    for (; i + VL <= n; i += VL) vstore(yp + i, vadd(vload(ap + i), vload(bp + i)));
    for (; i < n; ++i) yp[i] = ap[i] + bp[i];
}

// one position's heads [heads, D] rotated in place by its cos/sin table rows c, s [D/2]
inline void rope_row(float* xp, int64_t heads, int64_t D, const float* c, const float* s, bool interleaved) {
    const int64_t half = D / 2;
    for (int64_t h = 0; h < heads; ++h) {
        float* v = xp + h * D;
        for (int64_t i = 0; i < half; ++i) {
            float* a = interleaved ? v + 2 * i : v + i;
            float* b = interleaved ? v + 2 * i + 1 : v + i + half;
            const float x0 = *a, x1 = *b;
            *a = x0 * c[i] - x1 * s[i];
            *b = x0 * s[i] + x1 * c[i];
        }
    }
}

// RoPE's tables (cos/sin [max_len, half], contiguous, one shape) and that each of the n positions
// has its row: the tables grow with the context (Rotary.reserve)
void check_rope_tables(const torch::Tensor& cos, const torch::Tensor& sin, int64_t half, const int64_t* pos,
                       int64_t n, const char* who) {
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.size(1) == half && sin.sizes() == cos.sizes(),
                who, ": bad cos/sin tables");
    for (int64_t r = 0; r < n; ++r)
        TORCH_CHECK(pos[r] >= 0 && pos[r] < cos.size(0), who, ": position ", pos[r], " outside the ",
                    cos.size(0), "-row cos/sin tables");
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
    TORCH_CHECK(k.size(3) == D && positions.numel() == B * T, "rope_: shape mismatch");
    const int64_t* pos = positions.data_ptr<int64_t>();
    check_rope_tables(cos, sin, half, pos, B * T, "rope_");
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    for (torch::Tensor* x : {&q, &k}) {
        const int64_t heads = x->size(2);
        float* xp = x->data_ptr<float>();
        auto body = [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r)            // r = b * T + t
                rope_row(xp + r * heads * D, heads, D, cp + pos[r] * half, sp + pos[r] * half, interleaved);
        };
        if (B * T * (q.size(-2) + k.size(-2)) * D < (1 << 16)) body(0, B * T); else at::parallel_for(0, B * T, 16, body);
    }
}

// one row of width floats into slot `slot` of a float32 (cf) or float16 (ch) cache
inline void write_row(float* cf, c10::Half* ch, int64_t slot, const float* src, int64_t width) {
    if (cf) {
        std::memcpy(cf + slot * width, src, sizeof(float) * width);
        return;
    }
    // round to nearest even, as c10::Half does (its scalar conversion took ~2% of a 32-row step)
    c10::Half* dst = ch + slot * width;
    int64_t i = 0;
    for (; i + 8 <= width; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < width; ++i) dst[i] = c10::Half(src[i]);
}

// a new key and value row into slot `slot` of a float32 or float16 cache pair (rows of `width`)
struct KVWriter {
    float *kf, *vf;
    c10::Half *kh, *vh;
    int64_t width;
    KVWriter(const torch::Tensor& k_cache, const torch::Tensor& v_cache) : width(k_cache.numel() / k_cache.size(0)) {
        const bool half = k_cache.scalar_type() == torch::kHalf;
        kf = half ? nullptr : k_cache.data_ptr<float>();
        vf = half ? nullptr : v_cache.data_ptr<float>();
        kh = half ? static_cast<c10::Half*>(k_cache.data_ptr()) : nullptr;
        vh = half ? static_cast<c10::Half*>(v_cache.data_ptr()) : nullptr;
    }
    void operator()(int64_t slot, const float* k, const float* v) const {
        write_row(kf, kh, slot, k, width);
        write_row(vf, vh, slot, v, width);
    }
};

// k_cache[slots[i]] = k[i], v_cache[slots[i]] = v[i] for the N new rows k, v [N, KVH, D] (float32),
// converted to the caches' type as write_row does: one pass where ATen took a conversion and an
// index_copy_ for each (Gemma's 512-token prefill: ~50 us a layer for keys alone)
void write_kv_(torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slots, torch::Tensor k, torch::Tensor v) {
    check_caches(k_cache, v_cache);
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() && k_cache.dim() == 3,
                "write_kv_: caches must be contiguous [S, KVH, D] of one shape");
    const int64_t S = k_cache.size(0), width = k_cache.size(1) * k_cache.size(2), N = slots.numel();
    TORCH_CHECK(slots.dtype() == torch::kInt64, "write_kv_: slots must be int64");
    TORCH_CHECK(k.dtype() == torch::kFloat32 && v.dtype() == torch::kFloat32 && k.numel() == N * width && v.numel() == N * width,
                "write_kv_: k and v must be float32 with ", N, " rows of ", width);
    slots = slots.reshape(-1).contiguous();
    k = k.contiguous();
    v = v.contiguous();
    const int64_t* sp = slots.data_ptr<int64_t>();
    for (int64_t i = 0; i < N; ++i) TORCH_CHECK(0 <= sp[i] && sp[i] < S, "write_kv_: slot ", sp[i], " out of 0..", S - 1);
    const KVWriter write(k_cache, v_cache);
    const float* kp = k.data_ptr<float>();
    const float* vp = v.data_ptr<float>();
    auto body = [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) write(sp[i], kp + i * width, vp + i * width);
    };
    if (N * width < (1 << 15)) body(0, N); else at::parallel_for(0, N, 16, body);
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
                           bool gemma, int64_t digits, torch::Tensor h = {}, const torch::Tensor* next_norm = nullptr,
                           double next_eps = 0.0, torch::Tensor* h_next = nullptr, const torch::Tensor* key_slots = nullptr) {
    TORCH_CHECK(x.dim() == 2 && w.size() == 7 && qtypes.size() == 7 && norms.size() == (gemma ? 6u : 2u),
                "decode_block: x [B, D], 7 weights, 2 (llama) or 6 (gemma) norms");
    const int64_t B = x.size(0), D = x.size(1), HD = n_heads * head_dim;
    // matrices `idx` reading the same input, which is rounded once for all of them: y_i [B, N_i]
    auto lin = [&](torch::Tensor in, std::vector<int> idx, int64_t K) {
        std::vector<torch::Tensor> ws;
        std::vector<int64_t> ts;
        for (int i : idx) { ws.push_back(w[i]); ts.push_back(qtypes[i]); }
        return linear_rows(std::move(in), ws, ts, B, K, digits);
    };
    x = x.contiguous();
    if (!h.defined()) h = rms_norm(x, norms[0], eps);   // else the previous block's last stretch computed it
    TORCH_CHECK(h.is_contiguous() && h.sizes() == x.sizes() && h.dtype() == torch::kFloat32, "decode_block: h must be x's normed rows");
    auto qkv = lin(std::move(h), {0, 1, 2}, D);     // h freed once rounded (or split in place for AMX)
    // The steps between the matrices work row by row, one stretch at a time (norms, RoPE and cache
    // writes; norm, residual and norm; norm, residual and the next block's norm), each row through
    // the same row functions as rms_norm and rope_; from 8 rows a stretch is one parallel region.
    // Op by op they were below those ops' thresholds and ran on one thread: 0.6-1.3 ms of a 32-row
    // Gemma step.
    const int64_t KW = n_kv_heads * head_dim, half = head_dim / 2;
    for (int i = 0; i < 3; ++i)
        TORCH_CHECK(qkv[i].is_contiguous() && qkv[i].size(0) == B, "decode_block: q/k/v rows");
    TORCH_CHECK(qkv[0].size(1) == HD && qkv[1].size(1) == KW && qkv[2].size(1) == KW, "decode_block: q/k/v widths");
    check_caches(k_cache, v_cache);
    TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous() && k_cache.sizes() == v_cache.sizes() &&
                k_cache.numel() / k_cache.size(0) == KW, "decode_block: caches must be contiguous rows of k's width");
    for (size_t i = 1; i < norms.size(); ++i)
        TORCH_CHECK(norms[i].is_contiguous() && norms[i].dtype() == torch::kFloat32 &&
                    norms[i].numel() == (i == 2 || i == 3 ? head_dim : D), "decode_block: norm ", i, " has the wrong size");
    const auto pos_t = positions.contiguous(), slot_t = slot_mapping.contiguous();
    TORCH_CHECK(pos_t.numel() == B && slot_t.numel() == B && slot_t.dtype() == torch::kLong, "decode_block: one position and slot per row");
    const int64_t* pos = pos_t.data_ptr<int64_t>();
    const int64_t* slot = slot_t.data_ptr<int64_t>();
    check_rope_tables(cos, sin, half, pos, B, "decode_block");
    for (int64_t b = 0; b < B; ++b)
        TORCH_CHECK(slot[b] >= 0 && slot[b] < k_cache.size(0), "decode_block: slot ", slot[b], " outside the cache");
    auto rows = [&](auto&& f) {
        auto body = [&](int64_t r0, int64_t r1) { for (int64_t r = r0; r < r1; ++r) f(r); };
        if (B >= 8) at::parallel_for(0, B, 4, body);
        else body(0, B);
    };
    const KVWriter write_kv(k_cache, v_cache);
    auto norm_w = [&](size_t i) { return gemma || i < 2 ? norms[i].data_ptr<float>() : nullptr; };
    const float *w_ffn = norm_w(1), *w_q = norm_w(2), *w_k = norm_w(3), *w_post_attn = norm_w(4), *w_post_ffw = norm_w(5);
    float* qp = qkv[0].data_ptr<float>();
    float* kp = qkv[1].data_ptr<float>();
    const float* vp = qkv[2].data_ptr<float>();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    rows([&](int64_t b) {
        float* qb = qp + b * HD;
        float* kb = kp + b * KW;
        if (gemma) {
            for (int64_t i = 0; i < n_heads; ++i) rms_row(qb + i * head_dim, w_q, qb + i * head_dim, head_dim, eps);
            for (int64_t i = 0; i < n_kv_heads; ++i) rms_row(kb + i * head_dim, w_k, kb + i * head_dim, head_dim, eps);
        }
        rope_row(qb, n_heads, head_dim, cp + pos[b] * half, sp + pos[b] * half, interleaved);
        rope_row(kb, n_kv_heads, head_dim, cp + pos[b] * half, sp + pos[b] * half, interleaved);
        write_kv(slot[b], kb, vp + b * KW);
    });
    // key_slots: the rows are one prompt's new tokens (prefill_layers), attending causally
    auto a = key_slots ? paged_attention_prefill(qkv[0].view({B, n_heads, head_dim}), k_cache, v_cache, *key_slots,
                                                 positions, scale, window, true)
                       : paged_attention_decode(qkv[0].view({B, n_heads, head_dim}), k_cache, v_cache, decode_slots,
                                                decode_lens, scale, window);
    // Each intermediate is released once read and the residual sums are made in place, as in the
    // Python block (x1 in o, y in d): a 512-token prompt's peak RSS was 5-10 MB higher with
    // fresh tensors for them (glibc's heap keeps freed blocks, see llm._keep_freed_memory).
    qkv.clear();
    torch::Tensor av = a.view({B, HD});
    a.reset();
    auto x1 = lin(std::move(av), {3}, HD)[0].contiguous();     // o, then x + o
    h = torch::empty_like(x);
    const float* xp = x.data_ptr<float>();
    float* x1p = x1.data_ptr<float>();
    float* hp = h.data_ptr<float>();
    rows([&](int64_t b) {
        if (gemma) rms_row(x1p + b * D, w_post_attn, x1p + b * D, D, eps);
        add_row(xp + b * D, x1p + b * D, x1p + b * D, D);
        rms_row(x1p + b * D, w_ffn, hp + b * D, D, eps);
    });
    x.reset();       // the callers pass it moved
    torch::Tensor g;
#ifdef JISU_AVX512
    // a prompt's rows as the Python block's gated_ffn (one [B, d_ff] tensor, not two); decode rows
    // take gate and up in one parallel region (lin), fewer regions for a step's few rows. The
    // same numbers either way.
    // (h and g go once rounded to codes: a prompt's FFN held both beside the codes)
    if (key_slots && digits > 0 && B >= GEMM_MIN_ROWS) g = gated_ffn_i16(std::move(h), w[4], w[5], qtypes[4], qtypes[5], D, gemma);
#endif
    if (!g.defined()) {
        auto gu = lin(h, {4, 5}, D);
        g = gu[0].contiguous();
        act_mul_(g, gu[1].contiguous(), gemma);
    }
    h.reset();
    const int64_t d_ff = g.size(1);
    auto y = lin(std::move(g), {6}, d_ff)[0].contiguous();           // d, then x1 + d (g freed once rounded)
    float* yp = y.data_ptr<float>();
    // and the next block's first norm (its input's), from the same rows while they are at hand
    float* hn = nullptr;
    const float* w_next = nullptr;
    if (next_norm) {
        TORCH_CHECK(next_norm->is_contiguous() && next_norm->dtype() == torch::kFloat32 && next_norm->numel() == D,
                    "decode_block: the next block's norm has the wrong size");
        *h_next = torch::empty_like(x1);
        hn = h_next->data_ptr<float>();
        w_next = next_norm->data_ptr<float>();
    }
    rows([&](int64_t b) {
        if (gemma) rms_row(yp + b * D, w_post_ffw, yp + b * D, D, eps);
        add_row(x1p + b * D, yp + b * D, yp + b * D, D);
        if (hn) rms_row(yp + b * D, w_next, hn + b * D, D, next_eps);
    });
    return y;
}

// A block's fixed arguments to decode_block, held on the C++ side so that a decode step passes
// only what changes per step (slots, lengths, positions, rotary tables): decode_layers runs
// every block in one call. Per block through Python, the call and its ~25 converted arguments
// cost ~6 us, 0.2 ms of SmolLM2's ~4 ms step.
struct DecodeLayer {
    std::vector<torch::Tensor> w, norms;
    std::vector<int64_t> qtypes;
    int64_t n_heads, n_kv_heads, head_dim;
    double eps;
    torch::Tensor k_cache, v_cache;
    int64_t group, rotary;     // which KV group's slots and which rotary table the block uses
    bool interleaved;
    double scale;
    int64_t window;
    bool gemma;
    int64_t digits;
};

std::shared_ptr<DecodeLayer> decode_layer(std::vector<torch::Tensor> w, std::vector<int64_t> qtypes,
                                          std::vector<torch::Tensor> norms, int64_t n_heads, int64_t n_kv_heads,
                                          int64_t head_dim, double eps, torch::Tensor k_cache, torch::Tensor v_cache,
                                          int64_t group, int64_t rotary, bool interleaved, double scale, int64_t window,
                                          bool gemma, int64_t digits) {
    return std::make_shared<DecodeLayer>(DecodeLayer{std::move(w), std::move(norms), std::move(qtypes), n_heads, n_kv_heads,
                                                     head_dim, eps, k_cache, v_cache, group, rotary, interleaved, scale,
                                                     window, gemma, digits});
}

// The blocks in order through decode_block, each block's last stretch also norming the next
// block's input. group_slots[g]: decode rows' key slots (decode_lens keys each), or with
// `prefill` one prompt's key slots (positions 0 .. L - 1) for paged_attention_prefill.
torch::Tensor block_stack(torch::Tensor x, const std::vector<std::shared_ptr<DecodeLayer>>& layers,
                          const std::vector<torch::Tensor>& slot_mappings, const std::vector<torch::Tensor>& group_slots,
                          torch::Tensor decode_lens, torch::Tensor positions, const std::vector<torch::Tensor>& cos,
                          const std::vector<torch::Tensor>& sin, bool prefill, const char* who) {
    for (const auto& l : layers) {
        TORCH_CHECK(l->group >= 0 && l->group < int64_t(slot_mappings.size()) && l->group < int64_t(group_slots.size()) &&
                    l->rotary >= 0 && l->rotary < int64_t(cos.size()) && l->rotary < int64_t(sin.size()),
                    who, ": a layer's group or rotary index is out of range");
    }
    torch::Tensor h, none;     // h: the next block's normed input, computed with the block before it
    for (size_t i = 0; i < layers.size(); ++i) {
        const auto& l = layers[i];
        const DecodeLayer* next = i + 1 < layers.size() ? layers[i + 1].get() : nullptr;
        const torch::Tensor& slots = group_slots[l->group];
        torch::Tensor h_next;
        x = decode_block(std::move(x), l->w, l->qtypes, l->norms, l->n_heads, l->n_kv_heads, l->head_dim, l->eps, l->k_cache,
                         l->v_cache, slot_mappings[l->group], prefill ? none : slots, decode_lens, positions,
                         cos[l->rotary], sin[l->rotary], l->interleaved, l->scale, l->window, l->gemma, l->digits,
                         std::move(h), next ? &next->norms[0] : nullptr, next ? next->eps : 0.0, &h_next,
                         prefill ? &slots : nullptr);
        h = h_next;
    }
    return x;
}

torch::Tensor decode_layers(torch::Tensor x, const std::vector<std::shared_ptr<DecodeLayer>>& layers,
                            const std::vector<torch::Tensor>& slot_mappings, const std::vector<torch::Tensor>& decode_slots,
                            torch::Tensor decode_lens, torch::Tensor positions, const std::vector<torch::Tensor>& cos,
                            const std::vector<torch::Tensor>& sin) {
    return block_stack(std::move(x), layers, slot_mappings, decode_slots, decode_lens, positions, cos, sin, false,
                       "decode_layers");
}

// decode_layers for one prompt's new tokens x [T, D] (a prefill chunk, no decode rows): every
// block's attention through paged_attention_prefill over key_slots[group] (the sequence's keys,
// positions 0 .. L - 1) at `positions` [T]. The Python blocks run the same kernels in the same
// order (the same numbers, tested); one call spares ~15 dispatches a block.
torch::Tensor prefill_layers(torch::Tensor x, const std::vector<std::shared_ptr<DecodeLayer>>& layers,
                             const std::vector<torch::Tensor>& slot_mappings, const std::vector<torch::Tensor>& key_slots,
                             torch::Tensor positions, const std::vector<torch::Tensor>& cos,
                             const std::vector<torch::Tensor>& sin) {
    return block_stack(std::move(x), layers, slot_mappings, key_slots, torch::Tensor(), positions, cos, sin, true,
                       "prefill_layers");
}

// Index of the first maximum of n > 0 floats (torch.argmax's answer), -1 if there is a NaN
// (the caller then asks torch). torch's own argmax takes ~0.28 ms over Gemma's 262k logits
// here, this one pass ~0.03 ms.
int64_t first_max(const float* p, int64_t n) {
    // one pass: each lane keeps its largest value and where it first saw it (a later equal
    // value does not replace it), then the lanes holding the overall maximum give the least index
    __m256 mv = _mm256_set1_ps(-INFINITY), nan = _mm256_setzero_ps();
    __m256i mi = _mm256_setzero_si256(), idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i eight = _mm256_set1_epi32(8);
    int64_t i = 0;
    for (; i + 8 <= n && i < (int64_t(1) << 31) - 8; i += 8) {
        const __m256 v = _mm256_loadu_ps(p + i);
        const __m256 gt = _mm256_cmp_ps(v, mv, _CMP_GT_OQ);
        mv = _mm256_blendv_ps(mv, v, gt);
        mi = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(mi), _mm256_castsi256_ps(idx), gt));
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        idx = _mm256_add_epi32(idx, eight);
    }
    if (_mm256_movemask_ps(nan)) return -1;
    alignas(32) float lanes[8];
    alignas(32) int32_t where[8];
    _mm256_store_ps(lanes, mv);
    _mm256_store_si256(reinterpret_cast<__m256i*>(where), mi);
    float m = -INFINITY;
    int64_t best = -1;
    for (int j = 0; j < 8; ++j)
        if (lanes[j] > m || (lanes[j] == m && where[j] < best)) { m = lanes[j]; best = where[j]; }
    for (; i < n; ++i) {
        if (std::isnan(p[i])) return -1;
        if (p[i] > m) { m = p[i]; best = i; }
    }
    return best < 0 ? 0 : best;       // best < 0: every value is -inf, so the first one
}

int64_t argmax(torch::Tensor x) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 1 && x.is_contiguous() && x.numel() > 0,
                "argmax: x must be a non-empty contiguous float32 vector");
    return first_max(x.data_ptr<float>(), x.numel());
}

// argmax of rows `rows` of x [B, V], the rows split over the threads: a greedy step over 32
// sequences of Gemma's 262k vocabulary scans 34 MB (~2 ms on one core). -1 where a row has a NaN.
torch::Tensor argmax_rows(torch::Tensor x, std::vector<int64_t> rows) {
    TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.stride(1) == 1 && x.size(1) > 0,
                "argmax_rows: x must be float32 [B, V] with contiguous rows");
    for (int64_t r : rows) TORCH_CHECK(r >= 0 && r < x.size(0), "argmax_rows: row ", r, " out of range");
    auto out = torch::empty({int64_t(rows.size())}, torch::dtype(torch::kInt64));
    int64_t* o = out.data_ptr<int64_t>();
    const float* p = x.data_ptr<float>();
    const int64_t V = x.size(1), stride = x.stride(0);
    at::parallel_for(0, int64_t(rows.size()), 1, [&](int64_t a, int64_t b) {
        for (int64_t k = a; k < b; ++k) o[k] = first_max(p + rows[k] * stride, V);
    });
    return out;
}

// The ops hold no Python objects while they compute, so they let go of the GIL: the server's
// event loop (another thread) keeps serving while the engine thread is inside a kernel.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    using release = py::call_guard<py::gil_scoped_release>;
#ifdef JISU_AVX512
    m.attr("isa") = "avx512";
#else
    m.attr("isa") = "avx2";
#endif
    m.attr("GEMM_MIN_ROWS") = GEMM_MIN_ROWS;   // qmatmul takes the int16 GEMM from this many rows
#ifdef JISU_AMX
    // AMX builds are AVX-512 builds whose GEMM takes bf16 tiles from AMX_MIN_ROWS rows (where
    // the kernel grants the tile state)
    m.attr("amx") = amx_ready();
    m.attr("AMX_MIN_ROWS") = AMX_MIN_ROWS;
    m.def("set_amx_exact", [](bool exact) { return amx_exact.exchange(exact); });
    m.def("amx_settings", [] { return std::make_tuple(amx_min_rows.load(), amx_exact.load()); },
          "(rows from which the GEMM takes AMX, 0: never; whether it runs three products)");
    m.def("set_amx_min_rows", [](int64_t rows) {
        TORCH_CHECK(rows >= 0, "set_amx_min_rows: rows must be >= 0 (0: off)");
        return amx_min_rows.exchange(rows);
    }, "the GEMM takes AMX tiles from this many rows (0: never); returns the previous value");
#else
    m.attr("amx") = false;
#endif
#ifdef JISU_AVX512
    m.def("gated_ffn_i16", &gated_ffn_i16, "act(h W_gate^T) * (h W_up^T), h rounded to int16 once per code range", release());
    m.def("greedy_rows", &greedy_rows, "argmax of each row of the int16 GEMM x W^T, screened in int8 (-1: undecided)", release());
    m.attr("PANEL_ROWS") = GP;
    m.attr("PANEL_BLOCK_BYTES") = P8_BLOCK;
    m.attr("PANEL_NORMS") = 2 * GP;   // per panel: its columns' |W[n]|, then their |R[n]| (pack_panels)
    m.def("pack_panels", &pack_panels, "Q8_0 rows into panels p0..p1 of out, their columns' norms into norms", release());
    m.def("panel_matmul", &panel_matmul, "columns start..end of x W^T for W in panels", py::arg("x"), py::arg("w"),
          py::arg("N"), py::arg("K"), py::arg("start"), py::arg("end"), py::arg("out") = py::none(), release());
    m.def("panel_rows", &panel_rows, "rows of W in panels, dequantized", release());
    m.def("panel_greedy", &panel_greedy, "argmax of each row of panel_matmul over the first N columns (-1: undecided; "
          "also a row with more than cap candidates, -1: N / 64)", py::arg("x"), py::arg("w"), py::arg("norms"), py::arg("rows"),
          py::arg("N"), py::arg("K"), py::arg("cap") = -1, release());
#endif
    m.def("argmax", &argmax, "index of the first maximum (-1: NaN)", release());
    m.def("argmax_rows", &argmax_rows, "argmax of the given rows, in parallel (-1: NaN)", release());
    m.def("rope_", &rope_, "rotary embedding, in place on q and k", release());
    py::class_<DecodeLayer, std::shared_ptr<DecodeLayer>>(m, "DecodeLayer");
    m.def("decode_layer", &decode_layer, "a block's fixed decode_block arguments");
    m.def("decode_layers", &decode_layers, "every block of a decode step, in order", release());
    m.def("prefill_layers", &prefill_layers, "every block of one prompt chunk's prefill step, in order", release());
    m.def("paged_attention_decode", &paged_attention_decode, "one-token attention through block tables", release());
    m.def("paged_attention_prefill", &paged_attention_prefill,
          "causal attention of one sequence's new tokens through its keys' slots (integer: float16 caches through "
          "int16 products, on AVX-512 builds)", py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("key_slots"),
          py::arg("positions"), py::arg("scale"), py::arg("window"), py::arg("integer") = true, release());
    m.def("qmatmul_many", &qmatmul_many, "x @ dequant(W_i)^T for matrices reading the same x, x rounded once", release());
    m.def("write_kv_", &write_kv_, "new key and value rows into their cache slots", release());
    m.def("rms_norm", &rms_norm, "RMSNorm over the last dimension", release());
    m.def("act_mul_", &act_mul_, "g = silu(g) * u, or gelu_tanh(g) * u, in place", release());
    m.def("qmatmul", &qmatmul, "y = x @ dequant(W)^T for GGUF-quantized W", py::arg("x"), py::arg("w"),
          py::arg("qtype"), py::arg("K"), py::arg("digits") = 0, py::arg("out") = py::none(), release());
    m.def("dequantize", &dequantize, "GGUF blocks -> float32 [N, K]", release());
}
