"""Peak memory and time of one training step of a draft at Qwen2.5-VL-7B shapes: before / after.

The draft (fc + one decoder layer: hidden 3584, intermediate 18944, 28 heads / 4 KV heads of 128,
vocab 152064) trains against a bfloat16 target's embedding and lm_head, built here at random from
a Qwen2.5-VL text config (nothing is downloaded; the target's layers are not needed for a step).
One sample: --visual IVSB prefix states, then --text text positions whose last --loss are the
answer (in the loss), MTP unroll --unroll, the trainer's default settings otherwise.

  before  the old recipe: the draft's weights (and AdamW's moments) in the target's dtype, no
          autocast, and the loss with whole float32 [T, V] logits: p_target once and a
          log_softmax per pass, all kept for backward (old_compute_loss below, a copy of
          trainer.compute_loss as it was before the chunked token loss); attention through
          einsum and softmax, its [B, h, M, M] probabilities kept for backward (old_dense below).
  chunked the loss change apart: the old bf16 weights (draft_dtype=bfloat16) and the old
          attention with the new loss.
  after   the trainer's default: float32 master weights under bf16 autocast, the token loss over
          the loss positions only, in checkpointed chunks (trainer.compute_loss), attention
          through SDPA (DecoderLayer.dense).
Every recipe runs trainer.train_step (zero_grad, forward, backward, clipping, AdamW).

Each recipe runs in a fresh subprocess: build the models and the batch, one warm-up step (it
creates AdamW's moments, so the measured steps are steady-state ones), then --steps measured steps.
Memory on CPU: the process's peak RSS during the measured steps (VmHWM, reset through
/proc/self/clear_refs just before them) minus its RSS after building the models and the batch; so
the target's embedding / lm_head and the draft's weights are not counted, AdamW's moments, the
gradients and everything a step allocates are. On CUDA: torch.cuda.max_memory_allocated over the
measured steps minus memory_allocated after building. Time: the least wall time of a measured step.

    python bench/bench_train_memory.py [--device cuda] [--text 1024] [--loss 512] [--visual 1024] [--unroll 3]

Writes bench/results/train_memory.json and .md (device, versions, shapes beside the numbers).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from torch import nn

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, _ROOT)  # sparrow, when not installed

from sparrow.train import trainer  # noqa: E402
from sparrow.train.trainer import TrainConfig, collate, shift_features  # noqa: E402

GiB = 1024**3
SHAPES = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
              vocab_size=152064, num_hidden_layers=28)  # Qwen2.5-VL-7B's text model (head dim 128)
TARGET_DTYPE = torch.bfloat16
RECIPES = {
    "before": "bf16 weights, whole [T,V] float32 logits, einsum attention",
    "chunked": "bf16 weights, chunked token loss, einsum attention",
    "after": "float32 master weights + bf16 autocast, chunked token loss, SDPA attention",
}


# -- the old recipe's loss, kept to measure against ----------------------------------------------
def old_compute_loss(draft, batch, cfg, noise_gen=None):
    """THE OLD RECIPE (trainer.compute_loss before the chunked token loss), verbatim: p_target
    [B,T,V] float32 once, a log_softmax [B,T,V] float32 per unroll pass, all kept for backward."""
    h = batch.features
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32
    m = batch.loss_mask.to(acc)
    denom = m.sum().clamp(min=1.0)
    with torch.no_grad():
        p_target = torch.softmax(draft.logits(h).to(acc), dim=-1)
        top_target = p_target.argmax(-1)
    prev = shift_features(h)
    if cfg.feature_noise > 0:
        u = torch.rand(prev.shape, generator=noise_gen, dtype=torch.float64 if h.dtype == torch.float64 else torch.float32)
        prev = prev + ((2 * u - 1) * cfg.feature_noise).to(device=prev.device, dtype=prev.dtype) * batch.valid[..., None]
    total, wsum, metrics = 0.0, 0.0, {}
    for j in range(cfg.unroll):
        out = draft.forward_sequence(batch.token_ids, prev, batch.position_ids, batch.attention_mask, batch.prefix)
        feat = F.smooth_l1_loss(out.to(acc), h.to(acc), reduction="none").mean(-1)
        feat = (feat * m).sum() / denom
        logq = torch.log_softmax(draft.logits(out).to(acc), dim=-1)
        tok = (-(p_target * logq).sum(-1) * m).sum() / denom
        w = cfg.mtp_decay**j
        total = total + w * (cfg.feature_weight * feat + cfg.token_weight * tok)
        wsum += w
        with torch.no_grad():
            metrics[f"acc{j}"] = float(((logq.argmax(-1) == top_target).to(acc) * m).sum() / denom)
        if j == 0:
            metrics["feat"], metrics["tok"] = float(feat.detach()), float(tok.detach())
        if j + 1 < cfg.unroll:
            prev = shift_features(out.detach() if cfg.mtp_detach else out) * batch.valid[..., None]
    loss = total / wsum
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def old_dense(self, x, positions, allowed):
    """THE OLD RECIPE's attention (DecoderLayer.dense before SDPA), verbatim."""
    q, k, v = self.qkv(x, positions)
    g = self.hq // self.hkv
    k = k.repeat_interleave(g, dim=2)
    v = v.repeat_interleave(g, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * self.scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores.float() if q.dtype != torch.float64 else scores, dim=-1)
    probs = probs.nan_to_num(0.0).to(v.dtype)
    attn = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    return self.finish(x, attn)


