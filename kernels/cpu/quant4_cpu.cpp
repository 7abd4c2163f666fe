// Native CPU kernels for the bitsandbytes 4-bit format (NF4 / FP4), used by quant/backends/cpu.py.
//
// Plain C ABI over raw pointers (no torch headers), built on first use by kernels/cpu/build.py with
//   g++ -O3 -std=c++17 -fPIC -shared -fopenmp
// and no -march / -ffast-math: every result that must be bit-exact (quantize, dequantize) is computed
// with the same IEEE float32 operations as the PyTorch reference in quant/backends/default.py (ISO
// -std=c++17 also keeps GCC from contracting a * b + c into an FMA).
// Instruction sets beyond the x86-64 baseline live in per-function target attributes and are chosen
// at run time (AVX-512 (+BF16), AVX2+FMA+F16C, portable scalar).
//
// Format (see quant/ops.py): element 2i is the high nibble of byte i, 2i+1 the low nibble; blocks of
// `bs` consecutive elements share one float32 absmax, with flat indexing across rows.
//
// dtype codes: 0 float32, 1 float16, 2 bfloat16.
// Every entry point returns 0 when it did the work and nonzero when it does not handle the case
// (the caller then uses the PyTorch reference).

#include <cstdlib>
#include <limits>

#include "common.h"

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if (defined(__x86_64__) || defined(_M_X64)) && !defined(Q4_NO_X86)
#define Q4_X86 1
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define T512BF __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define T256 __attribute__((target("avx2,fma,f16c")))
// AVX-512-BF16 intrinsics need GCC 10 / clang 11; older compilers build everything else.
#if (defined(__clang__) && __clang_major__ >= 11) || (!defined(__clang__) && __GNUC__ >= 10)
#define Q4_BF16 1
#else
#define Q4_BF16 0
#endif
#else
#define Q4_X86 0
#define Q4_BF16 0
#endif

namespace {

enum { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512BF16 = 3 };

// ------------------------------------------------------------------------------------------------
// CPU feature selection
// ------------------------------------------------------------------------------------------------

int detect_isa() {
#if Q4_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
#if Q4_BF16
        if (__builtin_cpu_supports("avx512bf16")) return ISA_AVX512BF16;
#endif
        return ISA_AVX512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
        return ISA_AVX2;
    }
#endif
    return ISA_SCALAR;
}

const int g_detected_isa = detect_isa();
int g_isa_cap = 99;  // q4_set_isa_cap lowers it (tests exercise every code path)

inline int isa() { return std::min(g_detected_isa, g_isa_cap); }

template <int DT>
inline float load_scalar(const void* p, i64 i) {
    if (DT == DT_F32) return static_cast<const float*>(p)[i];
    if (DT == DT_F16) return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
    return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
}

// ------------------------------------------------------------------------------------------------
// Quantize
// ------------------------------------------------------------------------------------------------

const float kMinDivisor = (float)1e-38;  // torch's clamp(min=1e-38) on a float32 tensor

struct QTables {
    alignas(64) float mid[16];      // 15 sorted midpoints (+ padding, never read as a bound)
    alignas(64) int32_t ord[16];    // sorted position -> code
    alignas(64) uint8_t ord8[32];   // the same as bytes, twice (pshufb tables)
};

// torch.bucketize(right=False): the number of midpoints strictly below s; NaN sorts past all of them.
inline int bucket_scalar(float s, const float* mid) {
    if (s != s) return 15;
    int pos = 0;
    if (mid[pos + 7] < s) pos += 8;
    if (mid[pos + 3] < s) pos += 4;
    if (mid[pos + 1] < s) pos += 2;
    if (mid[pos] < s) pos += 1;
    return pos;
}

inline float clamp_divisor(float absmax) { return std::isnan(absmax) ? absmax : std::max(absmax, kMinDivisor); }

template <int DT>
float block_absmax_scalar(const void* A, i64 s, i64 len) {
    float m = 0.0f;
    bool nan = false;
    for (i64 i = 0; i < len; ++i) {
        float a = std::fabs(load_scalar<DT>(A, s + i));
        nan |= (a != a);
        m = a > m ? a : m;
    }
    return nan ? std::numeric_limits<float>::quiet_NaN() : m;
}

// One block starting at an even element index s (so its bytes are its own).
template <int DT>
void quant_block_scalar(const void* A, i64 s, i64 len, bool full, const QTables& t, uint8_t* out, float* absmax_out) {
    float am = block_absmax_scalar<DT>(A, s, len);
    float d = clamp_divisor(am);
    float inv = 1.0f / d;
    *absmax_out = full ? am : d;
    for (i64 i = 0; i < len; i += 2) {
        float x0 = load_scalar<DT>(A, s + i);
        float s0 = full ? x0 * inv : x0 / d;
        int c0 = t.ord[bucket_scalar(s0, t.mid)];
        int c1;
        if (i + 1 < len) {
            float x1 = load_scalar<DT>(A, s + i + 1);
            float s1 = full ? x1 * inv : x1 / d;
            c1 = t.ord[bucket_scalar(s1, t.mid)];
        } else {
            c1 = t.ord[bucket_scalar(0.0f, t.mid)];  // the 0.0 pad of an odd count
        }
        out[(s + i) >> 1] = (uint8_t)((c0 << 4) | c1);
    }
}

template <int DT>
void quant_blocks_scalar(const void* A, i64 n, i64 bs, i64 b0, i64 b1, const QTables& t, uint8_t* out, float* absmax) {
    for (i64 b = b0; b < b1; ++b) {
        i64 s = b * bs, len = std::min(bs, n - s);
        quant_block_scalar<DT>(A, s, len, len == bs, t, out, absmax + b);
    }
}

#if Q4_X86

template <int DT>
T512 inline __m512 load16_512(const void* A, i64 i) {
    if (DT == DT_F32) return _mm512_loadu_ps(static_cast<const float*>(A) + i);
    if (DT == DT_F16)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(static_cast<const uint16_t*>(A) + i)));
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(static_cast<const uint16_t*>(A) + i)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

// Sorted position (0..15) of 16 scaled values: a 4-step binary search over the midpoints.
T512 inline __m512i bucket16_512(__m512 s, __m512 mids, __m512 mid7) {
    const __m512i one = _mm512_set1_epi32(1), two = _mm512_set1_epi32(2), three = _mm512_set1_epi32(3),
                  four = _mm512_set1_epi32(4);
    __mmask16 m = _mm512_cmp_ps_mask(s, mid7, _CMP_NLE_UQ);  // mid < s, or s is NaN
    __m512i pos = _mm512_maskz_mov_epi32(m, _mm512_set1_epi32(8));
    m = _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(_mm512_add_epi32(pos, three), mids), _CMP_NLE_UQ);
    pos = _mm512_mask_add_epi32(pos, m, pos, four);
    m = _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(_mm512_add_epi32(pos, one), mids), _CMP_NLE_UQ);
    pos = _mm512_mask_add_epi32(pos, m, pos, two);
    m = _mm512_cmp_ps_mask(s, _mm512_permutexvar_ps(pos, mids), _CMP_NLE_UQ);
    pos = _mm512_mask_add_epi32(pos, m, pos, one);
    return pos;
}

// 16 codes (dwords, element order) -> 8 bytes, element 2i in the high nibble.
T512 inline __m128i pack16_512(__m512i c) {
    __m512i p = _mm512_or_si512(_mm512_slli_epi64(c, 4), _mm512_srli_epi64(c, 32));
    return _mm512_cvtepi64_epi8(p);
}

