"""Batches through shared-memory blocks: NumPy arrays <-> blocks, and who unlinks what, when.

A worker process copies each big array of a batch into a shared-memory block
(:mod:`compatmp._shm`) and replaces it by a :class:`ShmArray` descriptor (block name, shape,
dtype, memory order); only the descriptor is pickled and sent through the pipe. The main
process hands out an array that *is* a view of the block (:class:`Attachments`, zero-copy)
and tells the worker it may reuse the block once every such array is garbage (a
``weakref.finalize`` lease). A 19 MB float32 batch thus costs one ``memcpy`` in the worker
instead of pickle + two kernel copies through the pipe + unpickle.

Why zero-copy and cached attachments (measured, 19.3 MB batch, this 2-core machine, py-spy):
copying out of the block into a fresh array took 73% of the main process and
``SharedMemory.close`` (``munmap`` of a mapping whose pages were just faulted in) another 20%;
a fresh array costs a page fault per 4 KiB page, like a fresh block. Keeping each block
attached for the pool's life and handing out views leaves the main process a dictionary
lookup and a ``weakref.finalize`` per array.

Blocks are *reused*: creating a block costs more than copying into it, because the kernel must
allocate and zero every page on first touch (measured here: 15 ms to create and fill a fresh
19 MB block, 1.1 ms to copy 19 MB into memory already mapped). Each worker keeps the blocks
the main process has released in a free list and fills them again for later batches of the
same size. The free list holds as many blocks as the worker once had in use at the same time
(its prefetch depth), at least :data:`MAX_FREE_BLOCKS` and at most :data:`MAX_KEPT_BLOCKS`:
a fixed cap of 4 made a worker whose pipeline holds ~11 batches unlink 7 blocks at the end of
every epoch and create them again at the start of the next (measured: 14 block creations
per 100 batches of 19 MB, 2.4 ms per batch of a 2.5 ms batch; see benchmarks/RESULTS.md,
"Big batches filled in place").

NOTE [ Shared-memory ownership ]
A block belongs to the worker that created it, for its whole life; only that worker unlinks
it, except after a crash:

1. The worker creates or reuses a block in :meth:`BlockPool.encode`; it stays "in use" under
   the batch's ``send_idx`` until the main process sends ``("release", send_idx)``. If the
   batch cannot be sent, the worker takes its blocks back at once (:meth:`BlockPool.release`).
2. The main process only attaches (once per block, cached in :class:`Attachments`), views
   and finally closes its handle; it never unlinks a live worker's blocks. It sends the
   release when the last array viewing the batch's blocks is garbage. A batch nobody will read
   is released without being attached. When a worker unlinks a spare block
   (:meth:`BlockPool.release`), it names it in its next message (:meth:`BlockPool.take_dropped`)
   and the main process closes its handle once no array uses it; the name therefore never
   resolves to a stale mapping, even if a later block happened to get the same name.
3. When the worker exits - told to stop, on SIGTERM, or when the main process is gone - it
   unlinks all its blocks (:meth:`BlockPool.close`). Arrays the user still holds stay valid:
   an unlinked block lives until its last mapping is closed (on Windows, its last handle),
   and the main process closes its handle when the last such array is garbage.
4. A worker killed with SIGKILL (OOM killer, segfault) cannot. Block names start with a
   per-pool prefix holding the main process id, on Linux its PID namespace, and a 64-bit
   random pool token (:func:`compatmp._shm_names.block_prefix`,
   :func:`compatmp._shm_names.pool_token`), so the pool's ``close()`` finds and unlinks them
   with :func:`compatmp._shm_names.sweep` where the OS lists shared memory as files
   (``/dev/shm`` on Linux). That sweep removes only regular files of this user: an entry
   another user put there under the same prefix is left alone, and never makes it raise.
5. When the main process itself is killed with its workers (``os.killpg``, ``timeout -s
   KILL``, ``docker kill``, Slurm), nobody is left to sweep, and the resource tracker (in the
   same process group) dies too. So every pool start-up first runs
   :func:`compatmp._shm_names.sweep_dead_owners`: it unlinks blocks that are provably this
   user's and of this PID namespace and whose owner (the pid in the name) is gone, or is a
   recycled pid (a process that started after the block was made). Pids of another PID
   namespace mean nothing here (``/dev/shm`` shared between containers, ``docker
   --ipc=host``): such blocks, names without a namespace, other users' entries and anything
   but a regular file are never touched. See "Shared memory on each OS" in
   docs/architecture.md for what each OS guarantees, why the namespace is in the name rather
   than a liveness lock, and why blocks are named, not passed as file descriptors.

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

The blocks themselves (mapped without a file descriptor, the resource tracker) are
:mod:`compatmp._shm`'s; their names, and the sweeps that rules 4 and 5 rely on, are
:mod:`compatmp._shm_names`'.
"""