# -- the models and the batch -------------------------------------------------------------------
class BenchTarget:
    """What SparrowDraft.from_target and the trainer read of a TargetAdapter: the text config, the
    identity, the embedding and lm_head (random, in the target's dtype) and .model (frozen)."""

    feature = None  # features after the final norm (the default): lm_head(h) directly

    def __init__(self, device: str):
        from transformers import Qwen2_5_VLTextConfig

        self.text_config = Qwen2_5_VLTextConfig(rope_theta=1e6, **SHAPES)
        V, H = SHAPES["vocab_size"], SHAPES["hidden_size"]
        self.model = nn.Module()
        self.model.embed = nn.Embedding(V, H, device=device, dtype=TARGET_DTYPE)
        self.model.head = nn.Linear(H, V, bias=False, device=device, dtype=TARGET_DTYPE)
        with torch.no_grad():
            self.model.head.weight.normal_(std=0.02)
        self.model.requires_grad_(False)

    def identity(self) -> dict:
        return {"architecture": "bench", "model_type": "qwen2_5_vl", **{k: SHAPES[k] for k in
                ("hidden_size", "vocab_size", "num_hidden_layers")}}

    def embed_tokens(self) -> nn.Embedding:
        return self.model.embed

    def lm_head(self) -> nn.Linear:
        return self.model.head

    def final_norm(self):
        return None


def bench_sample(n_text: int, n_loss: int, n_visual: int) -> dict:
    """A stored sample as gen-data writes it: 2 text tokens, the visual block, the rest of the text;
    the last n_loss text positions are the answer."""
    g = torch.Generator().manual_seed(0)
    S = n_visual + n_text
    vis = torch.zeros(S, dtype=torch.bool)
    vis[2 : 2 + n_visual] = True
    H = SHAPES["hidden_size"]
    return {
        "id": "bench",
        "input_ids": torch.randint(0, SHAPES["vocab_size"], (S,), generator=g),
        "visual_mask": vis,
        "text_mask": ~vis,
        "prompt_len": S - n_loss,
        "features": torch.randn(n_text, H, generator=g).to(TARGET_DTYPE),
        "visual_mid": torch.randn(n_visual, H, generator=g).to(TARGET_DTYPE),
    }


