// CUDA runtime queries used by the binding module: what the driver reports, without torch.
// Linked against the static cudart, so importing vlcore._C never needs libcudart and works without a GPU.
#include <cuda_runtime.h>

#include "vlcore_cuda.h"

namespace vlcore {

int runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

int driver_version() {
  int v = 0;
  if (cudaDriverGetVersion(&v) != cudaSuccess) return 0;
  return v;
}

int device_count(std::string* error) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    if (error) *error = cudaGetErrorString(err);
    cudaGetLastError();  // clear the sticky "no driver / no device" state
    return 0;
  }
  return n;
}

std::string device_name(int device, int* major, int* minor) {
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    cudaGetLastError();
    return std::string();
  }
  *major = prop.major;
  *minor = prop.minor;
  return std::string(prop.name);
}

}  // namespace vlcore
