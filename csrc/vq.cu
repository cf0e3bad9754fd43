// Visual dictionary (SOHO): CUDA nearest-entry search, deterministic per-entry statistics, momentum update.
// A portable fallback for machines without Triton (fixed tiles, no autotuning), not the fast path.
//
// Same semantics as kernels/vq.py and vlcore/reference/vq.py; the host (vlcore/ops/vq.py) prepares the codebook
// operand once per call (cast to x's dtype for l2 with fp16/bf16 x, fp32 and normalised for cosine) and ||e||^2.
//
//   nearest     one block of 256 threads per 64 rows scans the codebook in 64-entry tiles (x and e chunks of 32
//               dims through shared memory). l2 with fp16/bf16 x and the codebook in x's dtype: the 64 x 64 tile of
//               dot products comes from WMMA tensor-core fragments (exact 16-bit products, fp32 accumulation);
//               otherwise (fp32, cosine) each thread accumulates a 4 x 4 micro-tile with fp32 FMAs. Per row, the
//               16 lanes of a half-warp that share it reduce (score, index) with shuffles (warp-level argmin in
//               torch.argmin's order: NaN first, ties to the lower index); a later tile replaces the running
//               best only when strictly better. The host maps duplicate entries to their first copy afterwards.
//               Nothing of size N x K exists, not even in shared memory.
//   statistics  rows ordered by entry on the host (stable sort, offsets); one block per (entry, 32 columns):
//               8 warps stride over the entry's rows, then the 8 partial sums are added in a fixed order in shared
//               memory. No float atomics: bitwise deterministic (at the cost of serialising a very large entry).
//   ema         sums EMA, Laplace smoothing and codebook = sums / smoothed counts over K x D, reading sum(counts)
//               from device memory (the K-element counts EMA and its sum are done by torch on the host side).
// IEEE-rounded intrinsics (__fsqrt_rn, __frcp_rn, __fdiv_rn, __fmul_rn, __fadd_rn) keep the results independent
// of --use_fast_math and equal to torch's elementwise ops.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <string>

#include "vlcore_cuda.h"

namespace vlcore {
namespace {

constexpr int kRows = 64;      // rows of x per block
constexpr int kCodes = 64;     // codebook entries per tile (== kRows: one load loop fills both tiles)
constexpr int kStepD = 32;     // dims per shared-memory chunk
constexpr int kThreads = 256;  // 16 x 16 threads, a 4 x 4 micro-tile each
constexpr int kStatCols = 32;  // columns of D per statistics block (one per lane)
constexpr int kStatWarps = 8;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// torch.argmin's order: a NaN before every number, then the smaller score, then the lower index.
__device__ __forceinline__ bool argmin_before(float ov, int oi, float v, int i) {
  const bool onan = isnan(ov), nan = isnan(v);
  return (onan && !nan) || ov < v || ((ov == v || (onan && nan)) && oi < i);
}

__device__ __forceinline__ void argmin_merge(float& v, int& i, float ov, int oi) {
  if (argmin_before(ov, oi, v, i)) {
    v = ov;
    i = oi;
  }
}

// ||x||^2 of the block's rows (and the cosine scale 1 / max(||x||, eps)): one warp per row, shuffle reduction.
template <typename TX>
__device__ void row_norms(const TX* __restrict__ x, int64_t n, int64_t dim, int64_t sx, int64_t row0, bool cosine,
                          float norm_eps, float* row_sq, float* row_scale) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  for (int r = warp; r < kRows; r += kThreads / 32) {
    const int64_t gr = row0 + r;
    float s = 0.f;
    if (gr < n) {
      for (int64_t d = lane; d < dim; d += 32) {
        const float v = to_float(x[gr * sx + d]);
        s = fmaf(v, v, s);
      }
    }
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    if (lane == 0) {
      float scale = 1.f;
      if (cosine) {
        scale = __frcp_rn(fmaxf(__fsqrt_rn(s), norm_eps));
        s = __fmul_rn(__fmul_rn(s, scale), scale);
      }
      row_sq[r] = s;
      row_scale[r] = scale;
    }
  }
}

// Folds one 64 x 64 tile of dot products into the running (best, index) of the thread's 4 rows. Thread
// (ty, tx) = (t / 16, t % 16) holds rows ty*4 + i and columns c0 + tx + 16 j. Must be called by all 32 lanes.
__device__ __forceinline__ void fold_tile(const float (&dots)[4][4], const float (&scale)[4],
                                          const float* __restrict__ e_sq, int64_t c0, int64_t k, int tx,
                                          float (&best)[4], int (&best_idx)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float v = INFINITY;
    int vi = 0x7fffffff;
#pragma unroll
    for (int j = 0; j < 4; ++j) {  // ascending columns
      const int64_t c = c0 + tx + 16 * j;
      if (c < k) {
        const float s = __fsub_rn(e_sq[c], 2.f * __fmul_rn(dots[i][j], scale[i]));
        argmin_merge(v, vi, s, static_cast<int>(c));
      }
    }
    // the 16 lanes holding this row are one half-warp: xor offsets 8..1 stay inside it
    for (int off = 8; off > 0; off >>= 1) {
      const float ov = __shfl_xor_sync(0xffffffffu, v, off);
      const int oi = __shfl_xor_sync(0xffffffffu, vi, off);
      argmin_merge(v, vi, ov, oi);
    }
    // strict: an equal score in a later tile keeps the lower index; a NaN replaces only a number
    if (v < best[i] || (isnan(v) && !isnan(best[i]))) {
      best[i] = v;
      best_idx[i] = vi;
    }
  }
}

