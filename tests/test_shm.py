"""Shared-memory batches: encode/view round trips, ownership, and no leaks at exit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from multiprocessing.shared_memory import SharedMemory

import numpy as np
import pytest
from pool_datasets import (
    ALL_METHODS,
    PROCESS_METHODS,
    ArrayDataset,
    BigArrayDataset,
    BusyAfterDataset,
    EmptyFillDataset,
    assert_batches_equal,
    sample_batch,
    shm_entries,
)

from compatmp import _batch_blocks, _shm, _shm_names
from compatmp._pool import OrderedPool

pytestmark = pytest.mark.usefixtures("no_leaked_workers")

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS_DIR)


def _view(encoded):
    """The batch as the main process gets it (zero-copy views; nobody waits for releases)."""
    return _batch_blocks.Attachments(lambda key: None).view(encoded, key=0)


@pytest.fixture
def prefix():
    p = _shm_names.block_prefix(os.getpid(), "t001")
    yield p
    _shm_names.sweep(p)


def test_round_trip_keeps_dtype_shape_values_and_structure(prefix):
    blocks = _batch_blocks.BlockPool(prefix)
    batch = sample_batch(1)
    encoded = blocks.encode(batch, key=0)
    # The big arrays moved (the strided view of `big` is 44 KiB: small, it stays).
    moved = _batch_blocks.names(encoded)
    assert len(moved) == 6
    assert sorted(moved) == shm_entries()
    assert_batches_equal(_view(encoded), batch)
    assert sorted(moved) == shm_entries()  # viewing never unlinks: the worker owns them
    blocks.close()
    assert shm_entries() == []


def test_small_object_and_empty_arrays_stay_in_the_batch(prefix):
    small = np.arange(10)
    obj = np.array([1, None], dtype=object)
    empty = np.zeros((0, 3))
    batch = (small, obj, empty, "leaf", 7)
    blocks = _batch_blocks.BlockPool(prefix, threshold=0)
    encoded = blocks.encode(batch, key=0)
    assert len(_batch_blocks.names(encoded)) == 1  # only `small` moved
    assert encoded[1] is obj and encoded[2] is empty
    assert_batches_equal(_view(encoded), batch)
    assert _batch_blocks.BlockPool(prefix).encode(batch, key=0) is batch  # nothing >= 256 KiB
    blocks.close()


def test_zero_d_non_contiguous_and_fortran_arrays(prefix):
    base = np.arange(24, dtype=np.int16).reshape(4, 6)
    batch = {
        "scalar": np.array(2.5, dtype=np.float32),
        "strided": base[:, ::2],
        "fortran": np.asfortranarray(base),
        "structured": np.array([(1, 2.0)], dtype=[("a", "i4"), ("b", "f8")]),
    }
    blocks = _batch_blocks.BlockPool(prefix, threshold=0)
    encoded = blocks.encode(batch, key=0)
    assert len(_batch_blocks.names(encoded)) == 4
    decoded = _view(encoded)
    assert_batches_equal(decoded, batch)
    assert decoded["scalar"].shape == ()
    assert decoded["fortran"].flags.f_contiguous
    assert decoded["strided"].flags.c_contiguous
    blocks.close()


def test_released_blocks_are_reused_and_bounded(prefix):
    blocks = _batch_blocks.BlockPool(prefix, max_free=2, max_kept=2)
    a = np.ones((300, 300))
    first = _batch_blocks.names(blocks.encode((a, a), key=0))
    blocks.release(0)
    second = _batch_blocks.names(blocks.encode((a * 2, a * 3), key=1))
    assert sorted(second) == sorted(first)  # same blocks, new content
    assert_batches_equal(_view(blocks.encode((a * 2,), key=9)), (a * 2,))
    # Keys 1 and 9 hold three blocks; releasing all keeps only max_kept=2 of them.
    blocks.release(1)
    blocks.release(9)
    assert len(shm_entries()) == 2
    blocks.release("unknown")  # ignored
    blocks.close()
    assert shm_entries() == []


def test_free_list_keeps_the_peak_in_use_up_to_max_kept(prefix):
    # A pipeline that once had 5 blocks in use finds them again after releasing them all
    # (the next epoch creates nothing); max_kept bounds what an idle worker holds.
    blocks = _batch_blocks.BlockPool(prefix, max_free=1, max_kept=3)
    a = np.ones((300, 300))
    first = [_batch_blocks.names(blocks.encode((a * k,), key=k))[0] for k in range(5)]
    assert blocks.peak == 5 and blocks.created == 5
    for k in range(5):
        blocks.release(k)
    assert len(blocks.free) == 3 and len(shm_entries()) == 3
    assert len(blocks.take_dropped()) == 2
    again = [_batch_blocks.names(blocks.encode((a * k,), key=10 + k))[0] for k in range(3)]
    assert blocks.created == 5 and set(again) <= set(first)  # reused, none created
    # Releasing one while two stay in use keeps the pool at its peak, never beyond max_kept.
    blocks.release(10)
    assert len(blocks.free) == 1 and blocks.n_in_use == 2
    blocks.close()
    assert shm_entries() == [] and blocks.n_in_use == 0


def test_max_free_zero_keeps_no_released_block(prefix):
    blocks = _batch_blocks.BlockPool(prefix, max_free=0)
    a = np.ones((300, 300))
    for k in range(3):
        blocks.encode((a,), key=k)
    for k in range(3):
        blocks.release(k)
    assert len(blocks.free) == 0 and shm_entries() == []
    assert len(blocks.take_dropped()) == 3


def test_too_full_shm_filesystem_keeps_the_batch_in_the_pipe(prefix, monkeypatch):
    monkeypatch.setattr(_shm_names, "free_bytes", lambda: 10 * 1024 * 1024)
    batch = (np.ones(1_000_000),)
    assert _batch_blocks.BlockPool(prefix).encode(batch, key=0) is batch
    assert shm_entries() == []


def test_free_blocks_of_other_sizes_do_not_hide_a_full_shm_filesystem(prefix, monkeypatch):
    # The free list keeps up to max_kept blocks; ten small ones (3 MB in all) must not
    # count as room for an 8 MB array that needs a new block.
    blocks = _batch_blocks.BlockPool(prefix, max_free=10)
    small = np.ones(300_000 // 8)
    for k in range(10):
        blocks.encode((small,), key=k)
    for k in range(10):
        blocks.release(k)
    assert len(blocks.free) == 10
    monkeypatch.setattr(_shm_names, "free_bytes", lambda: _shm._SHM_HEADROOM + 6_000_000)
    batch = (np.ones(1_000_000),)
    assert blocks.encode(batch, key=10) is batch  # stays in the pipe: no SIGBUS
    assert blocks.created == 10 and len(blocks.free) == 10
    assert blocks._new_bytes([300_000] * 10) == 0 and blocks._new_bytes([300_000] * 11) == 300_000
    blocks.close()


def _mapped_blocks(prefix: str) -> int:
    """Mappings of this process onto blocks named ``prefix...`` (Linux: /proc/self/maps)."""
    with open("/proc/self/maps") as f:
        return sum(1 for line in f if "/dev/shm/" + prefix in line)


def test_views_share_the_block_and_release_when_the_last_view_is_gone(prefix):
    blocks = _batch_blocks.BlockPool(prefix)
    a, b = np.arange(100_000.0), np.ones((300, 300), dtype=np.float32, order="F")
    encoded = blocks.encode({"a": a, "b": [b], "small": 7}, key=0)
    released = []
    att = _batch_blocks.Attachments(released.append)
    batch = att.view(encoded, key=0)
    assert_batches_equal(batch, {"a": a, "b": [b], "small": 7})
    assert batch["b"][0].flags.f_contiguous
    # Zero-copy: the array is the block, as the worker sees it.
    writer = SharedMemory(name=encoded["a"].name)
    np.ndarray(a.shape, a.dtype, buffer=writer.buf)[0] = -1.0
    writer.close()
    assert batch["a"][0] == -1.0
    assert len(att) == 2
    tail = batch["a"][10:]  # a NumPy view keeps the block leased
    del batch
    assert released == []
    del tail
    assert released == [0]
    blocks.release(0)
    blocks.close()
    att.close()
    assert len(att) == 0
    assert shm_entries() == []


def test_attachments_close_handles_of_dropped_blocks_once_unused(prefix):
    if not os.path.exists("/proc/self/maps"):
        pytest.skip("needs /proc/self/maps to see mappings")
    blocks = _batch_blocks.BlockPool(prefix, max_free=0)  # every released block is unlinked
    released = []
    att = _batch_blocks.Attachments(released.append)
    first = att.view(blocks.encode((np.ones(100_000),), key=0), key=0)
    kept = first[0]
    del first
    blocks.release(0)  # the worker unlinks it (max_free=0), closes its mapping, will say so
    assert _mapped_blocks(prefix) == 1  # ours
    dropped = blocks.take_dropped()
    assert len(dropped) == 1 and blocks.take_dropped() == []
    att.drop(dropped)
    assert len(att) == 1  # still viewed by `kept`
    assert kept.sum() == 100_000  # an unlinked block stays readable while mapped
    del kept
    assert len(att) == 0 and _mapped_blocks(prefix) == 0
    # A block dropped while unused is closed at once; close() closes the rest.
    second = att.view(blocks.encode((np.ones(100_000),), key=1), key=1)
    del second
    blocks.release(1)
    att.drop(blocks.take_dropped())
    assert len(att) == 0
    third = att.view(blocks.encode((np.ones(100_000),), key=2), key=2)
    att.close()
    assert len(att) == 1 and third[0].sum() == 100_000
    del third  # the last view closes the handle; on_release is not called after close()
    assert len(att) == 0 and released == [0, 1]
    blocks.close()
    with pytest.raises(RuntimeError, match="after close"):
        att.view(_batch_blocks.BlockPool(prefix).encode((np.ones(100_000),), key=3), key=3)


def test_view_of_a_vanished_block_says_so_and_releases_what_it_made(prefix):
    blocks = _batch_blocks.BlockPool(prefix)
    encoded = blocks.encode((np.ones(100_000), np.ones(100_000)), key=0)
    SharedMemory(name=encoded[1].name).unlink()
    released = []
    att = _batch_blocks.Attachments(released.append)
    with pytest.raises(FileNotFoundError, match="vanished"):
        att.view(encoded, key=0)
    assert released == [0]
    att.close()
    blocks.close()


def test_sweep_finds_only_its_prefix(prefix):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("this OS cannot list shared memory")
    other = _shm_names.block_prefix(os.getpid(), "t002")
    mine = _batch_blocks.names(_batch_blocks.BlockPool(prefix).encode((np.ones(100_000),), key=0))
    theirs = _batch_blocks.names(_batch_blocks.BlockPool(other).encode((np.ones(100_000),), key=0))
    assert _shm_names.sweep(prefix) == mine
    assert shm_entries() == theirs
    assert _shm_names.sweep(other) == theirs
    with pytest.raises(ValueError, match="non-empty prefix"):
        _shm_names.sweep("")


def test_block_names_fit_macos_limit():
    token = _shm_names.pool_token()
    assert len(token) == 13 and token.isalnum() and token == token.lower()  # 64 bits, base 36
    # The short form (no PID namespace: macOS) fits macOS's 31 characters, on every platform.
    prefix = _shm_names.block_prefix(9_999_999, token, pid_namespace=None)
    assert prefix == f"cmp9999999_{token}_"
    assert len("/" + prefix) + _shm_names._MIN_BLOCK_TOKEN_CHARS <= 31
    with pytest.raises(ValueError, match="31 characters"):
        _shm_names.block_prefix(9_999_999, token + "x", pid_namespace=None)
    with pytest.raises(ValueError, match="lowercase letters and digits"):
        _shm_names.block_prefix(1, "ab_c")
    # With a namespace (Linux: up to 10 digits) the name stays far below NAME_MAX (255).
    long_prefix = _shm_names.block_prefix(9_999_999, token, pid_namespace=4_294_967_295)
    assert long_prefix == f"cmp9999999n4294967295_{token}_"
    assert _shm_names._NAME_RE.match(long_prefix + "a" * _shm_names._MAX_BLOCK_TOKEN_CHARS)
    assert not _shm_names._NAME_RE.match(prefix + "a" * _shm_names._MAX_BLOCK_TOKEN_CHARS)


@pytest.mark.skipif(sys.platform != "linux", reason="PID namespaces are Linux's")
def test_names_carry_this_process_pid_namespace():
    ns = os.stat("/proc/self/ns/pid").st_ino
    assert _shm_names.current_pid_namespace() == ns
    assert _shm_names.block_prefix(os.getpid(), "t001") == f"cmp{os.getpid()}n{ns}_t001_"
    assert _shm_names.owner_prefix(os.getpid()) == f"cmp{os.getpid()}n{ns}_"


def test_no_namespace_where_proc_is_another_namespace(monkeypatch):
    # `unshare --pid --fork` without --mount-proc: /proc/self names another pid than ours.
    monkeypatch.setattr(os, "readlink", lambda path: "1" if path == "/proc/self" else "")
    assert _shm_names.current_pid_namespace() is None
    assert _shm_names.block_prefix(1234, "t001") == "cmp1234_t001_"
    assert _shm_names.sweep_dead_owners() == []  # pids there prove nothing: sweep nothing


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_pool_round_trip(method):
    ds = ArrayDataset()
    with OrderedPool(ds, workers=2, start_method=method) as pool:
        for i, batch in enumerate(pool.imap(range(len(ds)))):
            assert_batches_equal(batch, sample_batch(i))
            assert shm_entries() == [] or pool.decision.uses_processes
    assert shm_entries() == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", ALL_METHODS)
def test_held_batches_keep_their_values_and_outlive_the_pool(method):
    # Zero-copy batches: a block is reused only once the consumer has let go of the arrays.
    ds = BigArrayDataset(40, (300, 300))
    held = []
    with OrderedPool(ds, workers=2, start_method=method, max_queue_size=4) as pool:
        for i, batch in enumerate(pool.imap(range(len(ds)))):
            if i % 10 == 0:
                held.append((i, batch))
            assert batch[0, 0] == i and batch[-1, -1] == i
    for i, batch in held:  # later batches did not overwrite them, and close() did not unmap
        assert np.all(batch == i), i
    del held, batch
    assert shm_entries() == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_a_block_is_never_reused_while_an_array_views_it(method):
    # Blocks are kept across epochs now (the free list keeps the pipeline's peak): arrays
    # the consumer keeps - whole batches, and slices of batches it dropped - must keep their
    # values while later epochs cycle the other blocks (NOTE [ Shared-memory ownership ]).
    n, shape = 12, (64, 64, 16)  # 256 KiB: just at the threshold, in compatmp.empty blocks
    ds = EmptyFillDataset(4 * n, shape)
    kept: dict[int, np.ndarray] = {}
    with OrderedPool(ds, workers=2, start_method=method, max_queue_size=4) as pool:
        for epoch in range(4):
            for i, x in enumerate(pool.imap(range(epoch * n, (epoch + 1) * n))):
                assert (x == epoch * n + i).all()
                if i % 4 == epoch:
                    kept[epoch * n + i] = x if epoch % 2 else x[1:, ::2]  # a derived view
                del x
            for index, arr in kept.items():
                assert (arr == index).all(), f"batch {index} was overwritten by a later batch"
    for index, arr in kept.items():  # and after the pool is closed
        assert (arr == index).all()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_blocks_are_reused_when_the_consumer_drops_batches(method):
    ds = BigArrayDataset(60, (300, 300))
    seen: set[str] = set()
    with OrderedPool(ds, workers=2, start_method=method, max_queue_size=4) as pool:
        for i, batch in enumerate(pool.imap(range(len(ds)))):
            assert batch[0, 0] == i
            seen.update(shm_entries())
        del batch
        # Bounded by what can be in flight (4 queued + the one held) plus the free lists,
        # not by the 60 batches.
        assert len(seen) <= 4 + 1 + 2 * _batch_blocks.MAX_FREE_BLOCKS
        assert len(pool._core.attachments) <= len(seen)
    assert shm_entries() == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_busy_worker_unlinks_its_blocks_on_sigterm(method, monkeypatch):
    monkeypatch.setattr(_shm_names, "sweep", lambda prefix: [])  # prove the workers did it
    with OrderedPool(
        BusyAfterDataset(10, busy_from=2, seconds=30), workers=1, start_method=method
    ) as pool:
        it = pool.imap(range(10))
        assert [int(next(it)[0, 0]) for _ in range(2)] == [0, 1]
        assert shm_entries()  # the worker keeps its released blocks for reuse
        start = time.monotonic()
    # close(): the worker is busy in dataset[2], so it gets SIGTERM after the grace period.
    assert time.monotonic() - start < 30  # a "no hang" bound; normally ~SHUTDOWN_TIMEOUT
    assert shm_entries() == []


_EXIT_SCRIPT = """
import os, sys, time
sys.path[:0] = [{tests!r}, {root!r}]
from pool_datasets import BigArrayDataset, DiesAfterBlocksDataset
from compatmp._core import SHUTDOWN_TIMEOUT, TERMINATE_TIMEOUT
from compatmp._pool import OrderedPool
from compatmp import WorkerCrashedError

