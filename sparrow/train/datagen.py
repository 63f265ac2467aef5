"""`sparrow gen-data`: the target writes its own training data (self-distillation).

For every record (sparrow/train/records.py): build the prompt's inputs with the processor, let the
target answer greedily with `sparrow.generate(target, None, ...)` (autoregressive, at most
`max_new_tokens`, ending with the eos token when the target emits one): the same adapter, the
same position rule (`target.positions`) and the same decode path that will later serve the draft,
so the answers are exactly the ones speculative decoding reproduces. Hugging Face `generate` is
not used: it applies the checkpoint's generation_config processors (e.g. a repetition penalty)
and its own position rule. Then one prefill over prompt + answer, the answer at the positions
decoding gives it (`continuation`; the adapter's rule, see targets/qwen2_vl.py), gives what the
draft is trained on (sparrow/train/shards.py lists the tensors): the features h at the text
positions and the layer-L/2 hidden states at the visual positions, average-pooled to at most
`mid_pool` states.

With `answers="given"` the record's own answer is used instead ("answer_ids" in the record, or
from the processor's dict); the draft then learns the data's answers, not the target's.

Batching: `batch_size` records share each forward (generate, then the features' prefill), rows
left-padded, with the same results as one record at a time (answers token for token; features up
to the rounding of a differently shaped matmul). In the features' prefill every row's answer is
followed by filler tokens up to the batch's longest answer, so that one `continuation` serves all
rows: attention is causal, so the fillers change nothing before them, and they are dropped.
Records share a forward when their inputs can be stacked (`batch_signature`): Qwen-style flat
patches with grids always (any sizes, videos beside images); per-row pixel tensors (LLaVA-OneVision's
pixel_values_videos [1, frames, C, H, W]) only with equal shapes, so videos of different frame
counts go to separate forwards (said once, with the reason); images of different tile counts are
zero-padded (the model cuts every image's tiles by its image_sizes). Only the current batch's
pixels are on the device; the rest wait in host memory (records.host_inputs).

Resumable: samples whose id is in a finished shard are skipped; a shard is written atomically,
then the index; an interruption (error, Ctrl-C) first writes the samples finished so far.
"""

from __future__ import annotations

import os
import time
import warnings

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparrow.generation import eos_token_ids, generate
from sparrow.train.records import RecordError, host_inputs, load_records, to_device
from sparrow.train.shards import (
    SHARD_RE,
    DataError,
    ShardIndex,
    same_identity,
    shard_metadata,
    shard_name,
    write_shard,
)

_ZERO_EXTEND = ("mm_token_type_ids", "token_type_ids")
_SEQUENCE = ("input_ids", "attention_mask") + _ZERO_EXTEND  # [1, S] per record: left-padded into [B, S]
_FLAT = {"pixel_values_videos": "video_grid_thw", "pixel_values": "image_grid_thw"}  # Qwen: patches of all rows, one after another


def pool_states(x: torch.Tensor, limit: int) -> torch.Tensor:
    """[N, H] -> [min(N, limit), H]: average of contiguous groups in sequence order
    (adaptive_avg_pool1d); limit <= 0 keeps all N."""
    if limit <= 0 or x.shape[0] <= limit:
        return x
    return F.adaptive_avg_pool1d(x.T.unsqueeze(0).float(), limit)[0].T.to(x.dtype)


def extend_inputs(inputs: dict, answer: torch.Tensor) -> dict:
    """The prompt's processor dict (a batch of B) with the answer ids [B, A] appended (text
    positions): attention_mask gets ones, per-token type ids get zeros (text)."""
    out = dict(inputs)
    ids = inputs["input_ids"]
    out["input_ids"] = torch.cat([ids, answer.to(ids.device, ids.dtype)], dim=1)
    out["attention_mask"] = torch.cat(
        [inputs["attention_mask"], torch.ones_like(answer, dtype=inputs["attention_mask"].dtype, device=ids.device)], 1
    )
    for key in _ZERO_EXTEND:
        if key in inputs and inputs[key] is not None:
            t = inputs[key]
            out[key] = torch.cat([t, torch.zeros(t.shape[0], answer.shape[1], dtype=t.dtype, device=t.device)], 1)
    return out


