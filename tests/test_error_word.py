"""The error word: one message table for bad index values, whether an op raises at once (CPU, or
a direct CUDA call) or the decode loop raises later from the word's host copy (deferred_checks on
CUDA, then raise_if_error).

Every check of every op has a case below: the bad input, and the word a CUDA kernel records for
it. On CPU: the op's own message equals raise_if_error's message for that word (so the deferred
and the immediate message cannot drift). On CUDA (skipped without a GPU): inside deferred_checks
the bad call does not raise and leaves the word holding exactly that, outside it raises at once.
"""

import math
import os
import pathlib
import re
import struct
import subprocess
import sys

import pytest
import torch

from sparrow import ops
from sparrow.profiling import HostCounter
from conftest import requires_compiled_ops

pytestmark = requires_compiled_ops()

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _codes() -> dict[str, int]:
    """The code table of csrc/error_codes.h, read from the header itself."""
    text = (ROOT / "csrc" / "error_codes.h").read_text()
    op_ids = {name: int(v) for name, v in re.findall(r"constexpr int64_t (k\w+) = (\d+);", text)}
    return {name: (op_ids[op] << 8) | int(check)
            for name, op, check in re.findall(r"constexpr int64_t (k\w+) = code\((k\w+), (\d+)\);", text)}


CODES = _codes()


def pack2(hi, lo):
    return (hi << 32) | lo


def float_bits(x):
    return struct.unpack("<I", struct.pack("<f", x))[0]


def t(values, device, dtype=torch.long):
    return torch.tensor(values, device=device, dtype=dtype)


# ------------------------------------------------------------------------- bad inputs, per check


def fused_fc_call(device, token_ids):
    g = torch.Generator().manual_seed(0)
    embed, hidden = torch.randn(11, 8, generator=g), torch.randn(len(token_ids), 6, generator=g)
    weight, bias = torch.randn(7, 14, generator=g), torch.randn(7, generator=g)
    args = [t(token_ids, device)] + [x.to(device) for x in (embed, hidden, weight, bias)]
    return lambda: torch.ops.sparrow.fused_fc(*args)


def text_attention_call(device, lens):
    g = torch.Generator().manual_seed(0)
    B, Lq, L = len(lens), 3, 10
    q = torch.randn(B, Lq, 4, 16, generator=g).to(device)
    k, v = (torch.randn(B, L, 2, 16, generator=g).to(device) for _ in range(2))
    return lambda: torch.ops.sparrow.text_attention(q, k, v, t(lens, device), None, 0.25, 0)


def gather_call(device, src, counts, dst, n_caches=3):
    base = torch.arange(2 * 10 * 6, dtype=torch.float32).reshape(2, 10, 2, 3).to(device)
    caches = [base + i for i in range(n_caches)]
    return lambda: torch.ops.sparrow.gather_kv_(caches, t(src, device), t(counts, device), t(dst, device), 1)


def verify_call(device, tokens=None, parents=None, temperature=(0.0, 1.0)):
    g = torch.Generator().manual_seed(0)
    tokens = tokens or [[1, 2, -1], [4, 5, 6]]
    parents = parents or [[0, 1, 2], [0, 0, 1]]
    logits = torch.randn(2, 4, 9, generator=g).to(device)
    temp = t(list(temperature), device, torch.float32)
    u = torch.rand(2, 4, generator=g).to(device)
    return lambda: torch.ops.sparrow.verify(t(tokens, device), t(parents, device), logits, None, temp, u)


def write_call(device, start, index_dtype=torch.long):
    k, v = torch.zeros(2, 10, 2, 3, device=device), torch.zeros(2, 10, 2, 3, device=device)
    kn, vn = torch.ones(2, 4, 2, 3, device=device), torch.ones(2, 4, 2, 3, device=device)
    return lambda: torch.ops.sparrow.write_kv_(k, v, kn, vn, t(start, device, index_dtype), 1)


GOOD_SRC, GOOD_COUNTS, GOOD_DST = [[4, 5, 9], [1, 2, -1]], [3, 2], [3, 0]

