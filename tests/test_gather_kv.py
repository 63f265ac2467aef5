"""gather_kv_ (compiled, in place) against sparrow.reference.gather_kv_: layouts, strides, lists
of caches (every layer's K and V in one call), checks."""

import pytest
import torch

import sparrow
from sparrow import reference
from sparrow.profiling import HostCounter
from conftest import device_params, requires_compiled_ops

pytestmark = requires_compiled_ops()


def make_cache(B, L, h, d, seq_dim, dtype, device, seed=0):
    """A cache whose every element is distinct, so a misplaced or missed copy shows."""
    shape = (B, L, h, d) if seq_dim == 1 else (B, h, L, d)
    values = torch.randperm(B * L * h * d, generator=torch.Generator().manual_seed(seed)) % 2039
    return values.reshape(shape).to(device=device, dtype=dtype)


def random_moves(B, L, M, seed, index_dtype=torch.int64):
    """Valid moves per row: count <= M sources, ascending and never before their destination;
    entries past counts[b] are -1 (padding, must be ignored)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.full((B, M), -1, dtype=torch.int64)
    counts = torch.zeros(B, dtype=torch.int64)
    dst = torch.zeros(B, dtype=torch.int64)
    for b in range(B):
        c = int(torch.randint(0, min(M, L) + 1, (1,), generator=g))
        start = int(torch.randint(0, L - c + 1, (1,), generator=g))
        # The m-th smallest of c distinct slots in [start, L) is >= start + m.
        pick = torch.randperm(L - start, generator=g)[:c].sort().values + start
        src[b, :c], counts[b], dst[b] = pick, c, start
    return src, counts.to(index_dtype), dst.to(index_dtype)


def check_against_reference(cache, src, counts, dst, seq_dim):
    expect = cache.clone()
    reference.gather_kv_(expect, src, counts, dst, seq_dim)
    assert sparrow.ops.gather_kv_(cache, src, counts, dst, seq_dim) is None
    assert torch.equal(cache, expect)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("seq_dim", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8])
@pytest.mark.parametrize("B,L,h,d,M", [(1, 7, 1, 1, 7), (3, 83, 4, 7, 11), (5, 129, 3, 64, 40)])
def test_matches_reference(device, seq_dim, dtype, B, L, h, d, M):
    cache = make_cache(B, L, h, d, seq_dim, dtype, device)
    src, counts, dst = random_moves(B, L, M, seed=L + B)
    check_against_reference(cache, src.to(device), counts.to(device), dst.to(device), seq_dim)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("seq_dim", [1, 2])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_overlapping_moves_and_ragged_counts(device, seq_dim, index_dtype):
    """Commit-like shifts whose destinations overlap later sources, pruning to slot 0, a no-op
    move (source == destination) and an empty row, in one batch."""
    B, L, h, d = 4, 20, 2, 5
    cache = make_cache(B, L, h, d, seq_dim, torch.float32, device)
    src = torch.tensor(
        [
            [3, 4, 5, 6, 7, 8],  # shift left by one: every destination but the first is a source
            [2, 5, 6, 11, 19, -1],  # pruning: ragged, last slot of the cache
            [0, 1, 2, 9, -1, -1],  # the first three stay put
            [-1, -1, -1, -1, -1, -1],  # nothing to do
        ]
    )
    counts = torch.tensor([6, 5, 4, 0], dtype=index_dtype)
    dst = torch.tensor([2, 0, 0, 7], dtype=index_dtype)
    check_against_reference(cache, src.to(device=device, dtype=index_dtype), counts.to(device), dst.to(device), seq_dim)


@pytest.mark.parametrize("device", device_params())
def test_non_contiguous_caches(device):
    """Views into a larger buffer: the view is moved as a contiguous cache would be, and nothing
    of the buffer outside the view is written."""
    B, L, h, d = 3, 33, 4, 9
    src, counts, dst = (t.to(device) for t in random_moves(B, L, 12, seed=1))
    views = {  # name: (buffer shape [., L, ., .], view of the buffer, seq_dim)
        "head slice": ((B, L, h + 2, d), lambda t: t[:, :, 1 : 1 + h], 1),
        "element stride 2": ((B, L, h, 2 * d), lambda t: t[..., ::2], 1),
        "[B,h,L,d] view of [B,L,h,d]": ((B, L, h, d), lambda t: t.transpose(1, 2), 2),
        "row stride": ((2 * B, L, h, d), lambda t: t[::2].transpose(1, 2), 2),
        "3-D [B,d,L]": ((B, L, 1, d), lambda t: t[:, :, 0].transpose(1, 2), 2),
    }
    for name, (shape, view_of, seq_dim) in views.items():
        buffer = make_cache(*shape, 1, torch.float32, device)
        before = buffer.clone()
        view = view_of(buffer)
        assert not view.is_contiguous(), name
        expect = view.clone()
        reference.gather_kv_(expect, src, counts, dst, seq_dim)
        sparrow.ops.gather_kv_(view, src, counts, dst, seq_dim)
        assert torch.equal(view, expect), name
        outside = torch.ones(shape, dtype=torch.bool, device=device)
        view_of(outside).fill_(False)
        assert torch.equal(buffer[outside], before[outside]), name


def _valid(device):
    cache = make_cache(2, 10, 2, 3, 1, torch.float32, device)
    src = torch.tensor([[4, 5, 9], [1, 2, -1]], device=device)
    counts = torch.tensor([3, 2], device=device)
    dst = torch.tensor([3, 0], device=device)
    return cache, src, counts, dst


@pytest.mark.parametrize("device", device_params())
def test_bad_inputs_name_the_argument_and_leave_the_cache(device):
    cache, src, counts, dst = _valid(device)
    t = lambda rows, **kw: torch.tensor(rows, device=device, **kw)  # noqa: E731
    cases = [
        ("src_index", (cache, t([[4, 5, 10], [1, 2, -1]]), counts, dst, 1)),  # source out of range
        ("src_index", (cache, t([[4, 5, 9], [-1, 2, -1]]), counts, dst, 1)),  # negative source
        ("src_index", (cache, t([[5, 4, 9], [1, 2, -1]]), counts, dst, 1)),  # not ascending
        ("src_index", (cache, t([[4, 4, 9], [1, 2, -1]]), t([2, 2]), dst, 1)),  # repeated source
        ("src_index", (cache, t([[2, 5, 9], [1, 2, -1]]), counts, dst, 1)),  # source before destination
        ("src_index", (cache, src.float(), counts, dst, 1)),
        ("src_index", (cache, src[0], counts, dst, 1)),
        ("src_index", (cache, src[:1], counts, dst, 1)),
        ("counts", (cache, src, t([4, 2]), dst, 1)),  # more than src_index.size(1)
        ("counts", (cache, src, t([-1, 2]), dst, 1)),
        ("counts", (cache, src, counts.float(), dst, 1)),
        ("counts", (cache, src, counts[:1], dst, 1)),
        ("dst_start", (cache, src, counts, t([8, 0]), 1)),  # dst_start + counts > L
        ("dst_start", (cache, src, counts, t([3, -1]), 1)),
        ("dst_start", (cache, src, counts, dst[None], 1)),
        ("seq_dim", (cache, src, counts, dst, 0)),
        ("seq_dim", (cache, src, counts, dst, 3)),
        ("seq_dim", (cache, src, counts, dst, -1)),
        ("seq_dim", (cache[:, :, 0, 0], src, counts, dst, 2)),  # out of range for a 2-D cache
        ("cache", (cache[:, 0, 0, 0], src, counts, dst, 1)),
    ]
    other = make_cache(2, 10, 2, 3, 1, torch.float32, device, seed=1)  # a second cache of the list
    for name, args in cases:
        caches = [args[0], other] if args[0].shape == other.shape else [args[0]]
        before = [c.clone() for c in caches]
        with pytest.raises(RuntimeError, match=name):
            torch.ops.sparrow.gather_kv_(caches, *args[1:])
        assert all(torch.equal(c, b) for c, b in zip(caches, before)), name  # a bad call moves nothing


def test_overlapping_memory_cache_is_rejected():
    cache = torch.arange(10.0).reshape(1, 10, 1, 1).expand(2, 10, 3, 4)
    src, counts, dst = torch.tensor([[1], [1]]), torch.tensor([1, 1]), torch.tensor([0, 0])
    with pytest.raises(RuntimeError, match="cache"):
        torch.ops.sparrow.gather_kv_([cache], src, counts, dst, 1)


@pytest.mark.cuda
def test_device_mismatch_is_rejected():
    cache, src, counts, dst = _valid("cuda")
    for name, args in [
        ("src_index", ([cache], src.cpu(), counts, dst, 1)),
        ("counts", ([cache], src, counts.cpu(), dst, 1)),
        ("dst_start", ([cache], src, counts, dst.cpu(), 1)),
        (r"caches\[1\] must be on caches\[0\]'s device", ([cache, cache.cpu()], src, counts, dst, 1)),
    ]:
        with pytest.raises(RuntimeError, match=name):
            torch.ops.sparrow.gather_kv_(*args)


# ------------------------------------------------------------------------------ lists of caches


def layer_caches(n_layers, B, L, h, d, seq_dim, dtype, device):
    """Every layer's K and V with distinct values: the Ks views of one shared buffer (as a static
    cache may hold them), the Vs stored in the other layout and viewed back (transposed strides)."""
    ks = torch.stack([make_cache(B, L, h, d, seq_dim, dtype, device, seed=2 * i) for i in range(n_layers)])
    caches = []
    for i in range(n_layers):
        v = make_cache(B, L, h, d, 3 - seq_dim, dtype, device, seed=2 * i + 1).transpose(1, 2)
        caches += [ks[i], v]
    return caches


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("seq_dim", [1, 2])
@pytest.mark.parametrize("n_layers", [1, 3, 33])  # 66 caches: more than one CUDA launch holds
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_list_matches_reference(device, seq_dim, n_layers, dtype):
    B, L, h, d, M = 3, 41, 2, 24, 9
    caches = layer_caches(n_layers, B, L, h, d, seq_dim, dtype, device)
    src, counts, dst = (t.to(device) for t in random_moves(B, L, M, seed=n_layers))
    expect = [c.clone() for c in caches]
    reference.gather_kv_(expect, src, counts, dst, seq_dim)
    assert sparrow.ops.gather_kv_(caches, src, counts, dst, seq_dim) is None
    for i, (c, e) in enumerate(zip(caches, expect)):
        assert torch.equal(c, e), f"caches[{i}]"


@pytest.mark.parametrize("device", device_params())
def test_list_commit_shapes_of_a_7b_target(device):
    """A commit of a tree's accepted path into 56 caches [B, h=4, L, d=128] bf16 (Qwen2.5-7B)."""
    B, L, h, d = 2, 96, 4, 128
    caches = [make_cache(B, L, h, d, 2, torch.bfloat16, device, seed=i) for i in range(56)]
    base, end = 60, torch.tensor([31, 60])  # tree block at [60, 96); row 1's prefix ends at it
    nodes = torch.tensor([[0, 3, 7, 8, 20, -1], [0, 1, 2, 5, 11, 35]])
    counts = torch.tensor([5, 6])
    src = torch.where(nodes >= 0, nodes + base, base).to(device)
    expect = [c.clone() for c in caches]
    reference.gather_kv_(expect, src, counts, end, 2)
    sparrow.ops.gather_kv_(caches, src, counts.to(device), end.to(device), 2)
    assert all(torch.equal(c, e) for c, e in zip(caches, expect))