# 1. closed with big batches in flight
pool = OrderedPool(BigArrayDataset(50, (512, 512), delay=0.01), workers=2,
                   start_method={method!r}, max_queue_size=8)
it = pool.imap(range(50))
next(it); next(it)
time.sleep(0.3)  # let results with blocks pile up in the pipes
pool.close()
# 2. a worker dies after creating a block, before sending its descriptor
with OrderedPool(DiesAfterBlocksDataset(6, bad=2), workers=1, start_method={method!r}) as pool:
    try:
        list(pool.imap(range(6)))
    except WorkerCrashedError as exc:
        print("crashed:", exc.exitcode)
# 3. garbage collected with batches in flight, never closed explicitly
pool = OrderedPool(BigArrayDataset(20, (512, 512)), workers=2, start_method={method!r})
it = pool.imap(range(20))
next(it)
del it, pool
from compatmp import _shm_names
mine = _shm_names.owner_prefix(os.getpid())
print("left:", sorted(e for e in os.listdir("/dev/shm") if e.startswith(mine)))
"""


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_no_leak_and_no_resource_tracker_warning_at_exit(method):
    script = _EXIT_SCRIPT.format(tests=TESTS_DIR, root=ROOT, method=method)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    assert "crashed: 3" in proc.stdout
    assert "left: []" in proc.stdout
    assert "resource_tracker" not in proc.stderr, proc.stderr
    assert "leaked" not in proc.stderr, proc.stderr


_FD_SCRIPT = """
import os, resource, sys
sys.path[:0] = [{tests!r}, {root!r}]
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # macOS' default; workers inherit it
import psutil
from pool_datasets import BigArrayDataset
from compatmp._pool import OrderedPool

