"""sparrow::verify: greedy and sampled acceptance of draft trees and chains.

Exact hand-written greedy and sampled cases, the compiled kernel against sparrow.reference on
random trees (bit-for-bit: both use float32 softmax/sum and a float64 inverse CDF), argument
checks, and statistical tests that sampled outputs follow the target's distribution.
"""

import pytest
import torch
from scipy import stats

import sparrow
from sparrow import reference

from conftest import device_params, requires_compiled_ops

pytestmark = requires_compiled_ops()

ALL_FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def verify(*args):
    return torch.ops.sparrow.verify(*args)


def rows_with_argmax(argmaxes, V, device="cpu", dtype=torch.float32):
    """Logits rows [len(argmaxes), V] whose argmax is the given token (small noise elsewhere)."""
    rows = torch.linspace(-1.0, 0.0, V).repeat(len(argmaxes), 1)
    for i, a in enumerate(argmaxes):
        rows[i, a] = 3.0
    return rows.to(device=device, dtype=dtype)


def greedy_call(tokens, parents, argmaxes, V, device):
    """One-row greedy verify; argmaxes[i] is the target's argmax after node i."""
    tok = torch.tensor([tokens], dtype=torch.long, device=device)
    par = torch.tensor([parents], dtype=torch.long, device=device)
    logits = rows_with_argmax(argmaxes, V, device)[None]
    temp = torch.zeros(1, device=device)
    u = torch.rand(1, len(tokens) + 1, device=device)
    return [t.cpu().tolist()[0] for t in verify(tok, par, logits, None, temp, u)]


# ----------------------------------------------------------------------------- exact greedy cases


@pytest.mark.parametrize("device", device_params())
def test_greedy_chain_fully_accepted_gets_bonus_token(device):
    assert greedy_call([2, 4, 1], [0, 1, 2], [2, 4, 1, 3], 5, device) == [3, [1, 2, 3], [2, 4, 1, 3]]


@pytest.mark.parametrize("device", device_params())
def test_greedy_chain_rejected_at_first_step(device):
    assert greedy_call([2, 4, 1], [0, 1, 2], [0, 4, 1, 3], 5, device) == [0, [-1, -1, -1], [0, -1, -1, -1]]


@pytest.mark.parametrize("device", device_params())
def test_greedy_chain_rejected_midway(device):
    assert greedy_call([2, 4, 1], [0, 1, 2], [2, 4, 0, 3], 5, device) == [2, [1, 2, -1], [2, 4, 0, -1]]


@pytest.mark.parametrize("device", device_params())
def test_greedy_tree_second_child_matches(device):
    # root -> 1 (tok 1), 2 (tok 3); 1 -> 3 (tok 2); 2 -> 4 (tok 4)
    got = greedy_call([1, 3, 2, 4], [0, 0, 1, 2], [3, 2, 4, 1, 0], 5, device)
    assert got == [2, [2, 4, -1, -1], [3, 4, 0, -1, -1]]


@pytest.mark.parametrize("device", device_params())
def test_greedy_first_of_equal_siblings_and_first_max_on_ties(device):
    tok = torch.tensor([[3, 3, 1]], device=device)
    par = torch.tensor([[0, 0, 0]], device=device)
    logits = torch.zeros(1, 4, 5, device=device)
    logits[0, 0, 3] = 2.0
    logits[0, 1, [1, 4]] = 7.0  # tie: index 1 wins
    out = verify(tok, par, logits, None, torch.zeros(1, device=device), torch.rand(1, 4, device=device))
    assert [t.cpu().tolist()[0] for t in out] == [1, [1, -1, -1], [3, 1, -1, -1]]


@pytest.mark.parametrize("device", device_params())
def test_greedy_ragged_rows(device):
    V = 6
    tokens = torch.tensor([[2, 5, 1, 0], [4, 3, -1, -1], [-1, -1, -1, -1]], device=device)
    parents = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 2, 3]], device=device)
    logits = torch.stack(
        [
            rows_with_argmax([2, 5, 1, 0, 4], V),  # all four accepted, bonus 4
            rows_with_argmax([4, 3, 2, 0, 0], V),  # both real nodes accepted, then 2 (padded node)
            rows_with_argmax([5, 1, 1, 1, 1], V),  # nothing to accept
        ]
    ).to(device)
    acc, nodes, out = verify(tokens, parents, logits, None, torch.zeros(3, device=device), torch.rand(3, 5, device=device))
    assert acc.tolist() == [4, 2, 0]
    assert nodes.tolist() == [[1, 2, 3, 4], [1, 2, -1, -1], [-1, -1, -1, -1]]
    assert out.tolist() == [[2, 5, 1, 0, 4], [4, 3, 2, -1, -1], [5, -1, -1, -1, -1]]


