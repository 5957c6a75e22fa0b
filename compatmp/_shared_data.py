"""Big dataset buffers in shared memory: sent once, mapped read-only by every worker.

:class:`DatasetSharer` (main process, one per process pool) pickles the dataset with pickle
protocol 5 (PEP 574): every buffer of at least :data:`SHARE_THRESHOLD` bytes (a NumPy array's
data, a ``bytearray``, anything that hands the pickler a ``pickle.PickleBuffer``) goes
*out-of-band* into a shared-memory block that the main process creates once; what travels to
the workers is a :class:`SharedPayload`: the small remainder of the pickle plus the block
names. A worker maps each block read-only (:func:`_map_readonly`) and unpickles with
``buffers=``, so NumPy rebuilds the arrays as ``np.frombuffer`` views of the mapping
(``writeable`` is False): one copy of the data in the machine, however many workers.

NOTE [ Shared dataset buffers ]
Ownership. The blocks belong to the MAIN process (unlike batch blocks, which belong to the
worker that fills them, NOTE [ Shared-memory ownership ] in :mod:`compatmp._shm`): created
when the pool sends the dataset, unlinked by :meth:`DatasetSharer.close` when the pool closes,
shuts down after an error or is garbage collected (``_Core.close``), and after an update for
the blocks the new state no longer names. Their names start with the pool's batch-block prefix
(:func:`compatmp._shm.block_prefix`), so the pool's :func:`compatmp._shm.sweep` finds them
too; if the main process is killed, ``multiprocessing``'s resource tracker, with which
``SharedMemory(create=True)`` registered them, unlinks them. Workers map with ``shm_open`` +
``mmap(PROT_READ)`` (``OpenFileMapping`` read-only on Windows), never through
``SharedMemory``, so they never register a block with the tracker and never unlink one; a
worker's mapping stays valid while any array of its dataset uses it, even after the unlink.

Re-sync (``update_dataset``). Each out-of-band buffer is recognised by *identity and
version*, never by hashing it: the identity is the buffer's owner (the base ``ndarray``, or
the ``bytes``/``bytearray``), its data address, size, format and shape; the version is a
sampled fingerprint (:func:`_fingerprint`: every page's worth of stride through the buffer,
about 256 KiB read in all, plus the first and last 4 KiB) and the ``writeable`` flag. A
buffer whose identity and version match a block already sent is not copied, hashed or sent
again: only its name travels. The sharer keeps a reference to each owner so that its ``id``
cannot be reused while the entry lives; entries (and blocks) not named by the latest state
are dropped after the workers have it. What this guarantees:

* A replaced array (``self.x = self.x[perm]``, a new array loaded), a reshaped or resized one,
  or a different view is always detected and sent once, to every worker.
* An array that is read-only (``writeable`` False) in the main process cannot have been
  written in place (without flipping the flag back and forth) and is never re-sent.
* An in-place write to a *writeable* array (``np.random.shuffle(self.x)``, ``self.x *= 2``) is
  detected when it changes one of the sampled bytes - any write touching much of the array
  does, with near certainty. A write of a few elements may go unnoticed: the workers keep the
  old values. To be sure, assign a new array or mark arrays read-only (``x.setflags(
  write=False)``) after building them. The README says the same.

Fork. Under ``fork`` the workers inherit the dataset object itself (no pickle, no block,
nothing copied: the pages are shared copy-on-write); the sharer still pickles it once
(cheaply, buffers out-of-band and not copied) to know its state and to fail early when it
cannot be pickled. An update then sends a :class:`SharedPayload` whose unchanged big buffers
are *inherited* references (``BufferRef.name == ""``): the buffer's identity key, whose data
address is valid in the forked worker too (same address space at fork time). The main
process registers those keys with their owners in :data:`_inherited` before the workers
fork, so each worker holds the owners alive in its own copy and rebuilds the buffer as a
read-only view of its copy-on-write pages (:func:`_inherited_view`): nothing copied, nothing
in shared memory. Buffers that changed since the fork go into blocks as above.

Where blocks do not fit (``/dev/shm`` nearly full, e.g. Docker's 64 MB default), the buffer
is pickled in-band, as before: slower, never wrong.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import mmap
import os
import sys
import threading
import types
from dataclasses import dataclass, field
from multiprocessing.shared_memory import SharedMemory
from pickle import PickleBuffer
from typing import Any

import cloudpickle
import numpy as np

from . import _shm
from ._exceptions import SerializationError
from ._serialize import CompatPickler, dumps, loads
from ._standin import PyDatasetStandIn, keras_pydataset

__all__ = ["SHARE_THRESHOLD", "BufferRef", "DatasetSharer", "SharedPayload"]

# Buffers of at least this many bytes go to shared memory (bytes). joblib memory-maps arrays
# above 1 MB for its workers (``max_nbytes``); below, a block (a file descriptor, a mapping,
# a page-rounded size) costs more than pickling the bytes.
SHARE_THRESHOLD = 1024 * 1024

# Bytes sampled by :func:`_fingerprint` across a buffer (plus its first and last 4 KiB).
_FINGERPRINT_SAMPLES = 256 * 1024
_EDGE = 4096

# Packages never sent by value (NOTE [ Workers without Keras ] in this module); compatmp's
# own private modules (``compatmp._*``) neither.
_FRAMEWORKS = frozenset({"keras", "tensorflow", "tf_keras"})


def _is_framework(module: str) -> bool:
    return (
        module.split(".")[0] in _FRAMEWORKS
        or module == "compatmp"
        or module.startswith("compatmp._")
    )


# Top-level modules never worth preloading in the forkserver.
_NOT_PRELOADED = frozenset({"__main__", "builtins", "copyreg", "_codecs", "cloudpickle"})


@dataclass(frozen=True)
class BufferRef:
    """One out-of-band buffer of the dataset, in a shared-memory block.

    Attributes:
        name (str): the block name (no leading ``/``); ``""`` for a buffer a forked worker
            inherited.
        nbytes (int): the buffer's size in bytes (the block may be larger: page rounding).
        key (tuple | None): for an inherited buffer, its identity key (owner id, address,
            size, format, shape) in the main process at fork time.
    """

    name: str
    nbytes: int
    key: tuple | None = None  # name "": a buffer the forked worker inherited (NOTE above)


@dataclass(frozen=True)
class SharedPayload:
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
        """Unpickle in a worker, each buffer a read-only view of its block (zero-copy).

        Returns:
            object: the dataset; its big NumPy arrays have ``flags.writeable`` False.

        Raises:
            FileNotFoundError: a block no longer exists.
        """
        views = [_worker_view(ref) for ref in self.buffers]
        keep = {ref.name for ref in self.buffers}
        for name in [n for n in _mapped if n not in keep]:
            del _mapped[name]  # arrays still using the mapping keep it alive
        return loads(self.data, buffers=views)


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------

_mapped: dict[str, memoryview] = {}  # block name -> read-only view, in this worker process

# Identity key -> owner of each buffer forked workers inherit; filled by the main process
# before it forks them, read in the workers (their copy). NOTE [ Shared dataset buffers ].
_inherited: dict[tuple, Any] = {}


def _inherited_view(key: tuple) -> memoryview:
    """A read-only view of an inherited buffer: the worker's copy-on-write pages."""
    import ctypes

    if key not in _inherited:
        raise RuntimeError(
            "compatmp: an update named a dataset buffer this worker did not inherit "
            "(internal error: only forked workers get inherited references)"
        )
    address, nbytes = key[1], key[2]
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B").toreadonly()


