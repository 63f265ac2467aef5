"""write_kv_ (compiled, in place) against sparrow.reference.write_kv_: both cache layouts, odd
sizes, every dtype, strided and transposed new entries, int32/int64 starts, checks."""

import pytest
import torch

import sparrow
from sparrow import reference
from sparrow.profiling import HostCounter
from conftest import device_params, requires_compiled_ops

pytestmark = requires_compiled_ops()

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8]


def distinct(shape, dtype, device, seed):
    """A tensor whose every element is distinct (mod 251 for uint8), so a misplaced copy shows."""
    n = 1
    for s in shape:
        n *= s
    values = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) % (251 if dtype == torch.uint8 else 2039)
    return values.reshape(shape).to(device=device, dtype=dtype)


def layout(B, L, h, d, seq_dim):
    return (B, L, h, d) if seq_dim == 1 else (B, h, L, d)


def make_case(B, L, h, d, M, seq_dim, dtype, device, seed=0, index_dtype=torch.int64):
    k_cache = distinct(layout(B, L, h, d, seq_dim), dtype, device, seed)
    v_cache = distinct(layout(B, L, h, d, seq_dim), dtype, device, seed + 1)
    k_new = distinct(layout(B, M, h, d, seq_dim), dtype, device, seed + 2)
    v_new = distinct(layout(B, M, h, d, seq_dim), dtype, device, seed + 3)
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, L - M + 1, (B,), generator=g).to(device=device, dtype=index_dtype)
    return k_cache, v_cache, k_new, v_new, start


