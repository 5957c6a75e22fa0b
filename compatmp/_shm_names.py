"""Names of shared-memory blocks, whose they are, and removing the blocks of dead owners.

Every block compatmp creates is named ``cmp<main pid>n<pid namespace>_<pool token>_<block
token>`` (Linux) or ``cmp<main pid>_<pool token>_<block token>`` (elsewhere, or where ``/proc``
is unusable): :func:`pool_token`, :func:`current_pid_namespace`, :func:`owner_prefix`,
:func:`block_prefix` and :func:`block_name` make these names, so that a name says which
process owns the block. Rules 4 and 5 of NOTE [ Shared-memory ownership ]
(``compatmp/_batch_blocks.py``) rely on that: a pool's ``close()`` unlinks the blocks of its
killed workers (:func:`sweep`), and every pool start-up unlinks the blocks of dead owners of
this user and PID namespace (:func:`sweep_dead_owners`). ``python -m compatmp doctor`` reports
the space and this user's blocks (:func:`report`) and removes the short-form blocks no sweep
may touch, only when asked (:func:`remove_blocks_without_namespace`). See "Shared memory on each
OS" in docs/architecture.md for what each OS guarantees and why the namespace is in the name.

This is the one module that reads the shared-memory filesystem (``/dev/shm``) as a directory:
its listing for the sweeps and the doctor, its free space (:func:`free_bytes`) for the doctor
and for :func:`compatmp._shm.room`. It maps no memory and imports no other compatmp module.
"""

from __future__ import annotations

import os
import re
import secrets
import stat
import sys

__all__ = [
    "block_name",
    "block_prefix",
    "blocks_without_namespace",
    "current_pid_namespace",
    "free_bytes",
    "owner_prefix",
    "pool_token",
    "remove_blocks_without_namespace",
    "report",
    "sweep",
    "sweep_dead_owners",
]

# Where Linux (and other systems with a POSIX shm filesystem) list shared-memory blocks as
# files. Absent on macOS and Windows: :func:`sweep` then finds nothing and the free-space check
# is skipped.
_SHM_DIR = "/dev/shm"


# macOS limits POSIX shared-memory names to 31 characters (PSHMNAMLEN), the leading "/"
# included. Prefix "cmp" + pid (<= 7 digits on Linux, <= 5 on macOS) + "_" + pool token
# (64 random bits in base 36: 13 characters) + "_" is at most 25 characters, which leaves 5 for
# the block token (base 36, ~26 bits; a collision just draws again). Elsewhere names may be
# longer (Linux: 255 bytes, NAME_MAX; Windows pids can have 10 digits) and block tokens get 8
# characters (~41 bits). Linux names also carry the PID namespace ("n" + the inode number of
# /proc/self/ns/pid, <= 10 digits: at most 43 characters in all); macOS has no PID namespaces
# and keeps the short form, which must fit its 31 characters on every platform.
_MAX_NAME_LEN = 30
_MIN_BLOCK_TOKEN_CHARS = 5
_MAX_BLOCK_TOKEN_CHARS = 8
_POOL_TOKEN_BITS = 64
_LONG_NAME_LEN = 250  # Linux: NAME_MAX is 255 bytes; a margin for the leading "/"

# A block name made by block_prefix(): "cmp<main pid>n<pid namespace>_<pool token>_<block
# token>"; the short form without "n<pid namespace>" (macOS, or /proc unusable) never matches,
# so the start-up sweep never touches it: nothing proves whose pid it names.
_NAME_RE = re.compile(r"cmp(\d+)n(\d+)_[0-9a-z]+_[0-9a-z]+\Z")

# The short form, "cmp<main pid>_<pool token>_<block token>": macOS's, and on Linux that of
# compatmp before issue 17 (names had no namespace then) or of a process whose /proc was
# another namespace's. No sweep removes these; `python -m compatmp doctor` lists them and
# removes them only when asked (:func:`remove_blocks_without_namespace`).
_SHORT_NAME_RE = re.compile(r"cmp(\d+)_[0-9a-z]+_[0-9a-z]+\Z")

# A live process whose creation time is later than a block's mtime plus this (seconds) cannot
# be the block's owner: its pid was recycled. psutil's create_time is exact to a clock tick
# (10 ms on Linux); the slack only guards against clock adjustments.
_RECYCLE_SLACK = 1.0

# block_prefix()'s default for pid_namespace: read this process's own.
_THIS_NAMESPACE = "self"


def _name_limit() -> int:
    return _MAX_NAME_LEN if sys.platform == "darwin" else _LONG_NAME_LEN


