// Input checks shared by the CPU and CUDA launchers. Every message names the argument and the
// sizes it saw, so a bad call says what to fix.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define SPARROW_CHECK_DIM(t, n) \
  TORCH_CHECK((t).dim() == (n), #t " must have " #n " dimensions, got shape ", (t).sizes())

#define SPARROW_CHECK_SIZE(t, d, expected)                                                         \
  TORCH_CHECK((t).size(d) == (expected), #t ".size(" #d ") must be ", (expected), " (", #t " shape ", \
              (t).sizes(), ")")

#define SPARROW_CHECK_INDEX_DTYPE(t)                                                    \
  TORCH_CHECK((t).scalar_type() == at::kLong || (t).scalar_type() == at::kInt, #t \
              " must be int64 or int32, got ", (t).scalar_type())

#define SPARROW_CHECK_FLOAT_DTYPE(t)                                                             \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kHalf ||              \
                  (t).scalar_type() == at::kBFloat16 || (t).scalar_type() == at::kDouble,       \
              #t " must be float32, float16, bfloat16 or float64, got ", (t).scalar_type())

#define SPARROW_CHECK_SAME_DTYPE(a, b)                                                          \
  TORCH_CHECK((a).scalar_type() == (b).scalar_type(), #b " must have the dtype of " #a " (", \
              (a).scalar_type(), "), got ", (b).scalar_type())

#define SPARROW_CHECK_SAME_DEVICE(a, b)                                                    \
  TORCH_CHECK((a).device() == (b).device(), #b " must be on " #a "'s device (", (a).device(), \
              "), got ", (b).device())
