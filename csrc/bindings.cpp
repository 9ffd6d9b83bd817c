// Python binding of the CUDA launchers as lens_fast._C (built only by a CUDA build of
// torch; see setup.py). Output buffers are allocated by the Python launchers, which
// also choose the backend: this layer checks devices, dtypes and layouts, passes plain
// pointers and the current stream, and turns a launch error into a Python exception.
// It uses only device-generic ATen/c10 headers (no torch/extension.h, no CUDA parts of
// ATen), so it also compiles against a CPU build of torch: CI checks its syntax that way.
#include <ATen/core/Tensor.h>
#include <torch/csrc/utils/pybind.h>

#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <optional>
#include <string>

#include "lens_fast_kernels.h"

namespace {

using Opt = std::optional<at::Tensor>;

lens_fast::DType kernel_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return lens_fast::DType::kFloat32;
    case at::kHalf: return lens_fast::DType::kFloat16;
    case at::kBFloat16: return lens_fast::DType::kBFloat16;
    default: TORCH_CHECK(false, "lens_fast._C: dtype ", t.scalar_type(), " is not supported; expected float32, "
                         "float16 or bfloat16");
  }
}

cudaStream_t current_stream(const at::Tensor& t) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(t.device().type())->getStream(t.device());
  return static_cast<cudaStream_t>(stream.native_handle());
}

void check(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.is_cuda(), "lens_fast._C: ", name, " is on ", t.device(), "; expected a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), "lens_fast._C: ", name, " is on ", t.device(), "; expected ",
              like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "lens_fast._C: ", name, " is ", t.scalar_type(),
              "; expected ", like.scalar_type());
  TORCH_CHECK(t.dim() == 0 || t.stride(-1) == 1, "lens_fast._C: ", name, " needs a unit last stride, got strides ",
              t.strides());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, "lens_fast._C: ", name,
              " is not 16-byte aligned");
}

void check_launch(cudaError_t status, const char* what) {
  TORCH_CHECK(status == cudaSuccess, "lens_fast._C.", what, " failed: ", cudaGetErrorString(status),
              status == cudaErrorInvalidValue ? " (unsupported sizes: see csrc/lens_fast_kernels.h)" : "");
}

const void* ptr_or_null(const Opt& t) { return t.has_value() ? t->data_ptr() : nullptr; }

void qk_norm_rope_fwd(const at::Tensor& img, const at::Tensor& txt, const at::Tensor& w_q, const at::Tensor& w_k,
                      const at::Tensor& w_added_q, const at::Tensor& w_added_k, const at::Tensor& rope,
                      const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t heads, double eps) {
  TORCH_CHECK(img.dim() == 3 && txt.dim() == 3, "lens_fast._C.qk_norm_rope_fwd: img/txt must be [B, rows, 3*H*D]");
  const int64_t batch = img.size(0), n_img = img.size(1), n_txt = txt.size(1);
  TORCH_CHECK(heads > 0 && img.size(2) % (3 * heads) == 0, "lens_fast._C.qk_norm_rope_fwd: width ", img.size(2),
              " is not 3 * heads (", heads, ") * head_dim");
  const int64_t head_dim = img.size(2) / (3 * heads);
  for (const auto* t : {&txt, &w_q, &w_k, &w_added_q, &w_added_k, &q, &k, &v}) check(*t, img, "an argument");
  check(img, img, "img_qkv");
  TORCH_CHECK(rope.is_cuda() && rope.scalar_type() == at::kFloat && rope.is_contiguous() &&
                  rope.numel() == (n_img + n_txt) * head_dim,
              "lens_fast._C.qk_norm_rope_fwd: rope must be contiguous float32 [N + S, D/2, 2] on the GPU");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->is_contiguous() && t->numel() == batch * (n_img + n_txt) * heads * head_dim,
                "lens_fast._C.qk_norm_rope_fwd: outputs must be contiguous [B, N + S, H, D]");
  const c10::DeviceGuard guard(img.device());
  check_launch(lens_fast::qk_norm_rope_fwd(
                   kernel_dtype(img), img.data_ptr(), img.stride(0), img.stride(1), txt.data_ptr(), txt.stride(0),
                   txt.stride(1), w_q.data_ptr(), w_k.data_ptr(), w_added_q.data_ptr(), w_added_k.data_ptr(),
                   rope.data_ptr<float>(), q.data_ptr(), k.data_ptr(), v.data_ptr(), static_cast<int>(batch),
                   static_cast<int>(n_img), static_cast<int>(n_txt), static_cast<int>(heads),
                   static_cast<int>(head_dim), static_cast<float>(eps), current_stream(img)),
               "qk_norm_rope_fwd");
}

