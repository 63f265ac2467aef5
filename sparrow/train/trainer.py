"""`sparrow train`: the draft learns from the data of `sparrow gen-data` (IVSB + MTP).

One training sequence per sample (sparrow/train/shards.py). Its T text positions, in order, give
token ids x_t and target features h_t; the draft input at text index t is (x_t, h_{t-1}) (zeros for
t = 0) and its output ĥ_t should be h_t, whose logits lm_head(h_t) predict x_{t+1}. Positions are
the text index 0..T-1, as at inference (the draft's cache slots hold text positions only).

IVSB. With `ivsb` on, the sample's layer-L/2 visual states go in front of the text:
the draft runs over cat(h^{L/2}_vis, fc(e_txt ⊕ h_txt)); text queries see every (valid) visual
state and the causal text, visual queries see the causal visual prefix; only the text outputs enter
the loss (SparrowDraft.forward_sequence with prefix_states; prefix positions 0..P-1, text P+t).
The prefix is left-padded in a batch so a row's real prefix is adjacent to its text (rotary is
relative). With a VATA window (DraftConfig.window > 0) the mask windows the text only; the prefix
stays visible to every text query. For the ablation drafts the prefix is what the draft keeps at inference anyway:
visual_source "mid" -> the layer-L/2 states (IVSB or not), "embed" -> the visual input embeddings
(data made with --store-embeds). Stored states may be average-pooled (gen-data --mid-pool), while
inference keeps them all.

MTP. `unroll` forward passes per batch (default 3). Pass 0 reads the target's features (plus
noise); pass j >= 1 reads the draft's own outputs of pass j-1 shifted by one text position:
prev_features[:, t] = ĥ_{t-1} from pass j-1 (zeros at t = 0), so the draft learns to continue from
its own drift, as it must at inference. Gradients flow through the unroll unless `mtp_detach`. As in the paper's
z_rec, pass j replaces the features at every position, so the context the draft attends to is
drifted too (at inference only the newest draft steps are; earlier entries hold target features).
Pass j has weight mtp_decay**j (1, 0.8, 0.64 by default); the loss is the weighted mean over passes.
`--no-mtp` is unroll = 1.

Loss per pass: feature_weight * SmoothL1(ĥ, h) + token_weight * CE(softmax(lm_head(h)),
log_softmax(lm_head(ĥ))) (EAGLE: 1.0 and 0.1), averaged over the loss positions: the answer's text
positions (loss_on="answer": t with sequence position >= prompt_len, the positions the draft
predicts from at inference) or every text position ("all"). The lm_head is the target's, through
SparrowDraft.logits (final norm first when features are pre-norm). Logits are [positions, V] with V
up to 152k, so the token loss (and the top-1 agreement metric) is computed only at the loss
positions, LOGIT_CHUNK positions at a time, every pass of a chunk together (the target's
distribution once per chunk), each chunk under activation checkpointing: its logits are recomputed
in backward, so training holds O(LOGIT_CHUNK * V) logits at any time rather than O(T * V) per pass.
Reductions run in float32 (float64 for a float64 draft).

Precision. A bfloat16 / float16 target would give plain AdamW bf16 weights, which lose every update
below the weight's spacing (RMSNorm weights sit at 1.0, where bf16's spacing is 2^-7). So by default
the draft's own weights (its master weights, optimizer moments and gradients) are float32 and the
loss is computed under torch.autocast(dtype=the target's dtype), float16 with a GradScaler. The
target, its embedding and lm_head stay in the target's dtype, frozen and shared. A float32 or
float64 target trains in its own dtype without autocast. `draft_dtype` overrides the default: the
draft's weights and compute in that dtype, no autocast (draft_dtype=target's dtype is the recipe of
before). Checkpoints hold the master weights as trained; SparrowDraft.from_pretrained casts them to
the target's dtype for inference, while training (init_draft, resume) reads them as saved.

Noise (EAGLE): uniform noise U(-feature_noise, +feature_noise) is added to the target features the
draft reads in pass 0 (not to the loss targets, not to the draft's own features).

Optimisation: AdamW over the draft's own weights (fc + the decoder layer; the target, its
embedding and lm_head are frozen and shared), linear warm-up over `warmup_steps` then cosine (or
linear) decay to min_lr_ratio * lr, gradient-norm clipping. Data order: a permutation per epoch
drawn from (seed, epoch); noise from a generator whose state is checkpointed. A checkpoint
(checkpoints/step-NNNNNNN: the draft in save_pretrained format + trainer_state.pt with optimizer,
scheduler and RNG state) every `checkpoint_every` steps; the final draft in `out_dir` itself.
Resuming from a checkpoint gives the same weights as an uninterrupted run (the training precision
is recorded there and must match).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm.auto import tqdm

from sparrow.train.shards import ShardDataset

CKPT_DIR = "checkpoints"
CKPT_RE = re.compile(r"^step-(\d+)$")
STATE_NAME = "trainer_state.pt"
# Settings that may change between a run and its resumption without changing the result.
_RESUME_FREE = {"checkpoint_every", "keep_checkpoints", "log_every"}
# Loss positions per chunk of the token loss: at V = 152064 one float32 [128, V] tensor is 78 MB.
LOGIT_CHUNK = 128


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int = 0  # > 0: stop after this many steps (overrides epochs)
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.95)
    warmup_steps: int = 0
    schedule: str = "cosine"  # "cosine", "linear" or "constant" after warm-up
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.5  # max grad norm; <= 0: off
    unroll: int = 3  # MTP forward passes (1 = no MTP)
    mtp_decay: float = 0.8  # weight of pass j: mtp_decay ** j
    mtp_detach: bool = False
    ivsb: bool = True
    feature_weight: float = 1.0
    token_weight: float = 0.1
    feature_noise: float = 0.1  # half-width of the uniform noise on pass 0's input features
    loss_on: str = "answer"  # "answer" or "all"
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0: only at the end
    keep_checkpoints: int = 2  # newest kept; 0: keep all
    log_every: int = 1

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.loss_on not in ("answer", "all"):
            raise ValueError(f"loss_on must be 'answer' or 'all', got {self.loss_on!r}")
        if self.unroll < 1:
            raise ValueError("unroll must be >= 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d


# -- batches ------------------------------------------------------------------------------------
@dataclass
class Batch:
    token_ids: torch.Tensor  # [B, L] text token ids (0 on padding)
    features: torch.Tensor  # [B, L, H] target features h_t (0 on padding)
    position_ids: torch.Tensor  # [B, L] text index 0..L-1
    valid: torch.Tensor  # [B, L] bool: real text positions
    loss_mask: torch.Tensor  # [B, L] bool: positions in the loss
    prefix: torch.Tensor | None  # [B, P, H] visual states, left-padded, or None
    prefix_valid: torch.Tensor | None  # [B, P] bool
    attention_mask: torch.Tensor  # [B, P+L, P+L] bool (True: may attend)
    ids: list


def prefix_key(visual_source: str, ivsb: bool) -> str | None:
    """Which stored visual states go in front of the text while training."""
    if visual_source == "embed":
        return "visual_embeds"
    if visual_source == "mid" or ivsb:
        return "visual_mid"
    return None


def build_attention_mask(prefix_valid: torch.Tensor | None, L: int, window: int = 0) -> torch.Tensor:
    """[B, P+L, P+L] bool. Text query i: every valid prefix slot and text j <= i (j >= i - window
    when window > 0; the prefix is never windowed out). Prefix query i: valid prefix j <= i, and
    itself (so no row is empty)."""
    B = 1 if prefix_valid is None else prefix_valid.shape[0]
    P = 0 if prefix_valid is None else prefix_valid.shape[1]
    dev = None if prefix_valid is None else prefix_valid.device
    t = torch.arange(L, device=dev)
    tt = t[None, :] <= t[:, None]
    if window > 0:
        tt = tt & (t[None, :] >= t[:, None] - window)
    if P == 0:
        return tt[None].expand(B, L, L).clone()
    p = torch.arange(P, device=dev)
    pp = (p[None, :] <= p[:, None])[None] & prefix_valid[:, None, :]
    pp = pp | torch.eye(P, dtype=torch.bool, device=dev)[None]
    top = torch.cat([pp, torch.zeros(B, P, L, dtype=torch.bool, device=dev)], dim=2)
    bottom = torch.cat([prefix_valid[:, None, :].expand(B, L, P), tt[None].expand(B, L, L)], dim=2)
    return torch.cat([top, bottom], dim=1)


def collate(samples: list[dict], prefix_from: str | None, loss_on: str, window: int, device, dtype) -> Batch:
    """Stored samples -> one padded batch (text right-padded, prefix left-padded)."""
    B = len(samples)
    texts = []
    for s in samples:
        txt = s["text_mask"]
        seqpos = torch.nonzero(txt).flatten()
        texts.append((s["input_ids"][txt], seqpos >= s["prompt_len"]))
    L = max(ids.shape[0] for ids, _ in texts)
    H = samples[0]["features"].shape[1]
    token_ids = torch.zeros(B, L, dtype=torch.long)
    feats = torch.zeros(B, L, H, dtype=dtype)
    valid = torch.zeros(B, L, dtype=torch.bool)
    loss_mask = torch.zeros(B, L, dtype=torch.bool)
    for b, (s, (ids, answer)) in enumerate(zip(samples, texts)):
        T = ids.shape[0]
        token_ids[b, :T] = ids
        feats[b, :T] = s["features"].to(dtype)
        valid[b, :T] = True
        loss_mask[b, :T] = answer if loss_on == "answer" else True
    prefix = prefix_valid = None
    if prefix_from is not None:
        states = [s.get(prefix_from) for s in samples]
        if any(x is None for x in states):
            missing = [s["id"] for s, x in zip(samples, states) if x is None]
            raise ValueError(f"samples {missing[:5]} have no {prefix_from!r} (generate the data with --store-embeds)")
        P = max(x.shape[0] for x in states)
        prefix = torch.zeros(B, P, H, dtype=dtype)
        prefix_valid = torch.zeros(B, P, dtype=torch.bool)
        for b, x in enumerate(states):
            n = x.shape[0]
            if n:
                prefix[b, P - n :] = x.to(dtype)
                prefix_valid[b, P - n :] = True
        prefix, prefix_valid = prefix.to(device), prefix_valid.to(device)
    mask = build_attention_mask(prefix_valid, L, window)
    if prefix_valid is None:
        mask = mask.expand(B, L, L)
    return Batch(
        token_ids=token_ids.to(device),
        features=feats.to(device),
        position_ids=torch.arange(L, device=device)[None].expand(B, L),
        valid=valid.to(device),
        loss_mask=loss_mask.to(device),
        prefix=prefix,
        prefix_valid=prefix_valid,
        attention_mask=mask.to(device),
        ids=[s["id"] for s in samples],
    )


def shift_features(x: torch.Tensor) -> torch.Tensor:
    """prev[:, t] = x[:, t-1], prev[:, 0] = 0: the feature paired with token t."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _noisy(prev: torch.Tensor, valid: torch.Tensor, half_width: float, gen: torch.Generator | None) -> torch.Tensor:
    """prev + U(-half_width, half_width) on the valid positions (drawn on the CPU generator, so the
    noise does not depend on the device)."""
    u = torch.rand(prev.shape, generator=gen, dtype=torch.float64 if prev.dtype == torch.float64 else torch.float32)
    return prev + ((2 * u - 1) * half_width).to(device=prev.device, dtype=prev.dtype) * valid[..., None]


