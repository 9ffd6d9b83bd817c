// Device helpers shared by the .cu files: 16-byte vectors of fp32/fp16/bf16, float
// conversion, warp and block sums. Included from .cu files only.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lens_fast_kernels.h"

namespace lens_fast {

template <typename T>
struct alignas(16) Vec {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// 16-byte load/store of kSize elements widened to / narrowed from float.
template <typename T>
__device__ __forceinline__ void load_vec(const T* ptr, float (&out)[Vec<T>::kSize]) {
  Vec<T> raw = *reinterpret_cast<const Vec<T>*>(ptr);
#pragma unroll
  for (int i = 0; i < Vec<T>::kSize; ++i) out[i] = to_float(raw.v[i]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* ptr, const float (&in)[Vec<T>::kSize]) {
  Vec<T> raw;
#pragma unroll
  for (int i = 0; i < Vec<T>::kSize; ++i) raw.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<Vec<T>*>(ptr) = raw;
}

// Sum over aligned groups of `width` lanes (a power of two <= 32).
__device__ __forceinline__ float group_sum(float v, int width) {
  for (int offset = width / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset, width);
  return v;
}

// Sum over the thread block; `scratch` holds at least 33 floats of shared memory.
// Safe to call twice in a row (the broadcast slot is separate from the warp slots).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = group_sum(v, 32);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < warps ? scratch[lane] : 0.f;
    v = group_sum(v, 32);
    if (lane == 0) scratch[32] = v;
  }
  __syncthreads();
  return scratch[32];
}

}  // namespace lens_fast
