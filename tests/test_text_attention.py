"""sparrow::text_attention: the draft's attention over its text-only KV cache.

The compiled kernel against sparrow.reference (float64 ground truth, error bound tied to the
dtype) over odd sizes, every float dtype, GQA ratios, rows of different lengths, tree and causal
masks, windows, strided inputs and queries that see nothing; argument checks; opcheck and
torch.compile.
"""

import pytest
import torch

import sparrow
from sparrow import reference

from conftest import device_params, dtype_error_bound, requires_compiled_ops

pytestmark = requires_compiled_ops()

ALL_FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def ancestor_mask(parents):
    """[B, N+1, N+1] bool: node i sees node j when j is i or one of its ancestors (kept here so
    these op tests do not depend on the loop's tree module)."""
    B, N = parents.shape
    mask = torch.eye(N + 1, dtype=torch.bool).repeat(B, 1, 1)
    for i in range(1, N + 1):  # parents precede children: the parent's row is complete
        mask[:, i] |= mask[torch.arange(B), parents[:, i - 1]]
    return mask


def random_tree_mask(B, Lq, generator=None):
    """[B, Lq, Lq] ancestor masks of random trees of Lq nodes (node 0 the root)."""
    parents = torch.zeros(B, Lq - 1, dtype=torch.long)
    for i in range(1, Lq):
        parents[:, i - 1] = torch.randint(0, i, (B,), generator=generator)
    return ancestor_mask(parents)


def make_inputs(B, Lq, hq, hkv, d, L, dtype, device, lens=None, tree=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, hq, d, generator=g)
    k = torch.randn(B, L, hkv, d, generator=g)
    v = torch.randn(B, L, hkv, d, generator=g)
    if lens is None:  # rows of different lengths; the last one's new block is its whole cache
        lens = torch.randint(Lq, L + 1, (B,), generator=g)
        lens[-1] = Lq
    lens = torch.as_tensor(lens, dtype=torch.long)
    mask = random_tree_mask(B, Lq, g).to(device) if tree else None
    to = dict(device=device, dtype=dtype)
    return q.to(**to), k.to(**to), v.to(**to), lens.to(device), mask


def check_against_reference(q, k, v, lens, mask, scale, window):
    out = torch.ops.sparrow.text_attention(q, k, v, lens, mask, scale, window)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    assert out.is_contiguous()
    ref64 = reference.text_attention(q.double(), k.double(), v.double(), lens, mask, scale, window)
    same_dtype = reference.text_attention(q, k, v, lens, mask, scale, window)
    err, bound = dtype_error_bound(out, ref64, same_dtype)
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g}"
    return out


# (B, Lq, hq, hkv, d, L, tree, window)
CASES = [
    (1, 1, 4, 4, 64, 7, False, 0),  # decode, MHA, tiny cache
    (4, 1, 14, 2, 128, 769, False, 0),  # decode, GQA 7
    (3, 5, 28, 4, 128, 83, True, 0),  # tree, GQA 7
    (2, 17, 8, 2, 64, 769, True, 0),  # tree, GQA 4, Lq past a query block
    (3, 17, 7, 1, 64, 83, False, 0),  # causal chain, GQA 7 on one KV head
    (2, 5, 4, 1, 128, 83, True, 3),  # window smaller than the prefix
    (2, 17, 28, 4, 64, 83, True, 100),  # window larger than any prefix
    (2, 33, 7, 7, 128, 83, False, 20),  # window, causal
    (1, 83, 4, 4, 64, 83, False, 0),  # prefill: the whole cache is new
]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-Lq{}-hq{}-hkv{}-d{}-L{}-{}-w{}".format(
    *c[:6], "tree" if c[6] else "causal", c[7]))
def test_matches_reference(device, dtype, case):
    B, Lq, hq, hkv, d, L, tree, window = case
    q, k, v, lens, mask = make_inputs(B, Lq, hq, hkv, d, L, dtype, device, tree=tree)
    check_against_reference(q, k, v, lens, mask, d**-0.5, window)