@pytest.mark.parametrize("device", device_params())
def test_padded_nodes_never_accepted(device):
    # node 2 is padding under accepted node 1; node 3 (tok 4) hangs below the padded node 2 and
    # would match row 2's argmax, but is unreachable.
    V = 5
    tokens = torch.tensor([[2, -1, 4]], device=device)
    parents = torch.tensor([[0, 1, 2]], device=device)
    logits = rows_with_argmax([2, 0, 4, 1], V, device)[None]
    acc, nodes, out = verify(tokens, parents, logits, None, torch.zeros(1, device=device), torch.rand(1, 4, device=device))
    assert (acc.tolist(), nodes.tolist(), out.tolist()) == ([1], [[1, -1, -1]], [[2, 0, -1, -1]])
    # Sampling with u = 0 accepts every real child with p > 0, and still never a padded one; a
    # padded node may also carry parent -1.
    parents = torch.tensor([[0, -1, 1]], device=device)
    tokens = torch.tensor([[2, -1, 4]], device=device)
    uniform = torch.zeros(1, 4, device=device)
    acc, nodes, out = verify(tokens, parents, logits, None, torch.ones(1, device=device), uniform)
    assert acc.tolist() == [2] and nodes.tolist() == [[1, 3, -1]] and out.tolist()[0][:2] == [2, 4]


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("V", [1, 5, 16, 17, 1000])
def test_greedy_new_token_is_torch_argmax(device, V):
    """First max index on ties (within and across blocks, in the tail), -inf rows, +inf, NaN."""
    g = torch.Generator().manual_seed(V)
    rows = [torch.randn(V, generator=g), torch.full((V,), float("-inf")), torch.zeros(V)]
    for positions in ([V - 1], [V // 2, V - 1], [3, 1, 40, 999], [17, 2], [0, V - 1]):
        row = torch.randn(V, generator=g)
        for p in positions:
            if p < V:
                row[p] = 9.0
        rows.append(row)
    for value, positions in ((float("inf"), [V - 1, V // 3]), (float("nan"), [V - 1, V // 2])):
        row = torch.randn(V, generator=g)
        row[positions] = value
        rows.append(row)
    logits = torch.stack(rows)[:, None].to(device)  # [R, 1, V]: no draft nodes, N = 0
    R = logits.shape[0]
    empty = torch.zeros(R, 0, dtype=torch.long, device=device)
    acc, _, out = verify(empty, empty, logits, None, torch.zeros(R, device=device), torch.rand(R, 1, device=device))
    assert acc.tolist() == [0] * R
    assert out[:, 0].tolist() == torch.stack(rows).argmax(-1).tolist()


# ---------------------------------------------------------------------------- exact sampled cases


@pytest.mark.parametrize("device", device_params())
def test_sampled_one_hot_accept_and_reject_by_hand(device):
    p0 = torch.tensor([0.1, 0.2, 0.3, 0.4])
    logits = torch.stack([p0.log(), p0.log()])[None].to(device)  # rows 0 and 1
    tok = torch.tensor([[3]], device=device)
    par = torch.tensor([[0]], device=device)
    one = torch.ones(1, device=device)
    # u0 = 0.35 < p(3) = 0.4: accepted; then the bonus is drawn from row 1 with u1 = 0.05 -> token 0.
    acc, nodes, out = verify(tok, par, logits, None, one, torch.tensor([[0.35, 0.05]], device=device))
    assert (acc.tolist(), nodes.tolist(), out.tolist()) == ([1], [[1]], [[3, 0]])
    # u0 = 0.45: rejected, p -> [1, 2, 3, 0] / 6, u1 = 0.4 -> cdf [1/6, 1/2, 1]: token 1.
    acc, nodes, out = verify(tok, par, logits, None, one, torch.tensor([[0.45, 0.4]], device=device))
    assert (acc.tolist(), nodes.tolist(), out.tolist()) == ([0], [[-1]], [[1, -1]])
    # u1 close to 1 never lands on the zeroed token 3.
    acc, nodes, out = verify(tok, par, logits, None, one, torch.tensor([[0.45, 0.9999999]], device=device))
    assert out.tolist() == [[2, -1]]


@pytest.mark.parametrize("device", device_params())
def test_sampled_with_draft_probs_by_hand(device):
    p0 = torch.tensor([0.1, 0.2, 0.3, 0.4])
    q0 = torch.tensor([0.1, 0.6, 0.2, 0.1])
    logits = torch.stack([p0.log(), p0.log()])[None].to(device)
    q = q0[None, None].to(device)
    tok = torch.tensor([[1]], device=device)
    par = torch.tensor([[0]], device=device)
    one = torch.ones(1, device=device)
    # accept iff u * q(1) < p(1): 0.3 * 0.6 = 0.18 < 0.2 accepted, 0.4 * 0.6 = 0.24 rejected.
    acc, _, out = verify(tok, par, logits, q, one, torch.tensor([[0.3, 0.0]], device=device))
    assert acc.tolist() == [1] and out.tolist() == [[1, 0]]
    # rejected: residual max(0, p - q) = [0, 0, 0.1, 0.3] / 0.4; u1 = 0.2 -> token 2, 0.3 -> 3.
    for u1, want in [(0.2, 2), (0.3, 3), (0.0, 2)]:
        acc, _, out = verify(tok, par, logits, q, one, torch.tensor([[0.4, u1]], device=device))
        assert acc.tolist() == [0] and out.tolist() == [[want, -1]]


# ------------------------------------------------------------------------ kernel == reference


def random_case(B, N, V, dtype, *, chain, with_q, temps, seed, device):
    """Random trees (or chains), ragged padding, peaky logits so paths get accepted."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, N + 1, V, generator=g) * 3.0
    tokens = torch.full((B, N), -1, dtype=torch.long)
    parents = torch.zeros(B, N, dtype=torch.long)
    for b in range(B):
        n_real = int(torch.randint(0, N + 1, (1,), generator=g)) if b % 2 else N
        for i in range(1, N + 1):
            pa = i - 1 if chain else int(torch.randint(0, i, (1,), generator=g))
            if i > n_real:  # padded: any parent in -1..i-1
                parents[b, i - 1] = int(torch.randint(-1, i, (1,), generator=g))
                continue
            parents[b, i - 1] = pa
            if float(torch.rand(1, generator=g)) < 0.7:
                tokens[b, i - 1] = int(torch.argmax(logits[b, pa]))
            else:
                tokens[b, i - 1] = int(torch.randint(0, V, (1,), generator=g))
    draft_probs = None
    if with_q:
        draft_probs = torch.softmax(torch.randn(B, N, V, generator=g) * 2.0, -1)
        draft_probs = draft_probs.to(device=device, dtype=dtype)
    temperature = torch.tensor([temps[b % len(temps)] for b in range(B)], dtype=torch.float32)
    uniform = torch.rand(B, N + 1, generator=g)
    return (
        tokens.to(device),
        parents.to(device),
        logits.to(device=device, dtype=dtype),
        draft_probs,
        temperature.to(device),
        uniform.to(device),
    )


def assert_same(out, ref):
    for name, a, r in zip(("accept_len", "accepted_nodes", "out_tokens"), out, ref):
        assert a.dtype == torch.long and a.device == r.device, name
        torch.testing.assert_close(a, r, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", ALL_FLOAT_DTYPES)
@pytest.mark.parametrize("V", [7, 83, 1031])
@pytest.mark.parametrize(
    "mode",
    ["greedy", "sampled", "sampled_q", "mixed"],
)
def test_matches_reference_random(device, dtype, V, mode):
    temps = {"greedy": [0.0], "sampled": [1.0, 0.7, 1.5], "sampled_q": [1.0, 0.6], "mixed": [0.0, 1.0, 0.0, 0.3]}[mode]
    with_q = mode in ("sampled_q", "mixed")
    for seed, (B, N, chain) in enumerate([(8, 12, False), (5, 6, True), (1, 1, False), (3, 0, True)]):
        args = random_case(B, N, V, dtype, chain=chain, with_q=with_q, temps=temps, seed=seed, device=device)
        assert_same(verify(*args), reference.verify(*args))


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_float32_draft_probs_beside_other_logits(device, dtype):
    """The draft samples its tokens from a float32 q; verify takes that q as is beside bfloat16 /
    float16 / float64 logits (rounding q to the logits' dtype after the draw breaks exact
    sampling) and gives the reference's result, which reads q in float32."""
    V = 83
    for seed, (B, N, chain) in enumerate([(8, 12, False), (5, 6, True), (1, 1, False)]):
        args = list(random_case(B, N, V, dtype, chain=chain, with_q=True, temps=[1.0, 0.6, 0.0], seed=seed,
                                device=device))
        g = torch.Generator().manual_seed(100 + seed)
        args[3] = torch.softmax(torch.randn(B, N, V, generator=g) * 2.0, -1).to(device)  # float32, unrounded
        assert args[2].dtype == dtype and args[3].dtype == torch.float32
        assert_same(verify(*args), reference.verify(*args))
    torch.library.opcheck(torch.ops.sparrow.verify, [a.cpu() for a in args])


@pytest.mark.parametrize("device", device_params())
def test_matches_reference_strided_inputs(device):
    tok, par, logits, q, temp, u = random_case(4, 5, 33, torch.float32, chain=False, with_q=True, temps=[1.0, 0.0], seed=7, device=device)
    wide = torch.randn(4, 6, 66, device=device)
    wide[..., ::2] = logits
    q_wide = torch.zeros(5, 4, 33, device=device).transpose(0, 1)
    q_wide.copy_(q)
    args = (tok, par, wide[..., ::2], q_wide, temp, u)
    assert not args[2].is_contiguous() and not args[3].is_contiguous()
    assert_same(verify(*args), reference.verify(*args))


@pytest.mark.parametrize("device", device_params())
def test_same_uniforms_same_result_different_uniforms_differ(device):
    args = list(random_case(64, 8, 50, torch.float32, chain=False, with_q=True, temps=[1.0], seed=3, device=device))
    first = verify(*args)
    again = verify(*args)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    args[5] = torch.rand(args[5].shape, generator=torch.Generator().manual_seed(99)).to(device)
    other = verify(*args)
    assert not torch.equal(first[2], other[2])


# ------------------------------------------------------------------------------ argument checks


def good_args(device="cpu"):
    B, N, V = 2, 3, 9
    return dict(
        draft_tokens=torch.tensor([[1, 2, -1], [4, 5, 6]], device=device),
        parents=torch.tensor([[0, 1, 2], [0, 0, 1]], device=device),
        target_logits=torch.randn(B, N + 1, V, device=device),
        draft_probs=torch.softmax(torch.randn(B, N, V, device=device), -1),
        temperature=torch.tensor([0.0, 1.0], device=device),
        uniform=torch.rand(B, N + 1, device=device),
    )


BAD_INPUTS = {
    # name: (change to good_args, message fragment)
    "tokens_1d": (lambda a: a.update(draft_tokens=a["draft_tokens"][0]), "draft_tokens must have 2 dimensions"),
    "parents_N": (lambda a: a.update(parents=a["parents"][:, :2]), r"parents.size\(1\) must be 3"),
    "parents_B": (lambda a: a.update(parents=a["parents"][:1]), r"parents.size\(0\) must be 2"),
    "logits_N": (lambda a: a.update(target_logits=a["target_logits"][:, :3]), r"target_logits.size\(1\) must be N\+1 = 4"),
    "logits_B": (lambda a: a.update(target_logits=a["target_logits"][:1]), r"target_logits.size\(0\) must be 2"),
    "logits_2d": (lambda a: a.update(target_logits=a["target_logits"][0]), "target_logits must have 3 dimensions"),
    "probs_N": (lambda a: a.update(draft_probs=a["draft_probs"][:, :2]), r"draft_probs.size\(1\) must be 3"),
    "probs_V": (lambda a: a.update(draft_probs=a["draft_probs"][..., :8]), r"draft_probs.size\(2\) must be V = 9"),
    "uniform_N": (lambda a: a.update(uniform=a["uniform"][:, :3]), r"uniform.size\(1\) must be N\+1 = 4"),
    "uniform_B": (lambda a: a.update(uniform=a["uniform"][:1]), r"uniform.size\(0\) must be 2"),
    "temperature_B": (lambda a: a.update(temperature=a["temperature"][:1]), r"temperature.size\(0\) must be 2"),
    "tokens_int32": (lambda a: a.update(draft_tokens=a["draft_tokens"].int()), "draft_tokens must be int64"),
    "parents_int32": (lambda a: a.update(parents=a["parents"].int()), "parents must be int64"),
    "logits_int": (lambda a: a.update(target_logits=a["target_logits"].long()), "target_logits must be float32"),
    "probs_dtype": (lambda a: a.update(draft_probs=a["draft_probs"].half()),
                    r"draft_probs must be float32 or have the dtype of target_logits \(Float\), got Half"),
    "probs_f64": (lambda a: a.update(draft_probs=a["draft_probs"].double()),
                  r"draft_probs must be float32 or have the dtype of target_logits \(Float\), got Double"),
    "temperature_f64": (lambda a: a.update(temperature=a["temperature"].double()), "temperature must be float32"),
    "uniform_f16": (lambda a: a.update(uniform=a["uniform"].half()), "uniform must be float32"),
    "token_too_big": (lambda a: a["draft_tokens"].__setitem__((1, 2), 9), r"draft_tokens\[1, 2\] = 9 is outside \[0, V\)"),
    "token_negative": (lambda a: a["draft_tokens"].__setitem__((0, 0), -2), r"draft_tokens\[0, 0\] = -2 is outside \[0, V\)"),
    "parent_forward": (lambda a: a["parents"].__setitem__((1, 1), 2), r"parents\[1, 1\] = 2 must lie in 0..1"),
    "parent_self": (lambda a: a["parents"].__setitem__((1, 0), 1), r"parents\[1, 0\] = 1 must lie in 0..0"),
    "parent_negative_real": (lambda a: a["parents"].__setitem__((1, 2), -1), r"parents\[1, 2\] = -1 must lie in 0..2"),
    "parent_padded_bad": (lambda a: a["parents"].__setitem__((0, 2), 3), r"parents\[0, 2\] = 3 must lie in -1..2"),
    "temperature_negative": (lambda a: a["temperature"].__setitem__(1, -0.5), r"temperature\[1\] = -0.5 must be finite and >= 0"),
    "temperature_nan": (lambda a: a["temperature"].__setitem__(0, float("nan")), r"temperature\[0\] = nan must be finite"),
    "temperature_inf": (lambda a: a["temperature"].__setitem__(0, float("inf")), r"temperature\[0\] = inf must be finite"),
}


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_name_the_argument(device, case):
    args = good_args(device)
    verify(*args.values())  # the unchanged arguments are accepted
    change, message = BAD_INPUTS[case]
    change(args)
    with pytest.raises(RuntimeError, match=message):
        verify(*args.values())


def test_padded_node_may_have_parent_minus_one():
    args = good_args()
    args["parents"][0, 2] = -1
    verify(*args.values())


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["parents", "target_logits", "draft_probs", "temperature", "uniform"])
def test_argument_on_another_device(name):
    args = good_args("cuda")
    args[name] = args[name].cpu()
    with pytest.raises(RuntimeError, match=f"{name} must be on draft_tokens's device"):
        verify(*args.values())


# ------------------------------------------------------------------------------ statistical tests


def chi2_pvalue(samples, probs):
    """Chi-square p-value of integer samples against probs (flattened); cells with zero probability
    must never occur."""
    probs = probs.double().flatten().cpu()
    counts = torch.bincount(samples.flatten().cpu(), minlength=probs.numel()).double()
    assert counts.numel() == probs.numel(), "sample outside the support"
    support = probs > 0
    assert counts[~support].sum() == 0, f"zero-probability outcomes drawn: {torch.nonzero(counts * ~support).flatten().tolist()}"
    expected = probs[support] / probs[support].sum() * counts.sum()
    return stats.chisquare(counts[support].numpy(), expected.numpy()).pvalue


def complete_second_token(acc, out, row1_logits_of, temp, gen):
    """Second output token per row; where the step stopped after one token, draw the next one
    from the target itself (the following step would), so (first, second) ~ p0(x) p1[x](y)."""
    first, second = out[:, 0].cpu(), out[:, 1].cpu().clone()
    need = acc.cpu() == 0
    if need.any():
        probs = torch.softmax(row1_logits_of[first[need]].float() / temp, -1)
        second[need] = torch.multinomial(probs, 1, generator=gen).squeeze(1)
    return first, second


def stat_setup(V, seed, mask_topk=None):
    g = torch.Generator().manual_seed(seed)
    L0 = torch.randn(V, generator=g) * 0.8
    L1 = torch.randn(V, V, generator=g) * 0.8  # target row after token x: L1[x]
    L2 = torch.randn(V, generator=g) * 0.8
    if mask_topk is not None:  # top-k on L0, top-p-like (keep the k heaviest) per row of L1
        k0, k1 = mask_topk
        L0 = L0.masked_fill(L0 < L0.topk(k0).values[-1], float("-inf"))
        L1 = L1.masked_fill(L1 < L1.topk(k1, -1).values[:, -1:], float("-inf"))
    return g, L0, L1, L2


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("temp,mask", [(1.0, None), (0.6, None), (1.7, None), (1.0, (3, 2))])
def test_distribution_chain_with_draft_probs(device, temp, mask):
    """(a)/(c)/(d): a 3-token chain sampled from q (q of position 2 depends on the first draft
    token, as does the target row): first token ~ p0, first two jointly ~ p0(x) p1[x](y)."""
    V, R, N = 6, 12000, 3
    g, L0, L1, L2 = stat_setup(V, seed=11, mask_topk=mask)
    q0 = torch.softmax(torch.randn(V, generator=g), -1)  # also proposes masked tokens
    q1 = torch.softmax(torch.randn(V, V, generator=g), -1)
    q2 = torch.softmax(torch.randn(V, generator=g), -1)
    x1 = torch.multinomial(q0, R, replacement=True, generator=g)
    x2 = torch.multinomial(q1[x1], 1, generator=g).squeeze(1)
    x3 = torch.multinomial(q2, R, replacement=True, generator=g)
    tokens = torch.stack([x1, x2, x3], 1)
    parents = torch.arange(N).repeat(R, 1)
    logits = torch.stack([L0.expand(R, V), L1[x1], L2.expand(R, V), L2.expand(R, V)], 1)
    draft_probs = torch.stack([q0.expand(R, V), q1[x1], q2.expand(R, V)], 1)
    temperature = torch.full((R,), temp)
    uniform = torch.rand(R, N + 1, generator=g)
    args = [t.to(device) for t in (tokens, parents, logits, draft_probs, temperature, uniform)]
    acc, _, out = verify(*args)

    p0 = torch.softmax(L0 / temp, -1)
    p1 = torch.softmax(L1 / temp, -1)
    assert chi2_pvalue(out[:, 0], p0) > 1e-3
    first, second = complete_second_token(acc, out, L1, temp, g)
    assert chi2_pvalue(first * V + second, p0[:, None] * p1) > 1e-3
    assert (acc >= 1).float().mean() > 0.2  # the chain does get accepted


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("temp,mask", [(1.0, None), (0.5, None), (1.0, (4, 3))])
def test_distribution_tree_one_hot_drafts(device, temp, mask):
    """(b)/(c)/(d): deterministic tree, root -> its top-3 tokens (1, 2, 3), each with one child
    (4, 5, 6) holding the top token of that branch's row; no draft_probs."""
    V, R = 8, 12000
    g, L0, L1, L2 = stat_setup(V, seed=5, mask_topk=mask)
    top0 = torch.randn(V, generator=g).topk(3).indices if mask is None else L0.topk(4).indices[1:]
    # (the masked case drafts the 2nd-4th tokens, the 4th of which is masked out)
    kids = torch.stack([L1[t].argmax() for t in top0])
    tokens = torch.cat([top0, kids])[None].repeat(R, 1)
    parents = torch.tensor([0, 0, 0, 1, 2, 3]).repeat(R, 1)
    rows = torch.stack([L0, L1[top0[0]], L1[top0[1]], L1[top0[2]], L2, L2, L2])
    logits = rows[None].repeat(R, 1, 1)
    temperature = torch.full((R,), temp)
    uniform = torch.rand(R, 7, generator=g)
    acc, _, out = verify(*[t.to(device) for t in (tokens, parents, logits)], None, *[t.to(device) for t in (temperature, uniform)])

    p0 = torch.softmax(L0 / temp, -1)
    p1 = torch.softmax(L1 / temp, -1)
    assert chi2_pvalue(out[:, 0], p0) > 1e-3
    first, second = complete_second_token(acc, out, L1, temp, g)
    assert chi2_pvalue(first * V + second, p0[:, None] * p1) > 1e-3


@pytest.mark.parametrize("device", device_params())
def test_distribution_zero_probability_tokens_never_sampled(device):
    """A draft proposing only masked tokens (q lives on them) is always rejected and the new token
    stays in the kept set, also when the final uniform is at the top of its range."""
    V, R = 12, 4000
    logits = torch.full((R, 2, V), float("-inf"))
    logits[:, :, [2, 7, 9]] = torch.tensor([0.3, -1.0, 1.2])
    tokens = torch.tensor([[0]]).repeat(R, 1)
    uniform = torch.rand(R, 2, generator=torch.Generator().manual_seed(0))
    uniform[: R // 2, 1] = 0.99999994  # largest float32 below 1
    masked_q = torch.full((R, 1, V), 1.0 / 9)
    masked_q[:, :, [2, 7, 9]] = 0.0
    for q in (None, masked_q):
        args = [tokens, torch.zeros(R, 1, dtype=torch.long), logits, q, torch.ones(R), uniform]
        acc, _, out = verify(*[a.to(device) if a is not None else None for a in args])
        assert acc.sum() == 0
        assert set(out[:, 0].unique().tolist()) == {2, 7, 9}


# ----------------------------------------------------------------------- opcheck / torch.compile


def test_opcheck():
    for with_q in (False, True):
        args = random_case(3, 5, 17, torch.float32, chain=False, with_q=with_q, temps=[0.0, 1.0], seed=1, device="cpu")
        torch.library.opcheck(torch.ops.sparrow.verify, args)
    args = random_case(2, 4, 11, torch.bfloat16, chain=True, with_q=False, temps=[0.8], seed=2, device="cpu")
    torch.library.opcheck(torch.ops.sparrow.verify, args)


def test_torch_compile_fullgraph():
    def step(tokens, parents, logits, temperature, uniform):
        acc, nodes, out = sparrow.ops.verify(tokens, parents, logits * 2.0, None, temperature, uniform)
        return acc + 1, nodes, out

    args = random_case(4, 6, 29, torch.float32, chain=False, with_q=False, temps=[0.0, 1.0], seed=4, device="cpu")
    tokens, parents, logits, _, temperature, uniform = args
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(tokens, parents, logits, temperature, uniform)
    want = step(tokens, parents, logits, temperature, uniform)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# ------------------------------------------------------------------- CUDA kernel == CPU kernel
# The CUDA kernel splits every row over a cluster of blocks (slices of V, reductions exchanged
# between blocks): these cases cross the slice boundaries, at the sizes the decode loop sees.


def cuda_tree_case(B, N, V, dtype, seed, *, temps, with_q=False, chain=False):
    """Random trees (or chains) on the GPU: ragged padding (any parent -1..i-1 on padded nodes),
    children that mostly carry the target's argmax after their parent, and siblings that repeat an
    earlier sibling's token (their subtrees differ, so picking the wrong one shows)."""
    gpu = torch.Generator(device="cuda").manual_seed(seed)
    logits = (torch.randn(B, N + 1, V, generator=gpu, device="cuda") * 3.0).to(dtype)
    best = logits.float().argmax(-1).cpu()  # torch's first-max rule, on the values the op sees
    g = torch.Generator().manual_seed(seed)
    tokens = torch.full((B, N), -1, dtype=torch.long)
    parents = torch.zeros(B, N, dtype=torch.long)
    for b in range(B):
        n_real = N if b % 2 == 0 else int(torch.randint(0, N + 1, (1,), generator=g))
        for i in range(1, N + 1):
            if i > n_real:
                parents[b, i - 1] = int(torch.randint(-1, i, (1,), generator=g))
                continue
            pa = i - 1 if chain else int(torch.randint(0, i, (1,), generator=g))
            parents[b, i - 1] = pa
            siblings = [j for j in range(i - 1) if int(parents[b, j]) == pa and int(tokens[b, j]) >= 0]
            r = float(torch.rand(1, generator=g))
            if r < 0.2 and siblings:
                tokens[b, i - 1] = tokens[b, siblings[-1]]
            elif r < 0.8 or i == 1:  # node 1 always: every unpadded row accepts at least it
                tokens[b, i - 1] = int(best[b, pa])
            else:
                tokens[b, i - 1] = int(torch.randint(0, V, (1,), generator=g))
    draft_probs = None
    if with_q:
        draft_probs = torch.softmax(torch.randn(B, N, V, generator=gpu, device="cuda") * 2.0, -1)
    temperature = torch.tensor([temps[b % len(temps)] for b in range(B)], dtype=torch.float32)
    uniform = torch.rand(B, N + 1, generator=g)
    return [tokens.cuda(), parents.cuda(), logits, draft_probs, temperature.cuda(), uniform.cuda()]


def cpu_args(args):
    return [a.cpu() if a is not None else None for a in args]


def assert_cuda_matches_cpu(args):
    got = verify(*args)
    want = verify(*cpu_args(args))
    for name, a, w in zip(("accept_len", "accepted_nodes", "out_tokens"), got, want):
        assert a.device.type == "cuda" and a.dtype == torch.long, name
        torch.testing.assert_close(a.cpu(), w, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    return got


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("V", [1000, 152064])
@pytest.mark.parametrize("N", [1, 8, 60])
@pytest.mark.parametrize("B", [1, 8])
def test_cuda_greedy_matches_cpu(B, N, V, dtype):
    for seed, chain in ((0, False), (1, True)):
        args = cuda_tree_case(B, N, V, dtype, seed + 10 * N, temps=[0.0], chain=chain)
        acc, _, _ = assert_cuda_matches_cpu(args)
        assert acc[0] >= 1  # row 0 is unpadded and its node 1 carries the argmax: paths get walked


@pytest.mark.cuda
def test_cuda_greedy_duplicate_sibling_tokens_first_in_node_order():
    # Root children 1, 2, 3 carry token 7 (the argmax), 1 and 3 padded-free; node 4 (tok 5) under 1,
    # node 5 (tok 5) under 2: only the first sibling's subtree (node 1 -> 4) may be taken.
    V = 152064
    tokens = torch.tensor([[7, 7, 7, 5, 5, -1]], device="cuda")
    parents = torch.tensor([[0, 0, 0, 1, 2, 3]], device="cuda")
    argmaxes = [7, 5, 5, 5, 11, 12, 13]
    logits = rows_with_argmax(argmaxes, V, "cuda", torch.bfloat16)[None]
    args = [tokens, parents, logits, None, torch.zeros(1, device="cuda"), torch.rand(1, 7, device="cuda")]
    acc, nodes, out = assert_cuda_matches_cpu(args)
    assert acc.tolist() == [2] and nodes.tolist()[0][:2] == [1, 4] and out.tolist()[0][:3] == [7, 5, 11]


@pytest.mark.cuda
@pytest.mark.parametrize("V", [1000, 152064])
@pytest.mark.parametrize("N", [8, 60])
@pytest.mark.parametrize("with_q", [False, True])
def test_cuda_sampled_matches_cpu(V, N, with_q):
    """Same uniforms, same outputs: float32 logits, random trees; the CUDA p differs from the CPU
    one in its last bits only, so a decision could differ only on a near-tie (about 1e-6 each)."""
    for seed, chain in ((2, False), (3, True)):
        args = cuda_tree_case(8, N, V, torch.float32, seed, temps=[1.0, 0.3, 0.6, 0.0], with_q=with_q, chain=chain)
        assert_cuda_matches_cpu(args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_sampled_float32_q_beside_half_logits_matches_cpu(dtype):
    args = cuda_tree_case(8, 24, 152064, dtype, 4, temps=[1.0, 0.3], with_q=True)
    assert args[3].dtype == torch.float32
    assert_cuda_matches_cpu(args)


@pytest.mark.cuda
def test_cuda_draw_across_slices_by_hand():
    """The draw's slice selection and the step back over zero-probability tokens, exactly.
    V = 1024 float32: 8 slices of 128 tokens (token 127 ends slice 0, 128 starts slice 1)."""
    V = 1024
    p = torch.zeros(V)
    p[[127, 128, 900]] = torch.tensor([0.25, 0.5, 0.25])
    logits = p.log()[None, None].repeat(1, 2, 1).cuda()
    tok = torch.tensor([[-1]], device="cuda")  # a padded node only: straight to the draw
    par = torch.tensor([[0]], device="cuda")
    one = torch.ones(1, device="cuda")
    # u = 1.0 crosses no cdf value: the clamp to V-1, then back over the zeros to token 900;
    # with only slice 0 holding mass, back across seven slices to token 127.
    cases = [(0.0, 127), (0.2, 127), (0.3, 128), (0.74, 128), (0.76, 900), (0.99999994, 900), (1.0, 900)]
    for u, want in cases:
        args = [tok, par, logits, None, one, torch.tensor([[u, 0.0]], device="cuda")]
        out = assert_cuda_matches_cpu(args)[2]
        assert out.tolist() == [[want, -1]], u
    logits[0, 0, 128:] = float("-inf")
    args = [tok, par, logits, None, one, torch.tensor([[1.0, 0.0]], device="cuda")]
    assert assert_cuda_matches_cpu(args)[2].tolist() == [[127, -1]]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_draw_at_u_one_and_odd_vocab_matches_cpu(dtype):
    """u = 1.0 on random p with V = 1001 (one element per vector: the last slice has empty pieces):
    the draw clamps to V-1 and steps back as the CPU op does, never into an empty piece."""
    V, N = 1001, 4
    for seed in range(20):
        gpu = torch.Generator(device="cuda").manual_seed(seed)
        logits = (torch.randn(2, N + 1, V, generator=gpu, device="cuda") * 2.0).to(dtype)
        tok = torch.full((2, N), -1, dtype=torch.long, device="cuda")  # padded: straight to the draw
        par = torch.zeros(2, N, dtype=torch.long, device="cuda")
        u = torch.ones(2, N + 1, device="cuda")
        out = assert_cuda_matches_cpu([tok, par, logits, None, torch.ones(2, device="cuda"), u])[2]
        assert 0 <= int(out[0, 0]) < V and 0 <= int(out[1, 0]) < V


@pytest.mark.cuda
def test_cuda_nan_in_a_masked_sampled_row_matches_cpu():
    """A NaN among -inf logits (a top-k masked row) must poison the softmax as it does on CPU."""
    V, N = 1000, 3
    logits = torch.full((1, N + 1, V), float("-inf"))
    logits[0, :, :5] = torch.randn(N + 1, 5)
    logits[0, 0, 700] = float("nan")
    tok = torch.tensor([[1, 2, 3]])
    par = torch.tensor([[0, 1, 2]])
    args = [t.cuda() for t in (tok, par, logits)] + [None, torch.ones(1, device="cuda"),
                                                     torch.rand(1, N + 1, device="cuda")]
    assert_cuda_matches_cpu(args)


@pytest.mark.cuda
@pytest.mark.parametrize("with_q", [False, True])
def test_cuda_distribution_over_slices(with_q):
    """The sampled token follows p when p's mass is spread over every slice of a bfloat16 row
    (V = 4096: 8 slices of 512): one draft node x ~ q, accepted with min(1, p/q), else the draw
    from the residual; the first output token must follow p (chi-square and total variation)."""
    V, R = 4096, 20000
    g = torch.Generator().manual_seed(21)
    support = torch.randperm(V, generator=g)[:40].sort().values  # a few tokens in every slice
    L = torch.full((V,), float("-inf"))
    L[support] = torch.randn(40, generator=g)
    L = L.to(torch.bfloat16)
    p = torch.softmax(L.float(), -1)
    q = torch.softmax(torch.randn(V, generator=g) * 0.5, -1)  # also proposes zero-p tokens
    q[support[:20]] *= 40.0
    q = q / q.sum()
    x = torch.multinomial(q, R, replacement=True, generator=g) if with_q else torch.multinomial(p, R, replacement=True, generator=g)
    tokens = x[:, None]
    parents = torch.zeros(R, 1, dtype=torch.long)
    logits = L[None, None].expand(R, 2, V)  # stride 0 over rows: no copy
    draft_probs = q[None, None].expand(R, 1, V) if with_q else None
    uniform = torch.rand(R, 2, generator=g)
    args = [tokens, parents, logits, draft_probs, torch.ones(R), uniform]
    acc, _, out = verify(*[a.cuda() if a is not None else None for a in args])
    assert chi2_pvalue(out[:, 0], p) > 1e-3
    freq = torch.bincount(out[:, 0].cpu(), minlength=V).double() / R
    assert 0.5 * (freq - p.double()).abs().sum() < 0.03
    assert 0.05 < acc.float().mean() < 0.95  # both the accept and the draw paths were taken


@pytest.mark.cuda
def test_cuda_error_word_names_the_first_bad_value_like_cpu():
    """Several bad values in a batch of 8 rows: the CUDA kernel reports the one the CPU kernel
    raises for (row-major, token before parent, temperatures last), with the same message."""
    base = cuda_tree_case(8, 60, 1000, torch.bfloat16, 5, temps=[0.0, 1.0])

    def message(args):
        with pytest.raises(RuntimeError) as info:
            verify(*args)
        return str(info.value).splitlines()[0]

    for change in (
        lambda a: (a[0].__setitem__((5, 10), 1000), a[1].__setitem__((3, 40), 41)),  # parent in row 3 first
        lambda a: (a[0].__setitem__((2, 7), -3), a[1].__setitem__((2, 7), 9)),  # token before parent of a node
        lambda a: (a[1].__setitem__((6, 0), -1), a[4].__setitem__(1, -1.0)),  # nodes before temperatures
        lambda a: a[4].__setitem__(7, float("nan")),
    ):
        args = [t.clone() if t is not None else None for t in base]
        change(args)
        assert message(args) == message(cpu_args(args))
        verify(*base)  # the word is clear again: good inputs pass
