"""gather_kv_ (compiled, in place) against sparrow.reference.gather_kv_: layouts, strides, checks."""

import pytest
import torch

import sparrow
from sparrow import reference
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
    for name, args in cases:
        before = args[0].clone()
        with pytest.raises(RuntimeError, match=name):
            torch.ops.sparrow.gather_kv_(*args)
        assert torch.equal(args[0], before), name


def test_overlapping_memory_cache_is_rejected():
    cache = torch.arange(10.0).reshape(1, 10, 1, 1).expand(2, 10, 3, 4)
    src, counts, dst = torch.tensor([[1], [1]]), torch.tensor([1, 1]), torch.tensor([0, 0])
    with pytest.raises(RuntimeError, match="cache"):
        torch.ops.sparrow.gather_kv_(cache, src, counts, dst, 1)


@pytest.mark.cuda
def test_device_mismatch_is_rejected():
    cache, src, counts, dst = _valid("cuda")
    for name, args in [
        ("src_index", (cache, src.cpu(), counts, dst, 1)),
        ("counts", (cache, src, counts.cpu(), dst, 1)),
        ("dst_start", (cache, src, counts, dst.cpu(), 1)),
    ]:
        with pytest.raises(RuntimeError, match=name):
            torch.ops.sparrow.gather_kv_(*args)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("seq_dim", [1, 2])
def test_opcheck(device, seq_dim):
    cache = make_cache(2, 12, 3, 4, seq_dim, torch.float32, device)
    src, counts, dst = (t.to(device) for t in random_moves(2, 12, 5, seed=3))
    torch.library.opcheck(torch.ops.sparrow.gather_kv_.default, (cache, src, counts, dst, seq_dim))


@pytest.mark.parametrize("device", device_params())
def test_torch_compile_fullgraph(device):
    cache = make_cache(2, 12, 3, 4, 2, torch.float32, device)
    src, counts, dst = (t.to(device) for t in random_moves(2, 12, 5, seed=4))
    expect = cache.clone()
    reference.gather_kv_(expect, src, counts, dst, 2)

    @torch.compile(fullgraph=True)
    def commit(cache, src, counts, dst):
        sparrow.ops.gather_kv_(cache, src, counts, dst, 2)
        return cache.sum()

    total = commit(cache, src, counts, dst)
    assert torch.equal(cache, expect)
    assert total.item() == expect.sum().item()
