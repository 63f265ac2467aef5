"""Word-level tokenizer of the world's language: one id per word or punctuation mark.

Special tokens follow Qwen2.5-VL's names so the processor-style inputs look like the real family's:
  <|endoftext|>  padding            <|im_start|> / <|im_end|>  turn markers; <|im_end|> is EOS
  <|vision_start|> / <|vision_end|> around the video     <|video_pad|>  one per visual token
  <|image_pad|>  image placeholder (unused by the world)  <unk>  anything outside the vocabulary
Text is lower-cased and punctuation (. , ? ;) is split off; decode() joins words with spaces and
glues punctuation back to the previous word.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|video_pad|>", "<|image_pad|>", "<unk>")
ROLE_WORDS = ("user", "assistant")
_PUNCT = re.compile(r"([.,?;])")


def split_words(text: str) -> list[str]:
    return _PUNCT.sub(r" \1 ", text.lower()).split()


class WordTokenizer:
    def __init__(self, words):
        words = [w for w in words if w not in SPECIAL_TOKENS]
        if len(set(words)) != len(words):
            raise ValueError("duplicate words in the vocabulary")
        self.tokens = list(SPECIAL_TOKENS) + list(words)
        self.ids = {t: i for i, t in enumerate(self.tokens)}
        self.pad_token, self.eos_token, self.unk_token = "<|endoftext|>", "<|im_end|>", "<unk>"
        self.video_token, self.image_token = "<|video_pad|>", "<|image_pad|>"
        self.pad_token_id = self.ids["<|endoftext|>"]
        self.eos_token_id = self.ids["<|im_end|>"]
        self.im_start_id = self.ids["<|im_start|>"]
        self.vision_start_token_id = self.ids["<|vision_start|>"]
        self.vision_end_token_id = self.ids["<|vision_end|>"]
        self.video_token_id = self.ids["<|video_pad|>"]
        self.image_token_id = self.ids["<|image_pad|>"]
        self.unk_token_id = self.ids["<unk>"]
        self.special_ids = frozenset(self.ids[t] for t in SPECIAL_TOKENS)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.ids.get(tokens, self.unk_token_id)
        return [self.ids.get(t, self.unk_token_id) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.tokens[ids]
        return [self.tokens[int(i)] for i in ids]

    def encode(self, text: str) -> list[int]:
        """Words of plain text to ids (special tokens written in the text are kept as such)."""
        out = []
        for piece in re.split(r"(<\|[a-z_]+\|>|<unk>)", text):
            if piece in self.ids and piece in SPECIAL_TOKENS:
                out.append(self.ids[piece])
            else:
                out += [self.ids.get(w, self.unk_token_id) for w in split_words(piece)]
        return out

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        words = [self.tokens[i] for i in ids if i >= 0 and not (skip_special_tokens and i in self.special_ids)]
        return re.sub(r" ([.,?;])", r"\1", " ".join(words))

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return [self.decode(row, skip_special_tokens) for row in batch]

    # -- files --------------------------------------------------------------------------------
    def save(self, path) -> None:
        path = Path(path)
        if path.is_dir() or path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {"type": "sparrow-word-tokenizer", "special_tokens": list(SPECIAL_TOKENS), "tokens": self.tokens}
        path.write_text(json.dumps(data, indent=0) + "\n")

    @classmethod
    def load(cls, path) -> "WordTokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        data = json.loads(path.read_text())
        if data.get("type") != "sparrow-word-tokenizer" or tuple(data["special_tokens"]) != SPECIAL_TOKENS:
            raise ValueError(f"{path}: not a sparrow word tokenizer with the expected special tokens")
        return cls(data["tokens"][len(SPECIAL_TOKENS):])


def build_vocab(num_seeds: int = 3000) -> WordTokenizer:
    """The vocabulary of the grammar: every word of the questions and of the answers of seeds
    0..num_seeds-1, plus every word the grammar's tables hold (sorted, so it is deterministic)."""
    from sparrow.world import language as L
    from sparrow.world import scene as S

    words = set(ROLE_WORDS)
    tables = [L.QUESTIONS, *L.AUX_QUESTIONS.values(), L.COUNT.values(), L.LOCATION.values(), L.MOVE_VERBS, S.SHAPES, S.COLOURS,
              S.BACKGROUNDS, S.SIZES, S.SPEEDS, S.DIRECTIONS, S.EDGE_OF.values()]
    tables += list(L.DIR_PHRASES.values()) + list(L.PHASES.values()) + list(L.ORDINALS.values())
    for table in tables:
        for phrase in table:
            words.update(split_words(phrase))
    for seed in range(num_seeds):
        q, a = L.make_qa(seed)
        words.update(split_words(q))
        words.update(split_words(a))
    return WordTokenizer(sorted(words))