@pytest.mark.parametrize("device", device_params())
def test_long_rows_of_many_tiles(device):
    # Prefix lengths across several key tiles, scores large enough to move the running max.
    q, k, v, lens, mask = make_inputs(3, 5, 8, 2, 128, 1000, torch.float32, device, lens=[1000, 517, 64])
    check_against_reference(q * 4, k, v, lens, mask, 0.2, 0)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_odd_head_dim(device, dtype):
    q, k, v, lens, mask = make_inputs(2, 3, 6, 2, 13, 40, dtype, device)
    check_against_reference(q, k, v, lens, mask, 0.3, 0)


@pytest.mark.parametrize("device", device_params())
def test_no_mask_is_causal(device):
    q, k, v, lens, _ = make_inputs(2, 9, 8, 2, 64, 50, torch.float32, device, tree=False)
    tril = torch.ones(9, 9, dtype=torch.bool, device=device).tril().expand(2, 9, 9)
    causal = torch.ops.sparrow.text_attention(q, k, v, lens, None, 0.125, 0)
    masked = torch.ops.sparrow.text_attention(q, k, v, lens, tril, 0.125, 0)
    torch.testing.assert_close(causal, masked, rtol=0, atol=0)


@pytest.mark.parametrize("device", device_params())
def test_query_that_sees_nothing_returns_zeros(device):
    # Row 0's new block is its whole cache (no prefix) and query 2 may not even see itself.
    q, k, v, _, mask = make_inputs(2, 4, 8, 4, 64, 20, torch.float32, device)
    lens = torch.tensor([4, 20], device=device)
    mask[:, 2] = False
    out = check_against_reference(q, k, v, lens, mask, 0.125, 0)
    assert (out[0, 2] == 0).all()
    assert out[1, 2].abs().sum() > 0  # row 1 still sees its prefix
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("device", device_params())
def test_int32_cache_lens_and_ignored_slots(device):
    q, k, v, lens, mask = make_inputs(3, 5, 8, 2, 64, 60, torch.float32, device, lens=[60, 30, 5])
    out = torch.ops.sparrow.text_attention(q, k, v, lens.int(), mask, 0.125, 0)
    # Slots at or past cache_lens[b] are never read: garbage there changes nothing.
    k2, v2 = k.clone(), v.clone()
    for b, n in enumerate(lens.tolist()):
        k2[b, n:] = float("nan")
        v2[b, n:] = float("inf")
    out2 = torch.ops.sparrow.text_attention(q, k2, v2, lens, mask, 0.125, 0)
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    check_against_reference(q, k, v, lens.int(), mask, 0.125, 0)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_strided_inputs(device, dtype):
    B, Lq, hq, hkv, d, L = 3, 5, 14, 2, 64, 70
    q, k, v, lens, mask = make_inputs(B, Lq, hq, hkv, d, L, dtype, device)
    expected = torch.ops.sparrow.text_attention(q, k, v, lens, mask, 0.125, 4)

    # q: every other head of a bigger tensor, padded head dim; caches: slices of a longer cache
    # with more heads and a padded head dim.
    q_big = torch.zeros(B, Lq, 2 * hq, d + 8, dtype=dtype, device=device)
    q_big[:, :, ::2, :d] = q
    k_big = torch.zeros(B, L + 30, hkv + 1, d + 8, dtype=dtype, device=device)
    v_big = torch.zeros_like(k_big)
    k_big[:, :L, 1:, 3 : d + 3] = k
    v_big[:, :L, 1:, 3 : d + 3] = v
    qs, ks, vs = q_big[:, :, ::2, :d], k_big[:, :, 1:, 3 : d + 3], v_big[:, :, 1:, 3 : d + 3]
    assert not (qs.is_contiguous() or ks.is_contiguous() or vs.is_contiguous())
    out = torch.ops.sparrow.text_attention(qs, ks, vs, lens, mask, 0.125, 4)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)

    # A Hugging Face style [B, h, L, d] cache viewed as [B, L, h, d].
    k_hf, v_hf = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    out = torch.ops.sparrow.text_attention(q, k_hf, v_hf, lens, mask, 0.125, 4)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)

    # Head dim not contiguous (the kernel copies in that case) and a non-contiguous mask.
    k_t = k.transpose(2, 3).contiguous().transpose(2, 3)
    mask_t = mask.transpose(1, 2).contiguous().transpose(1, 2)
    out = torch.ops.sparrow.text_attention(q, k_t, v, lens, mask_t, 0.125, 4)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- CUDA kernel
