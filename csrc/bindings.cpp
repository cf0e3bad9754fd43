// pybind11 module vlcore._C: build metadata, runtime queries and (with the op issues) the CUDA kernels.
#include <pybind11/pybind11.h>

#include "vlcore_cuda.h"

namespace py = pybind11;

void bind_contrastive(py::module_& m);  // csrc/contrastive_bind.cpp
void bind_vq(py::module_& m);  // csrc/vq_bind.cpp

#ifndef VLCORE_BUILD_CUDA_VERSION
#define VLCORE_BUILD_CUDA_VERSION "unknown"
#endif
#ifndef VLCORE_BUILD_ARCHS
#define VLCORE_BUILD_ARCHS "unknown"
#endif
#ifndef VLCORE_BUILD_COMPILER
#define VLCORE_BUILD_COMPILER "unknown"
#endif
#ifndef VLCORE_BUILD_DATE
#define VLCORE_BUILD_DATE "unknown"
#endif
#ifndef VLCORE_BUILD_VERSION
#define VLCORE_BUILD_VERSION "unknown"
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "vlcore CUDA extension (raw-pointer kernels, no torch headers)";

  m.def("build_info", []() {
    py::dict d;
    d["vlcore_version"] = VLCORE_BUILD_VERSION;
    d["cuda_version"] = VLCORE_BUILD_CUDA_VERSION;
    d["archs"] = VLCORE_BUILD_ARCHS;
    d["compiler"] = VLCORE_BUILD_COMPILER;
    d["nvcc_host_compiler"] = __VERSION__;
    d["date"] = VLCORE_BUILD_DATE;
    d["cudart_runtime_version"] = vlcore::runtime_version();
    return d;
  });

  m.def("runtime_info", []() {
    py::dict d;
    std::string error;
    int n = vlcore::device_count(&error);
    d["driver_version"] = vlcore::driver_version();
    d["device_count"] = n;
    d["error"] = error;
    py::list devices;
    for (int i = 0; i < n; ++i) {
      int major = 0, minor = 0;
      std::string name = vlcore::device_name(i, &major, &minor);
      devices.append(py::make_tuple(name, major, minor));
    }
    d["devices"] = devices;
    return d;
  });

  // Op families register their kernels here as they land (see csrc/<op>.cu).
  bind_contrastive(m);
  bind_vq(m);
}
