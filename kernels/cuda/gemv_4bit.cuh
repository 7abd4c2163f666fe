// Batch-1 fused dequantize + GEMV for bitsandbytes-format NF4/FP4 weights: y = W x (+ bias).
//
// Device code only (no torch headers), written to build with nvcc and, after torch's hipify, with
// hipcc: 32-lane shuffles with an explicit width work on 32- and 64-wide wavefronts alike, and
// 16-bit floats are converted with bit operations and intrinsics that both toolkits provide.
//
// Layout (see quant/ops.py): W is (N, K), packed two weights per byte, element 2i in the high
// nibble; quant blocks of BLOCKSIZE consecutive elements run across rows (flat indexing), so
// element e of row n has absmax[(n * K + e) / BLOCKSIZE]. The launcher requires K % 32 == 0,
// BLOCKSIZE >= 32 and 16-byte aligned pointers: a lane's 16-byte chunk (32 weights) then lies in
// one quant block, and rows start on a chunk.
//
// Work split: a team of 32 lanes owns one output row; each lane streams 16-byte chunks of the
// row, UNROLL chunks in flight, through the read-only path, decodes them with a 16-entry table in
// shared memory (distinct entries sit in distinct banks: no conflicts) and accumulates
// code * x in fp32 per chunk, scaled once by the chunk's absmax. Double-quantized absmax is
// decoded in the kernel (one byte per block read instead of four).
#pragma once

#include <cstdint>

#if defined(USE_ROCM) || defined(__HIP_PLATFORM_AMD__)
#include <hip/hip_bf16.h>
#include <hip/hip_fp16.h>
#include <hip/hip_runtime.h>
#define QS_SHFL_XOR(v, lane_mask) __shfl_xor((v), (lane_mask), 32)
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define QS_SHFL_XOR(v, lane_mask) __shfl_xor_sync(0xffffffffu, (v), (lane_mask), 32)
#endif

namespace quantserve {

constexpr int kTeam = 32;          // lanes per output row
constexpr int kChunkBytes = 16;    // packed bytes per lane per load (32 weights)

// Activation / output element types: float, __half, and bfloat16 carried as raw uint16_t bits.
struct Bf16Bits {
  uint16_t bits;
};

template <typename T> struct Act;

template <> struct Act<float> {
  using Storage = float;
  // 32 consecutive activations from a 16-byte aligned address into fp32.
  __device__ __forceinline__ static void load32(const Storage* __restrict__ p, float* out) {
    const float4* v = reinterpret_cast<const float4*>(p);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      float4 f = __ldg(v + i);
      out[4 * i] = f.x;
      out[4 * i + 1] = f.y;
      out[4 * i + 2] = f.z;
      out[4 * i + 3] = f.w;
    }
  }
  __device__ __forceinline__ static float to_float(Storage v) { return v; }
  __device__ __forceinline__ static Storage from_float(float v) { return v; }
};

template <typename Half> struct Act16 {
  using Storage = uint16_t;
  __device__ __forceinline__ static void load32(const Storage* __restrict__ p, float* out) {
    const uint4* v = reinterpret_cast<const uint4*>(p);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint4 u = __ldg(v + i);
      const uint32_t words[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        out[8 * i + 2 * j] = Half::to_float(static_cast<uint16_t>(words[j] & 0xffffu));
        out[8 * i + 2 * j + 1] = Half::to_float(static_cast<uint16_t>(words[j] >> 16));
      }
    }
  }
};

