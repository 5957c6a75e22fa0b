"""The dataset of the differential harness (tests/test_differential.py); module level so spawn
and forkserver workers import it.

:class:`TreeDataset` holds a nested structure (dicts, tuples, lists) of NumPy arrays and
``bytearray`` leaves; ``dataset[i]`` describes what the process computing it sees: a SHA-256
of every leaf's bytes, dtype and shape, plus one element picked by ``i``. The harness
compares these with the same dataset iterated in the main process, so any stale, mixed or
wrongly shared buffer in a worker shows up as a difference.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def leaves(tree: Any, path: str = "") -> list[tuple[str, Any]]:
    """``(path, leaf)`` pairs of ``tree`` in a fixed order (dict keys sorted)."""
    if isinstance(tree, dict):
        return [p for k in sorted(tree) for p in leaves(tree[k], f"{path}/{k}")]
    if isinstance(tree, (tuple, list)):
        return [p for i, v in enumerate(tree) for p in leaves(v, f"{path}/{i}")]
    return [(path, tree)]


def replace_leaf(tree: Any, path: str, new: Any) -> Any:
    """A copy of ``tree``'s containers with the leaf at ``path`` replaced by ``new``."""
    if not path:
        return new
    head, _, rest = path.lstrip("/").partition("/")
    rest = "/" + rest if rest else ""
    if isinstance(tree, dict):
        return {k: (replace_leaf(v, rest, new) if k == head else v) for k, v in tree.items()}
    items = [replace_leaf(v, rest, new) if str(i) == head else v for i, v in enumerate(tree)]
    return tuple(items) if isinstance(tree, tuple) else items


def describe(leaf: Any, i: int) -> tuple:
    """What a batch reports about one leaf: digest of its contents, dtype, shape, element i."""
    if isinstance(leaf, bytearray):
        probe = leaf[i % len(leaf)] if leaf else None
        return ("bytearray", len(leaf), hashlib.sha256(leaf).hexdigest(), probe)
    a = np.asarray(leaf)
    flat = a.reshape(-1)
    probe = flat[i % flat.size].tobytes() if flat.size else None
    digest = hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
    return (str(a.dtype), a.shape, digest, probe)


class TreeDataset:
    """``n`` batches over a nested structure of arrays; ``dataset[i]`` describes the state.

    Args:
        tree (object): dicts, tuples and lists of ``numpy.ndarray`` and ``bytearray``.
        n (int): number of batches (default: 3).
    """

    def __init__(self, tree: Any, n: int = 3) -> None:
        self.tree = tree
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple:
        return i, [(path, describe(leaf, i)) for path, leaf in leaves(self.tree)]