__device__ __forceinline__ void store_best(const float (&best)[4], const int (&best_idx)[4], const float* row_sq,
                                           int64_t row0, int64_t n, int tx, int ty, int64_t* __restrict__ idx_out,
                                           float* __restrict__ dist_out) {
  if (tx != 0) return;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty * 4 + i;
    const int64_t gr = row0 + r;
    if (gr < n) {
      idx_out[gr] = best_idx[i];
      const float d = __fadd_rn(best[i], row_sq[r]);
      dist_out[gr] = d < 0.f ? 0.f : d;  // clamp at 0; NaN stays NaN (fmaxf would return 0)
    }
  }
}

// fp32 FMA path: any x dtype, fp32 or 16-bit codebook operand; values are converted to fp32 in shared memory.
template <typename TX, typename TE>
__global__ void __launch_bounds__(kThreads)
    nearest_kernel(const TX* __restrict__ x, const TE* __restrict__ e, const float* __restrict__ e_sq,
                   int64_t* __restrict__ idx_out, float* __restrict__ dist_out, int64_t n, int64_t k, int64_t dim,
                   int64_t sx, int64_t se, bool cosine, float norm_eps) {
  __shared__ float xs[kRows][kStepD + 1];
  __shared__ float es[kCodes][kStepD + 1];
  __shared__ float row_sq[kRows];
  __shared__ float row_scale[kRows];
  const int t = threadIdx.x;
  const int tx = t & 15, ty = t >> 4;  // tx: column group, ty: row group (a half-warp shares ty)
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  row_norms(x, n, dim, sx, row0, cosine, norm_eps, row_sq, row_scale);
  __syncthreads();

  float best[4], scale[4];
  int best_idx[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    best[i] = INFINITY;
    best_idx[i] = 0;
    scale[i] = row_scale[ty * 4 + i];
  }
  for (int64_t c0 = 0; c0 < k; c0 += kCodes) {
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
    for (int64_t d0 = 0; d0 < dim; d0 += kStepD) {
      for (int i = t; i < kRows * kStepD; i += kThreads) {
        const int rr = i / kStepD, dd = i % kStepD;
        const int64_t gr = row0 + rr, gc = c0 + rr, gd = d0 + dd;
        xs[rr][dd] = (gr < n && gd < dim) ? to_float(x[gr * sx + gd]) : 0.f;
        es[rr][dd] = (gc < k && gd < dim) ? to_float(e[gc * se + gd]) : 0.f;
      }
      __syncthreads();
#pragma unroll 8
      for (int dd = 0; dd < kStepD; ++dd) {
        float xv[4], ev[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) xv[i] = xs[ty * 4 + i][dd];
#pragma unroll
        for (int j = 0; j < 4; ++j) ev[j] = es[tx + 16 * j][dd];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(xv[i], ev[j], acc[i][j]);
      }
      __syncthreads();
    }
    fold_tile(acc, scale, e_sq, c0, k, tx, best, best_idx);
  }
  store_best(best, best_idx, row_sq, row0, n, tx, ty, idx_out, dist_out);
}

