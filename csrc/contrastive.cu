// Contrastive losses (InfoNCE, SigLIP) over local rows x gathered columns: CUDA forward and backward.
// A portable fallback for machines without Triton (fp32 FMA tiles, no tensor cores), not the fast path.
//
// Same op and formulas as kernels/contrastive.py (see vlcore/reference/contrastive.py): rows x (b, D) against
// columns y (B, D), positive column of row i at offset + i, logits l = s * x.y (+ bias), fp32 math for
// fp32/fp16/bf16 loads. The logits live only in a 32 x 32 shared-memory tile; the backward recomputes them.
//
//   forward   one block per 32 rows, loops over 32-column tiles; each warp owns 4 rows and keeps their online
//             log-sum-exp (InfoNCE) or softplus sum (SigLIP) in registers, reducing a tile row with shuffles.
//   dx        one block per (32 rows, 128-wide chunk of D), loops over column tiles: dx = s * G * y.
//   dy        one block per (32 columns, 128-wide chunk of D), loops over row tiles: dy = s * G^T * x.
//   dscale, dbias: per-row-block partial sums from the dx blocks of the first D chunk, reduced in a fixed
//             order in shared memory; the host sums the partials (no atomics: deterministic).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "vlcore_cuda.h"

namespace vlcore {
namespace {

constexpr int kTile = 32;      // rows and columns of a logits tile
constexpr int kTileK = 32;     // D step of the logits product
constexpr int kChunkD = 128;   // D columns of the gradient accumulated by one block (larger D: more blocks,
                               // each recomputing the logits)
constexpr int kPerThread = kChunkD / 8;  // accumulators per thread: 8 threads share a row (or column)
constexpr int kThreads = 256;  // 8 warps
constexpr int kPad = kTile + 1;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

struct Problem {
  int64_t rows, cols, dim, offset;
  int64_t sx0, sx1, sy0, sy1;
  float scale, bias;  // filled in the kernel from device pointers
  bool siglip;
};

// Scaled-free dot products of rows [row0, row0+32) of x with columns [col0, col0+32) of y into
// dots[r][c] (shared). Thread t owns r = t / 8 and c = t % 8 + 8q (q < 4). Out-of-range entries are 0.
template <typename T>
__device__ void dots_tile(const T* __restrict__ x, const T* __restrict__ y, const Problem& p, int64_t row0,
                          int64_t col0, float (*xs)[kTileK + 1], float (*ys)[kTileK + 1], float (*dots)[kPad]) {
  const int t = threadIdx.x;
  const int r = t >> 3;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int64_t k0 = 0; k0 < p.dim; k0 += kTileK) {
    for (int i = t; i < kTile * kTileK; i += kThreads) {
      const int rr = i / kTileK, kk = i % kTileK;
      const int64_t gr = row0 + rr, gc = col0 + rr, gk = k0 + kk;
      xs[rr][kk] = (gr < p.rows && gk < p.dim) ? to_float(x[gr * p.sx0 + gk * p.sx1]) : 0.f;
      ys[rr][kk] = (gc < p.cols && gk < p.dim) ? to_float(y[gc * p.sy0 + gk * p.sy1]) : 0.f;
    }
    __syncthreads();
#pragma unroll 8
    for (int kk = 0; kk < kTileK; ++kk) {
      const float xv = xs[r][kk];
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[q] = fmaf(xv, ys[(t & 7) + 8 * q][kk], acc[q]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int q = 0; q < 4; ++q) dots[r][(t & 7) + 8 * q] = acc[q];
  __syncthreads();
}

// s and bias live on the device (learnable parameters): read them in the kernel, no host sync.
__device__ __forceinline__ void load_scalars(Problem& p, const float* scale, const float* bias) {
  p.scale = scale[0];
  p.bias = p.siglip ? bias[0] : 0.f;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// softplus(t) = log(1 + e^t), exact in fp32 on both sides.
__device__ __forceinline__ float softplus(float t) { return fmaxf(t, 0.f) + log1pf(expf(-fabsf(t))); }

// G_ij = drow_i * dr_i/dl_ij (0 outside the matrix).
__device__ __forceinline__ float grad_entry(float dot, const Problem& p, int64_t row, int64_t col, float lse,
                                            float drow) {
  if (row >= p.rows || col >= p.cols) return 0.f;
  const float logit = dot * p.scale;
  const bool pos = col == row + p.offset;
  float g;
  if (p.siglip) {
    const float zt = pos ? logit + p.bias : -(logit + p.bias);
    const float e = expf(-fabsf(zt));
    const float sig = zt >= 0.f ? e / (1.f + e) : 1.f / (1.f + e);  // sigma(-z*l)
    g = pos ? -sig : sig;
  } else {
    g = expf(logit - lse) - (pos ? 1.f : 0.f);
  }
  return g * drow;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(const T* __restrict__ x, const T* __restrict__ y,
                                                           Problem p, const float* __restrict__ scale,
                                                           const float* __restrict__ bias,
                                                           float* __restrict__ rows_out,
                                                           float* __restrict__ lse_out) {
  load_scalars(p, scale, bias);
  __shared__ float xs[kTile][kTileK + 1];
  __shared__ float ys[kTile][kTileK + 1];
  __shared__ float dots[kTile][kPad];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  float m[4], l[4], pos[4], total[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) m[i] = -INFINITY, l[i] = 0.f, pos[i] = 0.f, total[i] = 0.f;
  for (int64_t col0 = 0; col0 < p.cols; col0 += kTile) {
    dots_tile(x, y, p, row0, col0, xs, ys, dots);
    const int64_t col = col0 + lane;
    const bool valid = col < p.cols;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int r = warp * 4 + i;
      const int64_t row = row0 + r;
      const float logit = dots[r][lane] * p.scale;
      const bool is_pos = valid && col == row + p.offset;
      if (p.siglip) {
        const float zt = is_pos ? logit + p.bias : -(logit + p.bias);
        total[i] += warp_sum(valid ? softplus(-zt) : 0.f);
      } else {
        const float v = valid ? logit : -INFINITY;
        const float m_new = fmaxf(m[i], warp_max(v));
        l[i] = l[i] * expf(m[i] - m_new) + warp_sum(valid ? expf(v - m_new) : 0.f);
        m[i] = m_new;
        pos[i] += warp_sum(is_pos ? logit : 0.f);
        // a NaN logit makes l NaN (exp(NaN)), so the row loss is NaN even though fmaxf drops NaN
      }
    }
    __syncthreads();  // dots is overwritten by the next tile
  }
  if (lane == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = row0 + warp * 4 + i;
      if (row >= p.rows) continue;
      if (p.siglip) {
        rows_out[row] = total[i];
      } else {
        const float lse = m[i] + logf(l[i]);
        lse_out[row] = lse;
        rows_out[row] = lse - pos[i];
      }
    }
  }
}

// Fixed-order block reduction of one value per thread (deterministic).
__device__ float block_sum(float v, float* scratch) {
  scratch[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) scratch[threadIdx.x] += scratch[threadIdx.x + s];
    __syncthreads();
  }
  const float out = scratch[0];
  __syncthreads();
  return out;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dx_kernel(const T* __restrict__ x, const T* __restrict__ y, Problem p,
                                                      const float* __restrict__ scale,
                                                      const float* __restrict__ bias,
                                                      const float* __restrict__ lse,
                                                      const float* __restrict__ drow, T* __restrict__ dx,
                                                      int64_t sdx0, float* __restrict__ partial,
                                                      int64_t n_row_blocks) {
  load_scalars(p, scale, bias);
  __shared__ float xs[kTile][kTileK + 1];
  __shared__ float ys[kTile][kTileK + 1];
  __shared__ float g[kTile][kPad];
  __shared__ float yd[kTile][kChunkD + 1];
  __shared__ float row_lse[kTile], row_drow[kTile];
  __shared__ float scratch[kThreads];
  const int t = threadIdx.x, r = t >> 3;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kChunkD;
  if (t < kTile) {
    const int64_t row = row0 + t;
    row_lse[t] = (!p.siglip && row < p.rows) ? lse[row] : 0.f;
    row_drow[t] = row < p.rows ? drow[row] : 0.f;
  }
  __syncthreads();
  float acc[kPerThread] = {};
  float dscale = 0.f, dbias = 0.f;
  for (int64_t col0 = 0; col0 < p.cols; col0 += kTile) {
    dots_tile(x, y, p, row0, col0, xs, ys, g);
#pragma unroll
    for (int q = 0; q < 4; ++q) {  // the thread turns its own dots into G (same entries it wrote)
      const int c = (t & 7) + 8 * q;
      const float dot = g[r][c];
      const float ge = grad_entry(dot, p, row0 + r, col0 + c, row_lse[r], row_drow[r]);
      dscale = fmaf(ge, dot, dscale);
      dbias += ge;
      g[r][c] = ge;
    }
    for (int i = t; i < kTile * kChunkD; i += kThreads) {
      const int cc = i / kChunkD, dd = i % kChunkD;
      const int64_t gc = col0 + cc, gd = d0 + dd;
      yd[cc][dd] = (gc < p.cols && gd < p.dim) ? to_float(y[gc * p.sy0 + gd * p.sy1]) : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int c = 0; c < kTile; ++c) {
      const float gv = g[r][c];
#pragma unroll
      for (int q = 0; q < kPerThread; ++q) acc[q] = fmaf(gv, yd[c][(t & 7) + 8 * q], acc[q]);
    }
    __syncthreads();
  }
  const int64_t row = row0 + r;
#pragma unroll
  for (int q = 0; q < kPerThread; ++q) {
    const int64_t d = d0 + (t & 7) + 8 * q;
    if (row < p.rows && d < p.dim) dx[row * sdx0 + d] = from_float<T>(acc[q] * p.scale);
  }
  if (blockIdx.y == 0) {  // uniform over the block: every thread takes part in the reductions
    const float s_sum = block_sum(dscale, scratch);
    const float b_sum = block_sum(dbias, scratch);
    if (t == 0) {
      partial[blockIdx.x] = s_sum;
      partial[n_row_blocks + blockIdx.x] = b_sum;
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dy_kernel(const T* __restrict__ x, const T* __restrict__ y, Problem p,
                                                      const float* __restrict__ scale,
                                                      const float* __restrict__ bias,
                                                      const float* __restrict__ lse,
                                                      const float* __restrict__ drow, T* __restrict__ dy,
                                                      int64_t sdy0) {
  load_scalars(p, scale, bias);
  __shared__ float xs[kTile][kTileK + 1];
  __shared__ float ys[kTile][kTileK + 1];
  __shared__ float g[kTile][kPad];
  __shared__ float xd[kTile][kChunkD + 1];
  const int t = threadIdx.x, c_own = t >> 3;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t d0 = static_cast<int64_t>(blockIdx.y) * kChunkD;
  float acc[kPerThread] = {};
  for (int64_t row0 = 0; row0 < p.rows; row0 += kTile) {
    dots_tile(x, y, p, row0, col0, xs, ys, g);
    const int r = t >> 3;
    const int64_t row = row0 + r;
    const float row_lse = (!p.siglip && row < p.rows) ? lse[row] : 0.f;
    const float row_drow = row < p.rows ? drow[row] : 0.f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int c = (t & 7) + 8 * q;
      g[r][c] = grad_entry(g[r][c], p, row, col0 + c, row_lse, row_drow);
    }
    for (int i = t; i < kTile * kChunkD; i += kThreads) {
      const int rr = i / kChunkD, dd = i % kChunkD;
      const int64_t gr = row0 + rr, gd = d0 + dd;
      xd[rr][dd] = (gr < p.rows && gd < p.dim) ? to_float(x[gr * p.sx0 + gd * p.sx1]) : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int rr = 0; rr < kTile; ++rr) {
      const float gv = g[rr][c_own];
#pragma unroll
      for (int q = 0; q < kPerThread; ++q) acc[q] = fmaf(gv, xd[rr][(t & 7) + 8 * q], acc[q]);
    }
    __syncthreads();
  }
  const int64_t col = col0 + c_own;
#pragma unroll
  for (int q = 0; q < kPerThread; ++q) {
    const int64_t d = d0 + (t & 7) + 8 * q;
    if (col < p.cols && d < p.dim) dy[col * sdy0 + d] = from_float<T>(acc[q] * p.scale);
  }
}

std::string launch_error(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return std::string();
  return std::string("vlcore._C.") + what + ": CUDA error: " + cudaGetErrorString(err);
}

Problem make_problem(int64_t rows, int64_t cols, int64_t dim, int64_t offset, int64_t sx0, int64_t sx1,
                     int64_t sy0, int64_t sy1, bool siglip) {
  return Problem{rows, cols, dim, offset, sx0, sx1, sy0, sy1, 0.f, 0.f, siglip};
}

std::string check_sizes(const char* what, int64_t rows, int64_t cols, int64_t dim, int dtype) {
  if (dtype != kFloat32 && dtype != kFloat16 && dtype != kBFloat16)
    return std::string("vlcore._C.") + what + ": dtype code " + std::to_string(dtype) +
           " not supported (float32, float16, bfloat16)";
  if (rows < 1 || cols < 1 || dim < 1)
    return std::string("vlcore._C.") + what + ": sizes must be positive, got rows " + std::to_string(rows) +
           ", cols " + std::to_string(cols) + ", dim " + std::to_string(dim);
  if ((rows + kTile - 1) / kTile > 0x7fffffffLL || (cols + kTile - 1) / kTile > 0x7fffffffLL ||
      (dim + kChunkD - 1) / kChunkD > 65535)
    return std::string("vlcore._C.") + what + ": sizes exceed the launch grid";
  return std::string();
}

}  // namespace

std::string contrastive_forward(uintptr_t x, uintptr_t y, uintptr_t scale, uintptr_t bias, uintptr_t rows_out,
                                uintptr_t lse_out, int64_t rows, int64_t cols, int64_t dim, int64_t offset,
                                int64_t sx0, int64_t sx1, int64_t sy0, int64_t sy1, int dtype, bool siglip,
                                uintptr_t stream_handle) {
  std::string err = check_sizes("contrastive_fwd", rows, cols, dim, dtype);
  if (!err.empty()) return err;
  cudaGetLastError();  // a stale error from someone else's launch must not be blamed on this one
  const Problem p = make_problem(rows, cols, dim, offset, sx0, sx1, sy0, sy1, siglip);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const dim3 grid(static_cast<unsigned>((rows + kTile - 1) / kTile));
  const auto* sc = reinterpret_cast<const float*>(scale);
  const auto* bi = reinterpret_cast<const float*>(bias);
  auto* ro = reinterpret_cast<float*>(rows_out);
  auto* lo = reinterpret_cast<float*>(lse_out);
  if (dtype == kFloat32)
    forward_kernel<float><<<grid, kThreads, 0, stream>>>(reinterpret_cast<const float*>(x),
                                                         reinterpret_cast<const float*>(y), p, sc, bi, ro, lo);
  else if (dtype == kFloat16)
    forward_kernel<__half><<<grid, kThreads, 0, stream>>>(reinterpret_cast<const __half*>(x),
                                                          reinterpret_cast<const __half*>(y), p, sc, bi, ro, lo);
  else
    forward_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(reinterpret_cast<const __nv_bfloat16*>(x),
                                                                 reinterpret_cast<const __nv_bfloat16*>(y), p,
                                                                 sc, bi, ro, lo);
  return launch_error("contrastive_fwd");
}

std::string contrastive_backward(uintptr_t drow, uintptr_t x, uintptr_t y, uintptr_t scale, uintptr_t bias,
                                 uintptr_t lse,
                                 uintptr_t dx, uintptr_t dy, uintptr_t partial, int64_t rows, int64_t cols,
                                 int64_t dim, int64_t offset, int64_t sx0, int64_t sx1, int64_t sy0, int64_t sy1,
                                 int64_t sdx0, int64_t sdy0, int dtype, bool siglip, uintptr_t stream_handle) {
  std::string err = check_sizes("contrastive_bwd", rows, cols, dim, dtype);
  if (!err.empty()) return err;
  cudaGetLastError();
  const Problem p = make_problem(rows, cols, dim, offset, sx0, sx1, sy0, sy1, siglip);
  auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int64_t row_blocks = (rows + kTile - 1) / kTile;
  const unsigned d_blocks = static_cast<unsigned>((dim + kChunkD - 1) / kChunkD);
  const dim3 grid_dx(static_cast<unsigned>(row_blocks), d_blocks);
  const dim3 grid_dy(static_cast<unsigned>((cols + kTile - 1) / kTile), d_blocks);
  const auto* sc = reinterpret_cast<const float*>(scale);
  const auto* bi = reinterpret_cast<const float*>(bias);
  const auto* dr = reinterpret_cast<const float*>(drow);
  const auto* ls = reinterpret_cast<const float*>(lse);
  auto* part = reinterpret_cast<float*>(partial);
#define VLCORE_CONTRASTIVE_BWD(T)                                                                          \
  dx_kernel<T><<<grid_dx, kThreads, 0, stream>>>(reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(y), \
                                                 p, sc, bi, ls, dr, reinterpret_cast<T*>(dx), sdx0, part, row_blocks); \
  dy_kernel<T><<<grid_dy, kThreads, 0, stream>>>(reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(y), \
                                                 p, sc, bi, ls, dr, reinterpret_cast<T*>(dy), sdy0)
  if (dtype == kFloat32) {
    VLCORE_CONTRASTIVE_BWD(float);
  } else if (dtype == kFloat16) {
    VLCORE_CONTRASTIVE_BWD(__half);
  } else {
    VLCORE_CONTRASTIVE_BWD(__nv_bfloat16);
  }
#undef VLCORE_CONTRASTIVE_BWD
  return launch_error("contrastive_bwd");
}

}  // namespace vlcore
