"""Big dataset buffers in shared memory: sent once, mapped copy-on-write, re-synced exactly.

:class:`DatasetSharer` (main process, one per process pool) pickles the dataset with pickle
protocol 5 (PEP 574, through :func:`compatmp._by_value.dump_dataset`): every buffer of at
least :data:`SHARE_THRESHOLD` bytes (a NumPy array's data, a ``bytearray``, anything that
hands the pickler a ``pickle.PickleBuffer``) goes *out-of-band* into a shared-memory block
that the main process owns; what travels to the workers is a :class:`SharedPayload`: the
small remainder of the pickle plus the block names. A worker maps each block *privately*
(copy-on-write, :func:`_map_private`) and unpickles with ``buffers=``, so NumPy rebuilds the
arrays as ``np.frombuffer`` views of the mapping: one copy of the data in the machine,
however many workers, and the arrays are as writable as in the main process.

NOTE [ Shared dataset buffers ]
Ownership. The blocks belong to the MAIN process (unlike batch blocks, which belong to the
worker that fills them, NOTE [ Shared-memory ownership ] in :mod:`compatmp._batch_blocks`): created
when the pool sends the dataset (under fork: just before the fork, "Fork" below), unlinked
by :meth:`DatasetSharer.close` when the pool closes, shuts down after an error or is garbage
collected (``_Core.close``), and at
:meth:`DatasetSharer.commit` for the blocks the new state no longer names. Their names start
with the pool's batch-block prefix (:func:`compatmp._shm_names.block_prefix`), so the pool's sweep
finds them too; if the main process is killed, ``multiprocessing``'s resource tracker, with
which ``SharedMemory(create=True)`` registered them, unlinks them. Workers map with
``shm_open`` + ``mmap(MAP_PRIVATE)`` (``FILE_MAP_COPY`` on Windows), never through
``SharedMemory``, so they never register a block with the tracker and never unlink one, and
close the descriptor once mapped (:func:`compatmp._shm.map_fd`): a dataset of thousands of
big arrays costs a worker no descriptor for them.

Writes in a worker. A worker's mapping is private (``MAP_PRIVATE``/``ACCESS_COPY``), so it
may write into the dataset's arrays (a decode cache filled in ``__getitem__``) and the write
stays in that worker, exactly as under fork, where the arrays are the worker's copy-on-write
pages; an array that is read-only in the main process is read-only in the workers too. The
write lasts until an update re-sends that buffer (the main process changed it): the worker
then maps the new contents afresh; buffers the update did not change keep the worker's
mapping, writes included, under every start method alike. A worker's write never reaches
the main process, the other workers, or the block.

Exact re-sync (``update_dataset``). The main process keeps the last-sent contents of every
buffer: the block itself is that copy. An update pickles the dataset again (buffers
out-of-band, nothing copied; :meth:`DatasetSharer.plan`), matches each buffer with its entry
by identity (the owner - base ``ndarray``, ``bytes`` or ``bytearray`` -, data address, size,
format and shape; the sharer keeps the owner alive so its ``id`` cannot be reused), and
compares its bytes with the block in :data:`CHUNK` pieces (``numpy.array_equal`` on 8-byte
words: 512 MiB in ~0.05 s here, memory bandwidth, the speed of ``memcmp``). Nothing else is
trusted: a one-element in-place write anywhere is found. Once the workers are idle (no task
in flight may see a half-written block), :meth:`DatasetSharer.materialise` writes the
differing chunks into the block (or a new block for a new or resized buffer), bumps the
buffer's version, and the payload names every block with its version; a worker re-maps a
block whose version changed and unpickles the small part again, so it holds exactly the main
process's state, never a mix. The digest of the small pickle plus every buffer's (name,
version, writeable) decides whether anything is sent; :class:`DatasetUpdate` says what was.
Cost: one read of every big buffer and its block per update (linear in the dataset's size,
~0.1-0.25 s per GiB here) plus the changed chunks' copy. We chose copies over per-chunk digests:
the blocks exist anyway (no extra memory), the comparison is exact, and it is several times
faster than hashing (SHA-256 ~1.7 GB/s, BLAKE2b ~0.9 GB/s here).

Fork. Under ``fork`` the workers inherit the dataset object itself (no pickle: the pages
are shared copy-on-write), and pages the main process writes after the fork are not in
their copies. Just before the fork the sharer copies each big buffer into a block
(:meth:`DatasetSharer._fork_copy`): the main process's copy of what the workers have, which
the workers do not map. An update compares each buffer with that block exactly, as under
spawn; an unchanged buffer goes as an *inherited* reference (``BufferRef.name == ""``: its
identity key, whose data address is valid in the forked worker too; the owner is kept in
:data:`_inherited`), which the worker rebuilds as a view of its own copy-on-write pages
(:func:`_inherited_view`), its writes included. A changed buffer (its bytes, or only its
writable flag) has its differing pieces patched into the block, and from then on the workers
map the block (``_Entry.inherited``
False), dropping their own writes to that buffer exactly as a spawn worker re-mapping a
changed block does. Where the copy does not fit (``/dev/shm``'s room, or more than half
the memory available at the fork, :func:`_copy_budget`) the sharer records a SHA-256 of the
buffer instead (a collision by accident is ~2**-128 likely), re-hashes it at every update,
and copies it into a block, whole, at its first change.

Measured (512 MiB float32, 2 workers, loaded 2-vCPU machine; ``benchmarks/RESULTS.md``): the
copy costs ~0.4 s before the fork (SHA-256: 0.31 s) and one more copy of the buffers in
memory (what spawn and forkserver hold too); an unchanged update then takes 0.06 s (SHA-256:
0.63 s) and a one-element change 0.13 s (SHA-256: 1.6-3.1 s at a buffer's first change, a
whole-buffer copy into a fresh block). Rejected: a lazy copy at the first update (by then
the main process may have written pages: the copy would not be what the workers have);
a 32-bit checksum per piece (``zlib.crc32`` 0.17 s, ``adler32`` 0.18 s per 512 MiB: only
2x faster than SHA-256 and not exact, a change slips through with probability 2**-32 per
changed piece); BLAKE2b (0.76 s, slower than SHA-256 with SHA-NI); the kernel's soft-dirty
bits (``/proc/self/clear_refs`` + ``/proc/self/pagemap`` bit 55: exact write tracking, no
reading) need ``CONFIG_MEM_SOFT_DIRTY`` (not set here: the bit never rose, as root or as
nobody), exist on x86-64, POWER and s390 only (not arm64), and ``clear_refs`` resets the
whole process, so a second pool, or a checkpointer such as CRIU, would erase the first
pool's record; userfaultfd write-protection needs ``vm.unprivileged_userfaultfd`` (0 here)
or ``CAP_SYS_PTRACE`` and a thread serving every first write of the main process.

Where blocks do not fit (``/dev/shm`` nearly full, e.g. Docker's 64 MB default;
:func:`compatmp._shm.room`), the buffer is pickled in-band: slower, never wrong.
"""

