// How a CUDA launcher reports bad index *values* (shapes, dtypes and devices are checked on the
// host, without them): through the error word (error_codes.h), which the kernels fill in
// themselves, so the checks add no launch and read nothing on the host. Per call:
//   - inside sparrow.ops.deferred_checks(device) (this thread): the scope's word; nothing is read
//     here. The decode loop reads the word in its one copy per step and calls raise_if_error.
//     Also while the stream is being captured into a CUDA graph: the graph keeps writing the word.
//   - otherwise, a direct call: a scratch word of this thread and device. After its launches the
//     launcher copies it back (one sync, as a direct call always cost) and raises the message.
//   - outside a deferred scope while the stream is being captured (a sync is illegal there), or
//     when the capture query itself fails, or with SPARROW_CUDA_VALUE_CHECKS=0: no word, no
//     checks. The kernels still never touch memory out of bounds: they skip or clamp a bad item.
#pragma once
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include "error_word.h"

namespace sparrow {

struct ValueChecks {
  int64_t* word = nullptr;  // passed to the kernels; nullptr: unchecked
  bool read_back = false;   // a direct call: finish_value_checks reads the word and raises
};

inline bool cuda_value_checks_enabled() {
  static const bool enabled = [] {
    const char* env = std::getenv("SPARROW_CUDA_VALUE_CHECKS");
    return env == nullptr || std::strcmp(env, "0") != 0;
  }();
  return enabled;
}

// Zeroed at allocation and after every error it reports, so it is zero whenever a launch starts.
// Per thread, so concurrent direct calls never read each other's errors; never freed (32 bytes
// per thread and device; a thread-exit free could run after the CUDA runtime has gone).
inline int64_t* scratch_error_word(int64_t device) {
  thread_local std::vector<int64_t*> words;
  if (static_cast<int64_t>(words.size()) <= device) words.resize(device + 1, nullptr);
  if (words[device] == nullptr) {
    void* p = nullptr;
    C10_CUDA_CHECK(cudaMalloc(&p, 4 * sizeof(int64_t)));
    C10_CUDA_CHECK(cudaMemset(p, 0, 4 * sizeof(int64_t)));
    words[device] = static_cast<int64_t*>(p);
  }
  return words[device];
}

// Call with the op's device current (after its CUDAGuard), before the launches.
inline ValueChecks begin_value_checks(int64_t device, cudaStream_t stream) {
  if (!cuda_value_checks_enabled()) return {};
  if (int64_t* word = deferred_error_word(device)) return {word, false};
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    (void)cudaGetLastError();  // clear the query's error; unknown capture state: do not sync
    return {};
  }
  if (status != cudaStreamCaptureStatusNone) return {};
  return {scratch_error_word(device), true};
}

// After the launches of a direct call: one copy and sync, then the op's message if a kernel
// recorded an error (the word is zeroed again first).
inline void finish_value_checks(const ValueChecks& checks, cudaStream_t stream) {
  if (!checks.read_back) return;
  int64_t host[4];
  C10_CUDA_CHECK(cudaMemcpyAsync(host, checks.word, sizeof(host), cudaMemcpyDeviceToHost, stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  if (host[0] == 0) return;
  C10_CUDA_CHECK(cudaMemsetAsync(checks.word, 0, sizeof(host), stream));
  C10_CUDA_CHECK(cudaStreamSynchronize(stream));
  raise_error_word(host);
}

}  // namespace sparrow