template <int DT>
T512 void quant_blocks_512(const void* A, i64 bs, i64 b0, i64 b1, const QTables& t, uint8_t* out, float* absmax) {
    const __m512 mids = _mm512_load_ps(t.mid);
    const __m512 mid7 = _mm512_set1_ps(t.mid[7]);
    const __m512i ord = _mm512_load_si512((const void*)t.ord);
    for (i64 b = b0; b < b1; ++b) {
        const i64 s = b * bs;
        __m512 mx = _mm512_setzero_ps();
        __mmask16 nan = 0;
        for (i64 i = 0; i < bs; i += 16) {
            __m512 x = load16_512<DT>(A, s + i);
            nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
            mx = _mm512_max_ps(mx, _mm512_abs_ps(x));
        }
        float am = nan ? std::numeric_limits<float>::quiet_NaN() : _mm512_reduce_max_ps(mx);
        absmax[b] = am;
        const __m512 inv = _mm512_set1_ps(1.0f / clamp_divisor(am));
        for (i64 i = 0; i < bs; i += 32) {
            __m512i c0 = bucket16_512(_mm512_mul_ps(load16_512<DT>(A, s + i), inv), mids, mid7);
            __m512i c1 = bucket16_512(_mm512_mul_ps(load16_512<DT>(A, s + i + 16), inv), mids, mid7);
            c0 = _mm512_permutexvar_epi32(c0, ord);
            c1 = _mm512_permutexvar_epi32(c1, ord);
            __m128i bytes = _mm_unpacklo_epi64(pack16_512(c0), pack16_512(c1));
            _mm_storeu_si128((__m128i*)(out + (s + i) / 2), bytes);
        }
    }
}

template <int DT>
T256 inline __m256 load8_256(const void* A, i64 i) {
    if (DT == DT_F32) return _mm256_loadu_ps(static_cast<const float*>(A) + i);
    if (DT == DT_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(static_cast<const uint16_t*>(A) + i)));
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(static_cast<const uint16_t*>(A) + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

// Sorted position of 8 scaled values: count the midpoints below (NaN counts all 15).
T256 inline __m256i bucket8_256(__m256 s, const float* midb /* [15][8] broadcast */) {
    __m256i cnt = _mm256_setzero_si256();
    for (int j = 0; j < 15; ++j) {
        __m256 m = _mm256_cmp_ps(s, _mm256_load_ps(midb + 8 * j), _CMP_NLE_UQ);
        cnt = _mm256_sub_epi32(cnt, _mm256_castps_si256(m));
    }
    return cnt;
}

template <int DT>
T256 void quant_blocks_256(const void* A, i64 bs, i64 b0, i64 b1, const QTables& t, uint8_t* out, float* absmax) {
    alignas(32) float midb[15 * 8];
    for (int j = 0; j < 15; ++j)
        for (int l = 0; l < 8; ++l) midb[8 * j + l] = t.mid[j];
    const __m256i ordtab = _mm256_loadu_si256((const __m256i*)t.ord8);
    const __m256i fix = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256 signmask = _mm256_set1_ps(-0.0f);
    const __m256i lo4 = _mm256_set1_epi16(0x000F);
    for (i64 b = b0; b < b1; ++b) {
        const i64 s = b * bs;
        __m256 mx = _mm256_setzero_ps(), nanacc = _mm256_setzero_ps();
        for (i64 i = 0; i < bs; i += 8) {
            __m256 x = load8_256<DT>(A, s + i);
            nanacc = _mm256_or_ps(nanacc, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(signmask, x));
        }
        alignas(32) float lanes[8];
        _mm256_store_ps(lanes, mx);
        float am = lanes[0];
        for (int l = 1; l < 8; ++l) am = lanes[l] > am ? lanes[l] : am;
        if (_mm256_movemask_ps(nanacc)) am = std::numeric_limits<float>::quiet_NaN();
        absmax[b] = am;
        const __m256 inv = _mm256_set1_ps(1.0f / clamp_divisor(am));
        for (i64 i = 0; i < bs; i += 32) {
            __m256i c0 = bucket8_256(_mm256_mul_ps(load8_256<DT>(A, s + i), inv), midb);
            __m256i c1 = bucket8_256(_mm256_mul_ps(load8_256<DT>(A, s + i + 8), inv), midb);
            __m256i c2 = bucket8_256(_mm256_mul_ps(load8_256<DT>(A, s + i + 16), inv), midb);
            __m256i c3 = bucket8_256(_mm256_mul_ps(load8_256<DT>(A, s + i + 24), inv), midb);
            __m256i bb = _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
            bb = _mm256_permutevar8x32_epi32(bb, fix);   // 32 sorted positions in element order
            bb = _mm256_shuffle_epi8(ordtab, bb);        // -> codes
            __m256i r = _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(bb, lo4), 4), _mm256_srli_epi16(bb, 8));
            r = _mm256_packus_epi16(r, r);
            r = _mm256_permute4x64_epi64(r, 0x08);
            _mm_storeu_si128((__m128i*)(out + (s + i) / 2), _mm256_castsi256_si128(r));
        }
    }
}

#endif  // Q4_X86

template <int DT>
void quantize_impl(const void* A, i64 n, i64 bs, const QTables& t, uint8_t* out, float* absmax, int nt) {
    const i64 nblocks = (n + bs - 1) / bs;
    const i64 nfull = n / bs;
    const int level = isa();
    nt = team_size(n, 1 << 16, nt);
    if (bs % 2 == 0) {
        const bool simd = level >= ISA_AVX2 && bs % 32 == 0;
        const i64 per_task = std::max<i64>(1, 8192 / bs);
        const i64 ntasks = (nblocks + per_task - 1) / per_task;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
        for (i64 task = 0; task < ntasks; ++task) {
            i64 b0 = task * per_task, b1 = std::min(nblocks, b0 + per_task);
            i64 bf = simd ? std::min(b1, nfull) : b0;  // [b0, bf) full blocks for the SIMD kernel
            if (bf > b0) {
#if Q4_X86
                if (level >= ISA_AVX512)
                    quant_blocks_512<DT>(A, bs, b0, bf, t, out, absmax);
                else
                    quant_blocks_256<DT>(A, bs, b0, bf, t, out, absmax);
#endif
            }
            quant_blocks_scalar<DT>(A, n, bs, std::max(b0, bf), b1, t, out, absmax);
        }
        return;
    }
    // Odd blocksize: bytes straddle blocks. Pass 1 absmax, pass 2 codes per byte.
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (i64 b = 0; b < nblocks; ++b) {
        i64 s = b * bs, len = std::min(bs, n - s);
        float am = block_absmax_scalar<DT>(A, s, len);
        absmax[b] = len == bs ? am : clamp_divisor(am);
    }
    const i64 nbytes = (n + 1) / 2;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (i64 p = 0; p < nbytes; ++p) {
        int c[2];
        for (int h = 0; h < 2; ++h) {
            i64 i = 2 * p + h;
            float sv = 0.0f;
            if (i < n) {
                i64 b = i / bs;
                float x = load_scalar<DT>(A, i);
                if (b < nfull)
                    sv = x * (1.0f / clamp_divisor(absmax[b]));
                else
                    sv = x / absmax[b];
            }
            c[h] = t.ord[bucket_scalar(sv, t.mid)];
        }
        out[p] = (uint8_t)((c[0] << 4) | c[1]);
    }
}

// ------------------------------------------------------------------------------------------------
// Dequantize (4-bit and 8-bit blockwise)
// ------------------------------------------------------------------------------------------------

void dequant_range_scalar(const uint8_t* q, const float* absmax, const float* code, i64 i0, i64 i1, i64 bs,
                          void* out, int dt) {
    i64 b = i0 / bs, next = (b + 1) * bs;
    float a = absmax[b];
    for (i64 i = i0; i < i1; ++i) {
        if (i == next) {
            ++b;
            next += bs;
            a = absmax[b];
        }
        uint8_t byte = q[i >> 1];
        int c = (i & 1) ? (byte & 0xF) : (byte >> 4);
        store_any(out, dt, i, code[c] * a);
    }
}

#if Q4_X86

// 16 floats -> 16 half / bfloat16 (round to nearest even; bf16 NaN -> 0x7FC0 as c10::BFloat16).
T512 inline __m256i to_16bit_512(__m512 v, int dt) {
    if (dt == DT_F16) return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(r);
}