# name: (call builder(device), the word the kernel records)
CASES = {
    "fused_fc token too big": (lambda d: fused_fc_call(d, [0, 11, 1]), ["kFusedFcToken", 1, 11, 11]),
    "fused_fc token negative": (lambda d: fused_fc_call(d, [0, 3, -4, 12]), ["kFusedFcToken", 2, -4, 11]),
    "text_attention lens short": (lambda d: text_attention_call(d, [10, 2]),
                                  ["kTextAttentionLens", 1, 2, pack2(3, 10)]),
    "text_attention lens long": (lambda d: text_attention_call(d, [11, 3]),
                                 ["kTextAttentionLens", 0, 11, pack2(3, 10)]),
    "gather counts": (lambda d: gather_call(d, GOOD_SRC, [3, 4], GOOD_DST), ["kGatherCounts", 1, 4, 3]),
    "gather counts negative": (lambda d: gather_call(d, GOOD_SRC, [-1, 2], GOOD_DST), ["kGatherCounts", 0, -1, 3]),
    "gather dst": (lambda d: gather_call(d, GOOD_SRC, GOOD_COUNTS, [8, 0]), ["kGatherDst", pack2(0, 3), 8, 10]),
    "gather dst negative": (lambda d: gather_call(d, GOOD_SRC, GOOD_COUNTS, [3, -1]),
                            ["kGatherDst", pack2(1, 2), -1, 10]),
    "gather src range": (lambda d: gather_call(d, [[4, 5, 10], [1, 2, -1]], GOOD_COUNTS, GOOD_DST),
                         ["kGatherSrcRange", pack2(0, 2), 10, 10]),
    "gather src negative": (lambda d: gather_call(d, [[4, 5, 9], [-1, 2, -1]], GOOD_COUNTS, GOOD_DST),
                            ["kGatherSrcRange", pack2(1, 0), -1, 10]),
    "gather src before dst": (lambda d: gather_call(d, [[4, 5, 9], [1, 2, -1]], GOOD_COUNTS, [3, 2]),
                              ["kGatherSrcBefore", pack2(1, 0), 1, 2]),
    "gather src order": (lambda d: gather_call(d, [[5, 4, 9], [1, 2, -1]], GOOD_COUNTS, GOOD_DST),
                         ["kGatherSrcOrder", pack2(0, 1), 5, 4]),
    "gather first of several (CPU order)": (lambda d: gather_call(d, [[4, 4, 10], [9, 2, -1]], GOOD_COUNTS, [3, 9]),
                                            ["kGatherSrcOrder", pack2(0, 1), 4, 4]),
    "verify token": (lambda d: verify_call(d, tokens=[[1, 2, -1], [4, 5, 9]]), ["kVerifyToken", pack2(1, 2), 9, 9]),
    "verify token negative": (lambda d: verify_call(d, tokens=[[-2, 2, -1], [4, 5, 6]]),
                              ["kVerifyToken", pack2(0, 0), -2, 9]),
    "verify parent": (lambda d: verify_call(d, parents=[[0, 1, 2], [0, 2, 1]]), ["kVerifyParent", pack2(1, 1), 2, 0]),
    "verify parent of padded": (lambda d: verify_call(d, parents=[[0, 1, 3], [0, 0, 1]]),
                                ["kVerifyParent", pack2(0, 2), 3, -1]),
    "verify tree before temperature": (
        lambda d: verify_call(d, parents=[[0, 1, 2], [0, 0, -1]], temperature=(-1.0, 1.0)),
        ["kVerifyParent", pack2(1, 2), -1, 0]),
    "verify temperature": (lambda d: verify_call(d, temperature=(0.0, -0.5)),
                           ["kVerifyTemperature", 1, float_bits(-0.5), 0]),
    "verify temperature nan": (lambda d: verify_call(d, temperature=(math.nan, 1.0)),
                               ["kVerifyTemperature", 0, float_bits(math.nan), 0]),
    "verify temperature inf": (lambda d: verify_call(d, temperature=(0.0, math.inf)),
                               ["kVerifyTemperature", 1, float_bits(math.inf), 0]),
    "write start": (lambda d: write_call(d, [0, 7]), ["kWriteStart", 1, 7, pack2(4, 10)]),
    "write start negative int32": (lambda d: write_call(d, [-1, 9], torch.int32), ["kWriteStart", 0, -1, pack2(4, 10)]),
}