# -- memory -------------------------------------------------------------------------------------
def _proc_status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class Memory:
    """Bytes in use now / the peak since reset(): RSS on CPU, the caching allocator on CUDA."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"
        self.method = ("torch.cuda.max_memory_allocated" if self.cuda else
                       "peak RSS (VmHWM, reset via /proc/self/clear_refs)")

    def now(self) -> int:
        gc.collect()
        return torch.cuda.memory_allocated() if self.cuda else _proc_status("VmRSS")

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _proc_status("VmHWM")


# -- one recipe, in its own process -------------------------------------------------------------
def run_recipe(recipe: str, args) -> dict:
    from sparrow.draft import SparrowDraft
    from sparrow.draft.model import DecoderLayer

    if recipe == "before":
        trainer.compute_loss = old_compute_loss  # train_step calls it by name; this process only
    if recipe in ("before", "chunked"):
        DecoderLayer.dense = old_dense
    mem = Memory(args.device)
    torch.manual_seed(0)
    target = BenchTarget(args.device)
    wdtype, amp = trainer.training_precision(TARGET_DTYPE, None if recipe == "after" else TARGET_DTYPE)
    torch.manual_seed(0)
    draft = SparrowDraft.from_target(target).to(wdtype).train()
    cfg = TrainConfig(unroll=args.unroll)
    params = trainer.trainable_parameters(draft, target)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(args.device, enabled=amp == torch.float16)
    noise_gen = torch.Generator().manual_seed(1)
    batch = collate([bench_sample(args.text, args.loss, args.visual)], "visual_mid", "answer", 0, args.device, wdtype)
    built = mem.now()

    def step() -> tuple:
        t0 = time.perf_counter()
        metrics = trainer.train_step(draft, batch, cfg, opt, params, noise_gen, amp, scaler)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, metrics

    warm_s, warm = step()
    after_warmup = mem.now()
    mem.reset()
    timed = [step() for _ in range(args.steps)]
    peak = mem.peak()
    moments = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim())
    return dict(
        recipe=recipe, description=RECIPES[recipe], weights=str(wdtype), autocast=str(amp),
        trainable_params=sum(p.numel() for p in params),
        draft_weight_bytes=sum(p.numel() * p.element_size() for p in params),
        adam_moment_bytes=moments, built_bytes=built, after_warmup_bytes=after_warmup, peak_bytes=peak,
        step_peak_over_built_bytes=peak - built, warmup_s=warm_s, step_s=min(t for t, _ in timed),
        steps_s=[t for t, _ in timed], loss_step1=warm["loss"], loss_last=timed[-1][1]["loss"],
        acc0_step1=warm["acc0"],
    )


# -- the report ---------------------------------------------------------------------------------
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"cpu: {model}, {torch.get_num_threads()} threads"


def report(rows: list, args, method: str, command: str) -> tuple:
    import transformers

    meta = dict(
        command=command, device=device_name(args.device), torch=torch.__version__,
        transformers=transformers.__version__,
        shapes=dict(SHAPES, head_dim=SHAPES["hidden_size"] // SHAPES["num_attention_heads"],
                    target_dtype=str(TARGET_DTYPE)),
        sequence=dict(batch=1, visual_prefix=args.visual, text=args.text, loss_positions=args.loss,
                      unroll=args.unroll, logit_chunk=trainer.LOGIT_CHUNK),
        memory=method + f" over {args.steps} measured steps after a warm-up step (so AdamW's moments exist), "
        "minus the memory after building the target embedding / lm_head, the draft and the batch",
        time=f"wall time of one step, the least of the {args.steps} measured steps",
    )
    seq = meta["sequence"]
    lines = [
        f"# One draft training step at Qwen2.5-VL-7B shapes ({meta['device']}, torch {meta['torch']})",
        "",
        f"Draft: hidden {SHAPES['hidden_size']}, intermediate {SHAPES['intermediate_size']}, "
        f"{SHAPES['num_attention_heads']} heads / {SHAPES['num_key_value_heads']} KV heads of "
        f"{meta['shapes']['head_dim']}, vocab {SHAPES['vocab_size']}; bf16 target embedding / lm_head. "
        f"Sequence: batch 1, {seq['visual_prefix']} IVSB visual states + {seq['text']} text positions, "
        f"{seq['loss_positions']} in the loss, unroll {seq['unroll']}, token-loss chunk {seq['logit_chunk']}.",
        f"Memory: {meta['memory']}. Time: {meta['time']}. Loss step 1: the same initial weights and batch "
        "in every recipe.",
        f"Command: `{command}`",
        "",
        "| recipe | weights | autocast | step peak over built (GiB) | built (GiB) | Adam moments (GiB) "
        f"| step (s, min of {args.steps}) | loss step 1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['recipe']}: {r['description']} | {r['weights'].removeprefix('torch.')} | "
            f"{r['autocast'].removeprefix('torch.')} | {r['step_peak_over_built_bytes'] / GiB:.2f} | "
            f"{r['built_bytes'] / GiB:.2f} | {r['adam_moment_bytes'] / GiB:.2f} | {r['step_s']:.1f} | "
            f"{r['loss_step1']:.4f} |"
        )
    by = {r["recipe"]: r for r in rows}
    base = by.get("before")
    for name in ("chunked", "after"):
        if base and name in by:
            peak = by[name]["step_peak_over_built_bytes"] / base["step_peak_over_built_bytes"]
            speed = by[name]["step_s"] / base["step_s"]
            lines.append(f"\n{name} / before: step peak {peak:.2f}x, step time {speed:.2f}x.")
    return meta, lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--text", type=int, default=1024, help="text positions")
    ap.add_argument("--loss", type=int, default=512, help="of which in the loss (the answer)")
    ap.add_argument("--visual", type=int, default=1024, help="IVSB visual prefix states")
    ap.add_argument("--unroll", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="measured steps after the warm-up step")
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--out", default=os.path.join(_ROOT, "bench", "results"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one recipe
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        with open(args.result, "w") as f:
            json.dump(run_recipe(args.worker, args), f)
        return 0
    rows = []
    common = ["--device", args.device, "--text", str(args.text), "--loss", str(args.loss),
              "--visual", str(args.visual), "--unroll", str(args.unroll), "--steps", str(args.steps)]
    for recipe in args.recipes:
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            subprocess.run([sys.executable, os.path.abspath(__file__), *common, "--worker", recipe,
                            "--result", tmp.name], check=True)
            with open(tmp.name) as f:
                rows.append(json.load(f))
        print(f"{recipe}: step peak over built {rows[-1]['step_peak_over_built_bytes'] / GiB:.2f} GiB, "
              f"step {rows[-1]['step_s']:.1f} s", flush=True)
    command = "python bench/bench_train_memory.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    meta, lines = report(rows, args, Memory(args.device).method, command)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_memory.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=2)
    with open(os.path.join(args.out, "train_memory.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