def test_list_arguments_name_the_index():
    B, L = 2, 10
    good = make_cache(B, L, 2, 3, 1, torch.float32, "cpu")
    src, counts, dst = torch.tensor([[4, 5, 9], [1, 2, -1]]), torch.tensor([3, 2]), torch.tensor([3, 0])
    cases = [
        (r"caches\[2\] has shape \[2, 9, 2, 3\].*cache length", [good, good.clone(), good[:, :9].clone()]),
        (r"caches\[1\] has shape \[1, 10, 2, 3\].*batch size", [good, good[:1].clone()]),
        (r"caches\[1\] must have the shape of caches\[0\] \(\[2, 10, 2, 3\]\), got \[2, 10, 2, 4\]",
         [good, torch.zeros(B, L, 2, 4)]),
        (r"caches\[1\] must have the dtype of caches\[0\]", [good, good.double()]),
        (r"caches\[1\] must have at least 2 dimensions", [good, good.flatten()]),
        (r"caches\[0\] and caches\[2\] start at the same memory", [good, good.clone(), good]),
        (r"caches\[1\] must not have overlapping memory", [good, good[:, :, :1].expand(B, L, 2, 3)]),
        ("caches must hold at least one tensor", []),
    ]
    for message, caches in cases:
        with pytest.raises(RuntimeError, match=message):
            torch.ops.sparrow.gather_kv_(caches, src, counts, dst, 1)