// Tensor-core path (l2 with fp16/bf16 x and the codebook in x's dtype): the 64 x 64 tile of dot products comes
// from WMMA 16 x 16 x 16 fragments with fp32 accumulation (16-bit products are exact), goes through shared memory,
// and is folded exactly as in the FMA path. 8 warps: warp w owns fragment row w / 2 and fragment columns
// 2 (w % 2) and 2 (w % 2) + 1.
constexpr int kLdT = kStepD + 8;  // 16-bit tile stride: a multiple of 8 elements, fragments 32-byte aligned
constexpr int kLdS = kCodes + 4;  // fp32 score stride: a multiple of 4, fragments 32-byte aligned

template <typename T>
__global__ void __launch_bounds__(kThreads)
    nearest_mma_kernel(const T* __restrict__ x, const T* __restrict__ e, const float* __restrict__ e_sq,
                       int64_t* __restrict__ idx_out, float* __restrict__ dist_out, int64_t n, int64_t k,
                       int64_t dim, int64_t sx, int64_t se) {
  using namespace nvcuda;
  __shared__ __align__(32) T xs[kRows * kLdT];
  __shared__ __align__(32) T es[kCodes * kLdT];
  __shared__ __align__(32) float dots_s[kRows * kLdS];
  __shared__ float row_sq[kRows];
  __shared__ float row_scale[kRows];
  const int t = threadIdx.x;
  const int tx = t & 15, ty = t >> 4;
  const int warp = t >> 5;
  const int frag_row = warp >> 1, frag_col = (warp & 1) * 2;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const T zero = from_float<T>(0.f);
  row_norms(x, n, dim, sx, row0, false, 0.f, row_sq, row_scale);
  __syncthreads();

  float best[4];
  int best_idx[4];
  const float scale[4] = {1.f, 1.f, 1.f, 1.f};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    best[i] = INFINITY;
    best_idx[i] = 0;
  }
  for (int64_t c0 = 0; c0 < k; c0 += kCodes) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
    wmma::fill_fragment(acc[0], 0.f);
    wmma::fill_fragment(acc[1], 0.f);
    for (int64_t d0 = 0; d0 < dim; d0 += kStepD) {
      for (int i = t; i < kRows * kStepD; i += kThreads) {
        const int rr = i / kStepD, dd = i % kStepD;
        const int64_t gr = row0 + rr, gc = c0 + rr, gd = d0 + dd;
        xs[rr * kLdT + dd] = (gr < n && gd < dim) ? x[gr * sx + gd] : zero;
        es[rr * kLdT + dd] = (gc < k && gd < dim) ? e[gc * se + gd] : zero;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kStepD; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, xs + frag_row * 16 * kLdT + kk, kLdT);
#pragma unroll
        for (int f = 0; f < 2; ++f) {
          // B = e^T (dim x codes): stored code-major, i.e. column-major with leading dimension kLdT
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(b, es + (frag_col + f) * 16 * kLdT + kk, kLdT);
          wmma::mma_sync(acc[f], a, b, acc[f]);
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int f = 0; f < 2; ++f)
      wmma::store_matrix_sync(dots_s + frag_row * 16 * kLdS + (frag_col + f) * 16, acc[f], kLdS, wmma::mem_row_major);
    __syncthreads();
    float dots[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) dots[i][j] = dots_s[(ty * 4 + i) * kLdS + tx + 16 * j];
    __syncthreads();  // dots_s is rewritten by the next tile
    fold_tile(dots, scale, e_sq, c0, k, tx, best, best_idx);
  }
  store_best(best, best_idx, row_sq, row0, n, tx, ty, idx_out, dist_out);
}