# The CUDA kernel's own paths: head dims compiled as constants (64, 128, 256) and padded (80, 96),
# key tiles clipped to the causal/tree frontier, splits of long prefixes, 16-byte and scalar
# loads. Fresh random inputs each run (the seed is in the message); error measured as
# ||out - ref|| / ||ref|| against float64 on the same (already rounded) inputs.

REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def fresh_seed():
    return int(torch.randint(0, 2**31 - 1, ()).item())


def relative_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def random_lens(B, Lq, L, g):
    """Ragged rows: random lengths in [Lq, L], the last row's cache all new (len == Lq)."""
    lens = torch.randint(Lq, L + 1, (B,), generator=g)
    lens[-1] = Lq
    return lens


def check_cuda_case(B, Lq, hq, hkv, d, L, dtype, mask_kind, window, seed, lens=None, scale=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, hq, d, generator=g).to("cuda", dtype)
    k = torch.randn(B, L, hkv, d, generator=g).to("cuda", dtype)
    v = torch.randn(B, L, hkv, d, generator=g).to("cuda", dtype)
    lens = (random_lens(B, Lq, L, g) if lens is None else torch.as_tensor(lens)).to("cuda")
    if mask_kind == "tree":
        mask = random_tree_mask(B, Lq, g).to("cuda")
    elif mask_kind == "any":  # the contract trusts every entry, m > i included
        mask = (torch.rand(B, Lq, Lq, generator=g) < 0.4).to("cuda")
    else:
        mask = None
    scale = d**-0.5 if scale is None else scale
    out = torch.ops.sparrow.text_attention(q, k, v, lens, mask, scale, window)
    ref = reference.text_attention(q.double(), k.double(), v.double(), lens, mask, scale, window)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    err = relative_error(out, ref)
    assert err <= REL_TOL[dtype], f"seed {seed}: relative error {err:.3g} > {REL_TOL[dtype]:.0e}"
    return out, ref


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("d", [64, 128, 256, 80, 96])
@pytest.mark.parametrize("Lq", [1, 7, 61])
@pytest.mark.parametrize("mask_kind", ["causal", "tree"])
@pytest.mark.parametrize("window", [0, 29])
def test_cuda_head_dims_and_frontier(dtype, d, Lq, mask_kind, window):
    # GQA 7 (the target's 28/4 heads); three ragged rows, the last with no prefix.
    check_cuda_case(3, Lq, 28, 4, d, Lq + 150, dtype, mask_kind, window, fresh_seed())


@pytest.mark.cuda
@pytest.mark.parametrize("d", [64, 128, 256, 80])
@pytest.mark.parametrize("mask_kind", ["causal", "tree"])
def test_cuda_float64(d, mask_kind):
    check_cuda_case(2, 7, 8, 8, d, 90, torch.float64, mask_kind, 0, fresh_seed())


