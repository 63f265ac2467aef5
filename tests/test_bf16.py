"""Losslessness in bfloat16, as users run it, on tiny random bf16 models of every family.

What holds by construction, on any backend: every token the speculative loop emits is the argmax
of the target's logits as that step's verify forward computes them (ops.verify), and every token
of autoregressive decoding (`draft=None`) is the argmax of a one-token verify through the same
layers and kernels. The two compute the same function of the same tokens, but not with the same
shapes: a verify of root + N nodes runs ops.text_attention over N+1 queries and the matmuls over
B*(N+1) rows. ops.text_attention's float32 accumulation for a query depends on the block it shares
(its score reductions, exp tiles and online-softmax rescaling follow the block), so its output's
last float32 bits differ for almost every query, and its bf16 output for a few in a thousand
(`test_text_attention_bits_depend_on_the_block`). The matmuls of these tiny models are
row-independent on the development CPU (each output accumulated in float32, rounded once), but
oneDNN's bf16 kernels are not at every size (there a 3584 x 18944 layer changes a row's bits from 2
rows on). So in bf16 speculative == autoregressive is not guaranteed bitwise; measured on the
development CPU over 540 tiny-model answers of 40 tokens, 2 parted, both at a tie within one bf16
spacing; the last of CASES is one of them (qwen2_vl, token 23). What is promised, and
asserted here every time:

  a verify's logits row is the one-token verify's up to rounding (at most ROUNDING_ULPS bf16
  spacings of the row's largest |logit|; 3.5 was the worst of 15,000 rows measured), so
  speculative == autoregressive token for token, or the two part at a near-tie: at the first
  differing token the autoregressive logits of both tokens are at most 2 * ROUNDING_ULPS apart.

The tests record (not assert) how often the rows were bitwise equal and how often Hugging Face
`generate` (other kernels: its own attention and cache) agrees with Sparrow's autoregressive answer.
"""

from __future__ import annotations

import functools

import pytest
import torch

from sparrow import ops
from sparrow.draft import SparrowDraft
from sparrow.drafting import TreeConfig
from sparrow.generation import generate
from sparrow.targets import load_target
from sparrow.tree import Tree
from tiny_models import FAMILIES, TEXT_LO, tiny_inputs, tiny_target

from oracle_draft import OracleDraft, route_proposals

N_NEW = 24
DEPTH = 3  # chain of 3; tree: the path and a wrong sibling at each of 3 depths (6 nodes)
SEEDS = (0, 1)  # prompt seeds: batch 1 and batch 3 for each
# (batch, prompt seed, prompt lengths, oracle seed): the last one parts at a tie on qwen2_vl here.
CASES = [(b, s, None, s) for s in SEEDS for b in (1, 3)] + [(3, 102, (22, 40, 9), 2)]
# How far (in bf16 spacings of the row's largest |logit|) a verify's logits row may lie from the
# one-token verify's: rounding flips in a few activations, propagated (worst measured 3.5).
ROUNDING_ULPS = 8
TIE_ULPS = 2 * ROUNDING_ULPS  # both tokens' logits move by at most ROUNDING_ULPS