def _chunk_token_loss(draft, target_h: torch.Tensor, *draft_h: torch.Tensor) -> tuple:
    """One chunk of positions: target_h [c, H], draft_h[j] [c, H] (pass j) -> (soft CE summed over
    the chunk, per pass [J]; top-1 agreements per pass [J]). The target distribution is computed
    once for every pass."""
    acc = _acc(target_h.dtype)
    with torch.no_grad():
        p = torch.softmax(draft.logits(target_h).to(acc), dim=-1)
        top = p.argmax(-1)
    ce, hits = [], []
    for out in draft_h:
        logq = torch.log_softmax(draft.logits(out).to(acc), dim=-1)
        ce.append(-(p * logq).sum())
        hits.append((logq.detach().argmax(-1) == top).sum().to(acc))
    return torch.stack(ce), torch.stack(hits)


def token_loss(draft, target_h: torch.Tensor, draft_h: list, chunk: int = LOGIT_CHUNK) -> tuple:
    """Soft cross-entropy CE(softmax(lm_head(h)), log_softmax(lm_head(ĥ_j))) and top-1 agreement,
    summed over the N rows of target_h [N, H] and draft_h[j] [N, H] -> (ce [J], hits [J]).
    `chunk` rows at a time; each chunk is checkpointed (its logits are not kept for backward but
    recomputed there), so the graph never holds more than one chunk's [chunk, V] logits."""
    ce, hits = [], []
    for s in range(0, max(target_h.shape[0], 1), chunk):  # no loss position: one empty chunk, zeros
        args = (target_h[s : s + chunk], *(o[s : s + chunk] for o in draft_h))
        if torch.is_grad_enabled() and any(a.requires_grad for a in args):
            c, k = checkpoint(_chunk_token_loss, draft, *args, use_reentrant=False, preserve_rng_state=False)
        else:
            c, k = _chunk_token_loss(draft, *args)
        ce.append(c)
        hits.append(k)
    return torch.stack(ce).sum(0), torch.stack(hits).sum(0)