# -- batching -----------------------------------------------------------------------------------
def _flat_keys(inputs: dict) -> set:
    """Keys whose rows are concatenated along dim 0 (Qwen: flat patches, one grid row per visual)."""
    out = set()
    for pix, grid in _FLAT.items():
        if inputs.get(grid) is not None:
            out |= {pix, grid}
    if inputs.get("video_grid_thw") is not None:
        out.add("second_per_grid_ts")
    return out


def _padded_tiles(inputs: dict) -> bool:
    """LLaVA-style images [1, tiles, C, H, W] with image_sizes: the model takes each image's own
    tile count from image_sizes, so a batch may zero-pad the tiles dimension."""
    pv = inputs.get("pixel_values")
    return "pixel_values" not in _flat_keys(inputs) and inputs.get("image_sizes") is not None and pv is not None \
        and pv.dim() == 5


def batch_signature(inputs: dict):
    """Records with equal signatures can share one forward (`collate`); a str: the reason this
    record shares none."""
    flat = _flat_keys(inputs)
    sig = []
    for k in sorted(inputs):
        v = inputs[k]
        if v is None:
            continue
        if k in _SEQUENCE:
            sig.append((k, "sequence"))
        elif k == "second_per_grid_ts" and k in flat:
            sig.append((k, "given"))  # given for every video, or for none
        elif k in flat:
            continue  # any sizes; videos and images side by side
        elif isinstance(v, torch.Tensor):
            if v.dim() == 0 or v.shape[0] != 1:
                return f"{k} has shape {list(v.shape)}, not one row per record"
            shape = v.shape[2:] if k == "pixel_values" and _padded_tiles(inputs) else v.shape[1:]
            sig.append((k, tuple(shape), str(v.dtype)))
        else:
            sig.append((k, repr(v)))
    return tuple(sig)


def _difference(a, b) -> str:
    if isinstance(a, str) or isinstance(b, str):
        return a if isinstance(a, str) else b
    da, db = dict((x[0], x[1:]) for x in a), dict((x[0], x[1:]) for x in b)
    for k in sorted(set(da) | set(db)):
        if da.get(k) != db.get(k):
            return f"{k}: {da.get(k, 'absent')} vs {db.get(k, 'absent')}"
    return "different inputs"


def collate(items: list[dict], pad_id: int = 0) -> dict:
    """Batch-of-one processor dicts with equal batch_signature -> one left-padded batch."""
    S = max(int(x["input_ids"].shape[1]) for x in items)
    flat = set().union(*(_flat_keys(x) for x in items))
    keys = list(dict.fromkeys(k for x in items for k in x))
    out = {}
    for k in keys:
        vals = [x[k] for x in items if x.get(k) is not None]
        if not vals:
            out[k] = None
        elif k in _SEQUENCE:
            fill = pad_id if k == "input_ids" else 0
            out[k] = torch.cat([torch.cat([torch.full((1, S - v.shape[1]), fill, dtype=v.dtype), v], 1) for v in vals])
        elif k in flat:
            out[k] = torch.cat(vals)
        elif isinstance(vals[0], torch.Tensor):
            if k == "pixel_values" and _padded_tiles(items[0]):
                n = max(v.shape[1] for v in vals)
                vals = [torch.cat([v, v.new_zeros(1, n - v.shape[1], *v.shape[2:])], 1) for v in vals]
            out[k] = torch.cat(vals)
        else:
            out[k] = vals[0]
    return out


def _placeholders(target) -> set:
    """The target's visual placeholder ids (none for a target without them)."""
    return set(target.placeholder_ids()) if hasattr(target, "placeholder_ids") else set()


def _pad_id(target) -> int:
    """An id for left padding and answer fillers: the model's pad id unless it is a visual
    placeholder (the adapters count placeholders over every slot), else 0."""
    holders = _placeholders(target)
    cfg = target.model.config
    pad = getattr(cfg, "pad_token_id", None)
    if pad is None and hasattr(cfg, "get_text_config"):
        pad = getattr(cfg.get_text_config(), "pad_token_id", None)
    return int(pad) if isinstance(pad, int) and pad not in holders and pad >= 0 else 0


# -- answers and features -------------------------------------------------------------------------
def _cut(tokens: list, eos, placeholders) -> list:
    for i, tok in enumerate(tokens):
        if tok in placeholders:
            return tokens[:i]
        if tok in eos:
            return tokens[: i + 1]
    return tokens


