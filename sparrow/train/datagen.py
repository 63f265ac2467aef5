"""`sparrow gen-data`: the target writes its own training data (self-distillation).

For every record (sparrow/train/records.py): build the prompt's inputs with the processor, let the
target answer greedily (Hugging Face `generate`, do_sample=False, at most `max_new_tokens`; the
answer ends with the eos token when the target emits one), then run the adapter's prefill over
prompt + answer, the answer at the positions decoding gives it (`continuation`; see
targets/qwen2_vl.py for why that matters), and keep what the draft is trained on
(sparrow/train/shards.py lists the tensors): the features h at the text positions and the
layer-L/2 hidden states at the visual positions, average-pooled to at most `mid_pool` states.

With `answers="given"` the record's own answer is used instead ("answer_ids" in the record, or
from the processor's dict); the draft then learns the data's answers, not the target's.

Resumable: samples whose id is in a finished shard are skipped; a shard is written atomically,
then the index; an interruption (error, Ctrl-C) first writes the samples finished so far.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sparrow.generation import eos_token_ids
from sparrow.train.records import RecordError, load_records, prepare_inputs
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


def pool_states(x: torch.Tensor, limit: int) -> torch.Tensor:
    """[N, H] -> [min(N, limit), H]: average of contiguous groups in sequence order
    (adaptive_avg_pool1d); limit <= 0 keeps all N."""
    if limit <= 0 or x.shape[0] <= limit:
        return x
    return F.adaptive_avg_pool1d(x.T.unsqueeze(0).float(), limit)[0].T.to(x.dtype)


def extend_inputs(inputs: dict, answer: torch.Tensor) -> dict:
    """The prompt's processor dict with the answer ids [1, A] appended (text positions):
    attention_mask gets ones, per-token type ids get zeros (text)."""
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


@torch.no_grad()
def target_answer(model, inputs: dict, max_new_tokens: int, eos=(), placeholders=()) -> torch.Tensor:
    """The target's own greedy answer [1, A], cut after the first eos (kept) and before the first
    visual placeholder id (dropped: a placeholder without pixels is no valid input; real targets do
    not emit them, tiny random ones do)."""
    out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=max_new_tokens)
    out = out.sequences if hasattr(out, "sequences") else out
    answer = out[:, inputs["input_ids"].shape[1] :]
    for i, tok in enumerate(answer[0].tolist()):
        if tok in placeholders:
            return answer[:, :i]
        if tok in eos:
            return answer[:, : i + 1]
    return answer


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


@torch.no_grad()
def make_sample(target, record: dict, make_inputs, max_new_tokens: int, mid_pool: int,
                store_embeds: bool, store_dtype: torch.dtype | None, answers: str) -> dict:
    """One record -> the tensors of one sample (sparrow/train/shards.py)."""
    name = f"sample {record['id']!r}"
    model = target.model
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs, given = prepare_inputs(record, make_inputs, model)
    if answers == "given":
        given = record.get("answer_ids") if record.get("answer_ids") is not None else given
        if given is None:
            raise RecordError(f"{name}: answers='given' but neither the record nor the processor gives answer_ids")
        answer = torch.as_tensor(given, dtype=torch.long, device=device).reshape(1, -1)
    else:
        placeholders = set(target.placeholder_ids()) if hasattr(target, "placeholder_ids") else set()
        answer = target_answer(model, inputs, max_new_tokens, eos_token_ids(target, None), placeholders)
    if answer.shape[1] == 0:
        raise RecordError(f"{name}: empty answer")
    full = extend_inputs(inputs, answer)
    out = target.prefill(full, want_visual_embeds=store_embeds, want_visual_mid=True, continuation=answer.shape[1],
                         decode_slots=None)  # features only: no cache
    live = full["attention_mask"][0].bool()  # a batch of one: no padding unless the processor added some
    ids = out.input_ids[0][live]
    vis = out.visual_mask[0][live]
    txt = out.text_mask[0][live]
    S = ids.shape[0]
    P = S - answer.shape[1]
    if not torch.equal(ids[P:], answer[0]):
        raise RecordError(f"{name}: the adapter's input_ids do not end with the answer")
    if out.visual_mid is None:
        raise RecordError(f"{name}: the adapter returned no visual_mid (want_visual_mid=True)")
    sd = store_dtype or dtype
    feats = out.features[0][live][txt]
    sample = {
        "input_ids": ids.long(),
        "visual_mask": vis.bool(),
        "text_mask": txt.bool(),
        "prompt_len": torch.tensor([P], dtype=torch.long),
        "features": feats.to(sd),
        "visual_mid": pool_states(out.visual_mid[0][live][vis], mid_pool).to(sd),
    }
    if store_embeds:
        if out.visual_embeds is None:
            raise RecordError(f"{name}: the adapter returned no visual_embeds (want_visual_embeds=True)")
        sample["visual_embeds"] = pool_states(out.visual_embeds[0][live][vis], mid_pool).to(sd)
    # How well the stored features reproduce the answer (self-distillation: should be ~1).
    head = target.lm_head()
    txt_pos = torch.nonzero(txt).flatten()
    ans_rows = (txt_pos >= P - 1) & (txt_pos < S - 1)
    if bool(ans_rows.any()):
        pred = head(feats[ans_rows].to(head.weight.dtype)).argmax(-1)
        nxt = ids[txt_pos[ans_rows] + 1]
        sample["_agree"] = (int((pred == nxt).sum()), int(ans_rows.sum()))
    return sample


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
) -> dict:
    """Write (or finish) a data folder; returns a summary dict.

    target: a TargetAdapter (sparrow.targets.load_target). records: a JSONL path or in-memory
    records. make_inputs: the processor (records.py). mid_pool: most layer-L/2 visual states kept
    per sample (average-pooled beyond; 0: all). store_dtype: dtype of the stored features
    (None: the target's). answers: "target" (self-distillation) or "given". limit: stop after this
    many new samples (the rest waits for a later run)."""
    if answers not in ("target", "given"):
        raise ValueError(f"answers must be 'target' or 'given', got {answers!r}")
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    records = load_records(records)
    identity = target.identity()
    settings = _settings(max_new_tokens, mid_pool, store_embeds, store_dtype or next(target.model.parameters()).dtype,
                         answers, target)
    index = _open_index(out_dir, identity, settings)
    done = index.sample_ids()
    todo = [r for r in records if r["id"] not in done]
    if limit is not None:
        todo = todo[:limit]
    t0 = time.perf_counter()
    written, new_shards, tokens, agree = 0, [], 0, [0, 0]
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
        for rec in todo:
            sample = make_sample(target, rec, make_inputs, max_new_tokens, mid_pool, store_embeds, store_dtype, answers)
            a = sample.pop("_agree", (0, 0))
            agree[0] += a[0]
            agree[1] += a[1]
            buffer.append((rec["id"], sample))
            written += 1
            tokens += int(sample["input_ids"].shape[0])
            bar.update(1)
            if len(buffer) >= shard_size:
                flush()
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
