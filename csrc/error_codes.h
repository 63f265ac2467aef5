// The error word: how a bad index *value* is reported without a host sync.
//
// An int64 tensor of 4 elements, [code, i0, i1, i2]. code 0: no error; otherwise
// code = (op << 8) | check, and i0..i2 hold the indices and values the message needs (the table
// below says which). CUDA kernels record the first error they see with atomicCAS on word[0]; the
// CPU kernels build the same word and raise at once. Either way the message comes from one
// formatter, sparrow::error_message (error_word.cpp), so a deferred error reads exactly like the
// error of a direct call.
//
// Framework-free (no torch include): included by device code (csrc/cuda/*.cuh) and host code.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define SPARROW_HD __host__ __device__
#else
#define SPARROW_HD
#endif

namespace sparrow {
namespace err {

// Op ids (the high byte of a code).
constexpr int64_t kFusedFc = 1;
constexpr int64_t kTextAttention = 2;
constexpr int64_t kGatherKv = 3;
constexpr int64_t kVerify = 4;
constexpr int64_t kWriteKv = 5;

SPARROW_HD constexpr int64_t code(int64_t op, int64_t check) { return (op << 8) | check; }

// Two non-negative values below 2^32 in one slot (row and column indices, or two sizes); the
// messages need up to four numbers and the word holds three.
SPARROW_HD constexpr int64_t pack2(int64_t hi, int64_t lo) {
  return static_cast<int64_t>((static_cast<uint64_t>(hi) << 32) | (static_cast<uint64_t>(lo) & 0xffffffffu));
}
SPARROW_HD constexpr int64_t hi32(int64_t packed) {
  return static_cast<int64_t>(static_cast<uint64_t>(packed) >> 32);
}
SPARROW_HD constexpr int64_t lo32(int64_t packed) {
  return static_cast<int64_t>(static_cast<uint64_t>(packed) & 0xffffffffu);
}

// code                                        i0                 i1               i2
// fused_fc
constexpr int64_t kFusedFcToken = code(kFusedFc, 1);          // n                  token_ids[n]     V
// text_attention
constexpr int64_t kTextAttentionLens = code(kTextAttention, 1);  // b               cache_lens[b]    pack2(Lq, L)
// gather_kv_
constexpr int64_t kGatherCounts = code(kGatherKv, 1);         // b                  counts[b]        M
constexpr int64_t kGatherDst = code(kGatherKv, 2);            // pack2(b, counts)   dst_start[b]     L
constexpr int64_t kGatherSrcRange = code(kGatherKv, 3);       // pack2(b, m)        src_index[b,m]   L
constexpr int64_t kGatherSrcBefore = code(kGatherKv, 4);      // pack2(b, m)        src_index[b,m]   dst_start[b]+m
constexpr int64_t kGatherSrcOrder = code(kGatherKv, 5);       // pack2(b, m)        src_index[b,m-1] src_index[b,m]
// verify
constexpr int64_t kVerifyToken = code(kVerify, 1);            // pack2(b, j)        draft_tokens[b,j] V
constexpr int64_t kVerifyParent = code(kVerify, 2);           // pack2(b, j)        parents[b,j]     lowest (-1|0)
constexpr int64_t kVerifyTemperature = code(kVerify, 3);      // b                  float32 bits     0
// write_kv_
constexpr int64_t kWriteStart = code(kWriteKv, 1);            // b                  start[b]         pack2(M, L)

}  // namespace err
}  // namespace sparrow