@torch.no_grad()
def target_answers(target, inputs: dict, max_new_tokens: int, eos=(), placeholders=()) -> list[list[int]]:
    """The target's own greedy answers, one list per batch row: sparrow.generate's autoregressive
    decoding (draft None) under the target's position rule, stopping at an eos id (kept), each cut
    before its first visual placeholder id (dropped with what follows: a placeholder without pixels
    is no valid input; real targets do not emit them, tiny random ones do)."""
    out = generate(target, None, inputs, max_new_tokens, eos_token_id=sorted(eos))
    return [_cut(list(t), set(eos), set(placeholders)) for t in out.tokens]


def target_answer(target, inputs: dict, max_new_tokens: int, eos=(), placeholders=()) -> torch.Tensor:
    """target_answers for a batch of one, as a [1, A] tensor (target: an adapter, or a Hugging
    Face model that sparrow.generate wraps)."""
    (answer,) = target_answers(target, inputs, max_new_tokens, eos, placeholders)
    return torch.tensor([answer], dtype=torch.long)


@torch.no_grad()
def make_samples(target, group: list[tuple[dict, dict, list | None]], max_new_tokens: int, mid_pool: int,
                 store_embeds: bool, store_dtype: torch.dtype | None, pad_id: int = 0) -> list:
    """One forward's records [(record, host inputs, given answer ids or None)] -> per record the
    tensors of one sample (sparrow/train/shards.py, on the CPU) or the RecordError it raised.
    None as the answer: the target's own (target_answers)."""
    model = target.model
    p = next(model.parameters())
    sd = store_dtype or p.dtype
    batch = to_device(collate([x for _, x, _ in group], pad_id), p.device, p.dtype)  # this batch's pixels only
    names = [f"sample {rec['id']!r}" for rec, _, _ in group]
    answers = [a for _, _, a in group]
    if any(a is None for a in answers):
        own = target_answers(target, batch, max_new_tokens, eos_token_ids(target, None), _placeholders(target))
        answers = [own[i] if a is None else a for i, a in enumerate(answers)]
    results: list = [RecordError(f"{n}: empty answer") if not a else None for n, a in zip(names, answers)]
    A = max(len(a) for a in answers)
    if A == 0:
        return results
    # Every row's answer, then fillers up to the longest (causal: they change nothing before them).
    block = torch.tensor([a + [pad_id] * (A - len(a)) for a in answers], dtype=torch.long)
    full = extend_inputs(batch, block.to(p.device))
    out = target.prefill(full, want_visual_embeds=store_embeds, want_visual_mid=True, continuation=A,
                         decode_slots=None)  # features only: no cache
    if out.visual_mid is None:
        raise RecordError(f"{names[0]}: the adapter returned no visual_mid (want_visual_mid=True)")
    if store_embeds and out.visual_embeds is None:
        raise RecordError(f"{names[0]}: the adapter returned no visual_embeds (want_visual_embeds=True)")
    head = target.lm_head()
    for b, answer in enumerate(answers):
        if not answer:
            continue
        P = int(batch["attention_mask"][b].sum())
        S = P + len(answer)
        live = full["attention_mask"][b].bool()
        ids = out.input_ids[b][live][:S]
        vis = out.visual_mask[b][live][:S]
        txt = out.text_mask[b][live][:S]
        if ids[P:].tolist() != answer:
            results[b] = RecordError(f"{names[b]}: the adapter's input_ids do not end with the answer")
            continue
        feats = out.features[b][live][:S][txt]
        sample = {
            "input_ids": ids.long(),
            "visual_mask": vis.bool(),
            "text_mask": txt.bool(),
            "prompt_len": torch.tensor([P], dtype=torch.long),
            "features": feats.to(sd),
            "visual_mid": pool_states(out.visual_mid[b][live][:S][vis], mid_pool).to(sd),
        }
        if store_embeds:
            sample["visual_embeds"] = pool_states(out.visual_embeds[b][live][:S][vis], mid_pool).to(sd)
        sample = {k: v.cpu() for k, v in sample.items()}
        # How well the stored features reproduce the answer (self-distillation: should be ~1).
        txt_pos = torch.nonzero(txt).flatten()
        ans_rows = (txt_pos >= P - 1) & (txt_pos < S - 1)
        if bool(ans_rows.any()):
            pred = head(feats[ans_rows].to(head.weight.dtype)).argmax(-1)
            nxt = ids[txt_pos[ans_rows] + 1]
            sample["_agree"] = (int((pred == nxt).sum()), int(ans_rows.sum()))
        results[b] = sample
    return results