@pytest.mark.cuda
@pytest.mark.parametrize("group", [1, 7])
@pytest.mark.parametrize("mask_kind", ["causal", "tree", "any"])
def test_cuda_gqa_groups_and_any_mask(group, mask_kind):
    check_cuda_case(2, 17, 4 * group, 4, 128, 120, torch.float32, mask_kind, 0, fresh_seed())


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Lq", [1, 61])
@pytest.mark.parametrize("window", [0, 3000])
def test_cuda_long_prefix_splits(dtype, Lq, window):
    # 5000 slots: several splits per row; a short row (fewer keys than splits) and a row whose
    # cache is all new leave splits with nothing to do.
    lens = [5000, 4000 + Lq, Lq + 3, Lq]
    check_cuda_case(4, Lq, 28, 4, 128, 5000, dtype, "tree" if Lq > 1 else "causal", window, fresh_seed(), lens=lens)


@pytest.mark.cuda
def test_cuda_large_scores_move_the_running_max():
    # Scores of tens (base 2: more): the running max changes across tiles and splits.
    out, ref = check_cuda_case(2, 5, 8, 2, 128, 3000, torch.float32, "tree", 0, fresh_seed(), scale=0.8)
    assert out.abs().max() > 0


@pytest.mark.cuda
def test_cuda_unaligned_caches_take_the_scalar_path():
    # Head-dim offset 1 (no 16-byte rows): element loads; the result equals the aligned one.
    seed = fresh_seed()
    q, k, v, lens, mask = make_inputs(2, 7, 14, 2, 128, 300, torch.bfloat16, "cuda", seed=seed)
    expected = torch.ops.sparrow.text_attention(q, k, v, lens, mask, 0.1, 0)
    k_big = torch.zeros(2, 300, 2, 129, dtype=q.dtype, device="cuda")
    v_big = torch.zeros_like(k_big)
    k_big[..., 1:], v_big[..., 1:] = k, v
    out = torch.ops.sparrow.text_attention(q, k_big[..., 1:], v_big[..., 1:], lens, mask, 0.1, 0)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.cuda
@pytest.mark.parametrize("lens_dtype", [torch.int32, torch.int64], ids=str)
def test_cuda_bad_lens_go_to_the_error_word(lens_dtype):
    q, k, v, _, mask = make_inputs(4, 3, 8, 2, 64, 10, torch.float32, "cuda")
    bad = torch.tensor([10, 11, 2, 12], dtype=lens_dtype, device="cuda")  # rows 1, 2, 3 bad
    cpu_args = [x.cpu() for x in (q, k, v, bad, mask)]
    with pytest.raises(RuntimeError) as cpu_error:
        torch.ops.sparrow.text_attention(*cpu_args, 0.25, 0)
    assert "cache_lens[1] = 11" in str(cpu_error.value)  # the first bad row, as on CPU
    with pytest.raises(RuntimeError) as cuda_error:
        torch.ops.sparrow.text_attention(q, k, v, bad, mask, 0.25, 0)
    assert str(cuda_error.value) == str(cpu_error.value)
    with sparrow.ops.deferred_checks("cuda") as word:
        out = torch.ops.sparrow.text_attention(q, k, v, bad, mask, 0.25, 0)  # no raise, no sync
        host = word.cpu()
    assert host[0] != 0 and host[1:3].tolist() == [1, 11] and host[3] == (3 << 32) | 10
    assert torch.isfinite(out).all()  # bad rows clamped, never read out of bounds
    with pytest.raises(RuntimeError) as deferred_error:
        sparrow.ops.raise_if_error(host)
    assert str(deferred_error.value) == str(cpu_error.value)


# ----------------------------------------------------------------------------- argument checks


def good_args(device="cpu"):
    q, k, v, lens, mask = make_inputs(2, 3, 8, 2, 16, 10, torch.float32, device, lens=[10, 5])
    return dict(q=q, k_cache=k, v_cache=v, cache_lens=lens, tree_mask=mask, scale=0.25, window=0)


def call(args):
    return torch.ops.sparrow.text_attention(
        args["q"], args["k_cache"], args["v_cache"], args["cache_lens"], args["tree_mask"], args["scale"],
        args["window"])