def check_against_reference(k_cache, v_cache, k_new, v_new, start, seq_dim):
    k_expect, v_expect = k_cache.clone(), v_cache.clone()
    reference.write_kv_(k_expect, v_expect, k_new, v_new, start, seq_dim)
    assert sparrow.ops.write_kv_(k_cache, v_cache, k_new, v_new, start, seq_dim) is None
    assert torch.equal(k_cache, k_expect)
    assert torch.equal(v_cache, v_expect)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("seq_dim", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,L,h,d,M", [(1, 7, 1, 1, 7), (3, 83, 4, 7, 11), (5, 129, 3, 64, 40), (2, 20, 4, 128, 1)])
def test_matches_reference(device, seq_dim, dtype, B, L, h, d, M):
    check_against_reference(*make_case(B, L, h, d, M, seq_dim, dtype, device, seed=L + M), seq_dim)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("seq_dim", [1, 2])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_start_dtypes_and_edges(device, seq_dim, index_dtype):
    """Rows written at slot 0 and at the very end, int32 or int64 starts."""
    B, L, h, d, M = 3, 12, 2, 5, 4
    k_cache, v_cache, k_new, v_new, _ = make_case(B, L, h, d, M, seq_dim, torch.float32, device)
    start = torch.tensor([0, L - M, 3], dtype=index_dtype, device=device)
    check_against_reference(k_cache, v_cache, k_new, v_new, start, seq_dim)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("seq_dim", [1, 2])
def test_strided_sources_and_caches(device, seq_dim):
    """New entries as transposed views (k and v with different strides), an element stride, a
    strided batch; caches that are views of a larger buffer (nothing outside them is written)."""
    B, L, h, d, M = 3, 33, 4, 9, 6
    dt = torch.float32
    k_cache, v_cache, k_new, v_new, start = make_case(B, L, h, d, M, seq_dim, dt, device, seed=5)
    other = 3 - seq_dim
    sources = {
        "transposed k": (distinct(layout(B, M, h, d, other), dt, device, 7).transpose(1, 2), v_new),
        "transposed v": (k_new, distinct(layout(B, M, h, d, other), dt, device, 8).transpose(1, 2)),
        "element stride": (distinct(layout(B, M, h, 2 * d, seq_dim), dt, device, 9)[..., ::2], v_new),
        "batch stride": (distinct(layout(2 * B, M, h, d, seq_dim), dt, device, 10)[::2], v_new),
        "head dim outermost": (distinct((B, d) + layout(B, M, h, d, seq_dim)[1:3], dt, device, 11).permute(0, 2, 3, 1),
                               v_new),
    }
    for name, (kn, vn) in sources.items():
        assert kn.shape == k_new.shape and vn.shape == v_new.shape, name
        kc, vc = k_cache.clone(), v_cache.clone()
        k_expect, v_expect = kc.clone(), vc.clone()
        reference.write_kv_(k_expect, v_expect, kn, vn, start, seq_dim)
        sparrow.ops.write_kv_(kc, vc, kn, vn, start, seq_dim)
        assert torch.equal(kc, k_expect) and torch.equal(vc, v_expect), name

    # Caches: a head slice of a wider buffer and a transposed view of the other layout.
    wide = distinct(layout(B, L, h + 2, d, seq_dim), dt, device, 12)
    before = wide.clone()
    kc = wide[:, :, 1 : 1 + h] if seq_dim == 1 else wide[:, 1 : 1 + h]
    vc = distinct(layout(B, L, h, d, other), dt, device, 13).transpose(1, 2)
    assert not kc.is_contiguous() and not vc.is_contiguous()
    k_expect, v_expect = kc.clone(), vc.clone()
    reference.write_kv_(k_expect, v_expect, k_new, v_new, start, seq_dim)
    sparrow.ops.write_kv_(kc, vc, k_new, v_new, start, seq_dim)
    assert torch.equal(kc, k_expect) and torch.equal(vc, v_expect)
    outside = torch.ones_like(wide, dtype=torch.bool)
    (outside[:, :, 1 : 1 + h] if seq_dim == 1 else outside[:, 1 : 1 + h]).fill_(False)
    assert torch.equal(wide[outside], before[outside])


@pytest.mark.parametrize("device", device_params())
def test_empty_writes(device):
    for B, M in [(0, 3), (2, 0)]:
        check_against_reference(*make_case(B, 8, 2, 4, M, 1, torch.float32, device), 1)


def _valid(device):
    return make_case(2, 10, 2, 3, 4, 1, torch.float32, device)


@pytest.mark.parametrize("device", device_params())
def test_bad_inputs_name_the_argument_and_leave_the_caches(device):
    k, v, kn, vn, start = _valid(device)
    t = lambda rows, **kw: torch.tensor(rows, device=device, **kw)  # noqa: E731
    cases = [
        (r"start\[1\] = 7 must satisfy 0 <= start and start \+ M <= L with M = 4 \(k_new.size\(seq_dim\)\) "
         r"and L = 10 \(k_cache.size\(seq_dim\)\)", (k, v, kn, vn, t([0, 7]), 1)),
        (r"start\[0\] = -1 must satisfy", (k, v, kn, vn, t([-1, 0]), 1)),
        (r"start\[0\] = -1 must satisfy", (k, v, kn, vn, t([-1, 9], dtype=torch.int32), 1)),  # the first bad row
        ("start must be int64 or int32", (k, v, kn, vn, start.float(), 1)),
        (r"start.size\(0\) must be 2", (k, v, kn, vn, start[:1], 1)),
        ("start must have 1 dimensions", (k, v, kn, vn, start[None], 1)),
        ("seq_dim must be 1", (k, v, kn, vn, start, 0)),
        ("seq_dim must be 1", (k, v, kn, vn, start, 3)),
        ("k_cache must have 4 dimensions", (k[0], v, kn, vn, start, 1)),
        ("v_cache must have k_cache's shape", (k, v[:, :9], kn, vn, start, 1)),
        ("k_new must have shape", (k, v, kn[:, :, :1], vn, start, 1)),
        ("k_new must have shape", (k, v, kn[:1], vn, start, 1)),
        ("v_new must have k_new's shape", (k, v, kn, vn[:, :3], start, 1)),
        ("v_cache must have the dtype of k_cache", (k, v.double(), kn, vn, start, 1)),
        ("k_new must have the dtype of k_cache", (k, v, kn.half(), vn, start, 1)),
        ("v_new must have the dtype of k_cache", (k, v, kn, vn.long(), start, 1)),
        ("k_new must not share memory with k_cache", (k, v, k[:, :4], vn, start, 1)),
        ("v_new must not share memory with k_cache or v_cache", (k, v, kn, v[:, 6:], start, 1)),
        ("v_cache must not share memory with k_cache", (k, k, kn, vn, start, 1)),
        ("k_cache must not have overlapping memory", (k[:, :, :1].expand(2, 10, 2, 3), v, kn, vn, start, 1)),
    ]
    for message, args in cases:
        before = [a.clone() for a in args[:2]]
        with pytest.raises(RuntimeError, match=message):
            torch.ops.sparrow.write_kv_(*args)
        assert torch.equal(args[0], before[0]) and torch.equal(args[1], before[1]), message  # nothing written


@pytest.mark.cuda
def test_device_mismatch_is_rejected():
    k, v, kn, vn, start = _valid("cuda")
    for name, args in [
        ("v_cache", (k, v.cpu(), kn, vn, start, 1)),
        ("k_new", (k, v, kn.cpu(), vn, start, 1)),
        ("v_new", (k, v, kn, vn.cpu(), start, 1)),
        ("start", (k, v, kn, vn, start.cpu(), 1)),
    ]:
        with pytest.raises(RuntimeError, match=f"{name} must be on k_cache's device"):
            torch.ops.sparrow.write_kv_(*args)


def test_wrapper_is_one_dispatch():
    k, v, kn, vn, start = make_case(2, 16, 2, 8, 5, 2, torch.bfloat16, "cpu")
    with HostCounter() as seen:
        sparrow.ops.write_kv_(k, v, kn.transpose(1, 2).contiguous().transpose(1, 2), vn, start.int(), 2)
    assert seen.calls.count("sparrow.write_kv_.default") == 1
    assert seen.calls[-1] == "sparrow.write_kv_.default"  # (the others built the arguments)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("seq_dim", [1, 2])
def test_opcheck(device, seq_dim):
    k, v, kn, vn, start = make_case(2, 12, 3, 4, 5, seq_dim, torch.float32, device)
    torch.library.opcheck(torch.ops.sparrow.write_kv_.default, (k, v, kn, vn, start, seq_dim))
    torch.library.opcheck(torch.ops.sparrow.write_kv_.default, (k, v, kn.transpose(1, 2).contiguous().transpose(1, 2),
                                                                vn, start.int(), seq_dim))


@pytest.mark.parametrize("device", device_params())
def test_torch_compile_fullgraph(device):
    k, v, kn, vn, start = make_case(2, 12, 3, 4, 5, 2, torch.float32, device)
    k_expect, v_expect = k.clone(), v.clone()
    reference.write_kv_(k_expect, v_expect, kn * 2, vn, start, 2)

    @torch.compile(fullgraph=True)
    def write(k, v, kn, vn, start):
        sparrow.ops.write_kv_(k, v, kn * 2, vn, start, 2)
        return k.sum() + v.sum()

    total = write(k, v, kn, vn, start)
    assert torch.equal(k, k_expect) and torch.equal(v, v_expect)
    assert total.item() == (k_expect.sum() + v_expect.sum()).item()
