// The adaLN chain of the Lens block, forward, in CUDA C++: (gated residual +) RMSNorm or
// LayerNorm (+ weight) (+ per-sample shift/scale), one row per thread block.
//
// Design trade-off: the whole row stays in registers (NV 16-byte vectors per thread, NV a
// template parameter picked by the launcher from C), so x and y are read from global
// memory exactly once and x', out written once, with float32 statistics from one (RMS) or
// two (LayerNorm: mean, then centred sum of squares, both on register values) block
// reductions. One block per row keeps the kernel simple and fully coalesced at Lens
// widths (C = 1536 bf16: 192 threads x one vector); its cost is a __syncthreads-bound
// reduction per row, hidden by several resident blocks per SM. The variant flags are
// runtime (warp-uniform branches) to keep the instantiation count at 3 dtypes x 4 NV.
#include "vec_utils.h"

namespace lens_fast {
namespace {

struct Params {
  const void* x; int64_t stride_xb, stride_xl;
  const void* y; int64_t stride_yb, stride_yl;
  const void* gate; int64_t stride_gate;
  const void* weight;
  const void* shift; int64_t stride_shift;
  const void* scale; int64_t stride_scale;
  void* res_out; void* out; float* mean; float* rstd;
  int rows, channels; float eps; bool layer;
};

template <typename T, int NV>
__global__ void __launch_bounds__(256) norm_modulate_kernel(Params p) {
  constexpr int kVec = Vec<T>::kSize;
  __shared__ float scratch[33];
  const int64_t row = blockIdx.x;  // b * rows + l
  const int64_t b = row / p.rows, l = row % p.rows;
  const int vectors = p.channels / kVec;
  const T* x = static_cast<const T*>(p.x) + b * p.stride_xb + l * p.stride_xl;
  const int64_t out_off = row * p.channels;

  float v[NV][kVec];
  float sum = 0.f;
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int vec = threadIdx.x + j * blockDim.x;
    if (vec < vectors) {
      load_vec(x + vec * kVec, v[j]);
      if (p.y != nullptr) {
        const T* y = static_cast<const T*>(p.y) + b * p.stride_yb + l * p.stride_yl;
        float yv[kVec], g[kVec];
        load_vec(y + vec * kVec, yv);
        load_vec(static_cast<const T*>(p.gate) + b * p.stride_gate + vec * kVec, g);
#pragma unroll
        for (int i = 0; i < kVec; ++i) v[j][i] += g[i] * yv[i];
        store_vec(static_cast<T*>(p.res_out) + out_off + vec * kVec, v[j]);
        // Normalise the stream as stored (rounded), as the reference does.
#pragma unroll
        for (int i = 0; i < kVec; ++i) v[j][i] = to_float(from_float<T>(v[j][i]));
      }
#pragma unroll
      for (int i = 0; i < kVec; ++i) sum += p.layer ? v[j][i] : v[j][i] * v[j][i];
    }
  }
  float mu = 0.f;
  if (p.layer) {
    mu = block_sum(sum, scratch) / p.channels;
    sum = 0.f;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      if (threadIdx.x + j * blockDim.x < vectors) {
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          v[j][i] -= mu;
          sum += v[j][i] * v[j][i];
        }
      }
    }
  }
  const float rstd = rsqrtf(block_sum(sum, scratch) / p.channels + p.eps);
  if (threadIdx.x == 0) {
    p.rstd[row] = rstd;
    if (p.layer) p.mean[row] = mu;
  }
#pragma unroll
  for (int j = 0; j < NV; ++j) {
    const int vec = threadIdx.x + j * blockDim.x;
    if (vec < vectors) {
      float o[kVec];
#pragma unroll
      for (int i = 0; i < kVec; ++i) o[i] = v[j][i] * rstd;
      if (p.weight != nullptr) {
        float w[kVec];
        load_vec(static_cast<const T*>(p.weight) + vec * kVec, w);
#pragma unroll
        for (int i = 0; i < kVec; ++i) o[i] *= w[i];
      }
      if (p.shift != nullptr) {
        float sh[kVec], sc[kVec];
        load_vec(static_cast<const T*>(p.shift) + b * p.stride_shift + vec * kVec, sh);
        load_vec(static_cast<const T*>(p.scale) + b * p.stride_scale + vec * kVec, sc);
#pragma unroll
        for (int i = 0; i < kVec; ++i) o[i] = o[i] * (1.f + sc[i]) + sh[i];
      }
      store_vec(static_cast<T*>(p.out) + out_off + vec * kVec, o);
    }
  }
}

template <typename T>
cudaError_t launch(const Params& p, int batch, cudaStream_t stream) {
  constexpr int kVec = Vec<T>::kSize;
  if (p.channels <= 0 || p.channels % kVec || (p.y != nullptr && p.gate == nullptr) ||
      (p.shift == nullptr) != (p.scale == nullptr) || (p.layer && p.mean == nullptr))
    return cudaErrorInvalidValue;
  const int64_t rows = static_cast<int64_t>(batch) * p.rows;
  if (rows == 0) return cudaSuccess;
  if (rows > 0x7fffffff) return cudaErrorInvalidValue;
  const int vectors = p.channels / kVec;
  // Fewest vectors per thread that keep the block at <= 256 threads: rows up to 2048
  // vectors (32 KiB: C = 16384 fp16/bf16, 8192 fp32).
  if (vectors > 8 * 256) return cudaErrorInvalidValue;
  int nv = 1;
  while (nv < 8 && (vectors + nv - 1) / nv > 256) nv *= 2;
  const int threads = ((vectors + nv - 1) / nv + 31) / 32 * 32;
  const dim3 grid(static_cast<unsigned>(rows));
  switch (nv) {
    case 1: norm_modulate_kernel<T, 1><<<grid, threads, 0, stream>>>(p); break;
    case 2: norm_modulate_kernel<T, 2><<<grid, threads, 0, stream>>>(p); break;
    case 4: norm_modulate_kernel<T, 4><<<grid, threads, 0, stream>>>(p); break;
    default: norm_modulate_kernel<T, 8><<<grid, threads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t norm_modulate_fwd(DType dtype, const void* x, int64_t stride_xb, int64_t stride_xl, const void* y,
                              int64_t stride_yb, int64_t stride_yl, const void* gate, int64_t stride_gate,
                              const void* weight, const void* shift, int64_t stride_shift, const void* scale,
                              int64_t stride_scale, void* res_out, void* out, float* mean, float* rstd, int batch,
                              int rows, int channels, float eps, bool layer, cudaStream_t stream) {
  const Params p{x, stride_xb, stride_xl, y, stride_yb, stride_yl, gate, stride_gate, weight, shift, stride_shift,
                 scale, stride_scale, res_out, out, mean, rstd, rows, channels, eps, layer};
  switch (dtype) {
    case DType::kFloat32: return launch<float>(p, batch, stream);
    case DType::kFloat16: return launch<__half>(p, batch, stream);
    case DType::kBFloat16: return launch<__nv_bfloat16>(p, batch, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lens_fast