T512 inline void store16_512(void* out, int dt, i64 i, __m512 v) {
    if (dt == DT_F32)
        _mm512_storeu_ps(static_cast<float*>(out) + i, v);
    else
        _mm256_storeu_si256((__m256i*)(static_cast<uint16_t*>(out) + i), to_16bit_512(v, dt));
}

// Elements [32*c0, 32*c1), each 32-element chunk inside one block (bs % 32 == 0).
T512 void dequant_chunks_512(const uint8_t* q, const float* absmax, const float* code, i64 c0, i64 c1, i64 bs,
                             void* out, int dt) {
    const __m512 cv = _mm512_loadu_ps(code);
    const __m512i ilo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i ihi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const i64 cpb = bs / 32;
    i64 b = (c0 * 32) / bs, left = cpb - (c0 - b * cpb);
    __m512 tab = _mm512_mul_ps(cv, _mm512_set1_ps(absmax[b]));
    for (i64 c = c0; c < c1; ++c) {
        if (left == 0) {
            ++b;
            left = cpb;
            tab = _mm512_mul_ps(cv, _mm512_set1_ps(absmax[b]));
        }
        --left;
        __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(q + c * 16)));
        __m512 od = _mm512_permutexvar_ps(v, tab);                        // low nibbles: odd elements
        __m512 ev = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tab);  // high nibbles: even elements
        store16_512(out, dt, c * 32, _mm512_permutex2var_ps(ev, ilo, od));
        store16_512(out, dt, c * 32 + 16, _mm512_permutex2var_ps(ev, ihi, od));
    }
}

T256 inline __m256 lut16_256(__m256i idx, __m256 t0, __m256 t1) {
    // entries 0..7 from t0, 8..15 from t1 (bit 3 of idx, moved into the sign bit, selects)
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx), _mm256_permutevar8x32_ps(t1, idx),
                            _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

T256 inline void store8_256(void* out, int dt, i64 i, __m256 v) {
    if (dt == DT_F32) {
        _mm256_storeu_ps(static_cast<float*>(out) + i, v);
    } else if (dt == DT_F16) {
        _mm_storeu_si128((__m128i*)(static_cast<uint16_t*>(out) + i),
                         _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        __m256i u = _mm256_castps_si256(v);
        __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
        r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC0)),
                                                 _mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
        __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storeu_si128((__m128i*)(static_cast<uint16_t*>(out) + i), w);
    }
}

T256 void dequant_chunks_256(const uint8_t* q, const float* absmax, const float* code, i64 c0, i64 c1, i64 bs,
                             void* out, int dt) {
    const __m256 cv0 = _mm256_loadu_ps(code), cv1 = _mm256_loadu_ps(code + 8);
    const i64 cpb = bs / 32;
    i64 b = (c0 * 32) / bs, left = cpb - (c0 - b * cpb);
    __m256 sc = _mm256_set1_ps(absmax[b]);
    __m256 t0 = _mm256_mul_ps(cv0, sc), t1 = _mm256_mul_ps(cv1, sc);
    for (i64 c = c0; c < c1; ++c) {
        if (left == 0) {
            ++b;
            left = cpb;
            sc = _mm256_set1_ps(absmax[b]);
            t0 = _mm256_mul_ps(cv0, sc);
            t1 = _mm256_mul_ps(cv1, sc);
        }
        --left;
        for (int h = 0; h < 2; ++h) {
            __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(q + c * 16 + 8 * h)));
            __m256 od = lut16_256(v, t0, t1);
            __m256 ev = lut16_256(_mm256_srli_epi32(v, 4), t0, t1);
            __m256 lo = _mm256_unpacklo_ps(ev, od), hi = _mm256_unpackhi_ps(ev, od);
            store8_256(out, dt, c * 32 + 16 * h, _mm256_permute2f128_ps(lo, hi, 0x20));
            store8_256(out, dt, c * 32 + 16 * h + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
        }
    }
}

#endif  // Q4_X86

// A large output is a fresh mapping from the allocator: faulting it in 4 KiB pages costs several
// times more than the dequantization itself (16 ms vs 2 ms for 64 MiB on a 2-core machine).
// Transparent huge pages cut that to ~3 ms; this is only a hint, ignored where THP is off.
void advise_huge_pages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)2 << 20;
    if (bytes < 4 * huge) return;
    const uintptr_t b = ((uintptr_t)p + huge - 1) & ~(huge - 1), e = ((uintptr_t)p + bytes) & ~(huge - 1);
    if (e > b) madvise((void*)b, e - b, MADV_HUGEPAGE);
#else
    (void)p, (void)bytes;
#endif
}

void dequantize_impl(const uint8_t* q, const float* absmax, const float* code, i64 n, i64 bs, void* out, int dt,
                     int nt) {
    advise_huge_pages(out, (size_t)n * (dt == DT_F32 ? 4 : 2));
    nt = team_size(n, 1 << 17, nt);
    const int level = isa();
    if (level >= ISA_AVX2 && bs % 32 == 0) {
#if Q4_X86
        const i64 nchunks = n / 32;
        const i64 per_task = 256;  // 8192 elements
        const i64 ntasks = (nchunks + per_task - 1) / per_task;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
        for (i64 task = 0; task < ntasks; ++task) {
            i64 c0 = task * per_task, c1 = std::min(nchunks, c0 + per_task);
            if (level >= ISA_AVX512)
                dequant_chunks_512(q, absmax, code, c0, c1, bs, out, dt);
            else
                dequant_chunks_256(q, absmax, code, c0, c1, bs, out, dt);
        }
        if (nchunks * 32 < n) dequant_range_scalar(q, absmax, code, nchunks * 32, n, bs, out, dt);
        return;
#endif
    }
    const i64 per_task = 8192;
    const i64 ntasks = (n + per_task - 1) / per_task;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (i64 task = 0; task < ntasks; ++task) {
        i64 i0 = task * per_task, i1 = std::min(n, i0 + per_task);
        dequant_range_scalar(q, absmax, code, i0, i1, bs, out, dt);
    }
}

void dequantize_blockwise_impl(const uint8_t* q, const float* absmax, const float* code, i64 n, i64 bs, void* out,
                               int dt, int nt) {
    advise_huge_pages(out, (size_t)n * (dt == DT_F32 ? 4 : 2));
    nt = team_size(n, 1 << 16, nt);
    const i64 per_task = 16384;
    const i64 ntasks = (n + per_task - 1) / per_task;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
    for (i64 task = 0; task < ntasks; ++task) {
        i64 i0 = task * per_task, i1 = std::min(n, i0 + per_task);
        i64 b = i0 / bs, next = (b + 1) * bs;
        float a = absmax[b];
        if (dt == DT_F32) {
            float* o = static_cast<float*>(out);
            for (i64 i = i0; i < i1; ++i) {
                if (i == next) {
                    ++b;
                    next += bs;
                    a = absmax[b];
                }
                o[i] = code[q[i]] * a;
            }
        } else {
            for (i64 i = i0; i < i1; ++i) {
                if (i == next) {
                    ++b;
                    next += bs;
                    a = absmax[b];
                }
                store_any(out, dt, i, code[q[i]] * a);
            }
        }
    }
}

