// QK-norm + 3-axis RoPE + joint [image ; text] layout, forward, in CUDA C++.
//
// Design trade-off: a head row of D elements is owned by D / VEC lanes of one warp
// (VEC = 16 bytes of elements: 8 for fp16/bf16, 4 for fp32), so every global access is
// one 16-byte vector, the RMS statistic is a shuffle reduction inside an aligned lane
// group (no shared memory, no __syncthreads), and RoPE pairs (even, odd) never straddle
// lanes because VEC is even. Each thread carries its q, k and v vectors of the same
// (token, head) in one pass, so the kernel reads each projection element once and writes
// each output once, straight into [B, N + S, H, D]. The cost: the lane group size is tied
// to D (D = 64 bf16 -> 8 lanes), which limits D to D / VEC in {1, 2, 4, ..., 32}; other
// head dims take the Triton kernel. Statistics and rotation in float32, one rounding.
#include "vec_utils.h"

namespace lens_fast {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) qk_norm_rope_kernel(
    const T* __restrict__ img, int64_t stride_ib, int64_t stride_in, const T* __restrict__ txt, int64_t stride_tb,
    int64_t stride_tn, const T* __restrict__ w_q, const T* __restrict__ w_k, const T* __restrict__ w_aq,
    const T* __restrict__ w_ak, const float* __restrict__ rope, T* __restrict__ q, T* __restrict__ k,
    T* __restrict__ v, int batch, int n_img, int n_txt, int heads, int head_dim, int lanes, float eps) {
  constexpr int kVec = Vec<T>::kSize;
  const int64_t tokens = n_img + n_txt;
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t row = thread / lanes;  // (b, t, h) flattened, h fastest
  const int lane = static_cast<int>(thread % lanes);
  const bool active = row < static_cast<int64_t>(batch) * tokens * heads;
  const int h = static_cast<int>(row % heads);
  const int64_t bt = row / heads;
  const int64_t t = bt % tokens;
  const int64_t b = bt / tokens;
  const bool is_img = t < n_img;
  const int64_t hd = static_cast<int64_t>(heads) * head_dim;
  const int col = lane * kVec;
  const T* src = is_img ? img + b * stride_ib + t * stride_in : txt + b * stride_tb + (t - n_img) * stride_tn;
  src += h * head_dim + col;
  const int64_t dst = row * head_dim + col;

  // All loads first (q, k, v, weights, rope: five 16-byte vectors in flight per thread),
  // then the two lane-group reductions, then the stores.
  float rot[kVec], xq[kVec], xk[kVec], wq[kVec], wk[kVec];
  Vec<T> xv;
  float ssq = 0.f, ssk = 0.f;
  if (active) {
    load_vec(src, xq);
    load_vec(src + hd, xk);
    xv = *reinterpret_cast<const Vec<T>*>(src + 2 * hd);
    load_vec((is_img ? w_q : w_aq) + col, wq);
    load_vec((is_img ? w_k : w_ak) + col, wk);
#pragma unroll
    for (int i = 0; i < kVec; i += 4) {
      const float4 cs = *reinterpret_cast<const float4*>(rope + t * head_dim + col + i);
      rot[i] = cs.x; rot[i + 1] = cs.y; rot[i + 2] = cs.z; rot[i + 3] = cs.w;
    }
#pragma unroll
    for (int i = 0; i < kVec; ++i) {
      ssq += xq[i] * xq[i];
      ssk += xk[i] * xk[i];
    }
  }
  // Every lane of the warp takes part in the shuffles, active or not.
  const float rq = rsqrtf(group_sum(ssq, lanes) / head_dim + eps);
  const float rk = rsqrtf(group_sum(ssk, lanes) / head_dim + eps);
  if (active) {
    float yq[kVec], yk[kVec];
#pragma unroll
    for (int i = 0; i < kVec; i += 2) {
      const float c = rot[i], s = rot[i + 1];
      const float qe = xq[i] * rq * wq[i], qo = xq[i + 1] * rq * wq[i + 1];
      const float ke = xk[i] * rk * wk[i], ko = xk[i + 1] * rk * wk[i + 1];
      yq[i] = qe * c - qo * s;
      yq[i + 1] = qe * s + qo * c;
      yk[i] = ke * c - ko * s;
      yk[i + 1] = ke * s + ko * c;
    }
    store_vec(q + dst, yq);
    store_vec(k + dst, yk);
    *reinterpret_cast<Vec<T>*>(v + dst) = xv;
  }
}

template <typename T>
cudaError_t launch(const void* img, int64_t sib, int64_t sin, const void* txt, int64_t stb, int64_t stn,
                   const void* wq, const void* wk, const void* waq, const void* wak, const float* rope, void* q,
                   void* k, void* v, int batch, int n_img, int n_txt, int heads, int head_dim, float eps,
                   cudaStream_t stream) {
  constexpr int kVec = Vec<T>::kSize;
  if (head_dim <= 0 || head_dim % kVec) return cudaErrorInvalidValue;
  const int lanes = head_dim / kVec;
  if (lanes > 32 || (lanes & (lanes - 1))) return cudaErrorInvalidValue;
  const int64_t threads = static_cast<int64_t>(batch) * (n_img + n_txt) * heads * lanes;
  if (threads == 0) return cudaSuccess;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  if (blocks > 0x7fffffff) return cudaErrorInvalidValue;
  qk_norm_rope_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(img), sib, sin, static_cast<const T*>(txt), stb, stn, static_cast<const T*>(wq),
      static_cast<const T*>(wk), static_cast<const T*>(waq), static_cast<const T*>(wak), rope, static_cast<T*>(q),
      static_cast<T*>(k), static_cast<T*>(v), batch, n_img, n_txt, heads, head_dim, lanes, eps);
  return cudaGetLastError();
}

}  // namespace

cudaError_t qk_norm_rope_fwd(DType dtype, const void* img, int64_t stride_ib, int64_t stride_in, const void* txt,
                             int64_t stride_tb, int64_t stride_tn, const void* w_q, const void* w_k,
                             const void* w_added_q, const void* w_added_k, const float* rope, void* q, void* k,
                             void* v, int batch, int n_img, int n_txt, int heads, int head_dim, float eps,
                             cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch<float>(img, stride_ib, stride_in, txt, stride_tb, stride_tn, w_q, w_k, w_added_q, w_added_k,
                           rope, q, k, v, batch, n_img, n_txt, heads, head_dim, eps, stream);
    case DType::kFloat16:
      return launch<__half>(img, stride_ib, stride_in, txt, stride_tb, stride_tn, w_q, w_k, w_added_q, w_added_k,
                            rope, q, k, v, batch, n_img, n_txt, heads, head_dim, eps, stream);
    case DType::kBFloat16:
      return launch<__nv_bfloat16>(img, stride_ib, stride_in, txt, stride_tb, stride_tn, w_q, w_k, w_added_q,
                                   w_added_k, rope, q, k, v, batch, n_img, n_txt, heads, head_dim, eps, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lens_fast
