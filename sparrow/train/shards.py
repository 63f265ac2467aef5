"""Training data on disk: safetensors shards plus one JSON index, written by `sparrow gen-data`.

A data folder holds

    index.json                      the index (below)
    shard-00000.safetensors ...     finished shards; never rewritten once they exist

A shard holds up to `shard_size` samples. Sample k of a shard has the tensors

    s{k}.input_ids    int64 [S]     prompt + answer token ids, as the target read them
    s{k}.visual_mask  bool  [S]     visual (placeholder) positions
    s{k}.text_mask    bool  [S]     text positions (every non-visual position; no padding)
    s{k}.prompt_len   int64 [1]     P: positions >= P are the answer (the target's own, greedy)
    s{k}.features     float [T, H]  the target's feature h (DESIGN.md, HSR) at the T text positions,
                                    in order; from the adapter's prefill over prompt + answer
    s{k}.visual_mid   float [M, H]  the target's layer-L/2 hidden states at the visual positions,
                                    in order, average-pooled to M <= `mid_pool` states when there
                                    are more (contiguous groups, adaptive_avg_pool1d), for IVSB
    s{k}.visual_embeds float [M, H] (optional, `--store-embeds`) the visual input embeddings,
                                    pooled the same way, for the MSD-style "embed" baseline

and the safetensors metadata {"format", "target" (JSON identity), "sample_ids" (JSON list, k-th id =
sample k)}. The index is JSON: {"format", "target": the target's identity
(TargetAdapter.identity()), "settings": the generation settings, "shards": [{"file", "samples":
[ids], "tokens"}], "num_samples"}.

Crash safety: a shard is written to `<name>.tmp` and renamed (atomic), then the index is rewritten
(also tmp + rename). A shard that exists but is missing from the index (a crash between the two) is
adopted on the next run; leftover `.tmp` files are unfinished and removed.
"""

from __future__ import annotations

import json
import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT = "sparrow-data-v1"
INDEX_NAME = "index.json"
SHARD_RE = re.compile(r"^shard-(\d{5,})\.safetensors$")
REQUIRED = ("input_ids", "visual_mask", "text_mask", "prompt_len", "features", "visual_mid")
OPTIONAL = ("visual_embeds",)


