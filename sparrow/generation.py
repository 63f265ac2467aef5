"""The draft/verify loop: `sparrow.generate(target, draft, inputs, ...)` and `SpeculativeGenerator`.

One generation, as DESIGN.md draws it:

    run = start(...)                        validate, prefill target and draft, first token
    while run.rows:
        tree = propose(run)                 the draft's tree (or chain): tokens, parents, depths, masks
        out = target.verify(...)            one forward over root + tree, written into the static cache
        acc = accept(run, tree, out)        ops.verify, on the device
        target.commit(...)                  one ops.gather_kv_ over every layer
        commit_draft(run, acc, tree, out)   the accepted path (token, feature) pairs through the draft
        run.emit(acc)                       the step's one device-to-host copy; EOS, limits, rows leaving

The step reads the device once, in emit: accepted counts, new tokens and the ops' error word in
one copy. Everything else stays on the device; nothing in the step is reallocated (caches are
sized at prefill); no Python loop over tree nodes or batch rows issues device work (emit appends
each row's tokens to its Python list, from the host copy). Rows accept their own counts;
rows that reach EOS or max_new_tokens leave the batch (once per finished row, not per step).
`draft=None` is plain autoregressive decoding of the target through the same verify (N = 0). The
MSD-style and no-VATA baselines are SparrowDrafts with visual_source "embed" / "mid".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from sparrow import drafting, ops
from sparrow.compiling import compile_options, compiled, mark_static
from sparrow.drafting import TreeConfig
from sparrow.sampling import RowUniforms, SamplingConfig, mask_logits, probs as sampling_probs, sample_from
from sparrow.stats import GenerationStats, StatsRecorder
from sparrow.tree import Tree

__all__ = ["generate", "SpeculativeGenerator", "GenerationOutput", "GenerationStats"]


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


@dataclass(frozen=True)
class Settings:
    """One generation's validated settings."""

    max_new_tokens: int
    sampling: SamplingConfig
    tree: TreeConfig | None  # a dynamic tree, or
    chain: int | None  # a chain of k draft tokens (neither: autoregressive)
    eos: frozenset
    seed: int | tuple | None
    compile: dict | None  # compiling.compile_options
    time_stages: bool

    @property
    def mode(self) -> str:
        return "sparrow-chain" if self.chain else ("sparrow-tree" if self.tree else "autoregressive")

    @property
    def tree_size(self) -> int:
        return self.chain or (self.tree.total_nodes if self.tree else 0)

    @property
    def target_slots(self) -> int:
        """Target cache entries per row past the prompt: a row still running has committed at most
        max_new_tokens - 1 more, and its verify writes the root and the tree after them."""
        return self.max_new_tokens + self.tree_size

    @property
    def draft_slots(self) -> int:
        """Draft cache entries per row past its prefill: the tokens to come and the widest write
        past the committed ones (drafting.proposal_width)."""
        return self.max_new_tokens + drafting.proposal_width(self.tree, self.chain)


@dataclass
class Acceptance:
    count: torch.Tensor  # [B] draft tokens accepted
    nodes: torch.Tensor  # [B, N] accepted node ids in path order, -1 padded
    tokens: torch.Tensor  # [B, N+1] accepted tokens then the new one, -1 padded


# -- validation ---------------------------------------------------------------------------------
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


def _match_target_dtype(draft, target) -> None:
    """A draft in another dtype than the target (e.g. float32 master weights of a bf16 target)
    would mix dtypes in the ops: cast it, in place, to the target's and say so."""
    have, want = draft.fc.weight.dtype, target.embed_tokens().weight.dtype
    if have != want:
        warnings.warn(f"sparrow.generate: the draft is {have} but the target is {want}; casting the draft to {want} "
                      "(in place)", stacklevel=5)  # the caller of generate (under no_grad)
        draft.to(want)


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


def _settings(target, draft, max_new_tokens, temperature, top_k, top_p, tree, chain, eos_token_id, seed, mode,
              compile, time_stages) -> tuple:
    """Validate the arguments of generate -> (draft or None, Settings)."""
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
    if draft is None:
        tree = chain = None
    else:
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
        _match_target_dtype(draft, target)
    options = compile_options(compile, _model_device(target))
    seed = seed if seed is None or isinstance(seed, int) else tuple(int(s) for s in seed)
    return draft, Settings(max_new_tokens, sampling, tree, chain, frozenset(eos_token_ids(target, eos_token_id)),
                           seed, options, bool(time_stages))