def compute_loss(draft, batch: Batch, cfg: TrainConfig, noise_gen: torch.Generator | None = None,
                 chunk: int = LOGIT_CHUNK) -> tuple:
    """The IVSB + MTP loss of one batch -> (loss tensor, metrics dict). `chunk`: loss positions per
    chunk of the token loss (token_loss)."""
    h = batch.features
    acc = _acc(h.dtype)
    H = h.shape[-1]
    sel = batch.loss_mask.reshape(-1).nonzero().squeeze(1)  # [N] flat loss positions
    denom = float(max(sel.numel(), 1))
    prev = shift_features(h)
    if cfg.feature_noise > 0:
        prev = _noisy(prev, batch.valid, cfg.feature_noise, noise_gen)
    outs = []  # ĥ of pass j at the loss positions, [N, H]
    for j in range(cfg.unroll):
        out = draft.forward_sequence(batch.token_ids, prev, batch.position_ids, batch.attention_mask, batch.prefix)
        outs.append(out.reshape(-1, H)[sel])
        if j + 1 < cfg.unroll:
            prev = shift_features(out.detach() if cfg.mtp_detach else out) * batch.valid[..., None]
    target_h = h.reshape(-1, H)[sel]
    ce, hits = token_loss(draft, target_h, outs, chunk)
    total, wsum, metrics = 0.0, 0.0, {}
    for j, out in enumerate(outs):
        feat = F.smooth_l1_loss(out.to(acc), target_h.to(acc), reduction="none").mean(-1).sum() / denom
        tok = ce[j] / denom
        w = cfg.mtp_decay**j
        total = total + w * (cfg.feature_weight * feat + cfg.token_weight * tok)
        wsum += w
        metrics[f"acc{j}"] = float(hits[j] / denom)
        if j == 0:
            metrics["feat"], metrics["tok"] = float(feat.detach()), float(tok.detach())
    loss = total / wsum
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def train_step(draft, batch: Batch, cfg: TrainConfig, opt, params: list, noise_gen, amp: torch.dtype | None,
               scaler) -> dict:
    """One optimisation step: the loss under autocast (amp: its dtype; None: off), backward (through
    the GradScaler, a no-op unless float16), gradient clipping, the optimizer. Returns the metrics."""
    opt.zero_grad(set_to_none=True)  # before the forward: the last step's grads are not held through it
    with torch.autocast(batch.token_ids.device.type, dtype=amp, enabled=amp is not None):
        loss, metrics = compute_loss(draft, batch, cfg, noise_gen)
    scaler.scale(loss).backward()
    if cfg.grad_clip > 0:
        scaler.unscale_(opt)
        metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
    metrics["lr"] = opt.param_groups[0]["lr"]
    scaler.step(opt)
    scaler.update()
    return metrics


