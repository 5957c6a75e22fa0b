"""NumPy arrays <-> shared-memory blocks, and who unlinks what, when.

A worker process copies each big array of a batch into a
:class:`multiprocessing.shared_memory.SharedMemory` block and replaces it by a
:class:`ShmArray` descriptor (block name, shape, dtype, memory order); only the descriptor is
pickled and sent through the pipe. The main process attaches, copies the array out and
closes its handle, then tells the worker it may reuse the block. A 19 MB float32 batch thus
costs two ``memcpy`` instead of pickle + two kernel copies through the pipe + unpickle.

Blocks are *reused*: creating a block costs more than copying into it, because the kernel must
allocate and zero every page on first touch (measured here: 15 ms to create and fill a fresh
19 MB block, 1.1 ms to copy 19 MB into memory already mapped). Each worker keeps the blocks
the main process has released in a small free list (:data:`MAX_FREE_BLOCKS`) and fills them
again for later batches of the same size.

NOTE [ Shared-memory ownership ]
A block belongs to the worker that created it, for its whole life; only that worker unlinks
it, except after a crash:

1. The worker creates or reuses a block in :meth:`BlockPool.encode`; it stays "in use" under
   the batch's ``send_idx`` until the main process sends ``("release", send_idx)``. If the
   batch cannot be sent, the worker takes its blocks back at once (:meth:`BlockPool.release`).
2. The main process only attaches, copies and closes (:func:`decode`); it never unlinks a live
   worker's blocks. A batch nobody will read is released without being attached.
3. When the worker exits - told to stop, on SIGTERM, or when the main process is gone - it
   unlinks all its blocks (:meth:`BlockPool.close`).
4. A worker killed with SIGKILL (OOM killer, segfault) cannot. Block names start with a
   per-pool prefix holding the main process id (:func:`block_prefix`), so the pool's
   ``close()`` finds and unlinks them with :func:`sweep` where the OS lists shared memory as
   files (``/dev/shm`` on Linux).

Resource tracker (bpo-38119, python/cpython#82300): ``SharedMemory`` registers a block with
``multiprocessing``'s resource tracker on create and, before Python 3.13 (or with
``track=True``, the default, since), also on attach; the tracker unlinks - and warns about
("resource_tracker: There appear to be N leaked shared_memory objects") - whatever is still
registered when the last process using it exits. The tracker keeps a *set* of names per type
(3.10 to 3.13 alike), so we leave tracking on and make it balance instead of using
``track=False`` (3.13+ only): the worker's create registers a name, the main's attaches
re-register the same name (a no-op in a set) strictly before the main releases the block, and
the worker's unlink unregisters it. This needs worker and main to talk to the *same* tracker:
:func:`ensure_tracker` starts the main's tracker before any worker starts, so fork children
inherit it and spawn/forkserver children are handed its fd. Blocks of a killed worker stay
registered; :func:`sweep` unlinks *and* unregisters them, so nothing is reported at exit.

Windows has no unlink: a block lives while some process has a handle open. Rule 1 (the worker
holds its handle until the release) is exactly what makes blocks survive until the main
process has attached there.

Only exact ``numpy.ndarray`` instances (no subclasses such as masked arrays, which would lose
their type) without Python objects inside (``dtype.hasobject`` is False), non-empty and of at
least ``threshold`` bytes travel this way; everything else stays in the batch and is pickled.
Containers walked: ``tuple`` (and named tuples), ``list`` and ``dict``, nested; other
containers are pickled as they are. A batch whose arrays would not fit in the free space of
``/dev/shm`` (Docker's default is 64 MB) goes through the pipe instead: writing past a full
tmpfs kills the writer with SIGBUS.
"""

from __future__ import annotations

import collections
import os
import secrets
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

__all__ = [
    "MAX_FREE_BLOCKS",
    "SHM_THRESHOLD",
    "BlockPool",
    "ShmArray",
    "block_prefix",
    "decode",
    "ensure_tracker",
    "names",
    "sweep",
]

# Arrays of at least this many bytes travel through shared memory (bytes). Measured per batch
# with the pool (fork, one worker, blocks reused, this machine), pipe vs shared memory: 16 KiB
# 87 vs 139 us, 64 KiB 124 vs 150 us, 128 KiB 140 vs 274 us, 256 KiB 489 vs 299 us, 1 MiB
# 1673 vs 410 us, 19 MB 35 vs 5 ms. The pipe wins below ~200 KiB (two small syscalls beat
# attaching a mapping); 256 KiB keeps labels, masks and small feature arrays in the pipe.
SHM_THRESHOLD = 256 * 1024

# Released blocks a worker keeps for reuse. Batches of one dataset usually have the same
# arrays each time, and the main process releases a batch's blocks as soon as it has copied it,
# so a few blocks cycle; the bound caps the idle memory a worker holds at 4 blocks.
MAX_FREE_BLOCKS = 4

# Where Linux (and other systems with a POSIX shm filesystem) list shared-memory blocks as
# files. Absent on macOS and Windows: :func:`sweep` then finds nothing and the free-space check
# is skipped.
_SHM_DIR = "/dev/shm"