def word_of(case):
    name, *values = CASES[case][1]
    return [CODES[name], *values]


def message_of(call):
    with pytest.raises(RuntimeError) as info:
        call()
    return str(info.value)


def test_every_code_has_a_case():
    used = {CASES[c][1][0] for c in CASES}
    assert used == set(CODES), f"codes without a case: {sorted(set(CODES) - used)}"


@pytest.mark.parametrize("case", list(CASES))
def test_cpu_message_equals_the_words_message(case):
    direct = message_of(CASES[case][0]("cpu"))
    word = word_of(case)
    assert message_of(lambda: ops.raise_if_error(word)) == direct
    assert message_of(lambda: ops.raise_if_error(torch.tensor(word))) == direct
    strided = torch.zeros(8, dtype=torch.long)
    strided[::2] = torch.tensor(word)
    assert message_of(lambda: ops.raise_if_error(strided[::2])) == direct


def test_zero_word_raises_nothing_and_a_list_costs_no_dispatch():
    word = torch.zeros(4, dtype=torch.long)
    with HostCounter() as seen:
        ops.raise_if_error([0, 0, 0, 0])
        ops.raise_if_error((0, 5, 6, 7))  # only the code counts
    assert seen.calls == []
    with HostCounter() as seen:
        ops.raise_if_error(word)
    assert seen.calls == ["sparrow._raise_error_word.default"]