BAD_ARGS = {
    "q_dims": (lambda a: a.update(q=a["q"][0]), "q must have 4 dimensions"),
    "k_dims": (lambda a: a.update(k_cache=a["k_cache"][0]), "k_cache must have 4 dimensions"),
    "v_dims": (lambda a: a.update(v_cache=a["v_cache"][..., None]), "v_cache must have 4 dimensions"),
    "lens_dims": (lambda a: a.update(cache_lens=a["cache_lens"][None]), "cache_lens must have 1 dimensions"),
    "q_int": (lambda a: a.update(q=a["q"].int()), "q must be float32, float16, bfloat16 or float64"),
    "k_dtype": (lambda a: a.update(k_cache=a["k_cache"].half()), "k_cache must have the dtype of q"),
    "v_dtype": (lambda a: a.update(v_cache=a["v_cache"].double()), "v_cache must have the dtype of q"),
    "lens_dtype": (lambda a: a.update(cache_lens=a["cache_lens"].float()), "cache_lens must be int64 or int32"),
    "k_batch": (lambda a: a.update(k_cache=a["k_cache"][:1]), r"k_cache.size\(0\) must be 2"),
    "lens_batch": (lambda a: a.update(cache_lens=a["cache_lens"][:1]), r"cache_lens.size\(0\) must be 2"),
    "head_dim": (lambda a: a.update(k_cache=a["k_cache"][..., :8], v_cache=a["v_cache"][..., :8]),
                 "k_cache head dim"),
    "v_shape": (lambda a: a.update(v_cache=a["v_cache"][:, :9]), "v_cache must have k_cache's shape"),
    "gqa": (lambda a: a.update(k_cache=torch.zeros(2, 10, 3, 16), v_cache=torch.zeros(2, 10, 3, 16)),
            "must be a multiple of k_cache's"),
    "lens_past_cache": (lambda a: a["cache_lens"].fill_(11), r"cache_lens\[0\] = 11 must lie in \[Lq, L\]"),
    "lens_below_lq": (lambda a: a["cache_lens"].__setitem__(1, 2), r"cache_lens\[1\] = 2 must lie in \[Lq, L\]"),
    "mask_shape": (lambda a: a.update(tree_mask=a["tree_mask"][:, :2]), "tree_mask must have shape"),
    "mask_dtype": (lambda a: a.update(tree_mask=a["tree_mask"].int()), "tree_mask must be bool"),
}


@pytest.mark.parametrize("name", list(BAD_ARGS))
def test_bad_arguments_name_the_argument(name):
    edit, message = BAD_ARGS[name]
    args = good_args()
    edit(args)
    with pytest.raises(RuntimeError, match=message):
        call(args)


@pytest.mark.cuda
@pytest.mark.parametrize("which", ["k_cache", "v_cache", "cache_lens", "tree_mask"])
def test_device_mismatch(which):
    args = good_args("cuda")
    args[which] = args[which].cpu()
    with pytest.raises(RuntimeError, match=f"{which} must be on q's device"):
        call(args)


# ----------------------------------------------------------------------------- torch integration


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("tree", [True, False], ids=["tree", "causal"])
def test_opcheck(device, tree):
    q, k, v, lens, mask = make_inputs(2, 3, 4, 2, 16, 9, torch.float32, device, tree=tree)
    torch.library.opcheck(torch.ops.sparrow.text_attention.default, (q, k, v, lens, mask, 0.25, 2))


def test_torch_compile_fullgraph():
    def step(q, k, v, lens, mask):
        return sparrow.ops.text_attention(q * 2, k, v, lens, mask, 0.125, 0).sum(-1)

    q, k, v, lens, mask = make_inputs(2, 5, 8, 2, 32, 30, torch.float32, "cpu")
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, lens, mask), step(q, k, v, lens, mask))