template <> struct Act<__half> : Act16<Act<__half>> {
  __device__ __forceinline__ static float to_float(uint16_t v) { return __half2float(__ushort_as_half(v)); }
  __device__ __forceinline__ static uint16_t from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

template <> struct Act<Bf16Bits> : Act16<Act<Bf16Bits>> {
  __device__ __forceinline__ static float to_float(uint16_t v) {
    return __uint_as_float(static_cast<uint32_t>(v) << 16);
  }
  // Round to nearest even (NaN stays NaN): the rounding torch's .to(torch.bfloat16) does.
  __device__ __forceinline__ static uint16_t from_float(float v) {
    uint32_t u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return static_cast<uint16_t>(u >> 16);
  }
};

// absmax of quant block `blk`: plain float32, or double-quantized (8-bit code in blocks of 2^nested_shift).
template <bool kNested>
__device__ __forceinline__ float block_absmax(const float* __restrict__ absmax, const uint8_t* __restrict__ absmax_q,
                                              const float* __restrict__ nested_absmax,
                                              const float* __restrict__ nested_code, float offset, int64_t blk,
                                              int nested_shift) {
  if constexpr (kNested) {
    return __ldg(nested_code + __ldg(absmax_q + blk)) * __ldg(nested_absmax + (blk >> nested_shift)) + offset;
  } else {
    return __ldg(absmax + blk);
  }
}

template <typename T, bool kNested, int kRowsPerBlock, int kUnroll>
__global__ void __launch_bounds__(kTeam * kRowsPerBlock)
gemv_4bit_kernel(const typename Act<T>::Storage* __restrict__ x, const uint8_t* __restrict__ w,
                 const float* __restrict__ code, const float* __restrict__ absmax,
                 const uint8_t* __restrict__ absmax_q, const float* __restrict__ nested_absmax,
                 const float* __restrict__ nested_code, float offset, const typename Act<T>::Storage* __restrict__ bias,
                 typename Act<T>::Storage* __restrict__ out, int64_t n_rows, int64_t k, int blocksize_shift,
                 int nested_shift) {
  __shared__ float table[16];
  if (threadIdx.x < 16) table[threadIdx.x] = code[threadIdx.x];
  __syncthreads();

  const int lane = threadIdx.x % kTeam;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kTeam;
  if (row >= n_rows) return;  // whole teams exit together, after the only barrier

  const int64_t chunks = k / (2 * kChunkBytes);  // 16-byte chunks per row
  const uint4* wrow = reinterpret_cast<const uint4*>(w + row * (k / 2));
  const int64_t row_first = row * k;  // flat index of the row's first element
  float acc = 0.f;

  for (int64_t c0 = lane; c0 < chunks; c0 += kTeam * kUnroll) {
    uint4 packed[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + u * kTeam;
      // Weights are read once: the non-coherent path, no L1 allocation pressure on the activations.
      packed[u] = c < chunks ? __ldg(wrow + c) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t c = c0 + u * kTeam;
      if (c < chunks) {
        float xs[2 * kChunkBytes];
        Act<T>::load32(x + c * 2 * kChunkBytes, xs);
        const uint32_t words[4] = {packed[u].x, packed[u].y, packed[u].z, packed[u].w};
        float part = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
#pragma unroll
          for (int b = 0; b < 4; ++b) {  // little-endian: byte b of the word is packed byte 4j + b
            const uint32_t byte = (words[j] >> (8 * b)) & 0xffu;
            part = fmaf(table[byte >> 4], xs[8 * j + 2 * b], part);
            part = fmaf(table[byte & 15u], xs[8 * j + 2 * b + 1], part);
          }
        }
        const int64_t blk = (row_first + c * 2 * kChunkBytes) >> blocksize_shift;
        acc = fmaf(part, block_absmax<kNested>(absmax, absmax_q, nested_absmax, nested_code, offset, blk, nested_shift),
                   acc);
      }
    }
  }

#pragma unroll
  for (int lane_mask = kTeam / 2; lane_mask > 0; lane_mask /= 2) acc += QS_SHFL_XOR(acc, lane_mask);
  if (lane == 0) {
    if (bias != nullptr) acc += Act<T>::to_float(bias[row]);
    out[row] = Act<T>::from_float(acc);
  }
}

}  // namespace quantserve