// ------------------------------------------------------------------------------------------------
// Fused 4-bit GEMM:  out[M, N] = A[M, K] @ W[N, K]^T + bias,  W = code[q] * absmax (flat blocks)
// ------------------------------------------------------------------------------------------------
//
// The activations are re-laid out once per call to match the nibble order of the packed weights,
// so the inner loop is a table lookup (permute) per weight vector and pure FMAs / dot products:
//  - float32 kernels (AVX-512, AVX2): per 32 weights (16 bytes) the activations are stored as
//    [x1, x3, ..., x31 | x0, x2, ..., x30]: byte j's low nibble (element 2j+1) pairs with the first
//    half, its high nibble (element 2j) with the second.
//  - bf16 kernel (AVX-512 BF16, vdpbf16ps): per 64 weights (32 bytes) two vectors of 16 bf16 pairs:
//    [(x1,x3), (x5,x7), ... | (x0,x2), (x4,x6), ...]; the decoded weights are bf16(code * absmax),
//    the same rounding as the reference's bf16 weight.
//
// Work is split over groups of NT weight rows (parallel over groups; NT = 8 for one activation row,
// else 4), activation rows in panels of kPanelRows (a group's weights are decoded once per panel).
// One bf16 activation row (decode at one stream) walks a group's rows one after another
// (bf16_rows): one sequential stream of weight bytes per thread.
// "Direct" kernels decode a group's weights in registers for every tile of MT <= 4 activation rows.
// With more rows, the bf16 kernel (above kDirectRowsBf16) and the AVX2 kernel (above 2) instead
// decode the group's rows once per K block into a per-thread buffer that stays in L1 and run the
// tiles from there ("buffered"). Measured on a 2-core Zen 5 with a 4096 x 4096 NF4 weight: direct
// is better up to ~8 rows for bf16; for AVX-512 float32 the FMAs, not the decode, are the limit and
// direct wins at any M. The fused kernels beat dequantize + torch's GEMM at every M measured except
// bf16 above kMaxRowsBf16 rows; the caller does that for whatever gemm_impl declines.
// In a model, each layer's weights come from memory, not cache: while a group is computed, its
// thread prefetches the next group's bytes (a 30-layer 135M model's step, 2 cores: 4.4 -> 3.3 ms
// for one row, 9.7 -> 7.9 ms for 16, bf16 products).

const i64 kDirectRowsBf16 = 8;
// Beyond this many bf16 rows, dequantizing once and torch's bf16 GEMM (oneDNN, with the same
// AVX-512-BF16 to work with) is faster: even at 256 rows (12.6 ms each), 22 vs 26 ms at 512.
const i64 kMaxRowsBf16 = 256;
const i64 kBlockBf16 = 1024;
const i64 kPanelRows = 16;
const i64 kBlockAvx2 = 512;  // the AVX2 kernel buffers (float32) for more than 2 rows

struct GemmArgs {
    const void* Ap;  // re-laid-out activations [M][K] (float32 or bf16 words)
    i64 M, K, N, bs;
    const uint8_t* B;
    const float* absmax;
    const float* code;
    const void* bias;  // [N] in the output dtype, or null
    void* out;         // [M][N]
    int odt;
    i64 kc;            // K block of the buffered kernels (kBlockBf16 or kBlockAvx2, or K if smaller)
};

inline void store_result(const GemmArgs& g, i64 m, i64 n, float v) {
    if (g.bias) v += load_any(g.bias, g.odt, n);
    store_any(g.out, g.odt, m * g.N + n, v);
}

// Per weight row: where its packed bytes start and which absmax block is current.
struct RowCursor {
    const uint8_t* w;
    i64 blk, rem;  // current block, elements of it left
    void init(const GemmArgs& g, i64 n) {
        i64 f = n * g.K;
        w = g.B + f / 2;
        blk = f / g.bs;
        rem = g.bs - (f - blk * g.bs);
    }
    // Advance by `len` elements (a chunk never straddles a block); true when a new block starts.
    bool step(i64 bs, i64 len) {
        bool fresh = false;
        if (rem == 0) {
            ++blk;
            rem = bs;
            fresh = true;
        }
        rem -= len;
        return fresh;
    }
};

#if Q4_X86

// Horizontal sums of 16 vectors at once: result[t] = sum of v[t]'s 16 lanes.
T512 inline __m512 hsum16_512(const __m512* v) {
    __m512 s[8], r[4];
    for (int p = 0; p < 8; ++p)
        s[p] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * p], v[2 * p + 1]), _mm512_unpackhi_ps(v[2 * p], v[2 * p + 1]));
    for (int q = 0; q < 4; ++q) {
        __m512d x = _mm512_castps_pd(s[2 * q]), y = _mm512_castps_pd(s[2 * q + 1]);
        r[q] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    __m512 q01 = _mm512_add_ps(_mm512_shuffle_f32x4(r[0], r[1], 0x88), _mm512_shuffle_f32x4(r[0], r[1], 0xDD));
    __m512 q23 = _mm512_add_ps(_mm512_shuffle_f32x4(r[2], r[3], 0x88), _mm512_shuffle_f32x4(r[2], r[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(q01, q23, 0x88), _mm512_shuffle_f32x4(q01, q23, 0xDD));
}

// out[m0 + i][n0 + j] = sum(acc[i * NT + j]) + bias[n0 + j], converted to the output dtype.
template <int MT, int NT>
T512 inline void epilogue_512(const GemmArgs& g, i64 m0, i64 n0, const __m512* acc) {
    static_assert(MT * NT <= 16, "one 16-lane result vector per tile");
    __m512 v[16];
    for (int t = 0; t < 16; ++t) v[t] = t < MT * NT ? acc[t] : _mm512_setzero_ps();
    __m512 s = hsum16_512(v);
    if (g.bias) {
        alignas(64) float b[16] = {};
        for (int i = 0; i < MT; ++i)
            for (int j = 0; j < NT; ++j) b[i * NT + j] = load_any(g.bias, g.odt, n0 + j);
        s = _mm512_add_ps(s, _mm512_load_ps(b));
    }
    if (g.odt == DT_F32) {
        alignas(64) float t[16];
        _mm512_store_ps(t, s);
        for (int i = 0; i < MT; ++i) std::memcpy(static_cast<float*>(g.out) + (m0 + i) * g.N + n0, t + i * NT, NT * 4);
    } else {
        alignas(32) uint16_t t[16];
        _mm256_store_si256((__m256i*)t, to_16bit_512(s, g.odt));
        for (int i = 0; i < MT; ++i)
            std::memcpy(static_cast<uint16_t*>(g.out) + (m0 + i) * g.N + n0, t + i * NT, NT * 2);
    }
}

// ---- AVX-512, float32 activations (32 weights per step) ----------------------------------------

T512 inline void f32_decode32(const uint8_t* w, __m512 tab, __m512& wo, __m512& we) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)w));
    wo = _mm512_permutexvar_ps(v, tab);                        // low nibbles: elements 2j+1
    we = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tab);  // high nibbles: elements 2j
}

template <int MT, int NT>
T512 void f32_direct(const GemmArgs& g, i64 m0, i64 n0) {
    constexpr bool SPLIT = MT * NT <= 8;  // separate even/odd accumulators: more independent chains
    const float* Ap = static_cast<const float*>(g.Ap);
    const i64 K = g.K;
    const __m512 cv = _mm512_loadu_ps(g.code);
    RowCursor rc[NT];
    __m512 tab[NT];
    __m512 acc[MT][NT], acc2[MT][NT];
    for (int j = 0; j < NT; ++j) {
        rc[j].init(g, n0 + j);
        tab[j] = _mm512_mul_ps(cv, _mm512_set1_ps(g.absmax[rc[j].blk]));
    }
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NT; ++j) acc[i][j] = acc2[i][j] = _mm512_setzero_ps();
    for (i64 k = 0; k < K; k += 32) {
        __m512 ao[MT], ae[MT];
        for (int i = 0; i < MT; ++i) {
            ao[i] = _mm512_loadu_ps(Ap + (m0 + i) * K + k);
            ae[i] = _mm512_loadu_ps(Ap + (m0 + i) * K + k + 16);
        }
        for (int j = 0; j < NT; ++j) {
            if (rc[j].step(g.bs, 32)) tab[j] = _mm512_mul_ps(cv, _mm512_set1_ps(g.absmax[rc[j].blk]));
            _mm_prefetch((const char*)(rc[j].w + k / 2 + NT * K / 2), _MM_HINT_T0);  // the next group's bytes
            __m512 wo, we;
            f32_decode32(rc[j].w + k / 2, tab[j], wo, we);
            for (int i = 0; i < MT; ++i) {
                acc[i][j] = _mm512_fmadd_ps(ao[i], wo, acc[i][j]);
                if (SPLIT)
                    acc2[i][j] = _mm512_fmadd_ps(ae[i], we, acc2[i][j]);
                else
                    acc[i][j] = _mm512_fmadd_ps(ae[i], we, acc[i][j]);
            }
        }
    }
    __m512 res[MT * NT];
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NT; ++j) res[i * NT + j] = SPLIT ? _mm512_add_ps(acc[i][j], acc2[i][j]) : acc[i][j];
    epilogue_512<MT, NT>(g, m0, n0, res);
}