from __future__ import annotations

import hashlib
import itertools
import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from multiprocessing.shared_memory import SharedMemory
from pickle import PickleBuffer
from typing import Any

import numpy as np

from . import _shm
from ._by_value import dump_dataset
from ._preload import WorkerPayload
from ._serialize import loads

__all__ = ["CHUNK", "SHARE_THRESHOLD", "BufferRef", "DatasetSharer", "DatasetUpdate"]

# Buffers of at least this many bytes go to shared memory (bytes). joblib memory-maps arrays
# above 1 MB for its workers (``max_nbytes``); below, a block (a file descriptor, a mapping,
# a page-rounded size) costs more than pickling the bytes.
SHARE_THRESHOLD = 1024 * 1024

# Re-sync compares and copies buffers in pieces of this many bytes: a multiple of every page
# size (4 KiB Linux/Windows, 16 KiB Apple silicon, 64 KiB some ARM kernels), small enough
# that a sparse write copies little, big enough that the per-piece overhead (~5 us) is noise.
CHUNK = 256 * 1024


@dataclass(frozen=True)
class DatasetUpdate:
    """What :meth:`compatmp.OrderedPool.update_dataset` sent; true when anything was sent.

    Attributes:
        sent (bool): the workers got a new state (False: the dataset was unchanged, or the
            same object in thread mode).
        pickle_bytes (int): size of the small pickle sent to each worker, bytes (0 in thread
            mode, where the object itself is shared, and when nothing was sent).
        shared_buffers (int): big buffers (>= :data:`SHARE_THRESHOLD`) the workers map from
            shared memory or inherited (fork) in the new state.
        changed_buffers (int): of those, how many changed since the last send (new, resized,
            or written in place) and were copied, whole or in part.
        bytes_copied (int): bytes written into shared memory for this update (changed
            :data:`CHUNK` pieces, whole new buffers).
    """

    sent: bool
    pickle_bytes: int = 0
    shared_buffers: int = 0
    changed_buffers: int = 0
    bytes_copied: int = 0

    def __bool__(self) -> bool:
        return self.sent