from __future__ import annotations

import collections
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import Any

import numpy as np

from . import _shm

__all__ = [
    "MAX_FREE_BLOCKS",
    "MAX_KEPT_BLOCKS",
    "SHM_THRESHOLD",
    "Attachments",
    "BlockPool",
    "ShmArray",
    "names",
]


# Arrays of at least this many bytes travel through shared memory (bytes). Measured per batch
# with the pool (fork, one worker, blocks reused, this machine), pipe vs shared memory: 16 KiB
# 87 vs 139 us, 64 KiB 124 vs 150 us, 128 KiB 140 vs 274 us, 256 KiB 489 vs 299 us, 1 MiB
# 1673 vs 410 us, 19 MB 35 vs 5 ms. The pipe wins below ~200 KiB (two small syscalls beat
# attaching a mapping); 256 KiB keeps labels, masks and small feature arrays in the pipe.
SHM_THRESHOLD = 256 * 1024

# Released blocks a worker always may keep for reuse. Batches of one dataset usually have the
# same arrays each time, so the same blocks cycle.
MAX_FREE_BLOCKS = 4

# ... and at most this many: a worker keeps as many released blocks as it had in use at once
# (the batches in flight: prefetched, queued, held by the consumer), so that the next epoch
# finds its whole pipeline's blocks mapped and faulted in (creating a 19 MB block and touching
# it costs 15-17 ms here, refilling a mapped one 0.5 ms). The cap bounds the idle memory
# a consumer that once held many batches leaves behind: 16 blocks per worker.
MAX_KEPT_BLOCKS = 16


