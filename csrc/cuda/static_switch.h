// Runtime flags and dtypes -> template constants, one readable macro each (flash-attention's
// static_switch.h idea). Host-side only: used by the .cu launchers.
#pragma once
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

// BOOL_SWITCH(flag, NAME, [&] { kernel<NAME><<<...>>>(...); });
#define SPARROW_BOOL_SWITCH(COND, CONST_NAME, ...) \
  [&] {                                            \
    if (COND) {                                    \
      constexpr static bool CONST_NAME = true;     \
      return __VA_ARGS__();                        \
    } else {                                       \
      constexpr static bool CONST_NAME = false;    \
      return __VA_ARGS__();                        \
    }                                              \
  }()

// Binds `scalar_t` to the CUDA element type of a float tensor's dtype (the checks have already
// rejected anything else; the default branch is a safety net naming the argument).
#define SPARROW_FLOAT_SWITCH(DTYPE, NAME, ...)                                            \
  [&] {                                                                                   \
    switch (DTYPE) {                                                                      \
      case at::kFloat: {                                                                  \
        using scalar_t = float;                                                           \
        return __VA_ARGS__();                                                             \
      }                                                                                   \
      case at::kHalf: {                                                                   \
        using scalar_t = __half;                                                          \
        return __VA_ARGS__();                                                             \
      }                                                                                   \
      case at::kBFloat16: {                                                               \
        using scalar_t = __nv_bfloat16;                                                   \
        return __VA_ARGS__();                                                             \
      }                                                                                   \
      case at::kDouble: {                                                                 \
        using scalar_t = double;                                                          \
        return __VA_ARGS__();                                                             \
      }                                                                                   \
      default:                                                                            \
        TORCH_CHECK(false, NAME " must be float32, float16, bfloat16 or float64, got ", DTYPE); \
    }                                                                                     \
  }()
