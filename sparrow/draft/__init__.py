"""Sparrow's draft model: HSR input + one decoder layer over a text-only KV cache (VATA)."""

from sparrow.draft.cache import DraftCache
from sparrow.draft.config import DraftConfig
from sparrow.draft.model import SparrowDraft

__all__ = ["DraftCache", "DraftConfig", "SparrowDraft"]