@dataclass(frozen=True)
class ShmArray:
    """Descriptor of one array that travels in a shared-memory block.

    Only this small object is pickled; :meth:`Attachments.view` rebuilds the array from the
    block.

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


# ---------------------------------------------------------------------------------------------
# Worker side: arrays -> blocks
# ---------------------------------------------------------------------------------------------


class BlockPool:
    """A worker's shared-memory blocks: created, reused and finally unlinked here.

    See NOTE [ Shared-memory ownership ]. Not thread-safe; one per worker process.

    Args:
        prefix (str): block name prefix, from :func:`compatmp._shm_names.block_prefix`.
        threshold (int): minimum array size in bytes that goes through shared memory
            (default: :data:`SHM_THRESHOLD`, 256 KiB).
        max_free (int): released blocks always kept for reuse (default:
            :data:`MAX_FREE_BLOCKS`); 0 keeps none (every released block is unlinked).
        max_kept (int): released blocks kept at most (default: :data:`MAX_KEPT_BLOCKS`).
            Between ``max_free`` and ``max_kept`` the pool keeps as many as it ever had in use
            at the same time (:attr:`peak`), so that blocks are not unlinked at the end of an
            epoch and created again at the start of the next.
    """

    def __init__(
        self,
        prefix: str,
        threshold: int = SHM_THRESHOLD,
        max_free: int = MAX_FREE_BLOCKS,
        max_kept: int = MAX_KEPT_BLOCKS,
    ) -> None:
        self.prefix = prefix
        self.threshold = threshold
        self.max_free = max_free
        self.max_kept = max(max_kept, max_free)
        self.n_in_use = 0  # blocks held under some key (sum of len(v) for in_use's values)
        self.peak = 0  # the most blocks ever in use at once
        self.created = 0  # blocks created (for tests and the benchmark's breakdown)
        self.free: collections.deque[_shm.Block | SharedMemory] = collections.deque()
        self.in_use: dict[Any, list[_shm.Block | SharedMemory]] = {}
        self.dropped: list[str] = []  # unlinked since the last take_dropped()
        # compatmp.empty(): data address -> block handed out for the batch being computed
        self.allocated: dict[int, _shm.Block | SharedMemory] = {}

    def _wants(self, obj: Any) -> bool:
        return (
            type(obj) is np.ndarray
            and not obj.dtype.hasobject
            and obj.nbytes > 0
            and obj.nbytes >= self.threshold
        )

    def _block(self, size: int) -> _shm.Block | SharedMemory:
        # Smallest free block that fits without wasting more than half of it.
        fits = [b for b in self.free if size <= b.size <= 2 * size]
        if fits:
            best = min(fits, key=lambda b: b.size)
            self.free.remove(best)
            return best
        self.created += 1
        return _shm.create_block(self.prefix, size)

    def allocate(self, shape: tuple[int, ...], dtype: Any, order: str = "C") -> np.ndarray:
        """An array whose memory is a block, for :func:`compatmp.empty` (no copy in encode).

        The block is this batch's: :meth:`encode` sends it as it is when the batch holds the
        whole array, and takes it back (for reuse) when the batch does not.

        Args:
            shape (tuple[int, ...]): the array's shape.
            dtype (numpy.dtype): its dtype (no object dtype).
            order (str): ``"C"`` or ``"F"``.

        Returns:
            numpy.ndarray: uninitialized, writable, viewing the block.
        """
        dt = np.dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        shm = self._block(nbytes)
        arr = np.ndarray(shape, dtype=dt, buffer=shm.buf, order=order)
        self.allocated[arr.__array_interface__["data"][0]] = shm
        return arr

    def _reclaim(self) -> None:
        """Blocks from :meth:`allocate` that no batch took go back to the free list."""
        self.free.extend(self.allocated.values())
        self.allocated.clear()

    def _new_bytes(self, sizes: list[int]) -> int:
        """Bytes of new blocks that arrays of ``sizes`` bytes need, given the free list.

        Matches each size, largest first, with the free block :meth:`_block` would pick
        (the smallest of ``size`` to ``2 * size`` bytes), so free blocks of other sizes - the
        free list keeps up to :attr:`max_kept` - never hide a block that must be created
        (and could not fit in ``/dev/shm``).
        """
        free = sorted(b.size for b in self.free)
        needed = 0
        for size in sorted(sizes, reverse=True):
            fit = next((i for i, f in enumerate(free) if size <= f <= 2 * size), None)
            if fit is None:
                needed += size
            else:
                del free[fit]
        return needed

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
        try:
            return self._encode(batch, key)
        finally:
            self._reclaim()

    def _encode(self, batch: Any, key: Any) -> Any:
        big = []
        _walk(batch, lambda x: big.append(x.nbytes) if self._wants(x) else None)
        if not big:
            return batch
        needed = self._new_bytes(big)  # reused blocks need no new space
        room_left = _shm.room() if needed > 0 else None
        if room_left is not None and needed > room_left:
            return batch  # would not fit: SIGBUS on write. The pipe is slower but safe.
        taken: list[_shm.Block | SharedMemory] = []

        def leaf(x: Any) -> Any:
            if not self._wants(x):
                return x
            order = "F" if x.flags.f_contiguous and not x.flags.c_contiguous else "C"
            shm = self.allocated.pop(x.__array_interface__["data"][0], None)
            if shm is not None and (x.flags.c_contiguous or x.flags.f_contiguous):
                taken.append(shm)  # made by compatmp.empty(): already in its block
                return ShmArray(shm.name, tuple(x.shape), x.dtype, order)
            if shm is not None:
                self.allocated[x.__array_interface__["data"][0]] = shm  # a strided view
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
        self.n_in_use += len(taken)
        self.peak = max(self.peak, self.n_in_use)
        return encoded

    def release(self, key: Any) -> None:
        """The main process is done with the blocks of ``key``: keep them for reuse.

        The free list keeps :attr:`max_free` blocks, or as many as were ever in use at once
        (:attr:`peak`) less those in use now, but never more than :attr:`max_kept`; blocks
        beyond are unlinked, oldest first. Unknown keys are ignored.

        Args:
            key (object): as passed to :meth:`encode`.
        """
        back = self.in_use.pop(key, ())
        self.n_in_use -= len(back)
        self.free.extend(back)
        keep = 0 if self.max_free == 0 else max(self.max_free, self.peak - self.n_in_use)
        keep = min(keep, self.max_kept)
        while len(self.free) > keep:
            shm = self.free.popleft()
            self.dropped.append(shm.name)
            _shm.unlink_block(shm)

    def take_dropped(self) -> list[str]:
        """Names of the blocks unlinked since the last call, for the main process to forget.

        Returns:
            list[str]: block names; the main process closes its handles to them
            (:meth:`Attachments.drop`) before it reads any later message of this worker.
        """
        dropped, self.dropped = self.dropped, []
        return dropped

    def close(self) -> None:
        """Unlink every block, free or in use (the worker is exiting)."""
        blocks = list(self.free) + [b for bs in self.in_use.values() for b in bs]
        blocks += self.allocated.values()
        self.allocated.clear()
        self.free.clear()
        self.in_use.clear()
        self.n_in_use = 0
        for shm in blocks:
            _shm.unlink_block(shm)


# ---------------------------------------------------------------------------------------------
# Main side: blocks -> arrays
# ---------------------------------------------------------------------------------------------


class Attachments:
    """Main side: one cached handle per worker block, and zero-copy views with leases.

    :meth:`view` rebuilds a batch whose arrays are views of the workers' blocks. Each view
    carries a ``weakref.finalize``; when every view of a batch is garbage (NumPy views derived
    from it keep it alive, as do buffers exported from it), ``on_release(key)`` is called -
    from whatever thread dropped the last reference, so it must be thread-safe and quick
    (the pool appends to a ``collections.deque`` and sends the release from its own thread).
    See NOTE [ Shared-memory ownership ] for who unlinks what.

    Args:
        on_release (Callable[[object], None]): called once per viewed batch with its key, when
            the batch's last view is gone.
    """

    def __init__(self, on_release: Callable[[Any], None]) -> None:
        self._on_release = on_release
        # Finalizers run in any thread, and in this one too when a garbage collection runs
        # while it holds the lock (an allocation inside view()): hence re-entrant.
        self._lock = threading.RLock()
        self._handles: dict[str, _shm.Block | SharedMemory] = {}
        self._views: collections.Counter[str] = collections.Counter()  # name -> live views
        self._pending: dict[Any, int] = {}  # key -> live views of that batch
        self._dropped: set[str] = set()  # unlinked by their worker: close when unused
        self._closed = False

    def __len__(self) -> int:
        """Number of blocks attached now."""
        with self._lock:
            return len(self._handles)

    def view(self, encoded: Any, key: Any) -> Any:
        """The batch with each :class:`ShmArray` replaced by an array viewing its block.

        Args:
            encoded (object): a batch as received from a worker.
            key (object): passed to ``on_release`` when the batch's last view is gone (the
                send index).

        Returns:
            object: ``encoded`` itself when it names no block (``on_release`` is then never
            called); else the rebuilt batch. The arrays are writable, have the original dtype,
            shape and memory order, and stay valid after the pool is closed.

        Raises:
            FileNotFoundError: a block named in ``encoded`` no longer exists (blocks already
                viewed for this batch are released as usual when garbage).
            RuntimeError: :meth:`close` was called.
        """
        if not names(encoded):
            return encoded
        made: list[tuple[np.ndarray, str]] = []

        def leaf(x: Any) -> Any:
            if type(x) is not ShmArray:
                return x
            with self._lock:
                if self._closed:
                    raise RuntimeError("compatmp: Attachments.view() after close()")
                shm = self._handles.get(x.name)
                if shm is None:
                    shm = self._handles[x.name] = _attach(x)
            arr = np.ndarray(x.shape, dtype=x.dtype, buffer=shm.buf, order=x.order)
            made.append((arr, x.name))
            return arr

        try:
            return _walk(encoded, leaf)
        finally:
            # Leases start only now, so a failure half-way releases what was made.
            with self._lock:
                for _, name in made:
                    self._views[name] += 1
                self._pending[key] = len(made)
            for arr, name in made:
                weakref.finalize(arr, self._end_view, key, name).atexit = False
            if not made:
                self._end_batch(key)

    def _end_view(self, key: Any, name: str) -> None:
        with self._lock:
            self._views[name] -= 1
            if self._views[name] <= 0:
                del self._views[name]
                if self._closed or name in self._dropped:
                    self._close_handle(name)
            left = self._pending[key] = self._pending[key] - 1
            if left > 0:
                return
            del self._pending[key]
        self._end_batch(key)

    def _end_batch(self, key: Any) -> None:
        with self._lock:
            self._pending.pop(key, None)
            closed = self._closed
        if not closed:
            self._on_release(key)

    def _close_handle(self, name: str) -> None:
        # Caller holds the lock and knows no view of the block is alive.
        self._dropped.discard(name)
        shm = self._handles.pop(name, None)
        if shm is not None:
            shm.close()

    def drop(self, dropped: list[str]) -> None:
        """A worker unlinked these blocks: close their handles once no view uses them.

        Args:
            dropped (list[str]): from the worker's :meth:`BlockPool.take_dropped`.
        """
        with self._lock:
            for name in dropped:
                if self._views.get(name, 0) > 0:
                    self._dropped.add(name)
                else:
                    self._close_handle(name)

    def close(self) -> None:
        """Close every unused handle now, and every other one when its last view is gone.

        ``on_release`` is not called any more. Idempotent.
        """
        with self._lock:
            self._closed = True
            for name in [n for n in self._handles if self._views.get(n, 0) <= 0]:
                self._close_handle(name)


def _attach(desc: ShmArray) -> _shm.Block | SharedMemory:
    try:
        if os.name == "nt":  # the mapping holds the one handle; nothing to save there
            return SharedMemory(name=desc.name)
        return _shm.Block.attach(desc.name)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"shared-memory block {desc.name!r} ({desc.nbytes} bytes, shape {desc.shape}, "
            f"dtype {desc.dtype}) vanished before the main process could read it; was it "
            "unlinked by someone else (e.g. a cleanup of /dev/shm)?"
        ) from exc


def names(encoded: Any) -> list[str]:
    """The block names of every :class:`ShmArray` in ``encoded``.

    Args:
        encoded (object): a batch as made by :meth:`BlockPool.encode`.

    Returns:
        list[str]: block names, in walk order; empty when there are none.
    """
    # The same containers as _walk, without rebuilding them: the main process calls this for
    # every batch (Transport.blocks_of), tiny ones included (issue 18 item 4).
    found: list[str] = []
    stack = [encoded]
    while stack:
        obj = stack.pop()
        cls = type(obj)
        if cls is ShmArray:
            found.append(obj.name)
        elif cls is tuple or cls is list or (isinstance(obj, tuple) and hasattr(cls, "_fields")):
            stack.extend(reversed(obj))
        elif cls is dict:
            stack.extend(reversed(list(obj.values())))
    return found