template <int NT>
T512 void f32_group_512(const GemmArgs& g, i64 n0, void*) {
    if constexpr (NT == 8) {
        f32_direct<1, 8>(g, 0, n0);  // used for M == 1 only
    } else {
        i64 m0 = 0;
        for (; m0 + 4 <= g.M; m0 += 4) f32_direct<4, NT>(g, m0, n0);
        switch (g.M - m0) {
            case 1: f32_direct<1, NT>(g, m0, n0); break;
            case 2: f32_direct<2, NT>(g, m0, n0); break;
            case 3: f32_direct<3, NT>(g, m0, n0); break;
            default: break;
        }
    }
}

#if Q4_BF16

// ---- AVX-512 BF16, bf16 activations (64 weights per step, vdpbf16ps) ----------------------------

T512BF inline __m512i bf16_table(__m512 cv, float absmax) {
    __m512 p = _mm512_mul_ps(cv, _mm512_set1_ps(absmax));
    return (__m512i)_mm512_cvtne2ps_pbh(p, p);  // 16 bf16 entries, twice (vpermw reads 5 index bits)
}

T512BF inline void bf16_decode64(const uint8_t* w, __m512i tab, __m512i& wl, __m512i& wh) {
    // 32 bytes -> 32 words; vpermw reads the low 5 bits: the low nibble (plus one bit the doubled
    // table ignores); shifted right by 4: the high nibble.
    __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)w));
    wl = _mm512_permutexvar_epi16(v, tab);
    wh = _mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), tab);
}

template <int MT, int NT>
T512BF void bf16_direct(const GemmArgs& g, i64 m0, i64 n0) {
    const uint16_t* Ap = static_cast<const uint16_t*>(g.Ap);
    const i64 K = g.K;
    const __m512 cv = _mm512_loadu_ps(g.code);
    RowCursor rc[NT];
    __m512i tab[NT];
    __m512 acc[MT][NT];
    for (int j = 0; j < NT; ++j) {
        rc[j].init(g, n0 + j);
        tab[j] = bf16_table(cv, g.absmax[rc[j].blk]);
    }
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NT; ++j) acc[i][j] = _mm512_setzero_ps();
    for (i64 k = 0; k < K; k += 64) {
        __m512i al[MT], ah[MT];
        for (int i = 0; i < MT; ++i) {
            al[i] = _mm512_loadu_si512((const void*)(Ap + (m0 + i) * K + k));
            ah[i] = _mm512_loadu_si512((const void*)(Ap + (m0 + i) * K + k + 32));
        }
        for (int j = 0; j < NT; ++j) {
            if (rc[j].step(g.bs, 64)) tab[j] = bf16_table(cv, g.absmax[rc[j].blk]);
            _mm_prefetch((const char*)(rc[j].w + k / 2 + NT * K / 2), _MM_HINT_T0);  // the next group's bytes
            __m512i wl, wh;
            bf16_decode64(rc[j].w + k / 2, tab[j], wl, wh);
            for (int i = 0; i < MT; ++i) {
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)al[i], (__m512bh)wl);
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)ah[i], (__m512bh)wh);
            }
        }
    }
    epilogue_512<MT, NT>(g, m0, n0, &acc[0][0]);
}

// One activation row, NT weight rows one after another (not interleaved): a thread's weight bytes
// are one sequential stream, prefetched kRowsPrefetch ahead across row (and page) boundaries.
// Why, measured on the 2-core AMD EPYC VM (AVX-512 BF16), weights far larger than the caches:
// plain loads of 8 rows interleaved at a 1 KB stride ran at 11.6 GB/s on one thread against 27 GB/s
// for one sequential stream. NF4 GEMV, GB/s of weight + absmax, old (bf16_direct<1, 8>) -> this,
// alternating builds, best of 9: 2 threads 6144x2048 11.5-16.5 -> 20-23, 16384x2048 12-17 -> 20-25,
// 2048x8192 14-18 -> 20, 3072x576 11-17 -> 16-21; one thread 2048x8192 is 12 -> 10, the others
// gain 20-45%. Interleaved calls of both builds in one process, 2 threads, time of this / the
// interleaved walk: 0.76-0.79 for 2048-wide rows, 0.77-0.92 for 576 and 1536, 1.07 for 8192 (kept
// interleaved above kRowsMaxK). A row's products and their order are bf16_direct's (one accumulator, al then ah
// per 64 weights), so its result is the same bits whatever the number of rows (batch invariance).
// Not for more activation rows: walking the weight rows one by one re-reads the activations for
// each, and with 4 or 8 rows (bound by compute there) that measured 0-40% slower than bf16_direct.
const i64 kRowsPrefetch = 2048;
const i64 kRowsMaxK = 4096;

template <int NT>
T512BF void bf16_rows(const GemmArgs& g, i64 n0) {
    const uint16_t* Ap = static_cast<const uint16_t*>(g.Ap);
    const i64 K = g.K;
    const __m512 cv = _mm512_loadu_ps(g.code);
    __m512 acc[NT];
    for (int j = 0; j < NT; ++j) {
        RowCursor rc;
        rc.init(g, n0 + j);
        __m512i tab = bf16_table(cv, g.absmax[rc.blk]);
        __m512 a = _mm512_setzero_ps();
        for (i64 k = 0; k < K; k += 64) {
            if (rc.step(g.bs, 64)) tab = bf16_table(cv, g.absmax[rc.blk]);
            _mm_prefetch((const char*)(rc.w + k / 2 + kRowsPrefetch), _MM_HINT_T0);
            __m512i wl, wh;
            bf16_decode64(rc.w + k / 2, tab, wl, wh);
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512((const void*)(Ap + k)), (__m512bh)wl);
            a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512((const void*)(Ap + k + 32)), (__m512bh)wh);
        }
        acc[j] = a;
    }
    epilogue_512<1, NT>(g, 0, n0, acc);
}

template <int NT>
T512BF void bf16_decode_block(const GemmArgs& g, RowCursor* rc, __m512i* tab, i64 k0, i64 kl, uint16_t* buf) {
    const __m512 cv = _mm512_loadu_ps(g.code);
    for (int j = 0; j < NT; ++j) {
        RowCursor c = rc[j];  // locals: see f32_decode_block
        __m512i t = tab[j];
        uint16_t* d = buf + j * g.kc;
        for (i64 k = 0; k < kl; k += 64) {
            if (c.step(g.bs, 64)) t = bf16_table(cv, g.absmax[c.blk]);
            _mm_prefetch((const char*)(c.w + (k0 + k) / 2 + NT * g.K / 2), _MM_HINT_T0);  // the next group's bytes
            __m512i wl, wh;
            bf16_decode64(c.w + (k0 + k) / 2, t, wl, wh);
            _mm512_store_si512((void*)(d + k), wl);
            _mm512_store_si512((void*)(d + k + 32), wh);
        }
        rc[j] = c;
        tab[j] = t;
    }
}