def bf16_spacing(logits: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers (8 significant bits) at each row's largest |logit|: [...]."""
    top = logits.float().abs().amax(-1).clamp(min=torch.finfo(torch.bfloat16).tiny)
    return torch.exp2(torch.floor(torch.log2(top)) - 7)


@functools.lru_cache(maxsize=None)
def _target(family: str):
    model = tiny_target(family, dtype=torch.bfloat16)
    return model, load_target(model, positions="generate")  # HF generate's positions: the record compares kernels only


@functools.lru_cache(maxsize=None)
def _inputs(family: str, batch: int, seed: int, prompt_lens=None) -> dict:
    return tiny_inputs(_target(family)[0], batch=batch, seed=seed, prompt_lens=prompt_lens)


@torch.no_grad()
def autoregressive_rows(target, inputs: dict, n: int):
    """Greedy autoregressive decoding as sparrow.generate(draft=None) does it (prefill, then
    one-token verifies), keeping every step's logits. -> tokens [B, n], logits [B, n, V] (row t:
    the logits token t was chosen from)."""
    pre = target.prefill(inputs, decode_slots=n + 8)
    state, rows = pre.state, [pre.logits]
    B = rows[0].shape[0]
    root = rows[0].argmax(-1)
    tokens = [root]
    none = torch.zeros(B, 0, dtype=torch.long)
    for _ in range(n - 1):
        logits = target.verify(state, root, Tree.empty(B, root.device)).logits[:, 0]
        target.commit(state, none, torch.zeros(B, dtype=torch.long))
        root = logits.argmax(-1)
        tokens.append(root)
        rows.append(logits)
    return torch.stack(tokens, 1), torch.stack(rows, 1)


def check_lossless(spec: list, ar_tokens: torch.Tensor, ar_logits: torch.Tensor) -> list:
    """Assert, per row, spec == autoregressive or a near-tie at the first difference; returns the
    rows' first differing index (None where equal)."""
    parted = []
    for b, got in enumerate(spec):
        want = ar_tokens[b].tolist()
        p = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), None)
        if p is None:
            assert len(got) == len(want), (b, got, want)
        else:
            row = ar_logits[b, p].float()
            gap = float(row[want[p]] - row[got[p]])
            ulps = gap / float(bf16_spacing(row))
            assert ulps <= TIE_ULPS, (
                f"row {b} parts from autoregressive decoding at token {p} ({got[p]} against {want[p]}) where the "
                f"target's logits are {gap:.4g} apart ({ulps:.1f} bf16 spacings): not a near-tie")
        parted.append(p)
    return parted


@pytest.fixture(autouse=True)
def oracle_proposals(monkeypatch):  # OracleDraft (tests/oracle_draft.py) answers the loop's proposals
    route_proposals(monkeypatch)


# -- the tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_is_autoregressive_in_bf16(family, record_property):
    """Chain and tree, batch 1 and 3, an oracle draft (deep nodes accepted) and an untrained one
    (almost every node rejected): speculative == autoregressive, or a near-tie (module docstring)."""
    model, target = _target(family)
    oracle = OracleDraft.from_target(target)
    untrained = SparrowDraft.from_target(target)
    tree = TreeConfig(depth=DEPTH, top_k=2, total_nodes=2 * DEPTH)
    rows = equal = hf_equal = 0
    ties = []  # where a row parted from autoregressive decoding (at a near-tie)
    accepted = []  # the oracle's accepted draft tokens per step, per run
    for batch, seed, lens, oracle_seed in CASES:
        inputs = _inputs(family, batch, seed, lens)
        ar_tokens, ar_logits = autoregressive_rows(target, inputs, N_NEW)
        ar = generate(target, None, inputs, max_new_tokens=N_NEW).tokens
        assert ar == ar_tokens.tolist()  # the loop's autoregressive path is this one
        hf = model.generate(**inputs, do_sample=False, max_new_tokens=N_NEW)[:, inputs["input_ids"].shape[1]:]
        hf_equal += sum(h == a for h, a in zip(hf.tolist(), ar))
        oracle.refs = ar
        oracle.rng = torch.Generator().manual_seed(oracle_seed)
        for draft, kw in ((oracle, dict(chain=DEPTH)), (oracle, dict(tree=tree)), (untrained, dict(tree=tree))):
            out = generate(target, draft, inputs, max_new_tokens=N_NEW, **kw)
            parted = check_lossless(out.tokens, ar_tokens, ar_logits)
            rows += len(parted)
            equal += sum(p is None for p in parted)
            ties += [p for p in parted if p is not None]
            if draft is oracle:
                accepted.append(out.stats.accepted_per_step)
    assert min(accepted) > 0.8  # the oracle's deep nodes were accepted, not only roots
    record_property("speculative_equal_to_autoregressive", f"{equal}/{rows}")
    record_property("hf_generate_equal_to_autoregressive", f"{hf_equal}/{rows // 3}")
    print(f"{family}: speculative == autoregressive in {equal}/{rows} rows (parted at near-ties: {ties}); HF generate "
          f"== autoregressive in {hf_equal}/{rows // 3}; oracle accepted/step {min(accepted):.2f}-{max(accepted):.2f}")