@dataclass(frozen=True)
class BufferRef:
    """One out-of-band buffer of the dataset, in a shared-memory block or inherited.

    Attributes:
        name (str): the block name (no leading ``/``); ``""`` for a buffer a forked worker
            inherited.
        nbytes (int): the buffer's size in bytes (the block may be larger: page rounding).
        version (int): changes whenever the block's contents change; a worker maps a block
            afresh when the version it holds differs.
        writeable (bool): the buffer was writable in the main process; the worker's view is
            then writable too (its private copy-on-write mapping), else read-only.
        key (tuple | None): for an inherited buffer, its identity key (owner id, address,
            size, format, shape) in the main process at fork time.
    """

    name: str
    nbytes: int
    version: int = 0
    writeable: bool = False
    key: tuple | None = None  # name "": a buffer the forked worker inherited (NOTE above)


@dataclass(frozen=True)
class SharedPayload(WorkerPayload):
    """What a worker receives for the dataset: the small pickle and its buffers' blocks.

    Attributes:
        data (bytes): the pickle, without the out-of-band buffers.
        buffers (tuple[BufferRef, ...]): the out-of-band buffers, in pickle order.
        modules (tuple[str, ...]): top-level packages the pickle refers to (for the forkserver
            preload, NOTE [ Forkserver preload ] in :mod:`compatmp._launch`).
    """

    data: bytes
    buffers: tuple[BufferRef, ...] = ()
    modules: tuple[str, ...] = field(default=(), compare=False)

    def load(self) -> Any:
        """Unpickle in a worker, each buffer a copy-on-write view of its block (zero-copy).

        Returns:
            object: the dataset; its big NumPy arrays are writable exactly when they were in
            the main process, and writes stay in this worker (NOTE [ Shared dataset
            buffers ]).

        Raises:
            FileNotFoundError: a block no longer exists.
        """
        views = [_worker_view(ref) for ref in self.buffers]
        keep = {ref.name for ref in self.buffers}
        for name in [n for n in _mapped if n not in keep]:
            del _mapped[name]  # arrays still using the mapping keep it alive
        return loads(self.data, buffers=views)

    def preload_modules(self) -> tuple[str, ...]:
        """The packages noted while pickling (already filtered): see :attr:`modules`."""
        return self.modules


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------

# Block name -> (version, writable private mapping), in this worker process.
_mapped: dict[str, tuple[int, memoryview]] = {}

# Identity key -> owner of each buffer forked workers inherit; filled by the main process
# before it forks them, read in the workers (their copy). NOTE [ Shared dataset buffers ].
_inherited: dict[tuple, Any] = {}


def _inherited_view(key: tuple, writeable: bool) -> memoryview:
    """A view of an inherited buffer: the worker's own copy-on-write pages."""
    import ctypes

    if key not in _inherited:
        raise RuntimeError(
            "compatmp: an update named a dataset buffer this worker did not inherit "
            "(internal error: only forked workers get inherited references)"
        )
    address, nbytes = key[1], key[2]
    view = memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")
    return view if writeable else view.toreadonly()


def _worker_view(ref: BufferRef) -> memoryview:
    if not ref.name:
        assert ref.key is not None
        return _inherited_view(ref.key, ref.writeable)
    held = _mapped.get(ref.name)
    if held is None or held[0] != ref.version:
        held = _mapped[ref.name] = (ref.version, _map_private(ref.name, ref.nbytes))
    view = held[1]
    return view if ref.writeable else view.toreadonly()


