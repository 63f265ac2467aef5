"""fused_fc (compiled) against sparrow.reference.fused_fc: sizes, dtypes, strides, checks, tracing."""

import secrets

import pytest
import torch

import sparrow
from sparrow import reference
from conftest import FLOAT_DTYPES, device_params, dtype_error_bound, requires_compiled_ops

pytestmark = requires_compiled_ops()

# (N, V, D, H, Dout): odd widths (vector tails), N across the micro-kernel's row groups and the
# 256-row task chunk, a reduction longer than one 2048-element chunk.
SHAPES = [
    (1, 7, 7, 83, 9),
    (7, 83, 769, 83, 33),
    (16, 50, 40, 24, 130),
    (83, 31, 2100, 7, 37),
    (300, 31, 65, 17, 70),
]


def make_inputs(N, V, D, H, Dout, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, V, (N,), generator=g)
    embed = torch.randn(V, D, generator=g)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(Dout, D + H, generator=g) / (D + H) ** 0.5
    b = torch.randn(Dout, generator=g) if bias else None
    cast = lambda t: None if t is None else t.to(device=device, dtype=dtype)  # noqa: E731
    return token_ids.to(device), cast(embed), cast(hidden), cast(weight), cast(b)


def same_dtype_torch(token_ids, embed, hidden, weight, bias):
    """The plain PyTorch computation in the inputs' own dtype (the error yardstick)."""
    out = torch.cat([embed[token_ids], hidden], -1) @ weight.T
    return out if bias is None else out + bias


def check_against_reference(token_ids, embed, hidden, weight, bias):
    out = sparrow.ops.fused_fc(token_ids, embed, hidden, weight, bias)
    assert out.shape == (token_ids.shape[0], weight.shape[0])
    assert out.dtype == embed.dtype and out.device == embed.device
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref64 = reference.fused_fc(token_ids, embed.double(), hidden.double(), weight.double(), as64(bias))
    err, bound = dtype_error_bound(out, ref64, same_dtype_torch(token_ids, embed, hidden, weight, bias))
    assert torch.isfinite(out).all()
    assert err <= bound, f"max error {err:.3e} > bound {bound:.3e}"


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}_V{}_D{}_H{}_O{}".format(*s))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_matches_reference(device, dtype, shape, bias):
    check_against_reference(*make_inputs(*shape, dtype, device, bias=bias))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "N{}_V{}_D{}_H{}_O{}".format(*s))
