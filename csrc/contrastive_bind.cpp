// pybind11 binding of the contrastive-loss CUDA kernels (csrc/contrastive.cu): raw pointers, sizes, strides,
// dtype code and stream handle — no torch headers. A CUDA error comes back to Python as RuntimeError.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "vlcore_cuda.h"

namespace py = pybind11;

namespace vlcore {
std::string contrastive_forward(uintptr_t x, uintptr_t y, uintptr_t scale, uintptr_t bias, uintptr_t rows_out,
                                uintptr_t lse_out, int64_t rows, int64_t cols, int64_t dim, int64_t offset,
                                int64_t sx0, int64_t sx1, int64_t sy0, int64_t sy1, int dtype, bool siglip,
                                uintptr_t stream_handle);
std::string contrastive_backward(uintptr_t drow, uintptr_t x, uintptr_t y, uintptr_t scale, uintptr_t bias,
                                 uintptr_t lse, uintptr_t dx, uintptr_t dy, uintptr_t partial, int64_t rows,
                                 int64_t cols, int64_t dim, int64_t offset, int64_t sx0, int64_t sx1, int64_t sy0,
                                 int64_t sy1, int64_t sdx0, int64_t sdy0, int dtype, bool siglip,
                                 uintptr_t stream_handle);
}  // namespace vlcore

void bind_contrastive(py::module_& m) {
  m.def(
      "contrastive_fwd",
      [](uintptr_t x, uintptr_t y, uintptr_t scale, uintptr_t bias, uintptr_t rows_out, uintptr_t lse_out,
         int64_t rows, int64_t cols, int64_t dim, int64_t offset, int64_t sx0, int64_t sx1, int64_t sy0,
         int64_t sy1, int dtype, bool siglip, uintptr_t stream) {
        std::string err = vlcore::contrastive_forward(x, y, scale, bias, rows_out, lse_out, rows, cols, dim, offset,
                                                      sx0, sx1, sy0, sy1, dtype, siglip, stream);
        if (!err.empty()) throw std::runtime_error(err);
      },
      "Contrastive rows x gathered columns forward: per-row loss terms (fp32) and, for InfoNCE, row lse (fp32). "
      "scale/bias point to fp32 device scalars.",
      py::arg("x"), py::arg("y"), py::arg("scale"), py::arg("bias"), py::arg("rows_out"), py::arg("lse_out"),
      py::arg("rows"), py::arg("cols"), py::arg("dim"), py::arg("offset"), py::arg("sx0"), py::arg("sx1"),
      py::arg("sy0"), py::arg("sy1"), py::arg("dtype"), py::arg("siglip"), py::arg("stream"));
  m.def(
      "contrastive_bwd",
      [](uintptr_t drow, uintptr_t x, uintptr_t y, uintptr_t scale, uintptr_t bias, uintptr_t lse, uintptr_t dx,
         uintptr_t dy, uintptr_t partial, int64_t rows, int64_t cols, int64_t dim, int64_t offset, int64_t sx0,
         int64_t sx1, int64_t sy0, int64_t sy1, int64_t sdx0, int64_t sdy0, int dtype, bool siglip,
         uintptr_t stream) {
        std::string err = vlcore::contrastive_backward(drow, x, y, scale, bias, lse, dx, dy, partial, rows, cols, dim,
                                                       offset, sx0, sx1, sy0, sy1, sdx0, sdy0, dtype, siglip, stream);
        if (!err.empty()) throw std::runtime_error(err);
      },
      "Contrastive backward: dx (rows, dim), dy (cols, dim) in the input dtype (unit stride in dim), and "
      "per-row-block partial sums of dscale then dbias in partial[2 * ceil(rows / 32)] (fp32).",
      py::arg("drow"), py::arg("x"), py::arg("y"), py::arg("scale"), py::arg("bias"), py::arg("lse"),
      py::arg("dx"), py::arg("dy"), py::arg("partial"), py::arg("rows"), py::arg("cols"), py::arg("dim"),
      py::arg("offset"), py::arg("sx0"), py::arg("sx1"), py::arg("sy0"), py::arg("sy1"), py::arg("sdx0"),
      py::arg("sdy0"), py::arg("dtype"), py::arg("siglip"), py::arg("stream"));
}