def _map_private(name: str, nbytes: int) -> memoryview:
    """Map block ``name`` copy-on-write, without ``SharedMemory`` (no resource-tracker entry).

    Mirrors ``multiprocessing.shared_memory.SharedMemory.__init__`` (CPython 3.8-3.14):
    ``shm_open`` + ``mmap`` on POSIX (``MAP_PRIVATE``, ``PROT_READ | PROT_WRITE``: POSIX
    allows it on a descriptor opened read-only, since writes never reach the object; the
    descriptor is closed once mapped, :func:`compatmp._shm.map_fd`), a named file mapping on
    Windows (``ACCESS_COPY``: ``FILE_MAP_COPY``).

    Raises:
        FileNotFoundError: the block is gone.
    """
    if os.name == "nt":
        mm = mmap.mmap(-1, nbytes, tagname=name, access=mmap.ACCESS_COPY)
    else:
        import _posixshmem

        try:
            fd = _posixshmem.shm_open("/" + name, os.O_RDONLY, mode=0o600)
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"compatmp: the dataset's shared-memory block {name!r} ({nbytes} bytes) is "
                "gone; was /dev/shm cleaned while the pool ran?"
            ) from exc
        try:
            return _shm.map_fd(fd, nbytes, private=True)  # keeps no descriptor
        finally:
            os.close(fd)
    return memoryview(mm)[:nbytes]


# ---------------------------------------------------------------------------------------------
# Main side: comparing and copying
# ---------------------------------------------------------------------------------------------


def _words(u8: np.ndarray) -> np.ndarray:
    """``u8`` as 8-byte words when its size allows (8x fewer elements to compare)."""
    return u8.view(np.uint64) if u8.size % 8 == 0 else u8


def differing_chunks(new: memoryview, old: memoryview) -> Iterable[tuple[int, int]]:
    """The ``(start, stop)`` byte ranges of the :data:`CHUNK` pieces where ``new`` and
    ``old`` differ.

    Args:
        new (memoryview): the current bytes (C-contiguous).
        old (memoryview): the last-sent bytes, at least as long as ``new``.

    Yields:
        tuple[int, int]: byte offsets, in order.
    """
    a = np.frombuffer(new, dtype=np.uint8)
    b = np.frombuffer(old, dtype=np.uint8, count=a.size)
    for start in range(0, a.size, CHUNK):
        stop = min(a.size, start + CHUNK)
        if not np.array_equal(_words(a[start:stop]), _words(b[start:stop])):
            yield start, stop


def _differs(raw: memoryview, block: SharedMemory) -> bool:
    """True if ``raw`` differs from the first ``raw.nbytes`` bytes of ``block`` (stops at the
    first differing chunk)."""
    for _ in differing_chunks(raw, block.buf):
        return True
    return False


def _patch(block: SharedMemory, raw: memoryview) -> int:
    """Make ``block`` hold ``raw`` again, copying only the differing chunks; bytes copied."""
    copied = 0
    for start, stop in differing_chunks(raw, block.buf):
        block.buf[start:stop] = raw[start:stop]
        copied += stop - start
    return copied


def _digest(raw: memoryview) -> bytes:
    return hashlib.sha256(raw).digest()


def _copy_budget() -> int:
    """Bytes the fork-time copies may take: half the memory available now (``psutil``'s
    ``virtual_memory().available``; the copies live in ``/dev/shm``, i.e. in RAM), so a
    dataset near the machine's memory is hashed instead of doubled (NOTE [ Shared dataset
    buffers ], "Fork")."""
    import psutil

    try:
        return psutil.virtual_memory().available // 2
    except (OSError, RuntimeError):  # unreadable: /dev/shm's own room still limits the copy
        return 1 << 62


def _identity(raw: memoryview, pb: PickleBuffer) -> tuple[Any, tuple]:
    owner = memoryview(pb).obj
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base  # numpy hands F-ordered arrays over as a fresh ``.T`` view
    address = np.frombuffer(raw, dtype=np.uint8).__array_interface__["data"][0]
    view = memoryview(pb)
    return owner, (id(owner), address, raw.nbytes, view.format, view.shape)


class _NoRoom(Exception):
    """A buffer does not fit in ``/dev/shm``: plan again with it in-band."""

    def __init__(self, key: tuple) -> None:
        super().__init__(key)
        self.key = key


# ---------------------------------------------------------------------------------------------
# Main side: plan -> materialise -> commit
# ---------------------------------------------------------------------------------------------


@dataclass
class _Entry:
    """One big buffer the workers have: its last-sent copy (block) or fork-time digest."""

    owner: Any  # keeps id(owner) from being reused while the entry lives
    nbytes: int
    writeable: bool
    version: int
    block: SharedMemory | None = None
    digest: bytes | None = None  # inherited (fork), no room for a block: SHA-256 at the fork
    # Fork: the workers still use their inherited pages (the block, if any, is only the main
    # process's copy of them); False once they were sent the block.
    inherited: bool = False