# -- one generation ---------------------------------------------------------------------------------
class Run:
    """A generation in flight: the caches, every row's last committed token (the root, not yet in
    the target's cache), the outputs so far, and which request row each batch row is."""

    def __init__(self, target, draft, settings: Settings, pre, root, uniforms, error_word, recorder: StatsRecorder):
        B = root.shape[0]
        dev = root.device
        self.target, self.draft, self.settings = target, draft, settings
        self.state = pre.state
        self.cache = self.root_hidden = None
        self.root = root
        self.uniforms = uniforms
        self.error_word = error_word
        self.temperature = torch.full((B,), settings.sampling.temperature, dtype=torch.float32, device=dev)
        self.no_uniforms = torch.zeros(B, settings.tree_size + 1, dtype=torch.float32, device=dev)  # greedy
        self.no_draft = Tree.empty(B, dev)  # an autoregressive step's tree
        self.rows = list(range(B))
        self.outputs: list[list[int]] = [[] for _ in range(B)]
        self.recorder = recorder

    def lap(self, stage: str) -> None:
        self.recorder.lap(stage)

    def begin_step(self) -> None:
        """CUDA graphs (compile on CUDA): the previous step's graph outputs may be overwritten now."""
        if self.settings.compile is not None and self.root.is_cuda:
            torch.compiler.cudagraph_mark_step_begin()

    def emit(self, acc: Acceptance) -> None:
        """The step's one host read: accepted counts, new tokens and the ops' error word in one
        copy. Appends each row's tokens (trimmed at EOS and max_new_tokens); finished rows leave."""
        B, N1 = acc.tokens.shape
        self.root = acc.tokens.gather(1, acc.count[:, None]).squeeze(1)  # the new token of every row
        host = _to_host(acc.count, acc.tokens.flatten(), error_word=self.error_word)
        counts = host[:B]
        self.recorder.step(counts)
        self._append([host[B + b * N1 : B + b * N1 + counts[b] + 1] for b in range(B)])

    def _append(self, new_tokens: list) -> None:
        done = []
        limit, eos = self.settings.max_new_tokens, self.settings.eos
        for i, toks in enumerate(new_tokens):
            out = self.outputs[self.rows[i]]
            for t in toks:
                out.append(t)
                if t in eos or len(out) >= limit:
                    done.append(i)
                    break
        if done:
            self._leave(done)

    def _leave(self, done: list) -> None:
        keep = [i for i in range(len(self.rows)) if i not in done]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            return
        idx = torch.tensor(keep, dtype=torch.long, device=self.root.device)
        self.no_draft = Tree.empty(len(keep), self.root.device)
        self.state = self.target.select_rows(self.state, idx)
        self.root, self.temperature, self.no_uniforms = self.root[idx], self.temperature[idx], self.no_uniforms[idx]
        if self.uniforms is not None:
            self.uniforms.select_rows(idx)
        if self.cache is not None:
            self.cache.select_rows(idx)
            self.root_hidden = self.root_hidden[idx]
        self._mark_static()

    def _mark_static(self) -> None:
        """The draft's cache, for compiled steps (the target's adapter marks its own)."""
        if self.settings.compile is not None and self.cache is not None:
            mark_static(self.cache.k, self.cache.v, self.cache.lens, *self.cache.rotary)  # lens: written in place

    def output(self) -> GenerationOutput:
        return GenerationOutput(self.outputs, self.recorder.finish(self.outputs))


def _to_host(*tensors: torch.Tensor, error_word: torch.Tensor) -> list:
    """One device-to-host copy of 1-D int64 tensors and the ops' error word; raises the op's own
    error if the word holds one, else returns the tensors' values, concatenated."""
    host = torch.cat([*tensors, error_word]).tolist()
    ops.raise_if_error(host[-4:])
    return host[:-4]


def first_token(logits: torch.Tensor, sampling: SamplingConfig, uniforms: RowUniforms | None) -> torch.Tensor:
    """[B, V] prefill logits -> [B] the first generated token (argmax, or a draw)."""
    if sampling.greedy:
        return logits.argmax(-1)
    return sample_from(sampling_probs(logits, sampling), uniforms.draw(1)[:, 0])


def start(target, draft, inputs: dict, settings: Settings, error_word: torch.Tensor) -> Run:
    """Prefill the target (its cache sized for the whole generation), draw the first token, prefill
    the draft, emit the first tokens (one host copy, which carries the error word too)."""
    recorder = StatsRecorder(settings.mode, _model_device(target), settings.time_stages)  # the clock starts
    vs = draft.config.visual_source if draft is not None else "none"
    pre = target.prefill(inputs, want_visual_embeds=vs == "embed", want_visual_mid=vs == "mid",
                         decode_slots=settings.target_slots)
    B = pre.logits.shape[0]
    uniforms = None if settings.sampling.greedy else RowUniforms(settings.seed, B, pre.logits.device)
    root = first_token(pre.logits, settings.sampling, uniforms)
    run = Run(target, draft, settings, pre, root, uniforms, error_word, recorder)
    recorder.mark()
    if draft is not None:
        run.cache, run.root_hidden = draft.prefill(pre, root, settings.draft_slots)
        run.lap("draft_prefill")
    run._mark_static()
    run._append([[t] for t in _to_host(root, error_word=error_word)])  # the first tokens' host copy
    run.recorder.prefill_done()
    return run