class DataError(ValueError):
    """Bad training data; the message names the shard and the sample."""


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def _atomic_write_text(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def identity_json(identity: dict) -> str:
    return json.dumps(identity, sort_keys=True)


def same_identity(a: dict, b: dict) -> bool:
    return identity_json(a) == identity_json(b)


def write_shard(path: str, samples: list[tuple[str, dict]], target: dict) -> None:
    """Write samples [(id, tensors)] to `path` atomically; refuses to replace an existing shard."""
    if os.path.exists(path):
        raise FileExistsError(f"{path} exists: finished shards are never overwritten")
    tensors = {}
    for k, (sid, sample) in enumerate(samples):
        for key in REQUIRED + OPTIONAL:
            if key in sample and sample[key] is not None:
                tensors[f"s{k}.{key}"] = sample[key].detach().to("cpu").contiguous()
            elif key in REQUIRED:
                raise DataError(f"sample {sid!r}: missing tensor {key!r}")
    meta = {"format": FORMAT, "target": identity_json(target), "sample_ids": json.dumps([s for s, _ in samples])}
    tmp = path + ".tmp"
    save_file(tensors, tmp, metadata=meta)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_metadata(path: str) -> dict:
    """The shard's metadata: format, target (dict), sample_ids (list)."""
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise DataError(f"shard {path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT:
        raise DataError(f"shard {path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return {"format": meta["format"], "target": json.loads(meta["target"]), "sample_ids": json.loads(meta["sample_ids"])}


class ShardIndex:
    """index.json of a data folder."""

    def __init__(self, root: str, target: dict, settings: dict, shards: list | None = None):
        self.root = root
        self.target = target
        self.settings = settings
        self.shards = shards or []

    @property
    def path(self) -> str:
        return os.path.join(self.root, INDEX_NAME)

    @classmethod
    def load(cls, root: str) -> "ShardIndex":
        path = os.path.join(root, INDEX_NAME)
        if not os.path.exists(path):
            raise DataError(f"{root}: no {INDEX_NAME} (not a sparrow data folder; make one with `sparrow gen-data`)")
        with open(path, encoding="utf-8") as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e})") from None
        if raw.get("format") != FORMAT:
            raise DataError(f"{path}: format {raw.get('format')!r}, expected {FORMAT!r}")
        return cls(root, raw["target"], raw.get("settings", {}), raw.get("shards", []))

    def save(self) -> None:
        body = {
            "format": FORMAT,
            "target": self.target,
            "settings": self.settings,
            "shards": self.shards,
            "num_samples": self.num_samples,
        }
        _atomic_write_text(self.path, json.dumps(body, indent=1) + "\n")

    @property
    def num_samples(self) -> int:
        return sum(len(s["samples"]) for s in self.shards)

    def sample_ids(self) -> set[str]:
        return {sid for s in self.shards for sid in s["samples"]}

    def files(self) -> set[str]:
        return {s["file"] for s in self.shards}

    def add(self, file: str, samples: list[str], tokens: int) -> None:
        self.shards.append({"file": file, "samples": list(samples), "tokens": int(tokens)})

    def next_number(self) -> int:
        """One past the largest shard number on disk or in the index (never reuses a name)."""
        nums = [-1]
        for name in list(self.files()) + os.listdir(self.root):
            m = SHARD_RE.match(name.removesuffix(".tmp"))
            if m:
                nums.append(int(m.group(1)))
        return max(nums) + 1


def _shape(f, key: str) -> tuple:
    return tuple(f.get_slice(key).get_shape())


def validate_sample(f, k: int, sid: str, where: str, hidden: int) -> dict:
    """Check sample k of an open shard: which tensors exist and their shapes; returns the small
    tensors (ids, masks) and the shapes. Every error names the shard and the sample."""
    name = f"{where}: sample {sid!r}"
    keys = set(f.keys())
    for key in REQUIRED:
        if f"s{k}.{key}" not in keys:
            raise DataError(f"{name}: missing tensor {key!r}")
    ids = f.get_tensor(f"s{k}.input_ids")
    vis = f.get_tensor(f"s{k}.visual_mask")
    txt = f.get_tensor(f"s{k}.text_mask")
    plen = f.get_tensor(f"s{k}.prompt_len")
    if ids.dim() != 1 or ids.dtype != torch.int64:
        raise DataError(f"{name}: input_ids must be int64 [S], got {ids.dtype} {tuple(ids.shape)}")
    S = ids.shape[0]
    for key, m in (("visual_mask", vis), ("text_mask", txt)):
        if m.dtype != torch.bool or tuple(m.shape) != (S,):
            raise DataError(f"{name}: {key} must be bool [{S}], got {m.dtype} {tuple(m.shape)}")
    if bool((vis & txt).any()):
        raise DataError(f"{name}: a position is both visual and text")
    if plen.numel() != 1:
        raise DataError(f"{name}: prompt_len must hold one number, got shape {tuple(plen.shape)}")
    P = int(plen.item())
    if not 0 < P < S:
        raise DataError(f"{name}: empty answer (prompt_len {P}, sequence length {S})")
    if not bool(txt[P:].all()):
        raise DataError(f"{name}: the answer (positions >= {P}) holds non-text positions")
    T, V = int(txt.sum()), int(vis.sum())
    feat = _shape(f, f"s{k}.features")
    if feat != (T, hidden):
        raise DataError(f"{name}: features has shape {feat}, expected ({T}, {hidden}) (text positions, hidden size)")
    for key in ("visual_mid",) + OPTIONAL:
        if f"s{k}.{key}" not in keys:
            continue
        shp = _shape(f, f"s{k}.{key}")
        if len(shp) != 2 or shp[1] != hidden or shp[0] > V or (V > 0 and shp[0] == 0):
            raise DataError(f"{name}: {key} has shape {shp}, expected (M, {hidden}) with 0 < M <= {V} visual positions")
    return {"input_ids": ids, "visual_mask": vis, "text_mask": txt, "prompt_len": P}


class ShardDataset:
    """The samples of a data folder, checked up front (index, shard metadata, every shape), read
    lazily: item i is a dict of tensors plus "id". Float tensors keep their stored dtype."""

    def __init__(self, root: str, target: dict | None = None, require: tuple = ()):
        self.index = ShardIndex.load(root)
        if target is not None and not same_identity(self.index.target, target):
            raise DataError(
                f"{root}: the data were generated by target {self.index.target}, not by this target {target}"
            )
        hidden = int(self.index.target["hidden_size"])
        self.items: list[tuple[str, int, str]] = []  # (shard path, k, id)
        self.small: list[dict] = []
        self._open: dict[str, object] = {}
        seen: dict[str, str] = {}
        for shard in self.index.shards:
            path = os.path.join(root, shard["file"])
            if not os.path.exists(path):
                raise DataError(f"{INDEX_NAME} lists {shard['file']}, which does not exist in {root}")
            meta = shard_metadata(path)
            if not same_identity(meta["target"], self.index.target):
                raise DataError(
                    f"shard {path}: written for target {meta['target']}, but the index is for {self.index.target}"
                )
            if meta["sample_ids"] != shard["samples"]:
                raise DataError(f"shard {path}: its sample ids differ from those {INDEX_NAME} lists")
            f = self._handle(path)
            for k, sid in enumerate(meta["sample_ids"]):
                if sid in seen:
                    raise DataError(f"sample {sid!r} appears twice ({seen[sid]} and {path})")
                seen[sid] = path
                small = validate_sample(f, k, sid, f"shard {path}", hidden)
                for key in require:
                    if f"s{k}.{key}" not in f.keys():
                        raise DataError(f"shard {path}: sample {sid!r}: has no {key!r} (generate with --store-embeds)")
                self.items.append((path, k, sid))
                self.small.append(small)

    def _handle(self, path: str):
        if path not in self._open:
            self._open[path] = safe_open(path, framework="pt")
        return self._open[path]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        path, k, sid = self.items[i]
        f = self._handle(path)
        out = dict(self.small[i], id=sid)
        for key in ("features", "visual_mid") + OPTIONAL:
            if f"s{k}.{key}" in f.keys():
                out[key] = f.get_tensor(f"s{k}.{key}")
        return out
