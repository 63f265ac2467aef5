"""`sparrow records`: a folder of videos (and images) + questions -> records JSONL (records.py).

    sparrow records --videos clips/ --questions questions.txt > records.jsonl

The questions file is either
- text, one question per line: every video is asked every question; or
- JSONL, one {"prompt": ..., "video": NAME (optional), "answer": ... (optional)} per line: a line
  with "video" (a file name in the folder, with or without its suffix) asks that video only, a
  line without asks them all.
Ids are the file's stem (its whole name where two files share a stem), with "#k" (k-th question
of that video) when it has several.
"""

from __future__ import annotations

import json
import os

from sparrow.inputs.video import VIDEO_SUFFIXES
from sparrow.train.records import IMAGE_SUFFIXES, RecordError


def visual_files(folder: str) -> list[str]:
    """The video and image files directly in `folder`, by name."""
    if not os.path.isdir(folder):
        raise RecordError(f"--videos {folder}: not a folder")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(VIDEO_SUFFIXES + IMAGE_SUFFIXES))
    if not names:
        raise RecordError(f"--videos {folder}: no video ({', '.join(VIDEO_SUFFIXES)}) or image files in it")
    return [os.path.join(os.path.abspath(folder), n) for n in names]


def read_questions(path: str) -> list[dict]:
    """[{"prompt": ..., optional "video" and "answer"}] from a text or JSONL questions file."""
    with open(path, encoding="utf-8") as f:
        lines = [(i, line.strip()) for i, line in enumerate(f, 1) if line.strip()]
    if not lines:
        raise RecordError(f"--questions {path}: no questions in it")
    if not lines[0][1].startswith("{"):
        return [{"prompt": line} for _, line in lines]
    out = []
    for i, line in lines:
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}:{i}: not valid JSON ({e})") from None
        if not isinstance(q, dict) or not isinstance(q.get("prompt"), str) or not q["prompt"]:
            raise RecordError(f"{path}:{i}: each line needs a non-empty string 'prompt'")
        if q.get("video") is not None and not isinstance(q["video"], str):
            raise RecordError(f"{path}:{i}: 'video' must be a file name (a string)")
        out.append(q)
    return out


def _matches(question: dict, path: str) -> bool:
    name = question.get("video")
    if name is None:
        return True
    base = os.path.basename(path)
    return name in (base, os.path.splitext(base)[0])


def records_from_folder(folder: str, questions_path: str, sampling: dict | None = None) -> list[dict]:
    """One record per (file, question that asks it); `sampling` ("fps", "num_frames",
    "max_pixels") is copied into every video record."""
    files, questions = visual_files(folder), read_questions(questions_path)
    named = {q["video"] for q in questions if q.get("video") is not None}
    unknown = named - {n for p in files for n in (os.path.basename(p), os.path.splitext(os.path.basename(p))[0])}
    if unknown:
        raise RecordError(f"--questions {questions_path}: no file in {folder} for {sorted(unknown)}")
    stems = [os.path.splitext(os.path.basename(p))[0] for p in files]
    records = []
    for path, stem in zip(files, stems):
        asked = [q for q in questions if _matches(q, path)]
        if stems.count(stem) > 1:  # clip.mp4 and clip.mkv: the file names tell them apart
            stem = os.path.basename(path)
        is_image = path.lower().endswith(IMAGE_SUFFIXES)
        for k, q in enumerate(asked):
            rec = {"id": stem if len(asked) == 1 else f"{stem}#{k}", "image" if is_image else "video": path,
                   "prompt": q["prompt"]}
            if q.get("answer") is not None:
                rec["answer"] = q["answer"]
            if not is_image:
                rec |= {key: val for key, val in (sampling or {}).items() if val is not None}
            records.append(rec)
    return records