def propose(run: Run) -> Tree:
    """The draft's proposal from every row's root (a Tree with no node when there is no draft)."""
    s = run.settings
    if run.draft is None:
        return run.no_draft
    if s.chain is not None:
        u = None if s.sampling.greedy else run.uniforms.draw(s.chain)
        return compiled(drafting.propose_chain, s.compile)(run.draft, run.cache, run.root_hidden, s.chain,
                                                          s.sampling, u)
    return compiled(drafting.propose_tree, s.compile)(run.draft, run.cache, run.root_hidden, s.tree)


def accept(run: Run, tree: Tree, out) -> Acceptance:
    """ops.verify on the device: greedy, or exact speculative sampling against the draft's q."""
    logits = mask_logits(out.logits, run.settings.sampling)
    u = run.no_uniforms if run.uniforms is None else run.uniforms.draw(tree.size + 1)
    count, nodes, tokens = ops.verify(tree.tokens, tree.parents, logits, tree.draft_probs, run.temperature, u)
    return Acceptance(count, nodes, tokens)


def commit_draft(run: Run, acc: Acceptance, tree: Tree, out) -> None:
    """The pending pairs (x_a1, h_root), (x_a2, h_a1), ..., (x_new, h_ak) through the draft; its
    output at the last one is the next root's hidden. The block is the longest path a step can
    commit (static), each row's own count inside it."""
    if run.draft is None:
        return
    M = tree.longest_path
    src = torch.nn.functional.pad(acc.nodes[:, : M - 1], (1, 0)).clamp(min=0)  # [B, M]: root, a1, .., ak
    features = out.features.gather(1, src[..., None].expand(-1, -1, out.features.shape[-1]))
    root_hidden = compiled(type(run.draft).commit, run.settings.compile)(
        run.draft, run.cache, acc.tokens[:, :M].clamp(min=0), features, acc.count + 1)
    # A CUDA graph's outputs live in its own memory, reused at its next replay: keep a copy.
    run.root_hidden = root_hidden if run.settings.compile is None else root_hidden.clone()


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
    seed: int | list | None = None,
    mode: str | None = None,
    compile=False,
    time_stages: bool = False,
) -> GenerationOutput:
    """Lossless speculative generation of `target` (a TargetAdapter, or a Hugging Face model that
    sparrow.targets.load_target can wrap) with `draft` (a SparrowDraft, or None).

    tree: TreeConfig for an EAGLE-2 dynamic tree; chain: k for a chain of k draft tokens (one of the
    two; neither: TreeConfig()). Sampled chains pass the draft's q to ops.verify; trees are
    deterministic top-k. mode: None (sparrow when a draft is given), "sparrow", "autoregressive".
    eos_token_id: int or list (None: the model's generation_config). seed: an int (row r draws its
    uniforms from (seed, r)) or one seed per row; either way a row's sampled output does not depend
    on which rows share its batch.
    compile: False, True, a torch.compile mode or its options (sparrow/compiling.py).
    time_stages: synchronise after every stage to time it (stats.draft_s / verify_s).
    Returns GenerationOutput with tokens (list per row, EOS included when hit) and stats."""
    target = _as_adapter(target)
    draft, settings = _settings(target, draft, max_new_tokens, temperature, top_k, top_p, tree, chain,
                                eos_token_id, seed, mode, compile, time_stages)
    inputs = _check_inputs(target, inputs)
    with ops.deferred_checks(_model_device(target)) as error_word:
        run = start(target, draft, inputs, settings, error_word)
        while run.rows:
            run.begin_step()
            tree = propose(run)  # the draft's tokens, parents, depths and ancestor masks
            run.lap("draft")
            out = target.verify(run.state, run.root, tree, settings.compile)  # logits, features
            acc = accept(run, tree, out)  # ops.verify, on the device
            target.commit(run.state, acc.nodes, acc.count)  # one gather_kv_ over every layer
            run.lap("verify")
            commit_draft(run, acc, tree, out)  # the accepted path through the draft
            run.lap("draft")
            run.emit(acc)  # the step's one host copy; EOS, limits, rows leaving
    return run.output()


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

    With compile=True the compiled steps are kept (sparrow/compiling.py) and reused by every call.
    """

    SETTINGS = {"temperature", "top_k", "top_p", "tree", "chain", "eos_token_id", "seed", "mode", "compile",
                "time_stages"}

    def __init__(self, target, draft=None, **defaults):
        self.target = _as_adapter(target)
        self.draft = draft
        if draft is not None:
            draft.check_target(self.target)
        bad = set(defaults) - self.SETTINGS
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