held = []
with OrderedPool(BigArrayDataset(400, (75_000,)), workers=2, start_method={method!r}) as pool:
    for b in pool.imap(range(400)):  # 300 KB each: zero-copy views of the workers' blocks
        held.append(b)
    print("blocks attached:", len(pool._core.attachments), flush=True)
    print("fds:", psutil.Process().num_fds(), flush=True)
print("held:", len(held), all(b[0] == i and b[-1] == i for i, b in enumerate(held)), flush=True)
"""


@pytest.mark.skipif(os.name != "posix", reason="RLIMIT_NOFILE and file descriptors: POSIX")
@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", PROCESS_METHODS)
def test_held_batches_hold_no_file_descriptors(method):
    # Issue 17.4: SharedMemory kept two descriptors per attached block, so 300 KB batches ran
    # out of descriptors after 121 under `ulimit -n 256` (EMFILE, and the pool shut down).
    script = _FD_SCRIPT.format(tests=TESTS_DIR, root=ROOT, method=method)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=100
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert int(lines["blocks attached"]) >= 400  # every batch is its own block, still mapped
    assert int(lines["fds"]) < 100  # none per block (the limit is 256)
    assert lines["held"] == "400 True"


def test_block_keeps_no_descriptor_and_lives_while_viewed(prefix):
    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to count descriptors")
    _shm.ensure_tracker()  # its pipe is one descriptor, opened once per process
    before = len(os.listdir("/proc/self/fd"))
    block = _shm.create_block(prefix, 1_000_000)
    other = _shm.Block.attach(block.name)  # the main side's handle
    assert len(os.listdir("/proc/self/fd")) == before
    assert other.size >= 1_000_000 and other.name == block.name
    arr = np.ndarray((1000,), np.float64, buffer=other.buf)
    np.ndarray((1000,), np.float64, buffer=block.buf)[:] = 7.0  # one memory, two mappings
    assert arr.sum() == 7000.0
    other.close()  # the handle goes; the array keeps the mapping (no BufferError)
    block.close()
    block.unlink()
    assert shm_entries() == [] and _mapped_blocks(prefix) == 1
    assert arr.sum() == 7000.0
    del arr
    assert _mapped_blocks(prefix) == 0  # unmapped with its last array
    with pytest.raises(FileNotFoundError):
        _shm.Block.attach(block.name)