def test_bad_words_are_refused():
    with pytest.raises(ValueError, match="host copy"):
        ops.raise_if_error(torch.zeros(4, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="4 values"):
        ops.raise_if_error([1, 2, 3])
    with pytest.raises(RuntimeError, match="int64 tensor of 4 elements"):
        ops.raise_if_error(torch.zeros(4, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"unknown error word \[1023, 1, 2, 3\]"):
        ops.raise_if_error([1023, 1, 2, 3])


def test_deferred_checks_on_cpu_is_a_no_op_scope():
    with ops.deferred_checks("cpu") as word:
        assert word.device.type == "cpu" and word.tolist() == [0, 0, 0, 0]
        with pytest.raises(RuntimeError, match=r"token_ids\[1\] = 11"):
            CASES["fused_fc token too big"][0]("cpu")()  # still raises at once
        with ops.deferred_checks(torch.device("cpu")) as inner:
            assert inner.tolist() == [0, 0, 0, 0]
    ops.raise_if_error(word)


def test_set_error_word_refuses_bad_words():
    with pytest.raises(RuntimeError, match="word must be on cuda:0"):
        torch.ops.sparrow._set_error_word(0, torch.zeros(4, dtype=torch.long))
    torch.ops.sparrow._set_error_word(0, None)  # clearing needs no tensor


# ---------------------------------------------------------------------------------- on a GPU


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_direct_call_raises_at_once_with_the_cpu_message(case):
    make = CASES[case][0]
    assert message_of(make("cuda")) == message_of(make("cpu"))


@pytest.mark.cuda
@pytest.mark.parametrize("case", list(CASES))
def test_cuda_deferred_raises_only_from_the_word(case):
    make = CASES[case][0]
    call = make("cuda")
    with ops.deferred_checks("cuda") as word:
        call()  # no raise, no sync
        host = word.cpu()
    assert host.tolist() == word_of(case)
    assert message_of(lambda: ops.raise_if_error(host)) == message_of(make("cpu"))
    assert message_of(lambda: ops.raise_if_error(host.tolist())) == message_of(make("cpu"))
    # The scope is closed: the same call raises at once again.
    assert message_of(call) == message_of(make("cpu"))


@pytest.mark.cuda
def test_cuda_deferred_keeps_the_first_error_and_good_calls_leave_it():
    first, second = CASES["fused_fc token too big"][0]("cuda"), CASES["verify token"][0]("cuda")
    with ops.deferred_checks(torch.device("cuda")) as word:
        gather_call("cuda", GOOD_SRC, GOOD_COUNTS, GOOD_DST)()  # a good call records nothing
        assert word.cpu().tolist() == [0, 0, 0, 0]
        first()
        second()
    assert word.cpu().tolist() == word_of("fused_fc token too big")


@pytest.mark.cuda
def test_cuda_deferred_bad_moves_change_nothing():
    caches = [torch.randn(2, 10, 2, 3, device="cuda") for _ in range(70)]  # two launches
    before = [c.clone() for c in caches]
    with ops.deferred_checks("cuda") as word:
        torch.ops.sparrow.gather_kv_(caches, t([[5, 4, 9], [1, 2, -1]], "cuda"), t(GOOD_COUNTS, "cuda"),
                                     t(GOOD_DST, "cuda"), 1)
    assert word.cpu().tolist() == word_of("gather src order")
    assert all(torch.equal(c, b) for c, b in zip(caches, before))


@pytest.mark.cuda
def test_cuda_nested_scopes_restore_the_outer_word():
    with ops.deferred_checks("cuda") as outer:
        CASES["fused_fc token too big"][0]("cuda")()
        with ops.deferred_checks("cuda") as inner:
            assert inner.data_ptr() != outer.data_ptr() and inner.cpu().tolist() == [0, 0, 0, 0]
            CASES["text_attention lens short"][0]("cuda")()
        CASES["verify token"][0]("cuda")()  # recorded in the outer word, which holds an error already
    assert inner.cpu().tolist() == word_of("text_attention lens short")
    assert outer.cpu().tolist() == word_of("fused_fc token too big")
    with ops.deferred_checks("cuda") as again:  # the outermost word is reused, zeroed
        assert again.data_ptr() == outer.data_ptr() and again.cpu().tolist() == [0, 0, 0, 0]


@pytest.mark.cuda
def test_cuda_graph_capture_keeps_deferred_checks_and_skips_direct_reads():
    caches = [torch.randn(2, 10, 2, 3, device="cuda") for _ in range(4)]
    src, counts, dst = t(GOOD_SRC, "cuda"), t(GOOD_COUNTS, "cuda"), t(GOOD_DST, "cuda")
    torch.ops.sparrow.gather_kv_(caches, src, counts, dst, 1)  # warm up outside the capture
    torch.cuda.synchronize()
    with ops.deferred_checks("cuda") as word:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            torch.ops.sparrow.gather_kv_(caches, src, counts, dst, 1)
        src.copy_(t([[5, 4, 9], [1, 2, -1]], "cuda"))
        graph.replay()
        assert word.cpu().tolist() == word_of("gather src order")
    # Outside a scope, a capture neither syncs nor raises (the values are not checked there).
    graph2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph2):
        torch.ops.sparrow.gather_kv_(caches, src, counts, dst, 1)
    src.copy_(t(GOOD_SRC, "cuda"))
    graph2.replay()
    torch.cuda.synchronize()


@pytest.mark.cuda
def test_cuda_value_checks_off_means_no_checks():
    code = (
        "import torch, sparrow\n"
        "embed, hidden = torch.randn(11, 8, device='cuda'), torch.randn(3, 6, device='cuda')\n"
        "weight = torch.randn(7, 14, device='cuda')\n"
        "bad = torch.tensor([0, 11, 1], device='cuda')\n"
        "out = torch.ops.sparrow.fused_fc(bad, embed, hidden, weight, None)\n"  # reads row 0 for id 11
        "good = torch.ops.sparrow.fused_fc(torch.tensor([0, 0, 1], device='cuda'), embed, hidden, weight, None)\n"
        "assert torch.allclose(out, good)\n"
        "with sparrow.ops.deferred_checks('cuda') as word:\n"
        "    torch.ops.sparrow.fused_fc(bad, embed, hidden, weight, None)\n"
        "assert word.cpu().tolist() == [0, 0, 0, 0]\n"
    )
    env = dict(os.environ, SPARROW_CUDA_VALUE_CHECKS="0")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