template <int MT, int NT>
T512BF void bf16_block_tile(const GemmArgs& g, i64 m0, i64 k0, i64 kl, const uint16_t* buf, __m512* accm) {
    const uint16_t* Ap = static_cast<const uint16_t*>(g.Ap) + k0;
    const i64 K = g.K;
    __m512 acc[MT][NT];
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NT; ++j) acc[i][j] = k0 ? accm[(m0 + i) * NT + j] : _mm512_setzero_ps();
    for (i64 k = 0; k < kl; k += 32) {
        __m512i a[MT];
        for (int i = 0; i < MT; ++i) a[i] = _mm512_loadu_si512((const void*)(Ap + (m0 + i) * K + k));
        for (int j = 0; j < NT; ++j) {
            __m512i w = _mm512_load_si512((const void*)(buf + j * g.kc + k));
            for (int i = 0; i < MT; ++i) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)a[i], (__m512bh)w);
        }
    }
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NT; ++j) accm[(m0 + i) * NT + j] = acc[i][j];
}

template <int NT>
T512BF void bf16_group_512(const GemmArgs& g, i64 n0, void* scratch) {
    if constexpr (NT == 8) {
        // used for M == 1 only; rows of 8192 (4 KB of weights, 16 KB of activations) measured 7%
        // slower walked one by one than interleaved
        if (g.K <= kRowsMaxK)
            bf16_rows<8>(g, n0);
        else
            bf16_direct<1, 8>(g, 0, n0);
    } else if (g.M <= kDirectRowsBf16) {
        i64 m0 = 0;
        for (; m0 + 4 <= g.M; m0 += 4) bf16_direct<4, NT>(g, m0, n0);
        switch (g.M - m0) {
            case 1: bf16_direct<1, NT>(g, m0, n0); break;
            case 2: bf16_direct<2, NT>(g, m0, n0); break;
            case 3: bf16_direct<3, NT>(g, m0, n0); break;
            default: break;
        }
    } else {
        uint16_t* buf = static_cast<uint16_t*>(scratch);
        __m512* accm = reinterpret_cast<__m512*>(buf + NT * g.kc);
        const __m512 cv = _mm512_loadu_ps(g.code);
        RowCursor rc[NT];
        __m512i tab[NT];
        for (int j = 0; j < NT; ++j) {
            rc[j].init(g, n0 + j);
            tab[j] = bf16_table(cv, g.absmax[rc[j].blk]);
        }
        for (i64 k0 = 0; k0 < g.K; k0 += g.kc) {
            const i64 kl = std::min(g.kc, g.K - k0);
            bf16_decode_block<NT>(g, rc, tab, k0, kl, buf);
            i64 m0 = 0;
            for (; m0 + 4 <= g.M; m0 += 4) bf16_block_tile<4, NT>(g, m0, k0, kl, buf, accm);
            switch (g.M - m0) {
                case 1: bf16_block_tile<1, NT>(g, m0, k0, kl, buf, accm); break;
                case 2: bf16_block_tile<2, NT>(g, m0, k0, kl, buf, accm); break;
                case 3: bf16_block_tile<3, NT>(g, m0, k0, kl, buf, accm); break;
                default: break;
            }
        }
        i64 m0 = 0;
        for (; m0 + 4 <= g.M; m0 += 4) epilogue_512<4, NT>(g, m0, n0, accm + m0 * NT);
        switch (g.M - m0) {
            case 1: epilogue_512<1, NT>(g, m0, n0, accm + m0 * NT); break;
            case 2: epilogue_512<2, NT>(g, m0, n0, accm + m0 * NT); break;
            case 3: epilogue_512<3, NT>(g, m0, n0, accm + m0 * NT); break;
            default: break;
        }
    }
}

#endif  // Q4_BF16

// ---- AVX2 + FMA, float32 activations (16 weights per step) --------------------------------------

T256 inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

T256 inline void table16_256(float* tab, __m256 cv0, __m256 cv1, float absmax) {
    __m256 s = _mm256_set1_ps(absmax);
    _mm256_store_ps(tab, _mm256_mul_ps(cv0, s));
    _mm256_store_ps(tab + 8, _mm256_mul_ps(cv1, s));
}

template <int MT, int NT>
T256 void f32_direct_256(const GemmArgs& g, i64 m0, i64 n0) {
    const float* Ap = static_cast<const float*>(g.Ap);
    const i64 K = g.K;
    const __m256 cv0 = _mm256_loadu_ps(g.code), cv1 = _mm256_loadu_ps(g.code + 8);
    RowCursor rc[NT];
    alignas(32) float tab[NT][16];
    __m256 acc[MT][NT];
    for (int j = 0; j < NT; ++j) {
        rc[j].init(g, n0 + j);
        table16_256(tab[j], cv0, cv1, g.absmax[rc[j].blk]);
    }
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NT; ++j) acc[i][j] = _mm256_setzero_ps();
    for (i64 k = 0; k < K; k += 32) {
        for (int j = 0; j < NT; ++j)
            if (rc[j].step(g.bs, 32)) table16_256(tab[j], cv0, cv1, g.absmax[rc[j].blk]);
        for (int h = 0; h < 2; ++h) {
            __m256 ao[MT], ae[MT];
            for (int i = 0; i < MT; ++i) {
                ao[i] = _mm256_loadu_ps(Ap + (m0 + i) * K + k + 8 * h);
                ae[i] = _mm256_loadu_ps(Ap + (m0 + i) * K + k + 16 + 8 * h);
            }
            for (int j = 0; j < NT; ++j) {
                const __m256 t0 = _mm256_load_ps(tab[j]), t1 = _mm256_load_ps(tab[j] + 8);
                __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(rc[j].w + k / 2 + 8 * h)));
                __m256 wo = lut16_256(v, t0, t1);
                __m256 we = lut16_256(_mm256_srli_epi32(v, 4), t0, t1);
                for (int i = 0; i < MT; ++i) {
                    acc[i][j] = _mm256_fmadd_ps(ao[i], wo, acc[i][j]);
                    acc[i][j] = _mm256_fmadd_ps(ae[i], we, acc[i][j]);
                }
            }
        }
    }
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NT; ++j) store_result(g, m0 + i, n0 + j, hsum256(acc[i][j]));
}

// Buffered (more than 2 activation rows; the AVX2 decode is too costly to repeat per tile): NT rows'
// elements [k0, k0 + kl) decoded into buf[j * kc + ...] in the activations' layout.
template <int NT>
T256 void f32_decode_block_256(const GemmArgs& g, RowCursor* rc, float (*tab)[16], i64 k0, i64 kl, float* buf) {
    const __m256 cv0 = _mm256_loadu_ps(g.code), cv1 = _mm256_loadu_ps(g.code + 8);
    for (int j = 0; j < NT; ++j) {
        RowCursor c = rc[j];  // a local: see f32_decode_block
        __m256 t0 = _mm256_load_ps(tab[j]), t1 = _mm256_load_ps(tab[j] + 8);
        float* d = buf + j * g.kc;
        for (i64 k = 0; k < kl; k += 32) {
            if (c.step(g.bs, 32)) {
                __m256 s = _mm256_set1_ps(g.absmax[c.blk]);
                t0 = _mm256_mul_ps(cv0, s);
                t1 = _mm256_mul_ps(cv1, s);
            }
            for (int h = 0; h < 2; ++h) {
                __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(c.w + (k0 + k) / 2 + 8 * h)));
                _mm256_store_ps(d + k + 8 * h, lut16_256(v, t0, t1));
                _mm256_store_ps(d + k + 16 + 8 * h, lut16_256(_mm256_srli_epi32(v, 4), t0, t1));
            }
        }
        rc[j] = c;
        _mm256_store_ps(tab[j], t0);
        _mm256_store_ps(tab[j] + 8, t1);
    }
}

