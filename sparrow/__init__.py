"""Sparrow: lossless speculative decoding for video LLMs (arXiv 2602.15318).

The draft reads the target's own late-layer text features and attends over text positions only,
so its cost does not grow with the video. See README.md for the tour and DESIGN.md for the method.
"""

from sparrow import ops, reference

__version__ = "0.1.0"
__all__ = ["ops", "reference", "__version__"]