def training_precision(target_dtype: torch.dtype, draft_dtype: torch.dtype | None = None) -> tuple:
    """(the draft's weight dtype, the autocast dtype or None) for training against a target whose
    weights are `target_dtype`; draft_dtype: an explicit weight dtype (then no autocast)."""
    if draft_dtype is not None:
        return draft_dtype, None
    if target_dtype in (torch.float16, torch.bfloat16):
        return torch.float32, target_dtype
    return target_dtype, None


# -- schedule, checkpoints ----------------------------------------------------------------------
def lr_lambda(cfg: TrainConfig, total_steps: int):
    def f(step: int) -> float:
        if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, total_steps - cfg.warmup_steps)
        frac = min(1.0, (step - cfg.warmup_steps) / span)
        shape = 0.5 * (1 + math.cos(math.pi * frac)) if cfg.schedule == "cosine" else 1 - frac
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape

    return f


def trainable_parameters(draft, target) -> list:
    """The draft's own weights: every draft parameter that is not one of the target's."""
    frozen = {id(p) for p in target.model.parameters()}
    return [p for p in draft.parameters() if id(p) not in frozen]


def _precision(weights: torch.dtype, amp: torch.dtype | None) -> dict:
    """How a run trains, as recorded in its checkpoints."""
    weights = str(weights).removeprefix("torch.")
    return {"weights": weights, "autocast": None if amp is None else str(amp).removeprefix("torch.")}


