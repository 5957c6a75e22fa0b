"""Shared-memory blocks themselves: created, mapped without a file descriptor, unlinked.

The memory under the batches (:mod:`compatmp._batch_blocks`) and the dataset's big buffers
(:mod:`compatmp._shared_data`): :func:`create_block` (named by
:func:`compatmp._shm_names.block_name`), :meth:`Block.attach`, :func:`map_fd`,
:func:`unlink_block`, :func:`ensure_tracker`, and :func:`room` (what a new block may still
take). Who creates and who unlinks which block: NOTE [ Shared-memory ownership ] in
:mod:`compatmp._batch_blocks`.

File descriptors: a process maps each block and closes the descriptor from ``shm_open`` at
once (:class:`Block`); the mapping stays valid without it (POSIX ``mmap``: it "adds an extra
reference to the file ... which is not removed by a subsequent close()"). ``SharedMemory``
keeps two per block (its own, and the ``dup`` inside ``mmap.mmap``), so a main process
holding many zero-copy batches hit ``ulimit -n`` (256 on macOS: EMFILE after 121 batches of
300 KB) and a worker holding their blocks in use did too. Held batches are now limited by
memory only. A :class:`Block`'s mapping is unmapped when the last array viewing it is
garbage, not by ``close()``, so an array can never outlive its memory. Windows keeps
``SharedMemory`` (one handle per mapping, which is what keeps the block alive there).

Resource tracker (bpo-38119, python/cpython#82300): ``SharedMemory`` registers a block with
``multiprocessing``'s resource tracker on create and, before Python 3.13 (or with
``track=True``, the default, since), also on attach; the tracker unlinks - and warns about
("resource_tracker: There appear to be N leaked shared_memory objects") - whatever is still
registered when the last process using it exits. The tracker keeps a *set* of names per type
(3.10 to 3.13 alike). :class:`Block` keeps exactly ``SharedMemory``'s create and unlink
semantics and does not register on attach: the worker's create registers a name once and the
worker's unlink unregisters it once; the main process, which only attaches, never touches the
tracker. This needs worker and main to talk to the *same* tracker: :func:`ensure_tracker`
starts the main's tracker before any worker starts, so fork children inherit it and
spawn/forkserver children are handed its fd. Blocks of a killed worker stay registered;
:func:`compatmp._shm_names.sweep` unlinks *and* unregisters them (registering first, so the
unregister balances whatever the tracker holds), so nothing is reported at exit.
"""

from __future__ import annotations

import mmap
import os
import sys
import weakref
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from . import _shm_names

__all__ = [
    "Block",
    "create_block",
    "ensure_tracker",
    "map_fd",
    "room",
    "unlink_block",
]

# Headroom left in /dev/shm when deciding whether a batch fits (bytes).
_SHM_HEADROOM = 16 * 1024 * 1024


# ---------------------------------------------------------------------------------------------
# Blocks without file descriptors (the module docstring, "File descriptors")
# ---------------------------------------------------------------------------------------------

_libc_mmap: Any = None  # (mmap, munmap) from the C library, loaded on first use


def _c_mmap() -> Any:
    global _libc_mmap
    if _libc_mmap is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        c_mmap, c_munmap = libc.mmap, libc.munmap
        c_mmap.restype = ctypes.c_void_p
        c_mmap.argtypes = [
            *(ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int),
            ctypes.c_int64 if ctypes.sizeof(ctypes.c_void_p) == 8 else ctypes.c_long,  # off_t
        ]
        c_munmap.restype = ctypes.c_int
        c_munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc_mmap = (c_mmap, c_munmap, ctypes)
    return _libc_mmap