def _worker_view(ref: BufferRef) -> memoryview:
    if not ref.name:
        assert ref.key is not None
        return _inherited_view(ref.key)
    view = _mapped.get(ref.name)
    if view is None:
        view = _mapped[ref.name] = _map_readonly(ref.name, ref.nbytes)
    return view


def _map_readonly(name: str, nbytes: int) -> memoryview:
    """Map block ``name`` read-only, without ``SharedMemory`` (no resource-tracker entry).

    Mirrors ``multiprocessing.shared_memory.SharedMemory.__init__`` (CPython 3.8-3.14):
    ``shm_open`` + ``mmap`` on POSIX, a named file mapping on Windows.
    """
    if os.name == "nt":
        mm = mmap.mmap(-1, nbytes, tagname=name, access=mmap.ACCESS_READ)
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
            mm = mmap.mmap(fd, nbytes, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
    return memoryview(mm)[:nbytes].toreadonly()


# ---------------------------------------------------------------------------------------------
# Main side
# ---------------------------------------------------------------------------------------------


def _fingerprint(raw: memoryview) -> bytes:
    """A cheap version of a buffer: a strided byte sample, plus its first and last 4 KiB."""
    u8 = np.frombuffer(raw, dtype=np.uint8)
    step = max(1, u8.size // _FINGERPRINT_SAMPLES) | 1  # odd: the offsets vary within rows
    h = hashlib.blake2b(digest_size=16)
    h.update(u8[::step].tobytes())
    h.update(u8[:_EDGE].tobytes())
    h.update(u8[-_EDGE:].tobytes())
    return h.digest()


def _identity(raw: memoryview, pb: PickleBuffer) -> tuple[Any, tuple]:
    owner = memoryview(pb).obj
    while isinstance(owner, np.ndarray) and owner.base is not None:
        owner = owner.base  # numpy hands F-ordered arrays over as a fresh ``.T`` view
    address = np.frombuffer(raw, dtype=np.uint8).__array_interface__["data"][0]
    view = memoryview(pb)
    return owner, (id(owner), address, raw.nbytes, view.format, view.shape)


@dataclass
class _Entry:
    owner: Any  # keeps id(owner) from being reused while the entry lives
    fingerprint: bytes
    writeable: bool
    serial: int
    block: SharedMemory | None = None
    inherited: bool = False  # forked workers have it (registered in _inherited)


class DatasetSharer:
    """Main process: pickle a dataset with its big buffers in shared memory, and own the blocks.

    See NOTE [ Shared dataset buffers ]. One per process pool; not thread-safe (the pool calls
    it under its own lock discipline: constructor, then ``update_dataset``, then ``close``).

    Args:
        threshold (int): buffers of at least this many bytes go to shared memory (default:
            :data:`SHARE_THRESHOLD`, 1 MiB).
        inherit (bool): the workers are forked and inherit the dataset (default: False).
    """

    def __init__(self, threshold: int = SHARE_THRESHOLD, *, inherit: bool = False) -> None:
        self.threshold = threshold
        self.inherit = inherit
        self.prefix: str | None = None
        self.digest: bytes | None = None
        self._entries: dict[tuple, _Entry] = {}
        self._pending: tuple[bytes, list[tuple], tuple[str, ...]] | None = None
        self._serial = itertools.count()
        self._retired: list[_Entry] = []  # replaced; unlinked once every worker moved on
        self._live: set[tuple] | None = None

    # -- pickling ------------------------------------------------------------------------------

    def _pickle(self, dataset: Any, materialize: bool) -> tuple[bytes, list[tuple], tuple]:
        keys: list[tuple] = []
        seen: dict[tuple, _Entry] = {}

        def callback(pb: PickleBuffer) -> bool:
            try:
                raw = pb.raw()
            except BufferError:  # not contiguous: in-band
                return True
            with raw:
                if raw.nbytes < self.threshold:
                    return True
                owner, key = _identity(raw, pb)
                writeable = not memoryview(pb).readonly
                entry = self._entries.get(key) or seen.get(key)
                if entry is not None and (entry.writeable or writeable):
                    if _fingerprint(raw) != entry.fingerprint or entry.writeable != writeable:
                        entry = None  # written in place (or the flag flipped): a new version
                if entry is None:
                    entry = _Entry(owner, _fingerprint(raw), writeable, next(self._serial))
                if materialize and _needs_block(entry):
                    block = self._copy_to_block(raw)
                    if block is None:
                        return True  # /dev/shm is full: in-band
                    entry.block = block
            seen[key] = entry
            keys.append(key)
            return False

        data, modules = _dump(dataset, callback, on_retry=keys.clear)
        for key, entry in seen.items():  # the new state replaces the old entries
            old = self._entries.get(key)
            if old is not None and old is not entry:
                self._retired.append(old)  # workers may still load it: unlink at commit()
        self._entries.update(seen)
        return data, keys, modules

    def _copy_to_block(self, raw: memoryview) -> SharedMemory | None:
        if self.prefix is None:  # pragma: no cover - start() sets it first
            raise RuntimeError("compatmp: DatasetSharer used before start()")
        free = _shm._shm_free_bytes()
        if free is not None and raw.nbytes + _shm._SHM_HEADROOM > free:
            return None
        block = _shm.create_block(self.prefix, raw.nbytes)
        try:
            block.buf[: raw.nbytes] = raw
        except BaseException:
            _unlink(block)
            raise
        return block

    def _payload(self, data: bytes, keys: list[tuple], modules: tuple) -> SharedPayload:
        refs = []
        for key in keys:
            entry = self._entries[key]
            if entry.block is None:
                assert entry.inherited
                refs.append(BufferRef("", _nbytes_of(key), key))
            else:
                refs.append(BufferRef(entry.block.name, _nbytes_of(key)))
        return SharedPayload(data, tuple(refs), modules)

    def _digest(self, data: bytes, keys: list[tuple]) -> bytes:
        h = hashlib.blake2b(data, digest_size=32)
        h.update(repr([self._entries[k].serial for k in keys]).encode())
        return h.digest()

    # -- the pool's calls ----------------------------------------------------------------------

    def check(self, dataset: Any) -> None:
        """Pickle ``dataset`` once, buffers out-of-band and not copied (constructor time).

        Raises:
            SerializationError: the dataset cannot be pickled (the pool then uses threads).
        """
        data, keys, modules = self._pickle(dataset, materialize=False)
        self._pending = (data, keys, modules)
        self.digest = self._digest(data, keys)

    def start(self, prefix: str, dataset: Any) -> Any:
        """What the workers start with: the dataset itself (fork) or a :class:`SharedPayload`.

        Args:
            prefix (str): the pool's block prefix (:func:`compatmp._shm.block_prefix`).
            dataset (object): the dataset :meth:`check` pickled.

        Returns:
            object: ``dataset`` when :attr:`inherit`, else the payload (its blocks created now).
        """
        self.prefix = prefix
        assert self._pending is not None, "check() first"
        data, keys, modules = self._pending
        self._pending = None
        if self.inherit:
            for key in keys:  # before the fork: the workers inherit these owners alive
                entry = self._entries[key]
                entry.inherited = True
                _inherited[key] = entry.owner
            return dataset
        if any(self._entries[k].block is None for k in keys):
            data, keys, modules = self._pickle(dataset, materialize=True)
            self.digest = self._digest(data, keys)
        return self._payload(data, keys, modules)

    def update(self, dataset: Any) -> tuple[SharedPayload | None, bytes]:
        """The payload for ``dataset``'s current state, or None when nothing changed.

        Unchanged big buffers are neither copied nor hashed: they keep their blocks (NOTE
        [ Shared dataset buffers ]).

        Returns:
            tuple[SharedPayload | None, bytes]: the payload (None: unchanged) and the digest
            to :meth:`commit` once every worker has it.

        Raises:
            SerializationError: the dataset can no longer be pickled.
        """
        data, keys, modules = self._pickle(dataset, materialize=False)
        digest = self._digest(data, keys)
        if digest == self.digest:
            return None, digest
        if any(_needs_block(self._entries[k]) for k in keys):
            data, keys, modules = self._pickle(dataset, materialize=True)
        self._live = set(keys)
        return self._payload(data, keys, modules), digest

    def commit(self, digest: bytes) -> None:
        """Every worker has the state of ``digest``: unlink the blocks it does not name."""
        self.digest = digest
        retired, self._retired = self._retired, []
        if self._live is not None:
            retired += [self._entries.pop(k) for k in list(self._entries) if k not in self._live]
            self._live = None
        for entry in retired:
            self._unlink(entry)

    def block_names(self) -> list[str]:
        """Names of the blocks this sharer owns now (for tests and diagnostics)."""
        return [e.block.name for e in self._entries.values() if e.block is not None]

    def close(self) -> None:
        """Unlink every block (the pool is closing); idempotent."""
        entries, self._entries = list(self._entries.values()), {}
        entries += self._retired
        self._retired = []
        for entry in entries:
            self._unlink(entry)

    @staticmethod
    def _unlink(entry: _Entry) -> None:
        if entry.inherited:
            entry.inherited = False
            for key in [k for k, v in _inherited.items() if v is entry.owner]:
                del _inherited[key]
        if entry.block is not None:
            _unlink(entry.block)
            entry.block = None


def _needs_block(entry: _Entry) -> bool:
    return entry.block is None and not entry.inherited


def _nbytes_of(key: tuple) -> int:
    return key[2]


def _unlink(block: SharedMemory) -> None:
    try:
        block.close()
    except BufferError:  # pragma: no cover - nothing in the main process views a block
        pass
    try:
        block.unlink()
    except FileNotFoundError:
        pass


# ---------------------------------------------------------------------------------------------
# NOTE [ Workers without Keras ]
# ---------------------------------------------------------------------------------------------
#
# A ``keras.utils.PyDataset`` (alias ``keras.utils.Sequence``, also reached as
# ``tf.keras.utils.Sequence``) subclass defined in an importable module - ``from mydata import
# Images``, the usual layout on Windows and macOS - is pickled by reference: a spawn worker
# imports ``mydata``, which imports Keras and TensorFlow (seconds and ~575 MB per worker) even
# when ``__getitem__`` needs only NumPy. For the pool's dataset pickle, compatmp therefore sends
# such a module *by value* (``cloudpickle.register_pickle_by_value`` for the duration of the
# dump): the class, its methods and the module-level helpers they call travel as code, and the
# worker never imports ``mydata``. Every reference to Keras' ``PyDataset`` class itself - the
# base, or ``PyDataset.__init__(self, ...)`` in a method - becomes the Keras-free
# :class:`compatmp._standin.PyDatasetStandIn` (NOTE [ PyDataset stand-in ]). A method that
# uses ``keras`` or ``tf`` makes cloudpickle send that module by name: the worker imports it
# when the dataset is loaded, so such code still works, it just pays the import.
#
# Limits: only the modules of the dataset's own classes (those in its MRO before
# ``PyDataset``, not from Keras, TensorFlow or compatmp) go by value; a helper from *another*
# module that imports Keras still makes the worker import it. Module-level state is copied as
# it is when the pool starts or updates, as for ``__main__`` classes. In the worker,
# ``isinstance(ds, keras.utils.PyDataset)`` is False.

_by_value_lock = threading.Lock()


def _standin_class() -> type:
    return PyDatasetStandIn


def _by_value_modules(obj: Any) -> list[types.ModuleType]:
    pydataset = keras_pydataset()
    cls = type(obj)
    if pydataset is None or not issubclass(cls, pydataset):
        return []
    found = []
    for c in cls.__mro__:
        if c is pydataset:
            break
        name = getattr(c, "__module__", None)
        module = sys.modules.get(name) if isinstance(name, str) else None
        if module is None or name == "__main__" or _is_framework(name):
            continue
        if module not in found:
            found.append(module)
    return found


class _RecordingPickler(CompatPickler):
    """CompatPickler that notes the packages it meets and swaps Keras' ``PyDataset`` class."""

    def __init__(self, *args: Any, swap_pydataset: type | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.modules: set[str] = set()
        self._swap = swap_pydataset

    def reducer_override(self, obj: Any) -> Any:
        if self._swap is not None and obj is self._swap:
            return _standin_class, ()
        if isinstance(obj, types.ModuleType):
            name: Any = obj.__name__
        elif isinstance(obj, (type, types.FunctionType)):
            name = getattr(obj, "__module__", None)
        else:
            name = type(obj).__module__
        if isinstance(name, str):
            self.modules.add(name.split(".")[0])
        return super().reducer_override(obj)


def _dump(obj: Any, buffer_callback: Any, on_retry: Any = None) -> tuple[bytes, tuple[str, ...]]:
    """Pickle ``obj`` (buffers through ``buffer_callback``); also return its packages.

    Module-defined Keras datasets go by value (NOTE [ Workers without Keras ]); if that
    fails, by reference as before.

    Raises:
        SerializationError: as :func:`compatmp._serialize.dumps`, with attribute paths.
    """
    by_value = _by_value_modules(obj)
    attempts = [by_value, []] if by_value else [[]]
    for k, modules in enumerate(attempts):
        try:
            return _dump_once(obj, buffer_callback, modules)
        except Exception as exc:
            if k + 1 < len(attempts):
                if on_retry is not None:
                    on_retry()  # forget the buffers the failed attempt reported
                continue  # by value failed (e.g. module state cloudpickle refuses)
            dumps(obj, root="dataset")  # raises SerializationError naming the culprits
            raise SerializationError(
                f"cannot pickle dataset to send it to worker processes: "
                f"{type(exc).__name__}: {exc}",
                [],
            ) from exc
    raise AssertionError("unreachable")  # pragma: no cover


def _dump_once(
    obj: Any, buffer_callback: Any, by_value: list[types.ModuleType]
) -> tuple[bytes, tuple[str, ...]]:
    buf = io.BytesIO()
    with _by_value_lock:
        added = []
        for module in by_value:
            if not cloudpickle.cloudpickle._is_registered_pickle_by_value(module):
                cloudpickle.register_pickle_by_value(module)
                added.append(module)
        try:
            pickler = _RecordingPickler(
                buf,
                None,
                buffer_callback=buffer_callback,
                swap_pydataset=keras_pydataset() if by_value else None,
            )
            pickler.dump(obj)
        finally:
            for module in added:
                cloudpickle.unregister_pickle_by_value(module)
    skip = by_value_names(by_value)
    modules = tuple(
        sorted(
            m
            for m in pickler.modules
            if m in sys.modules and m not in _NOT_PRELOADED and m not in skip
        )
    )
    return buf.getvalue(), modules


def by_value_names(modules: list[types.ModuleType]) -> set[str]:
    """Top-level names of ``modules`` (sent by value, so not to be preloaded)."""
    return {m.__name__.split(".")[0] for m in modules}