def _base36(value: int, width: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = []
    for _ in range(width):
        value, r = divmod(value, 36)
        out.append(digits[r])
    return "".join(reversed(out))


def pool_token() -> str:
    """A fresh random pool token: 64 random bits as 13 base-36 characters.

    With 64 bits, two live pools collide (and one's sweep would delete the other's blocks)
    with probability ~2**-64 per pair; a 16-bit token collided once in 65,536 pairs.

    Returns:
        str: 13 characters from ``[0-9a-z]``.
    """
    return _base36(secrets.randbits(_POOL_TOKEN_BITS), 13)


def current_pid_namespace() -> int | None:
    """The PID namespace of this process, where pids in ``/proc`` are this process's pids.

    Linux: the inode number of ``/proc/self/ns/pid`` (namespaces(7): two processes are in the
    same PID namespace exactly when these inode numbers (and devices) are equal; Docker,
    Kubernetes and ``unshare --pid`` give each container its own). It is returned only when
    ``/proc`` shows this namespace, i.e. ``/proc/self`` names :func:`os.getpid`: a ``/proc``
    mounted from another namespace (``unshare --pid --fork`` without ``--mount-proc``) would
    make every liveness check by pid wrong.

    Not cached: a process keeps its PID namespace for life, but a fork child of a process
    that called ``unshare(CLONE_NEWPID)`` is in the new one.

    Returns:
        int | None: the inode number; None where there are no PID namespaces (macOS,
        Windows) or they cannot be read (``/proc`` absent, foreign or unreadable).
    """
    try:
        if os.readlink("/proc/self") != str(os.getpid()):
            return None
        return os.stat("/proc/self/ns/pid").st_ino
    except (OSError, AttributeError):  # no /proc (macOS), no readlink (old Windows Pythons)
        return None


def owner_prefix(main_pid: int, pid_namespace: int | str | None = _THIS_NAMESPACE) -> str:
    """The start of every block name of the pools of process ``main_pid``.

    Tests and tools use it to count exactly what one process's pools made (never the whole of
    ``/dev/shm``, which other programs and other compatmp runs share).

    Args:
        main_pid (int): the main process's pid, as seen in its PID namespace.
        pid_namespace (int | str | None): that namespace (:func:`current_pid_namespace`);
            the default ``"self"`` reads this process's; None for names without one (macOS).

    Returns:
        str: ``"cmp<pid>n<namespace>_"``, or ``"cmp<pid>_"`` without a namespace.
    """
    if pid_namespace == _THIS_NAMESPACE:
        pid_namespace = current_pid_namespace()
    if pid_namespace is None:
        return f"cmp{main_pid}_"
    return f"cmp{main_pid}n{pid_namespace}_"


def block_prefix(
    main_pid: int, pool_token: str, pid_namespace: int | str | None = _THIS_NAMESPACE
) -> str:
    """The name prefix of every block a pool's workers create.

    Args:
        main_pid (int): process id of the main process (the one owning the pool); the
            start-up sweep (:func:`sweep_dead_owners`) reads it back to tell whether the
            owner is alive.
        pool_token (str): a token unique to the pool, from :func:`pool_token` (13 base-36
            characters), so that two pools never sweep each other's blocks; ``[0-9a-z]``.
        pid_namespace (int | str | None): the PID namespace ``main_pid`` belongs to
            (:func:`current_pid_namespace`); the default ``"self"`` reads the calling
            process's, which must then be the main process. None gives the short form
            without one (macOS, or where ``/proc`` is unusable): such blocks are never swept
            by another pool's start-up, because a bare pid proves nothing once ``/dev/shm`` is
            shared between PID namespaces (``docker --ipc=host``).

    Returns:
        str: e.g. ``"cmp12345n4026531836_0k2m9x7c1q3ab_"``, or ``"cmp12345_0k2m9x7c1q3ab_"``
        without a namespace.

    Raises:
        ValueError: the short form would leave fewer than 5 characters for block tokens under
            macOS's 31-character limit on shared-memory names (on every platform: it is the
            portable form), or the token has characters outside ``[0-9a-z]``.
    """
    if not re.fullmatch(r"[0-9a-z]+", pool_token):
        raise ValueError(f"pool token must be lowercase letters and digits; got {pool_token!r}")
    if pid_namespace == _THIS_NAMESPACE:
        pid_namespace = current_pid_namespace()
    prefix = f"{owner_prefix(main_pid, pid_namespace)}{pool_token}_"
    limit = _MAX_NAME_LEN if pid_namespace is None else _LONG_NAME_LEN
    if len(prefix) + _MIN_BLOCK_TOKEN_CHARS > limit:
        raise ValueError(
            f"shared-memory prefix {prefix!r} is too long: names must stay under "
            f"{limit + 1} characters{' on macOS' if limit == _MAX_NAME_LEN else ''}; use a "
            "pool token of at most 13 characters"
        )
    return prefix


def block_name(prefix: str) -> str:
    """A fresh block name: ``prefix`` + a random base-36 block token.

    The token takes what the name limit leaves (at most 8 characters, ~41 bits; at least 5
    under macOS's 31, which :func:`block_prefix` guarantees). A name may already be taken (the
    caller then draws again).

    Args:
        prefix (str): from :func:`block_prefix`.

    Returns:
        str: the block name, without the leading ``/``.
    """
    width = min(_MAX_BLOCK_TOKEN_CHARS, _name_limit() - len(prefix))
    return prefix + _base36(secrets.randbits(6 * width), width)


def _ours(path: str) -> bool:
    """True if ``path`` is a regular file of this user (never follows a symlink)."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid()


def _unlink_name(name: str) -> None:
    """``shm_unlink`` block ``name`` and leave it unregistered from the resource tracker.

    Registering first makes the unregister balance whether or not this tracker had the name
    (the tracker keeps a set; unregistering an unknown name prints a ``KeyError`` traceback
    from the tracker process).

    Raises:
        OSError: the name could not be removed (``FileNotFoundError`` if already gone).
    """
    import _posixshmem
    from multiprocessing import resource_tracker

    resource_tracker.register("/" + name, "shared_memory")
    try:
        _posixshmem.shm_unlink("/" + name)
    finally:
        resource_tracker.unregister("/" + name, "shared_memory")


def sweep(prefix: str) -> list[str]:
    """Unlink every block of this user whose name starts with ``prefix`` (killed workers').

    Lists ``/dev/shm`` where it exists (Linux); elsewhere finds nothing, because macOS and
    Windows cannot list shared-memory blocks. Only regular files owned by this user are
    touched: an entry another user (or a directory, a symlink) put there under the pool's
    prefix is left alone, and nothing about it makes this raise. Each block removed is also
    unregistered from the resource tracker, so it is not reported as leaked at exit. Call only
    when no worker of the pool is alive.

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
        if not _ours(os.path.join(_SHM_DIR, name)):
            continue
        try:
            _unlink_name(name)
        except OSError:  # gone meanwhile, or not ours to remove
            continue
        done.append(name)
    return done


def _owner_alive(pid: int, block_mtime: float) -> bool:
    """True if process ``pid`` runs and can be the owner of a block last changed then."""
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return proc.create_time() <= block_mtime + _RECYCLE_SLACK
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # exists but cannot be inspected (another user's): leave it
        return True


def sweep_dead_owners() -> list[str]:
    """Unlink compatmp blocks whose owning main process is provably gone (NOTE rule 5).

    Only blocks that are provably this user's and of this PID namespace are candidates: the
    name carries the owner's pid *and* PID namespace (:func:`block_prefix`), the namespace
    must be this process's (pids of another namespace say nothing here: with ``/dev/shm``
    shared between containers, ``docker --ipc=host``, the same pid is another process or
    none), the entry must be a regular file (``lstat``, no symlink followed) and belong to
    this user (``st_uid``; as root too). Names without a namespace (macOS's short form, or
    older compatmp versions) are never touched. A candidate's owner counts as gone when no
    such process runs, when it is a zombie, or when the process with that pid started more
    than a second after the block was last changed (its ``st_mtime``): the pid was recycled.
    Blocks of live owners (this process included) are never touched.

    Lists ``/dev/shm`` where it exists (Linux); elsewhere finds nothing (macOS and Windows
    cannot list shared memory, see docs/architecture.md), and where this process's PID
    namespace cannot be read or ``/proc`` is another namespace's (:func:`current_pid_namespace`)
    it sweeps nothing. Blocks are removed with ``os.unlink`` on their ``/dev/shm`` file, which
    is what ``shm_unlink`` does there, without attaching (the dead owner's resource tracker
    died with it: there is nothing to unregister).

    Returns:
        list[str]: names of the blocks unlinked.
    """
    namespace = current_pid_namespace()
    if namespace is None:
        return []
    return _unlink_dead_owners(
        [
            (name, st)
            for name, st in _this_users_blocks(_NAME_RE)
            if int(_NAME_RE.match(name).group(2)) == namespace  # type: ignore[union-attr]
        ],
        _NAME_RE,
    )


def _this_users_blocks(pattern: re.Pattern[str]) -> list[tuple[str, os.stat_result]]:
    """Regular files of this user in ``/dev/shm`` whose name matches ``pattern``, by name."""
    try:
        entries = os.listdir(_SHM_DIR)
    except OSError:
        return []
    uid = os.geteuid()
    found = []
    for name in sorted(entries):
        if not pattern.match(name):
            continue
        try:
            st = os.lstat(os.path.join(_SHM_DIR, name))
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_uid == uid:
            found.append((name, st))
    return found


def _unlink_dead_owners(
    blocks: list[tuple[str, os.stat_result]], pattern: re.Pattern[str]
) -> list[str]:
    """Unlink the ``blocks`` (from :func:`_this_users_blocks`) whose owner is gone.

    The owner is the pid in group 1 of ``pattern``; it is gone when :func:`_owner_alive` says
    so for the block's ``st_mtime`` (asked once per pid and second).

    Returns:
        list[str]: names of the blocks unlinked.
    """
    verdict: dict[tuple[int, int], bool] = {}
    done = []
    for name, st in blocks:
        pid = int(pattern.match(name).group(1))  # type: ignore[union-attr]
        key = (pid, int(st.st_mtime))
        if key not in verdict:
            verdict[key] = _owner_alive(pid, st.st_mtime)
        if verdict[key]:
            continue
        try:
            os.unlink(os.path.join(_SHM_DIR, name))
        except OSError:  # gone meanwhile, or not ours to remove
            continue
        done.append(name)
    return done


def blocks_without_namespace() -> list[tuple[str, int]]:
    """This user's compatmp blocks whose name has no PID namespace, which no sweep removes.

    Names of the short form ``cmp<pid>_<pool token>_<block token>``: made by compatmp before
    block names carried the PID namespace (issue 17), or by a process that could not read its
    namespace (``/proc`` absent or another namespace's). The pid in such a name proves nothing
    (it may be another container's, with ``/dev/shm`` shared), so :func:`sweep_dead_owners`
    leaves them, and a SIGKILLed run of an old version leaves its blocks for good: they hold
    memory (``/dev/shm`` is RAM) until removed. Lists ``/dev/shm`` where it exists (Linux);
    elsewhere finds nothing.

    Returns:
        list[tuple[str, int]]: ``(name, size in bytes)`` of each, by name.
    """
    return [(name, st.st_size) for name, st in _this_users_blocks(_SHORT_NAME_RE)]


def remove_blocks_without_namespace() -> list[str]:
    """Unlink :func:`blocks_without_namespace`, except those a live local process may own.

    Only on request (``python -m compatmp doctor --remove-blocks-without-namespace``): the
    caller vouches that no compatmp run of another PID namespace sharing this ``/dev/shm``
    (a container started with ``--ipc=host``) is alive, which nothing here can check. A block
    whose pid names a process of this namespace that may own it (it started before the block
    was last changed) is kept, as :func:`sweep_dead_owners` would.

    Returns:
        list[str]: names of the blocks unlinked.
    """
    return _unlink_dead_owners(_this_users_blocks(_SHORT_NAME_RE), _SHORT_NAME_RE)


def free_bytes() -> int | None:
    """Free bytes of the shared-memory filesystem (``/dev/shm``), as ``statvfs`` reports them.

    Returns:
        int | None: bytes available to this user; None where shared memory is not a
        filesystem (macOS, Windows) or it cannot be read.
    """
    try:
        st = os.statvfs(_SHM_DIR)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def report() -> list[str]:
    """Lines for ``python -m compatmp doctor``: ``/dev/shm`` space and this user's blocks.

    Returns:
        list[str]: empty where shared memory is not a listable filesystem (macOS, Windows);
        else the free space, the blocks of live compatmp runs (this user, this namespace) and
        the blocks no sweep removes (:func:`blocks_without_namespace`), with how to remove
        them.
    """
    if not os.path.isdir(_SHM_DIR):
        return []
    free = free_bytes()
    ours = _this_users_blocks(_NAME_RE)
    short = blocks_without_namespace()
    mib = 1024 * 1024
    lines = [
        f"Shared memory ({_SHM_DIR}):",
        f"  free: {'unknown' if free is None else f'{free / mib:,.0f} MiB'}",
        f"  compatmp blocks of this user with a PID namespace: {len(ours)} "
        f"({sum(st.st_size for _, st in ours) / mib:,.1f} MiB); those of dead runs of this "
        f"namespace are removed when the next pool starts",
    ]
    if short:
        lines += [
            f"  compatmp blocks of this user without a PID namespace: {len(short)} "
            f"({sum(size for _, size in short) / mib:,.1f} MiB), e.g. {short[0][0]}",
            "    No sweep removes these: made by compatmp before block names carried the PID",
            "    namespace, their pid may be another container's. If no compatmp run in a",
            "    container sharing this /dev/shm is alive, remove them (blocks of live local",
            "    processes are kept) with:",
            "      python -m compatmp doctor --remove-blocks-without-namespace",
        ]
    return lines