@dataclass
class _Planned:
    """An out-of-band buffer of a plan; ``buffer`` holds the export until released."""

    key: tuple
    buffer: PickleBuffer
    owner: Any
    nbytes: int
    writeable: bool


@dataclass
class _Plan:
    """The dataset's state as pickled now: nothing copied, nothing sent yet."""

    data: bytes
    modules: tuple[str, ...]
    buffers: list[_Planned]

    def release(self) -> None:
        for p in self.buffers:
            p.buffer.release()


@dataclass
class _Update:
    """A materialised state: the payload and the entries it names, for :meth:`commit`."""

    payload: SharedPayload
    order: list[tuple]  # identity key of each buffer, in pickle order
    report: DatasetUpdate


class _Collector:
    """pickle's ``buffer_callback`` for one plan: which buffers go out of band.

    Args:
        threshold (int): buffers of at least this many bytes go out of band.
        known (dict): the sharer's entries (buffers that have a block or are inherited).
        inband (set[tuple]): identity keys forced in-band (no room for their block).
        room (int | None): bytes new blocks may take (None: unknown, no limit).
    """

    def __init__(
        self, threshold: int, known: dict[tuple, _Entry], inband: set[tuple], room: int | None
    ) -> None:
        self.threshold = threshold
        self.known = known
        self.inband = inband
        self.room = room
        self.buffers: list[_Planned] = []

    def __call__(self, pb: PickleBuffer) -> bool:
        try:
            raw = pb.raw()
        except BufferError:  # not contiguous: in-band
            return True
        with raw:
            if raw.nbytes < self.threshold:
                return True
            owner, key = _identity(raw, pb)
            nbytes = raw.nbytes
        if key in self.inband:
            return True
        if key not in self.known and all(p.key != key for p in self.buffers):
            if self.room is not None:
                if nbytes > self.room:
                    return True  # /dev/shm is nearly full: in-band
                self.room -= nbytes
        writeable = not memoryview(pb).readonly
        self.buffers.append(_Planned(key, pb, owner, nbytes, writeable))
        return False

    def forget(self) -> None:
        """The pickler starts over (by-value attempt failed): drop what it reported."""
        for p in self.buffers:
            p.buffer.release()
        self.buffers.clear()


