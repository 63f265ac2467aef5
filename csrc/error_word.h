// Host side of the error word (layout and code table: error_codes.h). Every value-check message
// of every op is formatted here, once, from a word; the CPU kernels raise through raise_error, the
// CUDA launchers (cuda/value_checks.h) after reading the word back, and
// sparrow.ops.raise_if_error through the sparrow::_raise_error_word op.
#pragma once
#include <cstdint>
#include <string>

#include "error_codes.h"

namespace sparrow {

// The message of a non-zero error word [code, i0, i1, i2].
std::string error_message(const int64_t word[4]);

// Throws the RuntimeError (c10::Error) of a non-zero word. One throw site for every op, so the
// message of a direct call and that of a deferred check are the same string.
[[noreturn]] void raise_error_word(const int64_t word[4]);
[[noreturn]] inline void raise_error(int64_t code, int64_t i0, int64_t i1, int64_t i2) {
  const int64_t word[4] = {code, i0, i1, i2};
  raise_error_word(word);
}

// The int64 error word on CUDA device `device` that this thread's deferred_checks scope set
// (sparrow::_set_error_word), or nullptr outside such a scope.
int64_t* deferred_error_word(int64_t device);

}  // namespace sparrow