def test_float64_exact(device, shape):
    args = make_inputs(*shape, torch.float64, device)
    out = sparrow.ops.fused_fc(*args)
    torch.testing.assert_close(out, reference.fused_fc(*args), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("N", [1, 2, 5, 64, 257])
def test_batch_sizes(device, N):
    check_against_reference(*make_inputs(N, 40, 96, 33, 45, torch.float32, device, seed=N))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("N", [19, 150], ids=["decode_path", "gemm_path"])  # CPU switches paths by N
def test_strided_inputs(device, dtype, N):
    """Views with row and element strides: every operand read through its strides."""
    V, D, H, Dout = 23, 37, 29, 41
    token_ids, embed, hidden, weight, bias = make_inputs(N, V, D, H, Dout, dtype, device)
    tok_v = torch.stack([token_ids, torch.zeros_like(token_ids)], 1)[:, 0]  # stride 2
    embed_v = torch.stack([embed, torch.zeros_like(embed)], -1)[..., 0]  # element stride 2
    hidden_v = torch.cat([torch.zeros(N, 3, dtype=dtype, device=device), hidden, hidden], 1)[:, 3 : 3 + H]
    weight_v = weight.T.contiguous().T  # transposed view: stride (1, Dout)
    bias_v = torch.stack([bias, bias], 1)[:, 1]
    assert not any(t.is_contiguous() for t in (tok_v, embed_v, hidden_v, weight_v, bias_v))
    out = sparrow.ops.fused_fc(tok_v, embed_v, hidden_v, weight_v, bias_v)
    expect = sparrow.ops.fused_fc(token_ids, embed, hidden, weight, bias)
    if dtype == torch.float64:
        torch.testing.assert_close(out, reference.fused_fc(token_ids, embed, hidden, weight, bias))
    check_against_reference(tok_v, embed_v, hidden_v, weight_v, bias_v)
    torch.testing.assert_close(out.float(), expect.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", device_params())
def test_empty_and_repeated_tokens(device):
    token_ids, embed, hidden, weight, bias = make_inputs(0, 5, 8, 4, 6, torch.float32, device)
    assert sparrow.ops.fused_fc(token_ids, embed, hidden, weight, bias).shape == (0, 6)
    token_ids, embed, hidden, weight, bias = make_inputs(9, 5, 8, 4, 6, torch.float32, device)
    token_ids = torch.full_like(token_ids, 4)  # the last vocabulary row, every time
    check_against_reference(token_ids, embed, hidden, weight, bias)


@pytest.mark.parametrize("device", device_params())
def test_bad_inputs_name_the_argument(device):
    token_ids, embed, hidden, weight, bias = make_inputs(5, 11, 8, 6, 7, torch.float32, device)
    op = torch.ops.sparrow.fused_fc
    cases = [
        ("token_ids", (token_ids.int(), embed, hidden, weight, bias)),
        ("token_ids", (token_ids[None], embed, hidden, weight, bias)),
        ("token_ids", (torch.tensor([0, 11, 1, 2, 3], device=device), embed, hidden, weight, bias)),
        ("token_ids", (torch.tensor([0, -1, 1, 2, 3], device=device), embed, hidden, weight, bias)),
        ("embed", (token_ids, embed.long(), hidden, weight, bias)),
        ("hidden", (token_ids, embed, hidden.double(), weight, bias)),
        ("hidden", (token_ids, embed, hidden[:4], weight, bias)),
        ("hidden", (token_ids, embed, hidden[0], weight, bias)),
        ("weight", (token_ids, embed, hidden, weight.half(), bias)),
        ("weight", (token_ids, embed, hidden, weight[:, :-1], bias)),
        ("weight", (token_ids, embed, hidden, weight[None], bias)),
        ("bias", (token_ids, embed, hidden, weight, bias[:-1])),
        ("bias", (token_ids, embed, hidden, weight, bias.double())),
    ]
    for name, args in cases:
        with pytest.raises(RuntimeError, match=name):
            op(*args)


@pytest.mark.cuda
def test_device_mismatch_is_rejected():
    token_ids, embed, hidden, weight, bias = make_inputs(5, 11, 8, 6, 7, torch.float32, "cuda")
    for name, args in [
        ("hidden", (token_ids, embed, hidden.cpu(), weight, bias)),
        ("weight", (token_ids, embed, hidden, weight.cpu(), bias)),
        ("bias", (token_ids, embed, hidden, weight, bias.cpu())),
    ]:
        with pytest.raises(RuntimeError, match=name):
            torch.ops.sparrow.fused_fc(*args)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck(device, bias):
    args = make_inputs(6, 13, 24, 10, 17, torch.float32, device, bias=bias)
    torch.library.opcheck(torch.ops.sparrow.fused_fc.default, args)


@pytest.mark.parametrize("device", device_params())
def test_torch_compile_fullgraph(device):
    token_ids, embed, hidden, weight, bias = make_inputs(5, 13, 24, 10, 17, torch.float32, device)

    @torch.compile(fullgraph=True)
    def project(token_ids, hidden):
        return sparrow.ops.fused_fc(token_ids, embed, hidden, weight, bias).relu()

    out = project(token_ids, hidden)
    expect = reference.fused_fc(token_ids, embed, hidden, weight, bias).relu()
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------- CUDA paths (on a GPU)
# fused_fc.cu picks a path by N: N <= 16 the rows kernels (tensor-core mma.sync for float16 and
# bfloat16 with 16-byte-aligned rows, SIMT FMAs for float32, float64 and unaligned inputs), N > 16
# a gather into scratch then cuBLAS. Every N below crosses one of those edges (NT tiles 1..16,
# 8-row mma tiles, the 16/17 switch) or sits on the decode tree's N = 80.
PATH_NS = [1, 2, 5, 8, 9, 16, 17, 64, 80, 300, 512]
# ||out - ref|| / ||ref|| against float64 (METHOD.md): fp32 math far under 1e-3; half types carry
# the rounding of their output (and of cuBLAS's inputs) on top of fp32 accumulation.
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
# (V, D, H, Dout): D, H multiples of 8 (16-byte vectors, mma) with a K = D + H that ends inside a
# 32-wide chunk and a Dout that ends inside a 32-row block; and odd widths (scalar fallbacks).
ALIGNED = (97, 136, 200, 77)
ODD = (31, 37, 29, 45)


def fresh_cuda_inputs(N, V, D, H, Dout, dtype, bias=True, hidden_pad=(0, 0), weight_pad=0):
    """Fresh random inputs on the GPU (a new seed each call, named in failures). hidden_pad=(a, b):
    hidden is a column view [:, a:a+H] of a [N, a+H+b] tensor; weight_pad: the weight is a view
    [:, p:p+D+H] of a wider tensor (a pointer and stride off the 16-byte grid for odd p)."""
    seed = secrets.randbits(31)
    g = torch.Generator(device="cuda").manual_seed(seed)
    randn = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    token_ids = torch.randint(0, V, (N,), generator=g, device="cuda")
    embed = randn(V, D).to(dtype)
    a, b = hidden_pad
    hidden = randn(N, a + H + b).to(dtype)[:, a : a + H]
    weight = (randn(Dout, weight_pad + D + H) / (D + H) ** 0.5).to(dtype)[:, weight_pad:]
    bias_t = randn(Dout).to(dtype) if bias else None
    return seed, (token_ids, embed, hidden, weight, bias_t)


def check_cuda_path(seed, args):
    token_ids, embed, hidden, weight, bias = args
    out = sparrow.ops.fused_fc(*args)  # the op allocates: every element must have been written
    assert out.shape == (token_ids.shape[0], weight.shape[0]) and out.dtype == embed.dtype
    assert not torch.isnan(out).any(), f"NaN in the output (seed {seed})"
    as64 = lambda t: None if t is None else t.double()  # noqa: E731
    ref64 = reference.fused_fc(token_ids, embed.double(), hidden.double(), weight.double(), as64(bias))
    rel = ((out.double() - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()
    assert rel <= REL_TOL[embed.dtype], f"relative error {rel:.3e} (seed {seed})"
    if embed.dtype != torch.float64:
        err, bound = dtype_error_bound(out, ref64, same_dtype_torch(*args))
        assert err <= bound, f"max error {err:.3e} > bound {bound:.3e} (seed {seed})"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("N", PATH_NS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("widths", [ALIGNED, ODD], ids=["aligned", "odd"])
def test_cuda_every_path(dtype, N, bias, widths):
    check_cuda_path(*fresh_cuda_inputs(N, *widths, dtype, bias=bias))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("N", [5, 16, 80])
@pytest.mark.parametrize(
    "layout",
    [
        dict(hidden_pad=(8, 8)),  # strided hidden, still on the 16-byte grid: vector path
        dict(hidden_pad=(3, 2)),  # hidden pointer and stride off the grid: scalar fallback
        dict(weight_pad=1),  # weight pointer and stride off the grid (N > 16: cuBLAS takes it as is)
        dict(weight_pad=8),  # a wider weight's aligned column view
    ],
    ids=["hidden_aligned_view", "hidden_unaligned", "weight_unaligned", "weight_aligned_view"],
)
def test_cuda_strided_and_unaligned(dtype, N, layout):
    seed, args = fresh_cuda_inputs(N, *ALIGNED, dtype, **layout)
    assert not args[2].is_contiguous() or not args[3].is_contiguous()
    check_cuda_path(seed, args)


@pytest.mark.cuda
@pytest.mark.parametrize("N", [1, 9, 16, 17, 80])
def test_cuda_target_shape(N):
    """The 7B draft's fc: D = H = Dout = 3584, bfloat16 (a K of 7168, 112 mma blocks)."""
    check_cuda_path(*fresh_cuda_inputs(N, 1000, 3584, 3584, 3584, torch.bfloat16))


@pytest.mark.cuda
@pytest.mark.parametrize("N", [3, 16, 40])
@pytest.mark.parametrize(
    "widths", [ALIGNED, ODD, (13, 16, 0, 9), (13, 0, 24, 33)], ids=["aligned", "odd", "no_hidden", "no_embed"]
)
def test_cuda_float64(N, widths):
    seed, args = fresh_cuda_inputs(N, *widths, torch.float64)
    out = sparrow.ops.fused_fc(*args)
    torch.testing.assert_close(out, reference.fused_fc(*args), rtol=1e-12, atol=1e-12, msg=f"seed {seed}")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N", [3, 12, 40])
def test_cuda_bad_token_sets_the_word_and_a_direct_call_raises_the_cpu_message(dtype, N):
    seed, (token_ids, embed, hidden, weight, bias) = fresh_cuda_inputs(N, *ALIGNED, dtype)
    V = embed.shape[0]
    bad = token_ids.clone()
    bad[1], bad[N - 1] = V + 4, -3  # the first bad position is reported
    args = (bad, embed, hidden, weight, bias)
    with pytest.raises(RuntimeError) as cpu:
        torch.ops.sparrow.fused_fc(*(None if t is None else t.cpu() for t in args))
    with pytest.raises(RuntimeError) as direct:
        torch.ops.sparrow.fused_fc(*args)
    assert str(direct.value) == str(cpu.value)
    with sparrow.ops.deferred_checks("cuda") as word:
        out = torch.ops.sparrow.fused_fc(*args)  # no raise, no sync
        host = word.cpu()
    assert host.tolist()[1:] == [1, V + 4, V], f"seed {seed}"
    with pytest.raises(RuntimeError) as deferred:
        sparrow.ops.raise_if_error(host)
    assert str(deferred.value) == str(cpu.value)
    # A bad id reads embed row 0.
    clamped = torch.where((bad < 0) | (bad >= V), torch.zeros_like(bad), bad)
    expect = torch.ops.sparrow.fused_fc(clamped, embed, hidden, weight, bias)
    torch.testing.assert_close(out, expect, msg=f"seed {seed}")


@pytest.mark.cuda
@pytest.mark.parametrize("N", [4, 80])
def test_cuda_graph_capture(N):
    """The decode step replays fused_fc from a CUDA graph: both paths (cuBLAS too) capture."""
    seed, (token_ids, embed, hidden, weight, bias) = fresh_cuda_inputs(N, *ALIGNED, torch.bfloat16)
    sparrow.ops.fused_fc(token_ids, embed, hidden, weight, bias)  # warm up outside the capture
    torch.cuda.synchronize()
    with sparrow.ops.deferred_checks("cuda") as word:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = sparrow.ops.fused_fc(token_ids, embed, hidden, weight, bias)
        hidden.copy_(torch.randn_like(hidden))
        graph.replay()
        assert word.cpu().tolist() == [0, 0, 0, 0]
    expect = sparrow.ops.fused_fc(token_ids, embed, hidden, weight, bias)
    torch.testing.assert_close(out, expect, msg=f"seed {seed}")
