// pybind11 binding of the visual dictionary CUDA kernels (csrc/vq.cu): raw pointers, sizes, strides, dtype codes
// and the stream handle — no torch headers. A CUDA error comes back to Python as RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "vlcore_cuda.h"

namespace py = pybind11;

namespace vlcore {
std::string vq_nearest(uintptr_t x, uintptr_t e, uintptr_t e_sq, uintptr_t idx, uintptr_t dist, int64_t n, int64_t k,
                       int64_t dim, int64_t sx, int64_t se, int x_dtype, int e_dtype, bool cosine, float norm_eps,
                       uintptr_t stream_handle);
std::string vq_statistics(uintptr_t x, uintptr_t order, uintptr_t offsets, uintptr_t out, int64_t k, int64_t dim,
                          int64_t sx, int64_t so, int x_dtype, uintptr_t stream_handle);
std::string vq_ema(uintptr_t codebook, uintptr_t ema_counts, uintptr_t ema_sums, uintptr_t packed, uintptr_t total,
                   int64_t k, int64_t dim, int64_t sp, float gamma, float one_minus_gamma, float eps, float k_eps,
                   uintptr_t stream_handle);
}  // namespace vlcore

namespace {
void check(const std::string& err) {
  if (!err.empty()) throw std::runtime_error(err);
}
}  // namespace

void bind_vq(py::module_& m) {
  m.def(
      "vq_nearest",
      [](uintptr_t x, uintptr_t e, uintptr_t e_sq, uintptr_t idx, uintptr_t dist, int64_t n, int64_t k, int64_t dim,
         int64_t sx, int64_t se, int x_dtype, int e_dtype, bool cosine, float norm_eps, uintptr_t stream) {
        check(vlcore::vq_nearest(x, e, e_sq, idx, dist, n, k, dim, sx, se, x_dtype, e_dtype, cosine, norm_eps, stream));
      },
      "Nearest codebook entry per row: x (n, dim) with row stride sx and unit dim stride, codebook operand e (k, dim) "
      "(fp32, or x's fp16/bf16 dtype), ||e||^2 fp32 [k] -> idx int64 [n], squared distance fp32 [n].",
      py::arg("x"), py::arg("e"), py::arg("e_sq"), py::arg("idx"), py::arg("dist"), py::arg("n"), py::arg("k"),
      py::arg("dim"), py::arg("sx"), py::arg("se"), py::arg("x_dtype"), py::arg("e_dtype"), py::arg("cosine"),
      py::arg("norm_eps"), py::arg("stream"));
  m.def(
      "vq_statistics",
      [](uintptr_t x, uintptr_t order, uintptr_t offsets, uintptr_t out, int64_t k, int64_t dim, int64_t sx,
         int64_t so, int x_dtype, uintptr_t stream) {
        check(vlcore::vq_statistics(x, order, offsets, out, k, dim, sx, so, x_dtype, stream));
      },
      "Per-entry sums and counts into out (k, dim + 1) fp32 (row stride so) from rows sorted by entry: order int64 "
      "[n], offsets int64 [k + 1]. Deterministic (no atomics).",
      py::arg("x"), py::arg("order"), py::arg("offsets"), py::arg("out"), py::arg("k"), py::arg("dim"), py::arg("sx"),
      py::arg("so"), py::arg("x_dtype"), py::arg("stream"));
  m.def(
      "vq_ema",
      [](uintptr_t codebook, uintptr_t ema_counts, uintptr_t ema_sums, uintptr_t packed, uintptr_t total, int64_t k,
         int64_t dim, int64_t sp, float gamma, float one_minus_gamma, float eps, float k_eps, uintptr_t stream) {
        check(vlcore::vq_ema(codebook, ema_counts, ema_sums, packed, total, k, dim, sp, gamma, one_minus_gamma, eps,
                             k_eps, stream));
      },
      "SOHO momentum step on contiguous fp32 state: sums EMA from packed (k, dim + 1) statistics (row stride sp), "
      "Laplace smoothing with the device scalar total = sum of the (already updated) EMA counts, codebook = "
      "sums / smoothed counts.",
      py::arg("codebook"), py::arg("ema_counts"), py::arg("ema_sums"), py::arg("packed"), py::arg("total"),
      py::arg("k"), py::arg("dim"), py::arg("sp"), py::arg("gamma"), py::arg("one_minus_gamma"), py::arg("eps"),
      py::arg("k_eps"), py::arg("stream"));
}