def _load_for_training(directory: str, target, dtype: torch.dtype):
    """A saved draft with `dtype` weights, read as saved: from_pretrained (which checks the target)
    builds it in the target's dtype, which would round float32 master weights."""
    from safetensors.torch import load_file

    from sparrow.draft import SparrowDraft

    draft = SparrowDraft.from_pretrained(directory, target).to(dtype)
    draft.load_state_dict(load_file(os.path.join(directory, "model.safetensors"), device=str(draft.fc.weight.device)))
    return draft


def latest_checkpoint(out_dir: str) -> str | None:
    root = os.path.join(out_dir, CKPT_DIR)
    if not os.path.isdir(root):
        return None
    steps = [(int(m.group(1)), n) for n in os.listdir(root) if (m := CKPT_RE.match(n))
             and os.path.exists(os.path.join(root, n, STATE_NAME))]
    return os.path.join(root, max(steps)[1]) if steps else None


def _save(draft, directory: str, state: dict) -> None:
    """save_pretrained + trainer_state.pt, written to a tmp folder and renamed (atomic)."""
    tmp = directory.rstrip("/") + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    draft.save_pretrained(tmp)
    torch.save(state, os.path.join(tmp, STATE_NAME))
    if os.path.isdir(directory) and os.path.exists(os.path.join(directory, STATE_NAME)):
        old = directory.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old)
    else:
        os.replace(tmp, directory)


