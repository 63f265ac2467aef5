"""The draft/verify loop: `sparrow.generate(target, draft, inputs, ...)` and `SpeculativeGenerator`.

One generation, per DESIGN.md:

    prefill   target.prefill(inputs)          -> target cache, first logits, features
              root = first token (sampled / argmax from the prefill logits)
              draft.prefill(prompt text, h, root) -> draft cache (text only), root_hidden
    repeat    propose (chain or dynamic tree)  -> tokens [B,N], parents [B,N], draft_probs
              target.verify(root + tree)       -> logits [B,N+1,V], features [B,N+1,H]
              ops.verify                       -> accept_len, accepted nodes, out tokens
              target.commit(accepted path)
              draft.extend_pending((x_a1, h_root), (x_a2, h_a1), ..., (x_new, h_ak))
              -> root = x_new, root_hidden

Rows accept their own counts; rows that reach EOS or max_new_tokens leave the batch (target and
draft caches both select the remaining rows). `draft=None` (or mode="autoregressive") is plain
autoregressive decoding of the target through the same verify path with N = 0 draft tokens. The
MSD-style and no-VATA baselines are SparrowDrafts with visual_source "embed" / "mid".
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from sparrow import ops
from sparrow.drafting import TreeConfig
from sparrow.sampling import SamplingConfig, UniformSource, mask_logits, probs as sampling_probs, sample_from

_VISUAL_KEYS = ("pixel_values_videos", "pixel_values")


@dataclass
class GenerationStats:
    mode: str = ""  # "sparrow-tree", "sparrow-chain", "autoregressive"
    steps: int = 0  # verify steps (batched)
    row_steps: int = 0  # sum over steps of the rows in the batch
    accepted_per_step: float = 0.0  # mean draft tokens accepted per row per verify step
    tokens_per_step: float = 0.0  # accepted_per_step + 1 (EAGLE's tau)
    accept_histogram: list = field(default_factory=list)  # [n]: row-steps that accepted n draft tokens
    new_tokens: int = 0  # tokens returned, all rows (after trimming at EOS / max_new_tokens)
    prefill_s: float = 0.0  # target prefill + first token + draft prefill
    draft_prefill_s: float = 0.0  # the draft's share of prefill_s
    draft_s: float = 0.0  # proposing + processing the pending pairs
    verify_s: float = 0.0  # target verify forward + ops.verify + commit
    decode_s: float = 0.0  # everything after prefill
    total_s: float = 0.0
    tokens_per_s: float = 0.0  # new_tokens / total_s
    decode_tokens_per_s: float = 0.0  # (new_tokens - first tokens) / decode_s

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class GenerationOutput:
    tokens: list  # list per row of generated token ids (EOS included when hit)
    stats: GenerationStats

    def padded(self, pad_token_id: int = 0) -> torch.Tensor:
        n = max((len(t) for t in self.tokens), default=0)
        out = torch.full((len(self.tokens), n), pad_token_id, dtype=torch.long)
        for i, t in enumerate(self.tokens):
            out[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        return out


class _Timer:
    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


# -- input checks -------------------------------------------------------------------------------
def _model_device(target) -> torch.device:
    return target.embed_tokens().weight.device


def _check_inputs(target, inputs: dict) -> dict:
    if not isinstance(inputs, dict) and hasattr(inputs, "keys"):
        inputs = dict(inputs)
    if not isinstance(inputs, dict) or "input_ids" not in inputs:
        raise ValueError("inputs must be a processor-style dict with at least input_ids (and attention_mask)")
    ids = inputs["input_ids"]
    if ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got shape {tuple(ids.shape)}")
    if ids.shape[0] < 1 or ids.shape[1] < 1:
        raise ValueError(f"empty prompt: input_ids has shape {tuple(ids.shape)}")
    mask = inputs.get("attention_mask")
    if mask is not None:
        empty = (mask.sum(1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ValueError(f"empty prompt: rows {empty} have no token (attention_mask all zero)")
    tensors = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
    devices = {k: v.device for k, v in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(
            "inputs are on different devices ("
            + ", ".join(f"{k}: {d}" for k, d in devices.items())
            + "); put every tensor of the batch on one device"
        )
    dev = _model_device(target)
    on = next(iter(devices.values()))
    if on != dev:
        if on.type == "cpu":  # processor output: move it along, as HF pipelines do
            inputs = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in inputs.items()}
        else:
            raise ValueError(f"inputs are on {on} but the target model is on {dev}")
    # Visual placeholders without pixel values: say so before the model fails somewhere deep.
    cfg = getattr(getattr(target, "model", None), "config", None)
    if cfg is not None:
        for key, names in (
            ("pixel_values_videos", ("video_token_id", "video_token_index")),
            ("pixel_values", ("image_token_id", "image_token_index")),
        ):
            tid = next((getattr(cfg, n) for n in names if isinstance(getattr(cfg, n, None), int)), None)
            if tid is None:
                continue
            n = int((inputs["input_ids"] == tid).sum())
            if n and inputs.get(key) is None:
                raise ValueError(
                    f"input_ids hold {n} {'video' if 'video' in key else 'image'} placeholder tokens "
                    f"(id {tid}) but inputs have no {key}; pass the processor's visual tensors"
                )
    return inputs


def eos_token_ids(target, eos_token_id) -> set:
    """The stop ids: eos_token_id (int or list) or, when None, the model's generation_config's."""
    if eos_token_id is None:
        gc = getattr(getattr(target, "model", None), "generation_config", None)
        eos_token_id = getattr(gc, "eos_token_id", None)
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, int):
        return {eos_token_id}
    return {int(e) for e in eos_token_id}


# -- the loop -------------------------------------------------------------------------------------
@torch.no_grad()
def generate(
    target,
    draft,
    inputs: dict,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    tree: TreeConfig | None = None,
    chain: int | None = None,
    eos_token_id=None,
    seed: int | None = None,
    mode: str | None = None,
) -> GenerationOutput:
    """Lossless speculative generation of `target` (a TargetAdapter, or a Hugging Face model that
    sparrow.targets.load_target can wrap) with `draft` (a SparrowDraft, or None).

    tree: TreeConfig for an EAGLE-2 dynamic tree; chain: k for a chain of k draft tokens (one of the
    two; neither: TreeConfig()). Sampled chains pass the draft's q to ops.verify; trees are
    deterministic top-k. mode: None (sparrow when a draft is given), "sparrow", "autoregressive".
    eos_token_id: int or list (None: the model's generation_config). Returns GenerationOutput with
    tokens (list per row, EOS included when hit) and stats."""
    target = _as_adapter(target)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    sampling = SamplingConfig(float(temperature), int(top_k), float(top_p))
    if mode is None:
        mode = "autoregressive" if draft is None else "sparrow"
    if mode not in ("sparrow", "autoregressive"):
        raise ValueError(f"mode must be 'sparrow' or 'autoregressive', got {mode!r}")
    if mode == "autoregressive":
        draft = None
    elif draft is None:
        raise ValueError("mode='sparrow' needs a draft (or pass draft=None for autoregressive decoding)")
    if tree is not None and chain is not None:
        raise ValueError("pass either tree=TreeConfig(...) or chain=k, not both")
    if draft is not None:
        draft.check_target(target)
        if chain is not None:
            if not isinstance(chain, int) or chain < 1:
                raise ValueError(f"chain must be an integer >= 1 (draft tokens per step), got {chain!r}")
        else:
            tree = tree or TreeConfig()
            tree.validate(draft.config.vocab_size)
        ddev, tdev = draft.fc.weight.device, _model_device(target)
        if ddev != tdev:
            raise ValueError(f"draft is on {ddev} but the target is on {tdev}")
    inputs = _check_inputs(target, inputs)
    eos = eos_token_ids(target, eos_token_id)
    device = _model_device(target)
    timer = _Timer(device)
    uniforms = UniformSource(seed, device)
    stats = GenerationStats(mode="autoregressive" if draft is None else ("sparrow-chain" if chain else "sparrow-tree"))

    # -- prefill -------------------------------------------------------------------------------
    t0 = timer.now()
    vs = draft.config.visual_source if draft is not None else "none"
    pre = target.prefill(inputs, want_visual_embeds=vs == "embed", want_visual_mid=vs == "mid")
    state = pre.state
    B = pre.logits.shape[0]
    if sampling.greedy:
        root = pre.logits.argmax(-1)
    else:
        root = sample_from(sampling_probs(pre.logits, sampling), uniforms(B))
    outputs: list[list[int]] = [[] for _ in range(B)]
    active = list(range(B))  # original row id of each batch row
    done = _append(outputs, active, root[:, None].tolist(), eos, max_new_tokens)
    t1 = timer.now()
    cache = root_hidden = None
    if draft is not None:
        cache, root_hidden = draft.prefill(pre, root)
    t2 = timer.now()
    stats.prefill_s, stats.draft_prefill_s = t2 - t0, t2 - t1
    hist = torch.zeros(0, dtype=torch.long)

    # -- decode ------------------------------------------------------------------------------------
    def drop_finished(done_rows):
        nonlocal state, root, root_hidden, active
        keep = [i for i in range(len(active)) if i not in done_rows]
        if not keep:  # everyone is done: nothing left to select
            active = []
            return None
        idx = torch.tensor(keep, dtype=torch.long, device=device)
        state = target.select_rows(state, idx)
        root = root[idx]
        if cache is not None:
            cache.select_rows(idx)
            root_hidden = root_hidden[idx]
        active = [active[i] for i in keep]
        return idx

    if done:
        drop_finished(done)
    while active:
        Bn = len(active)
        ta = timer.now()
        if draft is None:
            tokens = torch.zeros(Bn, 0, dtype=torch.long, device=device)
            parents = torch.zeros(Bn, 0, dtype=torch.long, device=device)
            dprobs = None
        elif chain is not None:
            tokens, parents, dprobs = draft.propose_chain(cache, root_hidden, chain, sampling, uniforms)
        else:
            tokens, parents, dprobs = draft.propose_tree(cache, root_hidden, tree)
        tb = timer.now()
        vout = target.verify(state, torch.cat([root[:, None], tokens], 1), parents)
        logits = mask_logits(vout.logits, sampling)
        N = tokens.shape[1]
        temp = torch.full((Bn,), sampling.temperature, dtype=torch.float32, device=device)
        if dprobs is not None:
            dprobs = dprobs.to(logits.dtype)
        accept_len, acc_nodes, out_tokens = ops.verify(tokens, parents, logits, dprobs, temp, uniforms(Bn, N + 1))
        target.commit(state, acc_nodes, accept_len)
        tc = timer.now()

        k_host = accept_len.tolist()
        out_host = out_tokens.tolist()
        stats.steps += 1
        stats.row_steps += Bn
        hist = torch.cat([hist, torch.zeros(max(0, N + 1 - hist.numel()), dtype=torch.long)])
        hist += torch.bincount(accept_len.cpu(), minlength=hist.numel())
        new = [out_host[i][: k_host[i] + 1] for i in range(Bn)]
        done = _append(outputs, active, new, eos, max_new_tokens)
        root = out_tokens.gather(1, accept_len[:, None]).squeeze(1)
        if draft is not None:
            # Pending pairs: (x_a1, h_root), (x_a2, h_a1), ..., (x_new, h_ak).
            src = torch.cat([torch.zeros(Bn, 1, dtype=torch.long, device=device), acc_nodes.clamp(min=0)], 1)
            p_feats = vout.features.gather(1, src[..., None].expand(-1, -1, vout.features.shape[-1]))
            p_tokens = out_tokens.clamp(min=0)
            counts = accept_len + 1
            if done:
                idx = torch.tensor([i for i in range(Bn) if i not in done], dtype=torch.long, device=device)
                p_tokens, p_feats, counts = p_tokens[idx], p_feats[idx], counts[idx]
        if done:
            drop_finished(done)
        if draft is not None and active:
            m = int(counts.max())
            root_hidden = draft.extend_pending(cache, p_tokens[:, :m], p_feats[:, :m], counts)
        td = timer.now()
        stats.draft_s += (tb - ta) + (td - tc)
        stats.verify_s += tc - tb

    t_end = timer.now()
    stats.decode_s = t_end - t2
    stats.total_s = t_end - t0
    stats.new_tokens = sum(len(o) for o in outputs)
    if stats.row_steps:
        acc = (hist * torch.arange(hist.numel())).sum().item()
        stats.accepted_per_step = acc / stats.row_steps
        stats.tokens_per_step = stats.accepted_per_step + 1
    stats.accept_histogram = hist.tolist()
    stats.tokens_per_s = stats.new_tokens / stats.total_s if stats.total_s > 0 else 0.0
    decode_tokens = stats.new_tokens - B
    stats.decode_tokens_per_s = decode_tokens / stats.decode_s if stats.decode_s > 0 else 0.0
    return GenerationOutput(outputs, stats)


def _append(outputs, active, new_tokens, eos: set, limit: int) -> set:
    """Append each batch row's new tokens to its output, trimmed at the first EOS and at `limit`
    tokens; returns the batch rows that are finished."""
    done = set()
    for i, toks in enumerate(new_tokens):
        out = outputs[active[i]]
        for t in toks:
            out.append(int(t))
            if int(t) in eos or len(out) >= limit:
                done.add(i)
                break
    return done


def _as_adapter(target):
    from sparrow.targets.base import TargetAdapter

    if isinstance(target, TargetAdapter):
        return target
    if hasattr(target, "prefill") and hasattr(target, "verify") and hasattr(target, "commit"):
        return target  # duck-typed adapter
    from sparrow.targets import load_target

    return load_target(target)


class SpeculativeGenerator:
    """Keeps a target and a draft loaded, with default decoding settings:

        gen = SpeculativeGenerator(target, draft, tree=TreeConfig(depth=6, top_k=10, total_nodes=60))
        out = gen.generate(inputs, max_new_tokens=256)            # or gen(inputs, ...)
    """

    def __init__(self, target, draft=None, **defaults):
        self.target = _as_adapter(target)
        self.draft = draft
        if draft is not None:
            draft.check_target(self.target)
        bad = set(defaults) - {"temperature", "top_k", "top_p", "tree", "chain", "eos_token_id", "seed", "mode"}
        if bad:
            raise TypeError(f"SpeculativeGenerator: unknown settings {sorted(bad)}")
        self.defaults = defaults

    def generate(self, inputs: dict, max_new_tokens: int, **overrides) -> GenerationOutput:
        settings = {**self.defaults, **overrides}
        if "tree" in overrides and "chain" not in overrides:
            settings.pop("chain", None)
        if "chain" in overrides and "tree" not in overrides:
            settings.pop("tree", None)
        return generate(self.target, self.draft, inputs, max_new_tokens, **settings)

    __call__ = generate
