"""Real English text present in every CPython: the language reference topics of pydoc_data."""

from __future__ import annotations


def pydoc_topics(split: str) -> list[str]:
    """Topics sorted by name; every 8th one (starting at 0) is held out, the rest is 'train'."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    if split == "heldout":
        return [topics[n] for i, n in enumerate(names) if i % 8 == 0]
    if split == "train":
        return [topics[n] for i, n in enumerate(names) if i % 8 != 0]
    raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
