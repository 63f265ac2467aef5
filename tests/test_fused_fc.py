"""fused_fc (compiled) against sparrow.reference.fused_fc: sizes, dtypes, strides, checks, tracing."""

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