template <typename TX>
__global__ void __launch_bounds__(kStatWarps * 32)
    statistics_kernel(const TX* __restrict__ x, const int64_t* __restrict__ order,
                      const int64_t* __restrict__ offsets, float* __restrict__ out, int64_t dim, int64_t sx,
                      int64_t so) {
  __shared__ float part[kStatWarps][kStatCols];
  const int64_t j = blockIdx.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * kStatCols + lane;
  const int64_t start = offsets[j], end = offsets[j + 1];
  float acc = 0.f;
  if (d < dim) {
    for (int64_t r = start + warp; r < end; r += kStatWarps) acc = __fadd_rn(acc, to_float(x[order[r] * sx + d]));
  }
  part[warp][lane] = acc;
  __syncthreads();
  if (warp == 0) {
    float s = 0.f;
    for (int w = 0; w < kStatWarps; ++w) s = __fadd_rn(s, part[w][lane]);  // fixed order: deterministic
    if (d < dim) out[j * so + d] = s;
    if (blockIdx.y == 0 && lane == 0) out[j * so + dim] = static_cast<float>(end - start);
  }
}

__global__ void ema_kernel(float* __restrict__ codebook, const float* __restrict__ ema_counts,
                           float* __restrict__ ema_sums, const float* __restrict__ packed,
                           const float* __restrict__ total_ptr, int64_t k, int64_t dim, int64_t sp, float gamma,
                           float one_minus_gamma, float eps, float k_eps) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= k * dim) return;
  const int64_t j = i / dim, d = i % dim;
  const float total = total_ptr[0];
  const float smoothed = __fmul_rn(__fdiv_rn(__fadd_rn(ema_counts[j], eps), __fadd_rn(total, k_eps)), total);
  const float s = __fadd_rn(__fmul_rn(ema_sums[i], gamma), __fmul_rn(packed[j * sp + d], one_minus_gamma));
  ema_sums[i] = s;
  if (smoothed > 0.f) codebook[i] = __fdiv_rn(s, smoothed);
}

std::string last_error(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return std::string();
  return std::string(what) + ": " + cudaGetErrorString(err);
}

// Called right before a launch: a pending (non-sticky) error left by someone else's launch must not be
// reported as this launch's error by last_error afterwards.
void clear_pending_error() { cudaGetLastError(); }

template <typename TX, typename TE>
void launch_nearest(uintptr_t x, uintptr_t e, uintptr_t e_sq, uintptr_t idx, uintptr_t dist, int64_t n, int64_t k,
                    int64_t dim, int64_t sx, int64_t se, bool cosine, float norm_eps, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((n + kRows - 1) / kRows));
  nearest_kernel<TX, TE><<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<const TX*>(x), reinterpret_cast<const TE*>(e), reinterpret_cast<const float*>(e_sq),
      reinterpret_cast<int64_t*>(idx), reinterpret_cast<float*>(dist), n, k, dim, sx, se, cosine, norm_eps);
}

template <typename T>
void launch_nearest_mma(uintptr_t x, uintptr_t e, uintptr_t e_sq, uintptr_t idx, uintptr_t dist, int64_t n, int64_t k,
                        int64_t dim, int64_t sx, int64_t se, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((n + kRows - 1) / kRows));
  nearest_mma_kernel<T><<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<const T*>(x), reinterpret_cast<const T*>(e), reinterpret_cast<const float*>(e_sq),
      reinterpret_cast<int64_t*>(idx), reinterpret_cast<float*>(dist), n, k, dim, sx, se);
}

}  // namespace