def _given_answer(record: dict, given, answers: str):
    """The answer ids gen-data uses for a record: None (the target's own) or the given ones."""
    if answers != "given":
        return None
    given = record.get("answer_ids") if record.get("answer_ids") is not None else given
    if given is None:
        raise RecordError(f"sample {record['id']!r}: answers='given' but neither the record nor the processor "
                          "gives answer_ids")
    return [int(t) for t in torch.as_tensor(given, dtype=torch.long).flatten().tolist()]


def _settings(max_new_tokens, mid_pool, store_embeds, store_dtype, answers, target) -> dict:
    return {
        "max_new_tokens": int(max_new_tokens),
        "mid_pool": int(mid_pool),
        "store_embeds": bool(store_embeds),
        "store_dtype": str(store_dtype).removeprefix("torch."),
        "answers": answers,
        "feature": {"layer": target.feature.layer, "after_norm": target.feature.after_norm},
        # where the answer's features were computed: "decode" = at the positions generation gives
        # them (data written before this key existed used whole-sequence positions; not resumable)
        "answer_positions": "decode",
        # who wrote the answers (data written before this key: Hugging Face generate; not resumable)
        "answer_decoder": "sparrow.generate",
        "positions": getattr(target, "positions", None),  # the adapter's rule (Qwen); None: 1D positions
    }


def _open_index(out_dir: str, identity: dict, settings: dict) -> ShardIndex:
    """Load or create the index; adopt finished shards missing from it; drop stale .tmp files."""
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(os.path.join(out_dir, "index.json")):
        index = ShardIndex.load(out_dir)
        if not same_identity(index.target, identity):
            raise DataError(f"{out_dir}: holds data of target {index.target}, not of this target {identity}")
        if index.settings != settings:
            raise DataError(
                f"{out_dir}: was generated with settings {index.settings}; this run asks for {settings} "
                "(use another output folder, or the same settings to resume)"
            )
    else:
        index = ShardIndex(out_dir, identity, settings)
    known = index.files()
    for name in sorted(os.listdir(out_dir)):
        path = os.path.join(out_dir, name)
        if name.endswith(".tmp"):
            os.remove(path)  # an unfinished write of ours: its samples are not in any shard
        elif SHARD_RE.match(name) and name not in known:
            meta = shard_metadata(path)  # renamed, but the index update was lost: adopt it
            if not same_identity(meta["target"], identity):
                raise DataError(f"shard {path}: written for target {meta['target']}, not for {identity}")
            dup = set(meta["sample_ids"]) & index.sample_ids()
            if dup:
                raise DataError(f"shard {path}: samples {sorted(dup)[:5]} are already in other shards")
            index.add(name, meta["sample_ids"], 0)
    index.save()
    return index


def make_sample(target, record: dict, make_inputs, max_new_tokens: int, mid_pool: int,
                store_embeds: bool, store_dtype: torch.dtype | None, answers: str) -> dict:
    """One record -> the tensors of one sample (a batch of one through make_samples)."""
    inputs, given = host_inputs(record, make_inputs, target.model)
    (sample,) = make_samples(target, [(record, inputs, _given_answer(record, given, answers))], max_new_tokens,
                             mid_pool, store_embeds, store_dtype, _pad_id(target))
    if isinstance(sample, Exception):
        raise sample
    return sample


def _groups(signatures: list) -> list[list[int]]:
    """Indices of a window's records that share a forward: equal signatures, first-seen order; a
    record whose signature is a reason shares none."""
    groups: dict = {}
    for i, sig in enumerate(signatures):
        groups.setdefault(("solo", i) if isinstance(sig, str) else sig, []).append(i)
    return list(groups.values())


