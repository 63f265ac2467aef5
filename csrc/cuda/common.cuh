// Device helpers shared by the sparrow kernels: element conversions, warp/block reductions and
// index loads. Framework-free (no torch include), as every csrc/cuda/*.cuh.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cstdint>

#include "error_codes.h"

namespace sparrow {

// float32 accumulation for every float type but double (kept exact for float64 tests), as in
// sparrow/reference.py::_acc_dtype.
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_t = typename AccOf<T>::type;

template <typename T> __device__ __forceinline__ acc_t<T> to_acc(T x) { return static_cast<acc_t<T>>(x); }
template <> __device__ __forceinline__ float to_acc<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_acc<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_acc(acc_t<T> x) { return static_cast<T>(x); }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

template <typename A> __device__ __forceinline__ A neg_inf();
template <> __device__ __forceinline__ float neg_inf<float>() { return -__int_as_float(0x7f800000); }
template <> __device__ __forceinline__ double neg_inf<double>() { return -__longlong_as_double(0x7ff0000000000000LL); }

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename A> __device__ __forceinline__ A warp_max(A v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Block-wide sum; every thread gets the result. `scratch` holds >= 32 values and may be reused
// right after return (the trailing barrier protects it). blockDim.x must be a multiple of 32.
template <typename A> __device__ __forceinline__ A block_sum(A v, A* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A r = lane < nwarps ? scratch[lane] : A(0);
  r = warp_sum(r);
  __syncthreads();
  return r;
}

template <typename A> __device__ __forceinline__ A block_max(A v, A* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  v = warp_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  A r = lane < nwarps ? scratch[lane] : neg_inf<A>();
  r = warp_max(r);
  __syncthreads();
  return r;
}

// Index tensors may be int32 or int64; one runtime flag instead of a template per combination.
__device__ __forceinline__ int64_t load_index(const void* p, bool is64, int64_t i) {
  return is64 ? static_cast<const int64_t*>(p)[i] : static_cast<int64_t>(static_cast<const int32_t*>(p)[i]);
}

// Bad index *values* are reported through the error word (error_codes.h): a kernel checks the
// values it reads, records the first bad one, and skips or clamps the bad item (each kernel says
// which), so it never touches memory out of bounds. `word` is nullptr in an unchecked launch.
__device__ __forceinline__ void record_error(int64_t* word, int64_t code, int64_t i0, int64_t i1, int64_t i2) {
  if (word == nullptr) return;
  // First recorded wins; the winner alone fills in the values (read only after the kernel ends).
  if (atomicCAS(reinterpret_cast<unsigned long long*>(word), 0ull, static_cast<unsigned long long>(code)) == 0ull) {
    word[1] = i0;
    word[2] = i1;
    word[3] = i2;
  }
}

// Block-wide minimum of one key per thread (kNoKey: none), for every thread. The kernels number
// their checks in the CPU kernel's order and report the smallest bad key, so a message names the
// same value on both devices. 1-D blocks only.
constexpr uint64_t kNoKey = ~0ull;
__device__ __forceinline__ uint64_t block_min_key(uint64_t key) {
  __shared__ unsigned long long smin;
  if (threadIdx.x == 0) smin = kNoKey;
  __syncthreads();
  if (key != kNoKey) atomicMin(&smin, static_cast<unsigned long long>(key));
  __syncthreads();
  const uint64_t r = smin;
  __syncthreads();  // before a later call resets smin
  return r;
}

}  // namespace sparrow
