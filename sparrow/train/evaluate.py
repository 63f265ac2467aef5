"""`sparrow eval`: speculative decoding with each draft against autoregressive decoding.

For every record of a held-out set (records.py) and every method (autoregressive: the target alone
through the same loop with no draft tokens; then each draft given, e.g. Sparrow and the "mid" /
"embed" baselines), `sparrow.generate` runs one request (batch of one) and its stats are kept.
Records are taken one at a time, every method on the same inputs: only that record's pixels are
on the device, and the next record is loaded when it is done.
Figures, per method (DESIGN.md's words):

    accepted_per_step   draft tokens accepted per verify step (the new token not counted)
    tokens_per_step     accepted_per_step + 1 (EAGLE's tau)
    DSR                 sum of AR decode time / sum of this method's decode time (after prefill)
    ESR                 the same for the whole request (vision encoding and prefill included)
    tokens_per_s        new tokens / whole-request time; decode_tokens_per_s after prefill
    lossless            greedy only: the fraction of requests whose tokens equal AR's exactly

Both times sum over the same requests. With several visual lengths in the set, the figures are
also given per group: a record's "group" key, else its number of visual placeholder tokens.
Before timing, each method runs `warmup` untimed requests (the first record). Results go to
`<out>.json` and `<out>.md` (markdown table), with the device, versions and settings beside them.
"""

from __future__ import annotations

import json
import os
import platform
import time

import torch
from tqdm.auto import tqdm

from sparrow.train.records import host_inputs, load_records, to_device

AR = "autoregressive"


def _group(record: dict, inputs: dict, target) -> str:
    if record.get("group") is not None:
        return str(record["group"])
    ids = inputs["input_ids"][inputs["attention_mask"].bool()] if "attention_mask" in inputs else inputs["input_ids"]
    holders = target.placeholder_ids() if hasattr(target, "placeholder_ids") else ()
    n = int(sum((ids == t).sum() for t in holders)) if holders else 0
    return f"{n} visual"


def _ms_per_step(rows: list, key: str, row_steps: int):
    """Mean ms per verify step of a stage, or None when its times were not taken."""
    if not row_steps or any(r.get(key) is None for r in rows):
        return None
    return 1000 * sum(r[key] for r in rows) / row_steps


def aggregate(rows: list[dict], methods: list[str], greedy: bool = True) -> dict:
    """Per method figures over `rows` (one per request and method; times summed over requests).
    `lossless` (the share of answers equal to autoregressive's) needs rows with ids and tokens."""
    by = {m: [r for r in rows if r["method"] == m] for m in methods}
    ar = by.get(AR, [])
    ar_decode = sum(r["decode_s"] for r in ar)
    ar_total = sum(r["total_s"] for r in ar)
    ar_tokens = {r["id"]: r["tokens"] for r in ar if "tokens" in r}
    out = {}
    for m, rs in by.items():
        if not rs:
            continue
        row_steps = sum(r["row_steps"] for r in rs)
        accepted = sum(r["accepted_per_step"] * r["row_steps"] for r in rs)
        decode = sum(r["decode_s"] for r in rs)
        total = sum(r["total_s"] for r in rs)
        new = sum(r["new_tokens"] for r in rs)
        first = len(rs)  # each request's first token comes from the prefill
        aps = accepted / row_steps if row_steps else 0.0
        out[m] = {
            "requests": len(rs),
            "new_tokens": new,
            "steps": row_steps,
            "accepted_per_step": aps,
            "tokens_per_step": aps + 1.0,
            "decode_s": decode,
            "total_s": total,
            "prefill_s": sum(r["prefill_s"] for r in rs),
            # where a verify step's time goes: drafting (propose + commit) and target verify
            "draft_ms_per_step": _ms_per_step(rs, "draft_s", row_steps),
            "verify_ms_per_step": _ms_per_step(rs, "verify_s", row_steps),
            "DSR": ar_decode / decode if decode > 0 and ar else None,
            "ESR": ar_total / total if total > 0 and ar else None,
            "tokens_per_s": new / total if total > 0 else None,
            "decode_tokens_per_s": (new - first) / decode if decode > 0 else None,
            "lossless": (sum(r.get("tokens") == ar_tokens.get(r.get("id")) for r in rs) / len(rs))
            if ar_tokens and greedy else None,
        }
    return out