std::string vq_nearest(uintptr_t x, uintptr_t e, uintptr_t e_sq, uintptr_t idx, uintptr_t dist, int64_t n, int64_t k,
                       int64_t dim, int64_t sx, int64_t se, int x_dtype, int e_dtype, bool cosine, float norm_eps,
                       uintptr_t stream_handle) {
  if (n == 0) return std::string();
  if (n < 0 || k <= 0 || dim <= 0) return "vq_nearest: sizes must be positive";
  if ((n + kRows - 1) / kRows > 0x7fffffffLL) return "vq_nearest: too many rows for one launch";
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  clear_pending_error();
  if (e_dtype == kFloat32) {
    switch (x_dtype) {
      case kFloat32: launch_nearest<float, float>(x, e, e_sq, idx, dist, n, k, dim, sx, se, cosine, norm_eps, stream); break;
      case kFloat16: launch_nearest<__half, float>(x, e, e_sq, idx, dist, n, k, dim, sx, se, cosine, norm_eps, stream); break;
      case kBFloat16:
        launch_nearest<__nv_bfloat16, float>(x, e, e_sq, idx, dist, n, k, dim, sx, se, cosine, norm_eps, stream);
        break;
      default: return "vq_nearest: x must be fp32, fp16 or bf16 (dtype code " + std::to_string(x_dtype) + ")";
    }
  } else if (cosine) {
    return "vq_nearest: cosine needs the fp32 (normalised) codebook operand";
  } else if (e_dtype == x_dtype && x_dtype == kFloat16) {
    launch_nearest_mma<__half>(x, e, e_sq, idx, dist, n, k, dim, sx, se, stream);
  } else if (e_dtype == x_dtype && x_dtype == kBFloat16) {
    launch_nearest_mma<__nv_bfloat16>(x, e, e_sq, idx, dist, n, k, dim, sx, se, stream);
  } else {
    return "vq_nearest: the codebook operand must be fp32 or x's fp16/bf16 dtype (codes " + std::to_string(x_dtype) +
           ", " + std::to_string(e_dtype) + ")";
  }
  return last_error("vq_nearest kernel launch");
}

std::string vq_statistics(uintptr_t x, uintptr_t order, uintptr_t offsets, uintptr_t out, int64_t k, int64_t dim,
                          int64_t sx, int64_t so, int x_dtype, uintptr_t stream_handle) {
  if (k <= 0 || dim <= 0) return "vq_statistics: sizes must be positive";
  if (k > 0x7fffffffLL || (dim + kStatCols - 1) / kStatCols > 65535) return "vq_statistics: K or D too large";
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  clear_pending_error();
  const dim3 grid(static_cast<unsigned>(k), static_cast<unsigned>((dim + kStatCols - 1) / kStatCols));
  const int threads = kStatWarps * 32;
  const auto* ord = reinterpret_cast<const int64_t*>(order);
  const auto* off = reinterpret_cast<const int64_t*>(offsets);
  auto* o = reinterpret_cast<float*>(out);
  switch (x_dtype) {
    case kFloat32:
      statistics_kernel<float><<<grid, threads, 0, stream>>>(reinterpret_cast<const float*>(x), ord, off, o, dim, sx, so);
      break;
    case kFloat16:
      statistics_kernel<__half><<<grid, threads, 0, stream>>>(reinterpret_cast<const __half*>(x), ord, off, o, dim, sx,
                                                              so);
      break;
    case kBFloat16:
      statistics_kernel<__nv_bfloat16><<<grid, threads, 0, stream>>>(reinterpret_cast<const __nv_bfloat16*>(x), ord,
                                                                     off, o, dim, sx, so);
      break;
    default: return "vq_statistics: x must be fp32, fp16 or bf16 (dtype code " + std::to_string(x_dtype) + ")";
  }
  return last_error("vq_statistics kernel launch");
}

std::string vq_ema(uintptr_t codebook, uintptr_t ema_counts, uintptr_t ema_sums, uintptr_t packed, uintptr_t total,
                   int64_t k, int64_t dim, int64_t sp, float gamma, float one_minus_gamma, float eps, float k_eps,
                   uintptr_t stream_handle) {
  if (k <= 0 || dim <= 0) return "vq_ema: sizes must be positive";
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(stream_handle);
  const int threads = 256;
  const int64_t blocks = (k * dim + threads - 1) / threads;
  if (blocks > 0x7fffffffLL) return "vq_ema: K x D too large for one launch";
  clear_pending_error();
  ema_kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      reinterpret_cast<float*>(codebook), reinterpret_cast<const float*>(ema_counts),
      reinterpret_cast<float*>(ema_sums), reinterpret_cast<const float*>(packed), reinterpret_cast<const float*>(total),
      k, dim, sp, gamma, one_minus_gamma, eps, k_eps);
  return last_error("vq_ema kernel launch");
}

}  // namespace vlcore