def generate_data(
    target,
    records,
    make_inputs,
    out_dir: str,
    max_new_tokens: int = 128,
    mid_pool: int = 1024,
    shard_size: int = 256,
    store_embeds: bool = False,
    store_dtype: torch.dtype | None = None,
    answers: str = "target",
    progress: bool = True,
    limit: int | None = None,
    batch_size: int = 4,
) -> dict:
    """Write (or finish) a data folder; returns a summary dict.

    target: a TargetAdapter (sparrow.targets.load_target). records: a JSONL path or in-memory
    records. make_inputs: the processor (records.py). mid_pool: most layer-L/2 visual states kept
    per sample (average-pooled beyond; 0: all). store_dtype: dtype of the stored features
    (None: the target's). answers: "target" (self-distillation) or "given". limit: stop after this
    many new samples (the rest waits for a later run). batch_size: records per forward (the data
    are the same for every batch size, so a folder may be resumed with another)."""
    if answers not in ("target", "given"):
        raise ValueError(f"answers must be 'target' or 'given', got {answers!r}")
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    records = load_records(records)
    identity = target.identity()
    settings = _settings(max_new_tokens, mid_pool, store_embeds, store_dtype or next(target.model.parameters()).dtype,
                         answers, target)
    index = _open_index(out_dir, identity, settings)
    done = index.sample_ids()
    todo = [r for r in records if r["id"] not in done]
    if limit is not None:
        todo = todo[:limit]
    pad_id = _pad_id(target)
    t0 = time.perf_counter()
    written, new_shards, tokens, agree, forwards = 0, [], 0, [0, 0], 0
    split_said = False
    buffer: list[tuple[str, dict]] = []

    def flush():
        nonlocal buffer
        if not buffer:
            return
        name = shard_name(index.next_number())
        write_shard(os.path.join(out_dir, name), buffer, identity)
        n_tok = sum(int(s["input_ids"].shape[0]) for _, s in buffer)
        index.add(name, [sid for sid, _ in buffer], n_tok)
        index.save()
        new_shards.append(name)
        buffer = []

    bar = tqdm(total=len(records), initial=sum(r["id"] in done for r in records), desc="gen-data",
               unit="sample", disable=not progress)
    try:
        for lo in range(0, len(todo), batch_size):
            # The window's inputs in host memory; a record that fails here ends the run after the
            # records before it are done, as one record at a time would.
            window, failure = [], None
            for rec in todo[lo : lo + batch_size]:
                try:
                    inputs, given = host_inputs(rec, make_inputs, target.model)
                    window.append((rec, inputs, _given_answer(rec, given, answers)))
                except Exception as e:
                    failure = e
                    break
            signatures = [batch_signature(x) for _, x, _ in window]
            groups = _groups(signatures)
            if len(groups) > 1 and not split_said:
                i, j = groups[0][0], groups[1][0]
                warnings.warn(f"gen-data: samples {window[i][0]['id']!r} and {window[j][0]['id']!r} cannot share a "
                              f"forward ({_difference(signatures[i], signatures[j])}); such records go to separate "
                              "forwards (the data are the same, only slower)", stacklevel=2)
                split_said = True
            results: list = [None] * len(window)
            for g in groups:
                for i, r in zip(g, make_samples(target, [window[i] for i in g], max_new_tokens, mid_pool,
                                                store_embeds, store_dtype, pad_id)):
                    results[i] = r
                forwards += 1
            for (rec, _, _), sample in zip(window, results):
                if isinstance(sample, Exception):
                    raise sample
                a = sample.pop("_agree", (0, 0))
                agree[0] += a[0]
                agree[1] += a[1]
                buffer.append((rec["id"], sample))
                written += 1
                tokens += int(sample["input_ids"].shape[0])
                bar.update(1)
                if len(buffer) >= shard_size:
                    flush()
            del window, results
            if failure is not None:
                raise failure
    finally:
        flush()  # keep what is finished, even on an error or Ctrl-C
        bar.close()
    summary = {
        "out_dir": out_dir,
        "new_samples": written,
        "skipped_done": len(done),
        "total_samples": index.num_samples,
        "new_shards": new_shards,
        "total_shards": len(index.shards),
        "new_tokens": tokens,
        "seconds": round(time.perf_counter() - t0, 3),
        "feature_argmax_agreement": (agree[0] / agree[1]) if agree[1] else None,
        "batch_size": batch_size,
        "forwards": forwards,
        "target": identity,
        "settings": settings,
    }
    return summary


def format_summary(s: dict) -> str:
    agree = s["feature_argmax_agreement"]
    return (
        f"gen-data: wrote {s['new_samples']} new samples ({s['new_tokens']} tokens) in {len(s['new_shards'])} shards "
        f"in {s['seconds']:.1f}s; skipped {s['skipped_done']} already done; {s['out_dir']} now holds "
        f"{s['total_samples']} samples in {s['total_shards']} shards"
        + (f"; lm_head(h) reproduces {100 * agree:.1f}% of the answer tokens" if agree is not None else "")
    )