template <int MT, int NT>
T256 void f32_block_tile_256(const GemmArgs& g, i64 m0, i64 k0, i64 kl, const float* buf, __m256* accm) {
    const float* Ap = static_cast<const float*>(g.Ap) + k0;
    const i64 K = g.K;
    __m256 acc[MT][NT];
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NT; ++j) acc[i][j] = k0 ? accm[(m0 + i) * NT + j] : _mm256_setzero_ps();
    for (i64 k = 0; k < kl; k += 8) {
        __m256 a[MT];
        for (int i = 0; i < MT; ++i) a[i] = _mm256_loadu_ps(Ap + (m0 + i) * K + k);
        for (int j = 0; j < NT; ++j) {
            __m256 w = _mm256_load_ps(buf + j * g.kc + k);
            for (int i = 0; i < MT; ++i) acc[i][j] = _mm256_fmadd_ps(a[i], w, acc[i][j]);
        }
    }
    for (int i = 0; i < MT; ++i)
        for (int j = 0; j < NT; ++j) accm[(m0 + i) * NT + j] = acc[i][j];
}

template <int NT>
T256 void f32_group_256(const GemmArgs& g, i64 n0, void* scratch) {
    if (g.M <= 2) {
        if (g.M == 2)
            f32_direct_256<2, NT>(g, 0, n0);
        else
            f32_direct_256<1, NT>(g, 0, n0);
        return;
    }
    float* buf = static_cast<float*>(scratch);
    __m256* accm = reinterpret_cast<__m256*>(buf + NT * g.kc);
    RowCursor rc[NT];
    alignas(32) float tab[NT][16];
    const __m256 cv0 = _mm256_loadu_ps(g.code), cv1 = _mm256_loadu_ps(g.code + 8);
    for (int j = 0; j < NT; ++j) {
        rc[j].init(g, n0 + j);
        __m256 s = _mm256_set1_ps(g.absmax[rc[j].blk]);
        _mm256_store_ps(tab[j], _mm256_mul_ps(cv0, s));
        _mm256_store_ps(tab[j] + 8, _mm256_mul_ps(cv1, s));
    }
    for (i64 k0 = 0; k0 < g.K; k0 += g.kc) {
        const i64 kl = std::min(g.kc, g.K - k0);
        f32_decode_block_256<NT>(g, rc, tab, k0, kl, buf);
        i64 m0 = 0;
        for (; m0 + 2 <= g.M; m0 += 2) f32_block_tile_256<2, NT>(g, m0, k0, kl, buf, accm);
        if (m0 < g.M) f32_block_tile_256<1, NT>(g, m0, k0, kl, buf, accm);
    }
    for (i64 m = 0; m < g.M; ++m)
        for (int j = 0; j < NT; ++j) store_result(g, m, n0 + j, hsum256(accm[m * NT + j]));
}

#endif  // Q4_X86

typedef void (*GroupFn)(const GemmArgs&, i64 n0, void* scratch);

struct GroupSet {
    int nt;          // weight rows per group
    GroupFn main;    // NT = nt
    GroupFn tail;    // NT = 1, for the N % nt last rows
    size_t scratch;  // bytes of per-thread buffer
};

#if Q4_X86

// Activation re-layout (see the comment above GemmArgs); rows m of A into dst.
void relayout_f32(const void* A, int adt, i64 m, i64 K, float* dst) {
    for (i64 c = 0; c < K; c += 32) {
        const i64 base = m * K + c;
        float* d = dst + base;
        for (int j = 0; j < 16; ++j) {
            d[j] = load_any(A, adt, base + 2 * j + 1);
            d[16 + j] = load_any(A, adt, base + 2 * j);
        }
    }
}

void relayout_bf16(const uint16_t* A, i64 m, i64 K, uint16_t* dst) {
    for (i64 c = 0; c < K; c += 64) {
        const uint16_t* s = A + m * K + c;
        uint16_t* d = dst + m * K + c;
        for (int i = 0; i < 16; ++i) {
            d[2 * i] = s[4 * i + 1];
            d[2 * i + 1] = s[4 * i + 3];
            d[32 + 2 * i] = s[4 * i];
            d[32 + 2 * i + 1] = s[4 * i + 2];
        }
    }
}

template <int DT>
T512 void relayout_f32_512(const void* A, i64 m, i64 K, float* dst) {
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    for (i64 c = 0; c < K; c += 32) {
        const i64 base = m * K + c;
        __m512 x0 = load16_512<DT>(A, base), x1 = load16_512<DT>(A, base + 16);
        _mm512_storeu_ps(dst + base, _mm512_permutex2var_ps(x0, odd, x1));
        _mm512_storeu_ps(dst + base + 16, _mm512_permutex2var_ps(x0, even, x1));
    }
}

T512 void relayout_bf16_512(const uint16_t* A, i64 m, i64 K, uint16_t* dst) {
    __m512i vl, vh;
    bf16_pair_indices(vl, vh);
    for (i64 c = 0; c < K; c += 64) {
        const i64 base = m * K + c;
        __m512i s0 = _mm512_loadu_si512((const void*)(A + base)), s1 = _mm512_loadu_si512((const void*)(A + base + 32));
        _mm512_storeu_si512((void*)(dst + base), _mm512_permutex2var_epi16(s0, vl, s1));
        _mm512_storeu_si512((void*)(dst + base + 32), _mm512_permutex2var_epi16(s0, vh, s1));
    }
}

#if Q4_BF16
// float32 / float16 activations rounded to bf16 (nearest even, as torch's .to(torch.bfloat16)) in the
// bf16 kernel's layout: the bf16-products mode of q4_gemm.
template <int DT>
T512BF void relayout_to_bf16_512(const void* A, i64 m, i64 K, uint16_t* dst) {
    __m512i vl, vh;
    bf16_pair_indices(vl, vh);
    for (i64 c = 0; c < K; c += 64) {
        const i64 base = m * K + c;
        // _mm512_cvtne2ps_pbh(hi, lo): lo's 16 values in words 0..15, hi's in 16..31.
        __m512i s0 = (__m512i)_mm512_cvtne2ps_pbh(load16_512<DT>(A, base + 16), load16_512<DT>(A, base));
        __m512i s1 = (__m512i)_mm512_cvtne2ps_pbh(load16_512<DT>(A, base + 48), load16_512<DT>(A, base + 32));
        _mm512_storeu_si512((void*)(dst + base), _mm512_permutex2var_epi16(s0, vl, s1));
        _mm512_storeu_si512((void*)(dst + base + 32), _mm512_permutex2var_epi16(s0, vh, s1));
    }
}
#endif

void relayout_row(const void* A, int adt, i64 m, i64 K, void* dst, bool bf16, int level) {
#if Q4_BF16
    if (bf16 && adt != DT_BF16) {  // only chosen on AVX-512-BF16 CPUs
        if (adt == DT_F32)
            relayout_to_bf16_512<DT_F32>(A, m, K, static_cast<uint16_t*>(dst));
        else
            relayout_to_bf16_512<DT_F16>(A, m, K, static_cast<uint16_t*>(dst));
        return;
    }
#endif
    if (level >= ISA_AVX512) {
        if (bf16)
            relayout_bf16_512(static_cast<const uint16_t*>(A), m, K, static_cast<uint16_t*>(dst));
        else if (adt == DT_F32)
            relayout_f32_512<DT_F32>(A, m, K, static_cast<float*>(dst));
        else if (adt == DT_F16)
            relayout_f32_512<DT_F16>(A, m, K, static_cast<float*>(dst));
        else
            relayout_f32_512<DT_BF16>(A, m, K, static_cast<float*>(dst));
        return;
    }
    if (bf16)
        relayout_bf16(static_cast<const uint16_t*>(A), m, K, static_cast<uint16_t*>(dst));
    else
        relayout_f32(A, adt, m, K, static_cast<float*>(dst));
}

// A grow-only, 64-byte aligned buffer per thread and slot: the GEMM's re-laid-out activations
// (slot 0, the calling thread) and per-thread scratch (slot 1). Reused across calls, so a call
// does not allocate (nor fault in fresh pages).
void* thread_buffer(int slot, size_t bytes) {
    struct Buf {
        void* p = nullptr;
        size_t n = 0;
        ~Buf() { std::free(p); }
    };
    thread_local Buf bufs[2];
    Buf& b = bufs[slot];
    if (b.n < bytes) {
        std::free(b.p);
        b.n = 0;
        b.p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
        if (b.p) b.n = bytes;
    }
    return b.p;
}