def test_wrapper_is_one_dispatch():
    """The Python wrapper adds no ATen dispatch of its own: a list of 56 caches is one op call."""
    caches = [make_cache(2, 12, 3, 4, 2, torch.float32, "cpu", seed=i) for i in range(56)]
    src, counts, dst = random_moves(2, 12, 5, seed=3, index_dtype=torch.int32)
    for arg in (caches, caches[0]):
        with HostCounter() as seen:
            sparrow.ops.gather_kv_(arg, src, counts, dst, 2)
        assert seen.calls == ["sparrow.gather_kv_.default"], seen.calls


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("seq_dim", [1, 2])
def test_opcheck(device, seq_dim):
    caches = [make_cache(2, 12, 3, 4, seq_dim, torch.float32, device, seed=i) for i in range(3)]
    src, counts, dst = (t.to(device) for t in random_moves(2, 12, 5, seed=3))
    torch.library.opcheck(torch.ops.sparrow.gather_kv_.default, (caches, src, counts, dst, seq_dim))
    torch.library.opcheck(torch.ops.sparrow.gather_kv_.default, (caches[:1], src, counts, dst, seq_dim))


@pytest.mark.parametrize("device", device_params())
def test_torch_compile_fullgraph(device):
    caches = [make_cache(2, 12, 3, 4, 2, torch.float32, device, seed=i) for i in range(4)]
    src, counts, dst = (t.to(device) for t in random_moves(2, 12, 5, seed=4))
    expect = [c.clone() for c in caches]
    reference.gather_kv_(expect, src, counts, dst, 2)

    @torch.compile(fullgraph=True)
    def commit(caches, src, counts, dst):
        sparrow.ops.gather_kv_(caches, src, counts, dst, 2)
        sparrow.ops.gather_kv_(caches[0], src, counts * 0, dst, 2)  # a single tensor, a no-op
        return sum(c.sum() for c in caches)

    total = commit(caches, src, counts, dst)
    assert all(torch.equal(c, e) for c, e in zip(caches, expect))
    assert total.item() == sum(e.sum() for e in expect).item()
