"""Sparrow: lossless speculative decoding for video LLMs (arXiv 2602.15318).

The draft reads the target's own late-layer text features and attends over text positions only,
so its cost does not grow with the video. See README.md for the tour and DESIGN.md for the method.

`import sparrow` stays light: the ops load at once; the draft, the loop and the target adapters
(which import transformers) load on first use of their names.
"""

from sparrow import ops, reference

__version__ = "0.1.0"

_LAZY = {
    "SparrowDraft": ("sparrow.draft.model", "SparrowDraft"),
    "DraftConfig": ("sparrow.draft.config", "DraftConfig"),
    "generate": ("sparrow.generation", "generate"),
    "SpeculativeGenerator": ("sparrow.generation", "SpeculativeGenerator"),
    "GenerationOutput": ("sparrow.generation", "GenerationOutput"),
    "TreeConfig": ("sparrow.drafting", "TreeConfig"),
    "load_target": ("sparrow.targets", "load_target"),
    "load_model": ("sparrow.targets", "load_model"),
    "checkpoint_processor": ("sparrow.inputs", "checkpoint_processor"),
    "read_video": ("sparrow.inputs", "read_video"),
}

__all__ = ["ops", "reference", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'sparrow' has no attribute {name!r}")