# Headroom left in /dev/shm when deciding whether a batch fits (bytes).
_SHM_HEADROOM = 16 * 1024 * 1024

# macOS limits POSIX shared-memory names to 31 characters (PSHMNAMLEN), the leading "/"
# included. Prefix "cmp" + pid (<= 7 digits) + "_" + pool token (4 hex) + "_" + block token
# (8 hex) is at most 24 characters plus the slash.
_MAX_NAME_LEN = 30
_BLOCK_TOKEN_BYTES = 4


@dataclass(frozen=True)
class ShmArray:
    """Descriptor of one array that travels in a shared-memory block.

    Only this small object is pickled; :func:`decode` rebuilds the array from the block.

    Attributes:
        name (str): the block name, without the leading ``/``.
        shape (tuple[int, ...]): the array's shape; ``()`` for a 0-d array.
        dtype (numpy.dtype): the array's dtype (never an object dtype).
        order (str): ``"C"`` or ``"F"``, the memory order the copy keeps.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    order: str = "C"

    @property
    def nbytes(self) -> int:
        """Size of the array data in bytes."""
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def block_prefix(main_pid: int, pool_token: str) -> str:
    """The name prefix of every block a pool's workers create.

    Args:
        main_pid (int): process id of the main process (the one owning the pool).
        pool_token (str): a short token unique to the pool (4 hex characters), so that two
            pools in one process never sweep each other's blocks.

    Returns:
        str: e.g. ``"cmp12345_ab12_"``.

    Raises:
        ValueError: the prefix would leave no room for block tokens under macOS's 31-character
            limit on shared-memory names.
    """
    prefix = f"cmp{main_pid}_{pool_token}_"
    if len(prefix) + 2 * _BLOCK_TOKEN_BYTES > _MAX_NAME_LEN:
        raise ValueError(
            f"shared-memory prefix {prefix!r} is too long: names must stay under 31 "
            f"characters on macOS; use a pool token of at most 4 characters"
        )
    return prefix


def ensure_tracker() -> None:
    """Start this process's ``multiprocessing`` resource tracker if it is not running yet.

    Call in the main process before starting workers, so they share its tracker (see
    NOTE [ Shared-memory ownership ]). POSIX only: Windows has no resource tracker (blocks
    die with their last handle), and the pool does not call this there.
    """
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()


def _walk(obj: Any, leaf: Any) -> Any:
    """Rebuild ``obj`` with ``leaf`` applied to every non-container item."""
    cls = type(obj)
    if cls is tuple:
        return tuple(_walk(x, leaf) for x in obj)
    if cls is list:
        return [_walk(x, leaf) for x in obj]
    if cls is dict:
        return {k: _walk(v, leaf) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(cls, "_fields"):  # named tuple
        return cls(*(_walk(x, leaf) for x in obj))
    return leaf(obj)


def _shm_free_bytes() -> int | None:
    try:
        st = os.statvfs(_SHM_DIR)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


# ---------------------------------------------------------------------------------------------
# Worker side: arrays -> blocks
# ---------------------------------------------------------------------------------------------


class BlockPool:
    """A worker's shared-memory blocks: created, reused and finally unlinked here.

    See NOTE [ Shared-memory ownership ]. Not thread-safe; one per worker process.

    Args:
        prefix (str): block name prefix, from :func:`block_prefix`.
        threshold (int): minimum array size in bytes that goes through shared memory
            (default: :data:`SHM_THRESHOLD`, 256 KiB).
        max_free (int): released blocks kept for reuse (default: :data:`MAX_FREE_BLOCKS`).
    """

    def __init__(
        self, prefix: str, threshold: int = SHM_THRESHOLD, max_free: int = MAX_FREE_BLOCKS
    ) -> None:
        self.prefix = prefix
        self.threshold = threshold
        self.max_free = max_free
        self.free: collections.deque[SharedMemory] = collections.deque()
        self.in_use: dict[Any, list[SharedMemory]] = {}

    def _wants(self, obj: Any) -> bool:
        return (
            type(obj) is np.ndarray
            and not obj.dtype.hasobject
            and obj.nbytes > 0
            and obj.nbytes >= self.threshold
        )

    def _block(self, size: int) -> SharedMemory:
        # Smallest free block that fits without wasting more than half of it.
        fits = [b for b in self.free if size <= b.size <= 2 * size]
        if fits:
            best = min(fits, key=lambda b: b.size)
            self.free.remove(best)
            return best
        while True:
            name = self.prefix + secrets.token_hex(_BLOCK_TOKEN_BYTES)
            try:
                return SharedMemory(name=name, create=True, size=size)
            except FileExistsError:  # pragma: no cover - 2**32 tokens; draw another
                continue

    def encode(self, batch: Any, key: Any) -> Any:
        """Move the big arrays of ``batch`` into blocks held under ``key`` until released.

        Args:
            batch (object): a batch as returned by ``dataset[i]``: arrays, scalars, and
                tuples, lists and dicts of them, nested.
            key (object): what the main process will name in its release (the send index).

        Returns:
            object: the batch with each moved array replaced by a :class:`ShmArray`; the
            very same object when nothing was moved (no big array, or ``/dev/shm`` too full).

        Raises:
            OSError: a block could not be created; blocks taken for this batch go back to the
                free list first (also on any other exception).
        """
        big = []
        _walk(batch, lambda x: big.append(x.nbytes) if self._wants(x) else None)
        if not big:
            return batch
        needed = sum(big) - sum(b.size for b in self.free)  # reused blocks need no new space
        free = _shm_free_bytes() if needed > 0 else None
        if free is not None and needed + _SHM_HEADROOM > free:
            return batch  # would not fit: SIGBUS on write. The pipe is slower but safe.
        taken: list[SharedMemory] = []

        def leaf(x: Any) -> Any:
            if not self._wants(x):
                return x
            order = "F" if x.flags.f_contiguous and not x.flags.c_contiguous else "C"
            shm = self._block(x.nbytes)
            taken.append(shm)
            dst = np.ndarray(x.shape, dtype=x.dtype, buffer=shm.buf, order=order)
            np.copyto(dst, x, casting="no")
            del dst  # the view exports shm.buf; it must be gone before the block is closed
            return ShmArray(shm.name, tuple(x.shape), x.dtype, order)

        try:
            encoded = _walk(batch, leaf)
        except BaseException:
            self.free.extend(taken)
            raise
        self.in_use[key] = taken
        return encoded

    def release(self, key: Any) -> None:
        """The main process is done with the blocks of ``key``: keep them for reuse.

        Blocks beyond :attr:`max_free` are unlinked, oldest first. Unknown keys are ignored.

        Args:
            key (object): as passed to :meth:`encode`.
        """
        self.free.extend(self.in_use.pop(key, ()))
        while len(self.free) > self.max_free:
            _unlink(self.free.popleft())

    def close(self) -> None:
        """Unlink every block, free or in use (the worker is exiting)."""
        blocks = list(self.free) + [b for bs in self.in_use.values() for b in bs]
        self.free.clear()
        self.in_use.clear()
        for shm in blocks:
            _unlink(shm)


def _unlink(shm: SharedMemory) -> None:
    shm.close()
    try:
        shm.unlink()
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------
# Main side: blocks -> arrays
# ---------------------------------------------------------------------------------------------


def _from_block(desc: ShmArray) -> np.ndarray:
    try:
        shm = SharedMemory(name=desc.name)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"shared-memory block {desc.name!r} ({desc.nbytes} bytes, shape {desc.shape}, "
            f"dtype {desc.dtype}) vanished before the main process could read it; was it "
            "unlinked by someone else (e.g. a cleanup of /dev/shm)?"
        ) from exc
    try:
        view = np.ndarray(desc.shape, dtype=desc.dtype, buffer=shm.buf, order=desc.order)
        out = view.copy(order="K")
        del view
    finally:
        shm.close()
    return out


def decode(encoded: Any) -> Any:
    """Rebuild a batch made by :meth:`BlockPool.encode` (main side): copy each array out.

    The blocks are attached, copied and closed, never unlinked: they still belong to the
    worker, which reuses them once released (NOTE [ Shared-memory ownership ]).

    Args:
        encoded (object): the batch as received from a worker.

    Returns:
        object: the batch with each :class:`ShmArray` replaced by a regular ``numpy.ndarray``
        equal to the original (dtype, shape, values; memory order C, or F when the original
        was Fortran-ordered). ``encoded`` itself when it holds no descriptor.

    Raises:
        FileNotFoundError: a block named in ``encoded`` no longer exists.
    """
    if not names(encoded):
        return encoded
    return _walk(encoded, lambda x: _from_block(x) if type(x) is ShmArray else x)


def names(encoded: Any) -> list[str]:
    """The block names of every :class:`ShmArray` in ``encoded``.

    Args:
        encoded (object): a batch as made by :meth:`BlockPool.encode`.

    Returns:
        list[str]: block names, in walk order; empty when there are none.
    """
    found: list[str] = []
    _walk(encoded, lambda x: found.append(x.name) if type(x) is ShmArray else None)
    return found


def sweep(prefix: str) -> list[str]:
    """Unlink every block whose name starts with ``prefix`` (left by killed workers).

    Lists ``/dev/shm`` where it exists (Linux); elsewhere finds nothing, because macOS and
    Windows cannot list shared-memory blocks. Each block is attached, then unlinked, which
    also unregisters it from the resource tracker, so it is not reported as leaked at exit.
    Call only when no worker of the pool is alive.

    Args:
        prefix (str): from :func:`block_prefix`; must be non-empty.

    Returns:
        list[str]: names of the blocks unlinked.

    Raises:
        ValueError: ``prefix`` is empty (that would sweep other programs' blocks).
    """
    if not prefix:
        raise ValueError("sweep() needs a non-empty prefix; got ''")
    try:
        entries = os.listdir(_SHM_DIR)
    except OSError:
        return []
    done = []
    for name in sorted(e for e in entries if e.startswith(prefix)):
        try:
            shm = SharedMemory(name=name)
        except FileNotFoundError:
            continue
        _unlink(shm)
        done.append(name)
    return done
