// Host-side checks of index *values* for the CUDA launchers (shapes, dtypes and devices are
// checked without them). Each launcher builds one bool tensor `bad` on the device whose elements,
// in row-major order, follow the order in which the CPU kernel checks the same values; one
// reduction and one host sync then give the first offending element, and the launcher raises the
// CPU kernel's message for it (reading the few values it prints costs more syncs, on the error
// path only). The check runs before any launch, so a rejected call changes nothing.
//
// The sync is cheap next to a verify step but not free; so the checks run by default, can be
// turned off with SPARROW_CUDA_VALUE_CHECKS=0, and are skipped while the stream is being captured
// into a CUDA graph (a sync is illegal there). Unchecked, the kernels still never touch memory out
// of bounds: they skip or clamp a bad item (each .cuh says which).
#pragma once
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>

namespace sparrow {

inline bool cuda_value_checks_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("SPARROW_CUDA_VALUE_CHECKS");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  if (!enabled) return false;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(), &status) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the sticky error of the query; treat as not capturing
    return true;
  }
  return status == cudaStreamCaptureStatusNone;
}

// Row-major flat index of the first true element of `bad`, or -1 when there is none. One
// reduction and one host sync: a true sentinel is appended, and argmax returns the first maximum.
inline int64_t first_true(const at::Tensor& bad) {
  if (bad.numel() == 0) return -1;
  const at::Tensor flat = bad.reshape({-1}).to(at::kByte);
  const int64_t first = at::cat({flat, at::ones({1}, flat.options())}).argmax().item<int64_t>();
  return first == flat.numel() ? -1 : first;
}

// Error path only (one sync each): t's element at flat index i, as int64 / as float.
inline int64_t int_at(const at::Tensor& t, int64_t i) { return t.reshape({-1})[i].item<int64_t>(); }
inline float float_at(const at::Tensor& t, int64_t i) { return t.reshape({-1})[i].item<float>(); }

}  // namespace sparrow
