"""Sampling helpers: the device-side uniforms (counter-based, one stream per request row) and the
inverse-CDF draw, which must never read the device on the host."""

from __future__ import annotations

import pytest
import torch

from sparrow.profiling import HostCounter
from sparrow.sampling import RowUniforms, _splitmix64_int, sample_from, splitmix64


def test_splitmix64_on_tensors_equals_the_integer_definition():
    """torch's int64 arithmetic wraps mod 2^64 as the uint64 algorithm needs; checked against the
    same function on Python integers at the edges of the range and at random points."""
    g = torch.Generator().manual_seed(0)
    xs = [0, 1, -1, 2**63 - 1, -(2**63), 0x9E3779B97F4A7C15 - 2**64]
    xs += torch.randint(-(2**63), 2**63 - 1, (200,), generator=g, dtype=torch.long).tolist()
    got = splitmix64(torch.tensor(xs, dtype=torch.long)).tolist()
    assert got == [_splitmix64_int(x) for x in xs]
    assert _splitmix64_int(0) == 0xE220A8397B1DCDAF - 2**64  # the published first output for seed 0


def test_row_uniforms_are_per_row_streams():
    four, one = RowUniforms(7, 4, "cpu"), RowUniforms(7, 1, "cpu")
    a, b = four.draw(6), one.draw(6)
    assert a.shape == (4, 6) and a.dtype == torch.float32
    assert torch.equal(a[:1], b)  # row 0 does not see the other rows
    assert len({tuple(r) for r in a.tolist()}) == 4  # rows differ
    assert not torch.equal(four.draw(6), a)  # every draw advances
    # A list of seeds: row r of [.., s, ..] is the one row of [s]; rows leaving keep their streams.
    listed = RowUniforms([3, 9, 4], 3, "cpu")
    listed.select_rows(torch.tensor([1, 2]))
    alone = RowUniforms([9], 1, "cpu")
    assert torch.equal(listed.draw(5)[0], alone.draw(5)[0])
    with pytest.raises(ValueError, match="one seed per row"):
        RowUniforms([1, 2], 3, "cpu")


def test_row_uniforms_are_uniform():
    u = RowUniforms(1, 1, "cpu").draw(200_000)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    counts = torch.histc(u, bins=20, min=0, max=1)
    assert float((counts - 10_000).abs().max()) < 500  # about 5 standard deviations


def test_draws_and_sampling_read_nothing_on_the_host():
    uniforms = RowUniforms(5, 3, "cpu")
    p = torch.softmax(torch.randn(3, 50, dtype=torch.float64), -1)
    p[:, 10] = 0
    with HostCounter() as c:
        tokens = sample_from(p, uniforms.draw(1)[:, 0])
    assert c.host_reads == 0
    assert bool((p.gather(1, tokens[:, None]) > 0).all())
