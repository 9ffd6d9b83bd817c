// Launchers of lens_fast's CUDA kernels: plain pointers, sizes and a cudaStream_t, so the
// .cu files need only CUDA headers (the binding to torch lives in bindings.cpp).
// Every launcher checks its sizes, launches asynchronously on `stream` and returns the
// launch status (cudaErrorInvalidValue for sizes it does not support).
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

namespace lens_fast {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// q, k, v [B, N + S, H, D] (contiguous) from img_qkv [B, N, 3*H*D] and txt_qkv [B, S, 3*H*D]
// (row strides in elements, unit last stride): per-head RMSNorm on q and k with the
// stream's weights [D], RoPE from `rope` [N + S, D/2, 2] float32 (cos, sin), v copied.
// Needs D * sizeof(element) a multiple of 16 with D / (16 / sizeof(element)) a power of
// two <= 32, and 16-byte aligned rows.
cudaError_t qk_norm_rope_fwd(DType dtype, const void* img, int64_t stride_ib, int64_t stride_in,
                             const void* txt, int64_t stride_tb, int64_t stride_tn,
                             const void* w_q, const void* w_k, const void* w_added_q, const void* w_added_k,
                             const float* rope, void* q, void* k, void* v,
                             int batch, int n_img, int n_txt, int heads, int head_dim, float eps,
                             cudaStream_t stream);

// The adaLN chain on x [B, L, C] (strides in elements, unit last stride):
//   x' = x + gate[b] * y            (when y != nullptr; x' stored to res_out [B, L, C])
//   n  = norm(x') (* weight)        (RMSNorm, or LayerNorm without affine when layer)
//   out = n * (1 + scale[b]) + shift[b]   (when shift != nullptr)
// out is contiguous [B, L, C]; rstd (and mean when layer) are float32 [B, L].
// Needs C * sizeof(element) a multiple of 16 and at most 32 KiB, 16-byte aligned rows.
cudaError_t norm_modulate_fwd(DType dtype, const void* x, int64_t stride_xb, int64_t stride_xl,
                              const void* y, int64_t stride_yb, int64_t stride_yl,
                              const void* gate, int64_t stride_gate, const void* weight,
                              const void* shift, int64_t stride_shift, const void* scale, int64_t stride_scale,
                              void* res_out, void* out, float* mean, float* rstd,
                              int batch, int rows, int channels, float eps, bool layer, cudaStream_t stream);

}  // namespace lens_fast