void norm_modulate_fwd(const at::Tensor& x, const Opt& y, const Opt& gate, const Opt& weight, const Opt& shift,
                       const Opt& scale, const Opt& res_out, const at::Tensor& out, const Opt& mean,
                       const at::Tensor& rstd, double eps, bool layer) {
  TORCH_CHECK(x.dim() == 3, "lens_fast._C.norm_modulate_fwd: x must be [B, L, C], got ", x.sizes());
  const int64_t batch = x.size(0), rows = x.size(1), channels = x.size(2);
  check(x, x, "x");
  check(out, x, "out");
  TORCH_CHECK(out.is_contiguous() && out.sizes() == x.sizes(), "lens_fast._C.norm_modulate_fwd: out must be "
              "contiguous ", x.sizes());
  TORCH_CHECK(y.has_value() == gate.has_value() && y.has_value() == res_out.has_value(),
              "lens_fast._C.norm_modulate_fwd: y, gate and res_out come together");
  TORCH_CHECK(shift.has_value() == scale.has_value(), "lens_fast._C.norm_modulate_fwd: shift and scale come together");
  TORCH_CHECK(!layer || mean.has_value(), "lens_fast._C.norm_modulate_fwd: LayerNorm needs a mean buffer");
  for (const auto* t : {&y, &gate, &weight, &shift, &scale, &res_out})
    if (t->has_value()) check(**t, x, "an optional argument");
  if (res_out.has_value())
    TORCH_CHECK(res_out->is_contiguous() && res_out->sizes() == x.sizes(),
                "lens_fast._C.norm_modulate_fwd: res_out must be contiguous ", x.sizes());
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&rstd, mean.has_value() ? &*mean : &rstd})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == batch * rows,
                "lens_fast._C.norm_modulate_fwd: mean/rstd must be contiguous float32 [B, L]");
  const c10::DeviceGuard guard(x.device());
  check_launch(lens_fast::norm_modulate_fwd(
                   kernel_dtype(x), x.data_ptr(), x.stride(0), x.stride(1), ptr_or_null(y),
                   y.has_value() ? y->stride(0) : 0, y.has_value() ? y->stride(1) : 0, ptr_or_null(gate),
                   gate.has_value() ? gate->stride(0) : 0, ptr_or_null(weight), ptr_or_null(shift),
                   shift.has_value() ? shift->stride(0) : 0, ptr_or_null(scale),
                   scale.has_value() ? scale->stride(0) : 0, res_out.has_value() ? res_out->data_ptr() : nullptr,
                   out.data_ptr(), mean.has_value() ? mean->data_ptr<float>() : nullptr, rstd.data_ptr<float>(),
                   static_cast<int>(batch), static_cast<int>(rows), static_cast<int>(channels),
                   static_cast<float>(eps), layer, current_stream(x)),
               "norm_modulate_fwd");
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lens_fast CUDA kernels (forward of qk_norm_rope and the adaLN chain)";
  m.def("qk_norm_rope_fwd", &qk_norm_rope_fwd, "q, k, v <- QK-norm + RoPE of both streams' QKV (see csrc/)",
        py::arg("img_qkv"), py::arg("txt_qkv"), py::arg("norm_q"), py::arg("norm_k"), py::arg("norm_added_q"),
        py::arg("norm_added_k"), py::arg("rope"), py::arg("q"), py::arg("k"), py::arg("v"), py::arg("heads"),
        py::arg("eps"));
  m.def("norm_modulate_fwd", &norm_modulate_fwd, "(res_out,) out, (mean,) rstd <- the adaLN chain (see csrc/)",
        py::arg("x"), py::arg("y"), py::arg("gate"), py::arg("weight"), py::arg("shift"), py::arg("scale"),
        py::arg("res_out"), py::arg("out"), py::arg("mean"), py::arg("rstd"), py::arg("eps"), py::arg("layer"));
}