def evaluate(
    target,
    records,
    make_inputs,
    drafts: dict,
    max_new_tokens: int = 128,
    chain: int | None = None,
    tree=None,
    temperature: float = 0.0,
    warmup: int = 1,
    out: str | None = None,
    progress: bool = True,
    limit: int | None = None,
) -> dict:
    """Evaluate `drafts` ({name: SparrowDraft}) against autoregressive decoding on `records`.

    target: a TargetAdapter. chain / tree: the drafting shape (sparrow.generate's; neither: its
    default tree). out: path prefix for <out>.json and <out>.md (None: nothing written).
    Returns {"methods", "overall": {method: figures}, "groups": {group: {method: figures}},
    "requests": [...], "settings", "environment"}."""
    from sparrow.generation import generate

    records = load_records(records)
    if limit is not None:
        records = records[:limit]
    if not records:
        raise ValueError("eval: no records")
    methods = [AR] + [m for m in drafts if m != AR]
    model = target.model
    p = next(model.parameters())
    device = p.device

    # Stage times synchronise after every stage: free on a CPU, but on CUDA they would slow the
    # method with more steps (autoregressive) more and inflate DSR, so there they are left out.
    stage_times = device.type != "cuda"

    def run(method, inputs):
        draft = None if method == AR else drafts[method]
        kw = {} if draft is None else ({"chain": chain} if chain else {"tree": tree})
        return generate(target, draft, inputs, max_new_tokens, temperature=temperature, seed=0,
                        time_stages=stage_times, **kw)

    def on_device(rec):
        """The record's inputs on the device (the only pixels there while it runs) and its group."""
        inputs, _ = host_inputs(rec, make_inputs, model)
        return to_device(inputs, device, p.dtype), _group(rec, inputs, target)

    # Record by record, every method on the same inputs; only one record's pixels are on the device
    # at a time (the processor runs once per record).
    rows, group_of = [], {}
    if warmup > 0:
        inputs, _ = on_device(records[0])
        for method in methods:
            for _ in range(warmup):
                run(method, inputs)
        del inputs
    bar = tqdm(total=len(methods) * len(records), desc="eval", unit="request", disable=not progress)
    for rec in records:
        inputs, group = on_device(rec)
        group_of[rec["id"]] = group
        for method in methods:
            res = run(method, inputs)
            s = res.stats
            rows.append({
                "id": rec["id"], "group": group, "method": method, "tokens": list(res.tokens[0]),
                "new_tokens": s.new_tokens, "row_steps": s.row_steps, "accepted_per_step": s.accepted_per_step,
                "prefill_s": s.prefill_s, "decode_s": s.decode_s, "total_s": s.total_s,
                "draft_s": s.draft_s if stage_times else None, "verify_s": s.verify_s if stage_times else None,
            })
            bar.update(1)
        del inputs
    bar.close()
    rows.sort(key=lambda r: methods.index(r["method"]))  # method by method, records in order (stable)
    groups = sorted(set(group_of.values()), key=_group_key)
    result = {
        "methods": methods,
        "overall": aggregate(rows, methods, temperature == 0),
        "groups": {g: aggregate([r for r in rows if r["group"] == g], methods, temperature == 0) for g in groups}
        if len(groups) > 1 else {},
        "requests": rows,
        "settings": {"max_new_tokens": max_new_tokens, "chain": chain, "tree": None if tree is None else vars(tree),
                     "temperature": temperature, "warmup": warmup, "records": len(records),
                     "drafts": {m: drafts[m].config.to_dict() for m in methods if m != AR}},
        "environment": environment(device),
    }
    if out:
        write_results(result, out)
    return result


def _group_key(g: str):
    head = g.split(" ")[0]
    return (0, int(head), g) if head.isdigit() else (1, 0, g)


def environment(device) -> dict:
    import transformers

    env = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
           "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if torch.device(device).type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    else:
        env["cpu"] = platform.processor() or platform.machine()
        env["threads"] = torch.get_num_threads()
    return env


def _fmt(x, spec=".2f", suffix=""):
    return "-" if x is None else f"{x:{spec}}{suffix}"


def markdown_table(figs: dict) -> str:
    lines = [
        "| method | accepted/step | tokens/step | DSR | ESR | tokens/s | decode tokens/s | lossless | requests |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, f in figs.items():
        lines.append(
            f"| {m} | {_fmt(f['accepted_per_step'])} | {_fmt(f['tokens_per_step'])} | {_fmt(f['DSR'], '.2f', 'x')} | "
            f"{_fmt(f['ESR'], '.2f', 'x')} | {_fmt(f['tokens_per_s'], '.1f')} | {_fmt(f['decode_tokens_per_s'], '.1f')} | "
            f"{_fmt(f['lossless'], '.0%')} | {f['requests']} |"
        )
    return "\n".join(lines)


def write_results(result: dict, out: str) -> tuple[str, str]:
    """<out>.json and <out>.md."""
    base = out[:-5] if out.endswith(".json") else out[:-3] if out.endswith(".md") else out
    os.makedirs(os.path.dirname(os.path.abspath(base)), exist_ok=True)
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    env = result["environment"]
    st = result["settings"]
    parts = [
        "# sparrow eval",
        "",
        f"{st['records']} requests, max_new_tokens {st['max_new_tokens']}, temperature {st['temperature']}, "
        f"{'chain ' + str(st['chain']) if st['chain'] else 'tree ' + json.dumps(st['tree'])}; device {env.get('gpu', env['device'])}, "
        f"torch {env['torch']}, transformers {env['transformers']}. accepted/step excludes the new token; "
        "tokens/step = accepted/step + 1. DSR / ESR: autoregressive time over this method's time, after "
        "prefill / whole request.",
        "",
        markdown_table(result["overall"]),
    ]
    for g, figs in result["groups"].items():
        parts += ["", f"## {g}", "", markdown_table(figs)]
    with open(base + ".md", "w") as f:
        f.write("\n".join(parts) + "\n")
    return base + ".json", base + ".md"
