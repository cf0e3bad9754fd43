// Declarations shared by the pybind11 binding module (host C++) and the CUDA translation units.
// The binding never includes torch headers: kernels take raw device pointers, sizes, strides, a dtype code
// and the CUDA stream handle, so the extension survives torch upgrades.
#pragma once

#include <cstdint>
#include <string>

namespace vlcore {

// dtype codes shared with vlcore/_ext.py (DTYPE_CODES)
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3, kInt32 = 4, kInt64 = 5 };

int runtime_version();
int driver_version();
int device_count(std::string* error);
std::string device_name(int device, int* major, int* minor);

}  // namespace vlcore