#endif  // Q4_X86

int gemm_impl(const void* A, int adt, i64 M, i64 K, const uint8_t* B, const float* absmax, const float* code, i64 N,
              i64 bs, const void* bias, void* out, bool bf16_products, int nt) {
#if Q4_X86
    const int level = isa();
    // bf16_products (float32 / float16 activations): round them to bf16 and run the bf16 kernel,
    // at every M, so each row's result is the same whatever the other rows are (batch invariance).
    const bool bf16_ok = level >= ISA_AVX512BF16 && K % 64 == 0 && bs % 64 == 0;
    const bool bf16_in = adt == DT_BF16;
    int path;
    if (bf16_ok && ((bf16_in && M <= kMaxRowsBf16) || (!bf16_in && bf16_products)))
        path = 3;
    else if (bf16_in && level >= ISA_AVX512BF16 && M > kMaxRowsBf16)
        return 1;
    else if (level >= ISA_AVX512 && K % 32 == 0 && bs % 32 == 0)
        path = 2;
    else if (level >= ISA_AVX2 && K % 32 == 0 && bs % 32 == 0)
        path = 1;
    else
        return 1;
    const size_t esz = path == 3 ? 2 : 4;
    const i64 mc = std::min(M, kPanelRows);
    const i64 kc = std::min(path == 3 ? kBlockBf16 : kBlockAvx2, K);
    GroupSet gs{};
    if (path == 3) {
#if Q4_BF16
        gs = mc == 1 ? GroupSet{8, bf16_group_512<8>, bf16_group_512<1>, 0}
                     : GroupSet{4, bf16_group_512<4>, bf16_group_512<1>,
                                mc <= kDirectRowsBf16 ? 0 : (size_t)(4 * kc * 2 + mc * 4 * 64)};
#endif
    } else if (path == 2) {
        gs = mc == 1 ? GroupSet{8, f32_group_512<8>, f32_group_512<1>, 0}
                     : GroupSet{4, f32_group_512<4>, f32_group_512<1>, 0};
    } else {
        gs = GroupSet{4, f32_group_256<4>, f32_group_256<1>, mc <= 2 ? 0 : (size_t)(4 * kc * 4 + mc * 4 * 32)};
    }
    // Even one activation row is worth a team from ~256K weights: a model's weights are read from
    // memory every step, and one core alone does not saturate it (a 30-layer 135M model's decode
    // step: 5.2 ms on one thread, 3.8 ms on two, 2-core Zen 5).
    nt = team_size(M * N * K, 1 << 18, nt);
    void* Ap = thread_buffer(0, (size_t)(M * K) * esz);
    if (!Ap) return 2;
    const i64 nfull = N / gs.nt;
    const i64 ngroups = nfull + (N - nfull * gs.nt);  // full groups, then single rows
    const size_t osz = adt == DT_F32 ? 4 : 2;
    int failed = 0;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
#pragma omp for schedule(static)
        for (i64 m = 0; m < M; ++m) relayout_row(A, adt, m, K, Ap, path == 3, level);
        void* buf = gs.scratch ? thread_buffer(1, gs.scratch) : nullptr;
        for (i64 m0 = 0; m0 < M; m0 += mc) {
            const GemmArgs g{static_cast<const char*>(Ap) + m0 * K * esz, std::min(mc, M - m0), K, N, bs, B, absmax,
                             code, bias, static_cast<char*>(out) + m0 * N * osz, adt, kc};
#pragma omp for schedule(static)
            for (i64 t = 0; t < ngroups; ++t) {
                if (gs.scratch && !buf) {
#pragma omp atomic write
                    failed = 1;
                    continue;
                }
                if (t < nfull)
                    gs.main(g, t * gs.nt, buf);
                else
                    gs.tail(g, nfull * gs.nt + (t - nfull), buf);
            }
        }
    }
    return failed ? 2 : 0;
#else
    (void)A, (void)adt, (void)M, (void)K, (void)B, (void)absmax, (void)code, (void)N, (void)bs, (void)bias, (void)out,
        (void)bf16_products, (void)nt;
    return 1;
#endif
}

}  // namespace

// ------------------------------------------------------------------------------------------------
// C ABI
// ------------------------------------------------------------------------------------------------

extern "C" {

int q4_abi_version() { return 2; }

int q4_detected_isa() { return g_detected_isa; }

int q4_isa() { return isa(); }

// Lower (or restore, with a large value) the instruction-set level used; for tests.
void q4_set_isa_cap(int cap) { g_isa_cap = cap; }

// A: n values (dtype), blocksize bs; mid: 15 sorted float32 midpoints; order: 16 uint8 (sorted
// position -> code). out: (n + 1) / 2 bytes; absmax: ceil(n / bs) floats.
int q4_quantize(const void* A, int dtype, i64 n, i64 bs, const float* mid, const uint8_t* order, uint8_t* out,
                float* absmax, int nt) {
    if (n <= 0 || bs <= 0 || dtype < 0 || dtype > 2) return 1;
    QTables t;
    for (int j = 0; j < 15; ++j) t.mid[j] = mid[j];
    t.mid[15] = std::numeric_limits<float>::infinity();
    for (int j = 0; j < 16; ++j) {
        t.ord[j] = order[j] & 0xF;
        t.ord8[j] = t.ord8[16 + j] = (uint8_t)(order[j] & 0xF);
    }
    if (dtype == DT_F32)
        quantize_impl<DT_F32>(A, n, bs, t, out, absmax, nt);
    else if (dtype == DT_F16)
        quantize_impl<DT_F16>(A, n, bs, t, out, absmax, nt);
    else
        quantize_impl<DT_BF16>(A, n, bs, t, out, absmax, nt);
    return 0;
}

// q: (n + 1) / 2 packed bytes; absmax: ceil(n / bs) floats; code: 16 floats; out: n values (dtype).
int q4_dequantize(const uint8_t* q, const float* absmax, const float* code, i64 n, i64 bs, void* out, int dtype,
                  int nt) {
    if (n <= 0 || bs <= 0 || dtype < 0 || dtype > 2) return 1;
    dequantize_impl(q, absmax, code, n, bs, out, dtype, nt);
    return 0;
}

// 8-bit: out[i] = code[q[i]] * absmax[i / bs] (code: 256 floats).
int q4_dequantize_blockwise(const uint8_t* q, const float* absmax, const float* code, i64 n, i64 bs, void* out,
                            int dtype, int nt) {
    if (n <= 0 || bs <= 0 || dtype < 0 || dtype > 2) return 1;
    dequantize_blockwise_impl(q, absmax, code, n, bs, out, dtype, nt);
    return 0;
}

// out[M, N] (dtype of A) = A[M, K] @ W^T + bias (bias: [N] in A's dtype, or null); W = [N, K] packed
// 4-bit with float32 absmax per bs elements. Returns nonzero if the shape / CPU is not handled.
// bf16_products != 0 allows float32 / float16 activations to be rounded to bf16 where the CPU has
// bf16 dot products (products of bf16 values, float32 sums and output: torch's "medium" float32
// matmul precision); elsewhere it is ignored.
int q4_gemm(const void* A, int dtype, i64 M, i64 K, const uint8_t* B, const float* absmax, const float* code, i64 N,
            i64 bs, const void* bias, void* out, int bf16_products, int nt) {
    if (M <= 0 || K <= 0 || N <= 0 || bs <= 0 || dtype < 0 || dtype > 2) return 1;
    return gemm_impl(A, dtype, M, K, B, absmax, code, N, bs, bias, out, bf16_products != 0, nt);
}

// 1 when q4_gemm's bf16_products takes effect on this CPU (AVX-512-BF16 and the kernel built in).
int q4_has_bf16_products() { return isa() >= ISA_AVX512BF16 ? 1 : 0; }

}  // extern "C"