@pytest.mark.parametrize("family", FAMILIES)
def test_verify_rows_are_the_autoregressive_rows(family, record_property):
    """The per-row check behind the test above: the logits of the autoregressive answer's tokens,
    computed as nodes of one chain / tree verify, against the one-token verifies. They may differ
    only by rounding (asserted: ROUNDING_ULPS bf16 spacings at most); bitwise equality is recorded."""
    model, target = _target(family)
    bitwise = total = 0
    worst = 0.0
    for batch, seed, lens, _ in CASES:
        inputs = _inputs(family, batch, seed, lens)
        ar_tokens, ar_logits = autoregressive_rows(target, inputs, DEPTH + 2)
        want = ar_logits[:, 1 : DEPTH + 2].float()  # the rows of tokens 1.., chosen after the root (token 0)
        B = ar_tokens.shape[0]
        path = ar_tokens[:, 1 : DEPTH + 1]
        sibling = torch.where(path == TEXT_LO, TEXT_LO + 1, TEXT_LO)
        tokens = torch.stack([sibling, path], 2).reshape(B, 2 * DEPTH)
        parents = torch.tensor([0, 0] + [2 * d for d in range(1, DEPTH) for _ in (0, 1)]).expand(B, -1)
        shapes = ((Tree.chain(path), list(range(DEPTH + 1))),
                  (Tree.from_parents(tokens, parents), [0] + [2 * d for d in range(1, DEPTH + 1)]))
        for tree, nodes in shapes:
            pre = target.prefill(inputs, decode_slots=16)
            got = target.verify(pre.state, pre.logits.argmax(-1), tree).logits[:, nodes].float()
            assert torch.equal(pre.logits.argmax(-1), ar_tokens[:, 0])
            diff = (got - want).abs() / bf16_spacing(want)[..., None]
            worst = max(worst, float(diff.max()))
            bitwise += int((got == want).all(-1).sum())
            total += B * len(nodes)
    assert worst <= ROUNDING_ULPS, f"verify rows differ from autoregressive rows by {worst} bf16 spacings"
    record_property("verify_rows_bitwise_equal", f"{bitwise}/{total}")
    print(f"{family}: verify rows bitwise equal to autoregressive rows: {bitwise}/{total}, worst {worst:.2f} spacings")


def test_text_attention_bits_depend_on_the_block(record_property):
    """Records why bitwise equality is not promised: ops.text_attention's output for one query
    depends in its last float32 bits on how many new queries share the call; bf16's rounding hides
    it for most, not all, outputs."""
    hq, hkv, d, n1 = 4, 2, 16, DEPTH + 2
    g = torch.Generator().manual_seed(0)
    chain = torch.ones(1, n1, n1, dtype=torch.bool).tril()
    alone = torch.ones(1, 1, 1, dtype=torch.bool)
    differ = {torch.float32: 0, torch.bfloat16: 0}
    trials = 40
    for _ in range(trials):
        L = int(torch.randint(4, 80, (1,), generator=g))
        q = torch.randn(1, n1, hq, d, generator=g)
        k = torch.randn(1, L + n1, hkv, d, generator=g)
        v = torch.randn(1, L + n1, hkv, d, generator=g)
        for dtype in differ:
            qd, kd, vd = q.to(dtype), k.to(dtype), v.to(dtype)
            block = ops.text_attention(qd, kd, vd, torch.tensor([L + n1]), chain, d**-0.5)
            for i in range(n1):
                one = ops.text_attention(qd[:, i : i + 1].contiguous(), kd, vd, torch.tensor([L + i + 1]), alone,
                                         d**-0.5)
                torch.testing.assert_close(one[:, 0].float(), block[:, i].float(),
                                           **({} if dtype == torch.float32 else dict(atol=0.02, rtol=0.02)))
                differ[dtype] += int(not torch.equal(one[:, 0], block[:, i]))
    n = trials * n1
    record_property("text_attention_queries_differing_fp32", f"{differ[torch.float32]}/{n}")
    record_property("text_attention_queries_differing_bf16", f"{differ[torch.bfloat16]}/{n}")
    print(f"text_attention: a query's output differs from its one-query call in {differ[torch.float32]}/{n} (float32), "
          f"{differ[torch.bfloat16]}/{n} (bfloat16)")