class DatasetSharer:
    """Main process: share a dataset's big buffers with the workers, and own the blocks.

    See NOTE [ Shared dataset buffers ]. One per process pool; not thread-safe (the pool calls
    it under its own lock discipline: :meth:`check`, :meth:`start`, then per update
    :meth:`plan` -> :meth:`changed` -> :meth:`materialise` -> :meth:`commit`, then
    :meth:`close`).

    Args:
        threshold (int): buffers of at least this many bytes go to shared memory (default:
            :data:`SHARE_THRESHOLD`, 1 MiB).
        inherit (bool): the workers are forked and inherit the dataset (default: False).
    """

    def __init__(self, threshold: int = SHARE_THRESHOLD, *, inherit: bool = False) -> None:
        self.threshold = threshold
        self.inherit = inherit
        self.prefix: str | None = None
        self._entries: dict[tuple, _Entry] = {}
        self._pending: _Plan | None = None
        self._versions = itertools.count(1)
        self._forked = False  # inherit: the workers exist (new buffers now need blocks)
        self._sent_data: bytes | None = None  # digest of the small pickle they have
        self._sent_keys: list[tuple] = []

    # -- plan ----------------------------------------------------------------------------------

    def plan(self, dataset: Any, inband: set[tuple] | None = None) -> _Plan:
        """Pickle ``dataset`` with its big buffers out of band, copying nothing.

        Args:
            dataset (object): the dataset.
            inband (set[tuple] | None): identity keys to keep in the pickle (no room).

        Returns:
            _Plan: the pickle and the buffers (their exports held until released).

        Raises:
            SerializationError: the dataset cannot be pickled.
        """
        # Before a fork nothing is copied: the workers inherit every buffer.
        room = None if self.inherit and not self._forked else _shm.room()
        collector = _Collector(self.threshold, self._entries, inband or set(), room)
        data, modules = dump_dataset(dataset, collector, on_retry=collector.forget)
        return _Plan(data, modules, collector.buffers)

    def changed(self, plan: _Plan) -> bool:
        """Would :meth:`materialise` send anything? Reads only; the workers may be busy.

        Returns:
            bool: True when the small pickle, the set or order of big buffers, a buffer's
            writable flag or any of its bytes differ from what the workers have.
        """
        if hashlib.blake2b(plan.data).digest() != self._sent_data:
            return True
        if [p.key for p in plan.buffers] != self._sent_keys:
            return True
        for p in plan.buffers:
            entry = self._entries[p.key]
            if entry.writeable != p.writeable:
                return True
            with p.buffer.raw() as raw:
                if entry.block is not None:
                    if _differs(raw, entry.block):
                        return True
                elif _digest(raw) != entry.digest:
                    return True
        return False

    # -- materialise ---------------------------------------------------------------------------

    def _new_block(self, key: tuple, raw: memoryview) -> SharedMemory:
        if self.prefix is None:  # pragma: no cover - start() sets it first
            raise RuntimeError("compatmp: DatasetSharer used before start()")
        room = _shm.room()
        if room is not None and raw.nbytes > room:
            raise _NoRoom(key)
        block = _shm.create_block(self.prefix, raw.nbytes)
        try:
            block.buf[: raw.nbytes] = raw
        except BaseException:
            _shm.unlink_block(block)
            raise
        return block

    def materialise(self, plan: _Plan) -> _Update:
        """Bring every block up to ``plan``'s state and build the payload naming them.

        Call only while no worker computes a batch: a changed block is written in place
        (NOTE [ Shared dataset buffers ]). Releases ``plan``.

        Returns:
            _Update: the payload, for :meth:`commit` once every worker has it.

        Raises:
            _NoRoom: a new block does not fit; plan again with that key in-band.
            OSError: the system refused a block.
        """
        try:
            refs = []
            changed = copied = 0
            done: set[tuple] = set()
            for p in plan.buffers:
                entry = self._entries.get(p.key)
                with p.buffer.raw() as raw:
                    if p.key in done:
                        pass  # the same buffer twice in the dataset: handled once
                    elif entry is None:
                        block = self._new_block(p.key, raw)
                        version = next(self._versions)
                        entry = _Entry(p.owner, p.nbytes, p.writeable, version, block)
                        self._entries[p.key] = entry
                        changed += 1
                        copied += p.nbytes
                    elif entry.block is not None:
                        n = _patch(entry.block, raw)
                        if n or entry.writeable != p.writeable:
                            entry.version = next(self._versions)
                            entry.writeable = p.writeable
                            changed += n > 0
                            copied += n
                            # fork: the workers now map the block afresh, as a spawn worker
                            # does at a new version (their own writes to it go)
                            entry.inherited = False
                    elif _digest(raw) != entry.digest:  # inherited, written since the fork
                        entry.block = self._new_block(p.key, raw)
                        entry.digest = None
                        entry.inherited = False
                        entry.version = next(self._versions)
                        entry.writeable = p.writeable
                        changed += 1
                        copied += p.nbytes
                    elif entry.writeable != p.writeable:
                        entry.version = next(self._versions)
                        entry.writeable = p.writeable
                done.add(p.key)
                version, writeable = entry.version, entry.writeable
                if entry.inherited:
                    refs.append(BufferRef("", p.nbytes, version, writeable, p.key))
                else:
                    assert entry.block is not None
                    refs.append(BufferRef(entry.block.name, p.nbytes, version, writeable))
            payload = SharedPayload(plan.data, tuple(refs), plan.modules)
            report = DatasetUpdate(True, len(plan.data), len(done), changed, copied)
            return _Update(payload, [p.key for p in plan.buffers], report)
        finally:
            plan.release()

    # -- commit --------------------------------------------------------------------------------

    def commit(self, update: _Update) -> None:
        """Every worker has ``update``'s state: unlink the blocks it does not name."""
        self._sent_data = hashlib.blake2b(update.payload.data).digest()
        self._sent_keys = list(update.order)
        live = set(update.order)
        for key in [k for k in self._entries if k not in live]:
            self._retire(self._entries.pop(key))

    # -- the pool's calls ----------------------------------------------------------------------

    def check(self, dataset: Any) -> None:
        """Pickle ``dataset`` once, buffers out-of-band and not copied (constructor time).

        Raises:
            SerializationError: the dataset cannot be pickled (the pool then uses threads).
        """
        self._pending = self.plan(dataset)

    def start(self, prefix: str | None, dataset: Any) -> Any:
        """What the workers start with: the dataset itself (fork) or a :class:`SharedPayload`.

        Args:
            prefix (str | None): the pool's block prefix (:func:`compatmp._shm_names.block_prefix`);
                None where the pool has no shared memory (Ray: the threshold keeps every
                buffer in-band).
            dataset (object): the dataset :meth:`check` pickled.

        Returns:
            object: ``dataset`` when :attr:`inherit`, else the payload (its blocks created now).

        Raises:
            OSError: the system refused a block.
        """
        self.prefix = prefix
        plan = self._pending if self._pending is not None else self.plan(dataset)
        self._pending = None
        if self.inherit:
            budget = _copy_budget()
            try:
                for p in plan.buffers:
                    if p.key in self._entries:
                        continue
                    with p.buffer.raw() as raw:  # before the fork: what the workers will have
                        block, digest = self._fork_copy(p.key, raw, budget)
                    if block is not None:
                        budget -= p.nbytes
                    version = next(self._versions)
                    self._entries[p.key] = _Entry(
                        p.owner, p.nbytes, p.writeable, version, block, digest, inherited=True
                    )
                    _inherited[p.key] = p.owner  # the workers inherit the owners alive
                self._sent_data = hashlib.blake2b(plan.data).digest()
                self._sent_keys = [p.key for p in plan.buffers]
                self._forked = True
            finally:
                plan.release()
            return dataset
        update = self._materialise_with_room(plan, dataset)
        self.commit(update)
        return update.payload

    def _fork_copy(
        self, key: tuple, raw: memoryview, budget: int
    ) -> tuple[SharedMemory | None, bytes | None]:
        """What the main process keeps of an inherited buffer, taken just before the fork.

        A copy in a block when ``/dev/shm`` has room and the copy fits in ``budget`` bytes
        (compared at memcmp speed later, and the workers' copy once the buffer changes), else
        a SHA-256 digest (NOTE [ Shared dataset buffers ], "Fork").

        Returns:
            tuple[SharedMemory | None, bytes | None]: ``(block, None)`` or ``(None, digest)``.
        """
        if self.prefix is None or raw.nbytes > budget:  # no shared memory, or no memory
            return None, _digest(raw)
        try:
            return self._new_block(key, raw), None
        except (_NoRoom, OSError):  # full or refused: hashing is slower, never wrong
            return None, _digest(raw)

    def _materialise_with_room(self, plan: _Plan, dataset: Any) -> _Update:
        """:meth:`materialise`, planning again with buffers in-band while they do not fit."""
        inband: set[tuple] = set()
        while True:
            try:
                return self.materialise(plan)
            except _NoRoom as exc:
                inband.add(exc.key)
                plan = self.plan(dataset, inband)

    def update(self, dataset: Any, when_idle: Any = None) -> _Update | None:
        """Plan, compare and (if anything changed) materialise ``dataset``'s current state.

        Args:
            dataset (object): the dataset, usually the one given before, changed in place.
            when_idle (Callable[[], None] | None): called before any block is written, to
                wait until no worker computes a batch (default: None, the caller knows).

        Returns:
            _Update | None: the update to send and then :meth:`commit`; None: unchanged.

        Raises:
            SerializationError: the dataset can no longer be pickled (nothing was written).
            OSError: the system refused a block.
        """
        plan = self.plan(dataset)
        try:
            if not self.changed(plan):
                return None
        except BaseException:
            plan.release()
            raise
        if when_idle is not None:
            try:
                when_idle()
            except BaseException:
                plan.release()
                raise
        return self._materialise_with_room(plan, dataset)

    def block_names(self) -> list[str]:
        """Names of the blocks this sharer owns now (for tests and diagnostics)."""
        return [e.block.name for e in self._entries.values() if e.block is not None]

    def close(self) -> None:
        """Unlink every block (the pool is closing); idempotent."""
        if self._pending is not None:
            self._pending.release()
            self._pending = None
        entries, self._entries = list(self._entries.values()), {}
        for entry in entries:
            self._retire(entry)

    @staticmethod
    def _retire(entry: _Entry) -> None:
        """Forget an entry: its inherited owner and its block (the workers moved on)."""
        for key in [k for k, v in _inherited.items() if v is entry.owner]:
            del _inherited[key]
        if entry.block is not None:
            _shm.unlink_block(entry.block)
            entry.block = None