def map_fd(fd: int, size: int, private: bool = False) -> memoryview:
    """Map ``size`` bytes of ``fd`` read-write; the mapping keeps no descriptor.

    Args:
        fd (int): an open descriptor of a shared-memory block (or any mappable file).
        size (int): bytes to map, from offset 0.
        private (bool): False (default): ``MAP_SHARED``, writes reach the block;
            True: ``MAP_PRIVATE``, copy-on-write, writes stay in this process (the
            dataset's blocks in workers, NOTE [ Shared dataset buffers ] in
            ``compatmp._shared_data``; ``fd`` may then be open read-only).

    Raises:
        OSError: the kernel refused the mapping (``errno`` from ``mmap``).

    The caller may close ``fd`` at once. The mapping is unmapped when the returned memoryview
    and everything made from it (NumPy arrays, slices) are garbage - never earlier, so no
    array can outlive its memory.

    Python's ``mmap.mmap`` keeps a ``dup`` of the descriptor for ``size()``/``resize()``
    (Modules/mmapmodule.c) unless ``trackfd=False`` (3.13+). Before 3.13 this calls the C
    library's ``mmap``/``munmap`` through ctypes, and falls back to ``mmap.mmap`` (one
    descriptor per block) where ctypes is missing.
    """
    flags = mmap.MAP_PRIVATE if private else mmap.MAP_SHARED
    prot = mmap.PROT_READ | mmap.PROT_WRITE
    if sys.version_info >= (3, 13):
        mm = mmap.mmap(fd, size, flags=flags, prot=prot, trackfd=False)  # type: ignore[call-arg]
        return memoryview(mm)
    try:
        c_mmap, c_munmap, ctypes = _c_mmap()
    except (ImportError, OSError, AttributeError):  # pragma: no cover - no ctypes here
        return memoryview(mmap.mmap(fd, size, flags=flags, prot=prot))
    addr = c_mmap(None, size, prot, flags, fd, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:  # MAP_FAILED
        err = ctypes.get_errno()
        raise OSError(err, f"mmap of a {size}-byte shared-memory block: {os.strerror(err)}")
    memory = (ctypes.c_ubyte * size).from_address(addr)
    weakref.finalize(memory, c_munmap, addr, size).atexit = False  # the kernel unmaps at exit
    return memoryview(memory).cast("B")


class Block:
    """A POSIX shared-memory block mapped into this process, holding no file descriptor.

    Made by :func:`create_block` (worker side) or :meth:`attach` (main side). Same interface
    as :class:`multiprocessing.shared_memory.SharedMemory` (``name``, ``size``, ``buf``,
    ``close()``, ``unlink()``), but the descriptor from ``shm_open`` is closed as soon as the
    block is mapped: a process holding thousands of blocks holds no descriptor for them
    (``SharedMemory`` keeps two per block, its own and ``mmap``'s duplicate, and hits
    ``ulimit -n``; 256 by default on macOS). Resource tracker: :meth:`_create` registers the
    name and :meth:`unlink` unregisters it, exactly as ``SharedMemory`` does; :meth:`attach`
    does not register (the creator already did, see NOTE [ Shared-memory ownership ]).

    Attributes:
        name (str): the block name, without the leading ``/``.
        size (int): the block's size in bytes.
        buf (memoryview | None): the whole block, writable, format ``"B"``; None after
            :meth:`close`.
    """

    __slots__ = ("buf", "name", "size")

    def __init__(self, name: str, size: int, buf: memoryview) -> None:
        self.name = name
        self.size = size
        self.buf: memoryview | None = buf

    @classmethod
    def _create(cls, name: str, size: int) -> Block:
        import _posixshmem
        from multiprocessing import resource_tracker

        if size <= 0:
            raise ValueError(f"a shared-memory block needs size > 0 bytes; got {size}")
        fd = _posixshmem.shm_open("/" + name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            os.ftruncate(fd, size)
            buf = map_fd(fd, size)
        except BaseException:
            _posixshmem.shm_unlink("/" + name)
            raise
        finally:
            os.close(fd)
        resource_tracker.register("/" + name, "shared_memory")
        return cls(name, size, buf)

    @classmethod
    def attach(cls, name: str) -> Block:
        """Map the existing block ``name`` read-write; the descriptor is closed at once.

        Args:
            name (str): the block name, without the leading ``/``.

        Raises:
            FileNotFoundError: no such block.
            OSError: it cannot be opened or mapped.
        """
        import _posixshmem

        fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
        try:
            size = os.fstat(fd).st_size
            buf = map_fd(fd, size)
        finally:
            os.close(fd)
        return cls(name, size, buf)

    def close(self) -> None:
        """Let go of this handle's mapping; it is unmapped once no array views it. Idempotent.

        Unlike ``SharedMemory.close`` this never raises ``BufferError``: arrays still viewing
        the block keep the mapping alive by reference.
        """
        self.buf = None

    def unlink(self) -> None:
        """Remove the block's name (``shm_unlink``) and unregister it from the tracker.

        Raises:
            FileNotFoundError: the name is already gone (nothing is unregistered then, as
                with ``SharedMemory.unlink``).
        """
        import _posixshmem
        from multiprocessing import resource_tracker

        _posixshmem.shm_unlink("/" + self.name)
        resource_tracker.unregister("/" + self.name, "shared_memory")

    def __repr__(self) -> str:
        return f"Block(name={self.name!r}, size={self.size})"


def create_block(prefix: str, size: int) -> Block | SharedMemory:
    """Create a shared-memory block named ``prefix`` + a fresh random base-36 block token.

    The token takes what the name limit leaves (:func:`compatmp._shm_names.block_name`); a name
    already taken draws again. On POSIX the block is a :class:`Block` (mapped, no file
    descriptor kept open, registered with the resource tracker exactly like
    ``SharedMemory(create=True)``); on Windows a ``SharedMemory``. Both have ``name``,
    ``size``, ``buf``, ``close()`` and ``unlink()``.

    Args:
        prefix (str): from :func:`compatmp._shm_names.block_prefix`.
        size (int): bytes, > 0.

    Raises:
        OSError: the system refused the block (e.g. ``/dev/shm`` full or too many files).
    """
    while True:
        name = _shm_names.block_name(prefix)
        try:
            if os.name == "nt":
                return SharedMemory(name=name, create=True, size=size)
            return Block._create(name, size)
        except FileExistsError:  # pragma: no cover - >= 36**5 tokens; draw another
            continue


def unlink_block(shm: Block | SharedMemory) -> None:
    """Close this process's handle on block ``shm`` and remove its name (``shm_unlink``).

    Mappings other processes hold stay valid until they drop them. A block already unlinked
    (by a sweep, or a cleanup of ``/dev/shm``) is not an error.

    Args:
        shm (Block | SharedMemory): a block this process created or attached.
    """
    try:
        shm.close()
    except BufferError:  # an array from compatmp.empty() the dataset kept still views it
        pass  # the mapping goes when that array does
    try:
        shm.unlink()
    except FileNotFoundError:
        pass


def ensure_tracker() -> None:
    """Start this process's ``multiprocessing`` resource tracker if it is not running yet.

    Call in the main process before starting workers, so they share its tracker (see
    "Resource tracker" in the module docstring). POSIX only: Windows has no resource tracker (blocks
    die with their last handle), and the pool does not call this there.
    """
    from multiprocessing import resource_tracker

    resource_tracker.ensure_running()


def room(headroom: int = _SHM_HEADROOM) -> int | None:
    """Bytes that may still be put into shared memory, leaving ``headroom`` free.

    A block written beyond what ``/dev/shm`` (a tmpfs) holds kills the writer with SIGBUS, so
    callers check before they copy; where the free space cannot be read (macOS, Windows:
    shared memory is not a filesystem there) there is no such limit to check.

    Args:
        headroom (int): bytes to leave free (default: 16 MiB).

    Returns:
        int | None: free bytes minus ``headroom`` (>= 0), or None where unknown.
    """
    free = _shm_names.free_bytes()
    return None if free is None else max(0, free - headroom)