def _save_final(draft, out_dir: str, state: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    draft.save_pretrained(out_dir)
    torch.save(state, os.path.join(out_dir, STATE_NAME))


def _prune(out_dir: str, keep: int) -> None:
    if keep <= 0:
        return
    root = os.path.join(out_dir, CKPT_DIR)
    steps = sorted((int(m.group(1)), n) for n in os.listdir(root) if (m := CKPT_RE.match(n)))
    for _, name in steps[:-keep]:
        shutil.rmtree(os.path.join(root, name))


# -- the loop ---------------------------------------------------------------------------------
def train(
    target,
    data,
    out_dir: str,
    config: TrainConfig | None = None,
    draft_overrides: dict | None = None,
    init_draft: str | None = None,
    resume: str | bool | None = None,
    draft_dtype: torch.dtype | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> dict:
    """Train a draft for `target` (a TargetAdapter) on `data` (a data folder or ShardDataset) and
    save it to `out_dir`. Returns a summary (steps, last losses, seconds, out_dir).

    draft_overrides: DraftConfig settings for a new draft (visual_source, window, ...).
    init_draft: start from this saved draft instead of a random one.
    resume: True (the newest checkpoint in out_dir) or a checkpoint folder; the run continues as if
        never interrupted (same config required, except checkpoint_every / keep_checkpoints).
    draft_dtype: the draft's weight and compute dtype while training, without autocast (default:
        float32 weights under the target's autocast for a float16 / bfloat16 target, the target's
        dtype otherwise; see "Precision" above).
    stop_after: stop (after checkpointing) once this many steps are done in total: an interruption
        on purpose, for tests and time-boxed jobs; resume later."""
    from sparrow.draft import SparrowDraft

    cfg = config or TrainConfig()
    target.model.requires_grad_(False)
    wdtype, amp = training_precision(target.embed_tokens().weight.dtype, draft_dtype)
    precision = _precision(wdtype, amp)
    ckpt = None
    if resume:
        ckpt = latest_checkpoint(out_dir) if resume is True else resume
        if ckpt is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {os.path.join(out_dir, CKPT_DIR)}")
        state = torch.load(os.path.join(ckpt, STATE_NAME), map_location="cpu", weights_only=False)
        saved = state["config"]
        diff = {k: (saved.get(k), v) for k, v in cfg.to_dict().items() if k not in _RESUME_FREE and saved.get(k) != v}
        if diff:
            raise ValueError(f"--resume {ckpt}: the training settings differ from the checkpoint's: "
                             + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in diff.items()))
        # Checkpoints of before the precision was recorded trained in the target's dtype.
        was = state.get("precision", _precision(target.embed_tokens().weight.dtype, None))
        if was != precision:
            raise ValueError(f"--resume {ckpt}: the checkpoint trained with {was}, this run would train with "
                             f"{precision} (the default follows the target's dtype; draft_dtype overrides it)")
        draft = _load_for_training(ckpt, target, wdtype)
    elif init_draft:
        draft = _load_for_training(init_draft, target, wdtype)
    else:
        torch.manual_seed(cfg.seed)
        draft = SparrowDraft.from_target(target, **(draft_overrides or {})).to(wdtype)
    device = next(draft.parameters()).device
    dtype = next(draft.parameters()).dtype
    draft.train()

    dataset = data if isinstance(data, ShardDataset) else None
    vs = draft.config.visual_source
    pkey = prefix_key(vs, cfg.ivsb)
    if dataset is None:
        dataset = ShardDataset(data, target=target.identity(), require=(pkey,) if pkey == "visual_embeds" else ())
    elif dataset.index.target != target.identity():
        raise ValueError(f"the data were generated by target {dataset.index.target}, not by {target.identity()}")
    N = len(dataset)
    if N == 0:
        raise ValueError("no training samples")
    per_epoch = math.ceil(N / cfg.batch_size)
    total = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * per_epoch

    params = trainable_parameters(draft, target)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
    # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    noise_gen = torch.Generator().manual_seed(cfg.seed + 1)
    step = 0
    if ckpt is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        noise_gen.set_state(state["noise_rng"])
        torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])

    def trainer_state() -> dict:
        return {
            "step": step,
            "total_steps": total,
            "config": cfg.to_dict(),
            "draft_config": draft.config.to_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict(),
            "precision": precision,
            "noise_rng": noise_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "data": {"root": dataset.index.root, "num_samples": N},
        }

    window = int(getattr(draft.config, "window", 0))
    order_epoch, order = -1, None
    history: list[dict] = []
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc="train", unit="step", disable=not progress)
    last = {}
    try:
        while step < total and (stop_after is None or step < stop_after):
            epoch, k = divmod(step, per_epoch)
            if epoch != order_epoch:
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch)
                order, order_epoch = torch.randperm(N, generator=g).tolist(), epoch
            idx = order[k * cfg.batch_size : (k + 1) * cfg.batch_size]
            batch = collate([dataset[i] for i in idx], pkey, cfg.loss_on, window, device, dtype)
            metrics = train_step(draft, batch, cfg, opt, params, noise_gen, amp, scaler)
            sched.step()
            step += 1
            metrics["step"] = step
            last = metrics
            if cfg.log_every and step % cfg.log_every == 0:
                history.append(metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['acc0']:.2f}", lr=f"{metrics['lr']:.2e}")
            bar.update(1)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < total:
                _save(draft, os.path.join(out_dir, CKPT_DIR, f"step-{step:07d}"), trainer_state())
                _prune(out_dir, cfg.keep_checkpoints)
    finally:
        bar.close()
    finished = step >= total
    if finished:
        _save_final(draft, out_dir, trainer_state())
    elif not (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
        _save(draft, os.path.join(out_dir, CKPT_DIR, f"step-{step:07d}"), trainer_state())
        _prune(out_dir, cfg.keep_checkpoints)
    summary = {
        "out_dir": out_dir,
        "finished": finished,
        "steps": step,
        "total_steps": total,
        "samples": N,
        "visual_source": vs,
        "prefix": pkey,
        "precision": precision,
        "seconds": round(time.perf_counter() - t0, 3),
        "last": last,
        "history": history,
        "config": cfg.to_dict(),
    }
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "train_summary.json"), "w") as f:
        json.dump({k: v for k, v in summary.items() if k != "history"} | {"history": history[-1000:]}, f, indent=1)
    summary["draft"] = draft
    return summary
