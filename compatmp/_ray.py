"""Ray actors as workers (``start_method="ray"``): the same worker loop, past one machine.

Only this module imports Ray, and only when a pool with ``start_method="ray"`` starts.
:class:`RayTransport` is one implementation of NOTE [ Worker transports ]
(:mod:`compatmp._transport`), beside the process and thread transports: the running pool
(:mod:`compatmp._core`) starts, waits on and stops actors through it exactly as it does
processes; everything else in the pool (dispatch, reorder buffer, timeouts, dataset updates,
error messages) is the same code for every start method.

NOTE [ Ray workers ]
Each worker is one Ray actor (``_WorkerActor``) that runs the unchanged
:func:`compatmp._worker.worker_main` loop in a thread of its own, over an in-actor
:class:`_ActorChannel`. The actor has one method that matters, ``step(msg)``: put one message
of NOTE [ Worker protocol ] into the loop's inbox, wait until the loop has handled it and
waits for the next one, and return what the loop sent meanwhile (a list of messages:
``[("ok", send_idx, batch, [])]`` for a task, ``[("updated", version)]`` for a dataset,
``[]`` for a stop). So the protocol travels unchanged, one Ray call per message, and whatever
the loop does (seeding, ``worker_init_fn``, ``get_worker_info``, pickled exceptions) is what
process workers do. Alternatives rejected: a method per message kind (a second copy of the
loop that would drift from the process one), and a long-running ``run()`` method polling a
Ray queue (one more actor, and a hung ``dataset[i]`` would block the queue reads).

Main side: :class:`RayChannel` turns each ``send`` into ``actor.step.remote(msg)`` and keeps
the returned ``ObjectRef`` (calls to one actor run in order, so replies come back in order);
:meth:`RayTransport.wait` does for Ray what ``multiprocessing.connection.wait`` on pipes and
sentinels does for processes: one ``ray.wait`` over the oldest pending reply of every actor.
A reply is a Ray
object: NumPy arrays in it come back zero-copy from the object store on the same node
(read-only views; Ray's objects are immutable), copied once over the network from another
node. Nothing is in flight beyond what the pool dispatched (``max_queue_size`` batches not yet
yielded), so a slow consumer never fills the object store; an object is freed when the pool
has yielded the batch and the consumer dropped it.

Orphaned prefetches (NOTE [ Task records ] in :mod:`compatmp._tasks`) are taken back before
they reach the actor. A call already submitted cannot be (each ``step`` returns only when the
loop is idle, so a ``("skip", ...)`` would reach the loop after the tasks it names, and
:class:`_ActorChannel` does not read ahead). So :class:`RayChannel` submits at most
:data:`SUBMIT_WINDOW` calls per actor (one being handled, one queued behind it, so the actor
never waits for the main side between batches) and keeps later messages in its own queue,
submitting the next as each reply is fetched; :meth:`RayTransport.withdraw` takes orphaned
tasks out of that queue, as the thread transport does from a mailbox. At most the one task
being computed and the one submitted behind it are computed for nothing, whatever
``max_queue_size`` is. The cost: replies are fetched (and the next call submitted) only while
the consumer asks for a batch, so while it trains on one each actor computes at most two
batches ahead, where a worker process computes up to ``max_queue_size / workers``. That
bounds how much slack absorbs uneven batch times, not the throughput, which the one call
queued behind the running one keeps (the actor never idles while the pool takes batches).

Failure: ``ray.get`` of a reply raises ``RayActorError`` when the actor died (``os._exit``,
Ray's out-of-memory killer, its node lost) or ``ObjectLostError`` when the node holding the
reply is gone; either marks the worker dead and the pool raises ``WorkerCrashedError`` naming
the index, as for a process. The index named is the oldest one the actor had not delivered:
the batch it was computing, or one it finished just before dying (Ray sends a reply from a
background thread, so ``os._exit`` right after a batch can lose that reply; a pipe write
cannot be lost that way). An actor that cannot be placed (the cluster lacks the resources
it asks for) is reported as crashed after :data:`ACTOR_START_TIMEOUT`. Actors are created with
``max_restarts=0``: a restarted actor would have lost the dataset and the batch it held.

Ray itself: when Ray is not initialised, the first pool starts a new local instance sized to
its workers (``address="local"``, ``num_cpus=workers``, no dashboard, worker output not
forwarded; never the cluster a ``ray start`` on this machine recorded, which Ray's default
``ray.init()`` would join) or, when ``RAY_ADDRESS`` is set, connects to that cluster; the last
pool using it shuts it down at ``close()``. A Ray the program initialised (``ray.init(...)``)
is used and left running. Batches already yielded stay valid after the shutdown. The workers
receive the main process's ``sys.path`` entries that exist on their node and its working
directory when it exists there (as spawn does), so the dataset's own modules and relative paths
work on one machine; on a cluster they must be installed on, or reachable from, every node.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import logging
import os
import sys
import threading
import time
from dataclasses import replace
from typing import Any

from . import _worker
from ._exceptions import StartMethodError
from ._transport import Transport, WorkerHandle, take_back_tasks

__all__ = [
    "ACTOR_OPTIONS_ENV_VAR",
    "ACTOR_START_TIMEOUT",
    "DEFAULT_ACTOR_OPTIONS",
    "SUBMIT_WINDOW",
    "RayChannel",
    "RayHandle",
    "RayTransport",
    "actor_options",
    "check_available",
]

# How long an actor may take from creation to "ready" (seconds) before it counts as crashed.
# Covers Ray placing it (a worker process start, ~1-2 s) and loading the dataset; an actor
# that the cluster cannot place at all (missing resources) would otherwise wait forever.
ACTOR_START_TIMEOUT = 120.0

# Ray calls submitted to one actor and not yet answered, at most (NOTE above): the one the
# actor handles and one queued behind it. Later messages wait in the RayChannel, where
# RayTransport.withdraw can still take orphaned tasks back.
SUBMIT_WINDOW = 2

# How often a blocked ``step`` call inside the actor re-checks that the loop thread lives
# (seconds); it wakes at once when the loop is done with the message.
_STEP_POLL_INTERVAL = 0.5

# Environment variable holding extra ``ActorClass.options(...)`` as a JSON object, e.g.
# '{"resources": {"loader": 1}}' to place workers on nodes started with that resource.
ACTOR_OPTIONS_ENV_VAR = "COMPATMP_RAY_ACTOR_OPTIONS"

# One core per worker (Ray schedules by it); never restart (the dataset and the batch held
# would be lost silently); spread the workers over the cluster's nodes.
DEFAULT_ACTOR_OPTIONS: dict[str, Any] = {
    "num_cpus": 1,
    "max_restarts": 0,
    "max_task_retries": 0,
    "scheduling_strategy": "SPREAD",
}

_INSTALL_HINT = (
    "install it with `pip install 'compatmp[ray]'` (or `pip install 'ray>=2.9'`), or choose "
    "another start_method"
)


def check_available(source: str = "start_method") -> None:
    """Raise unless Ray can be imported here (without importing it).

    Args:
        source (str): what asked for Ray, for the message (default: ``"start_method"``).

    Raises:
        StartMethodError: Ray is not installed; the message says how to install it.
    """
    if importlib.util.find_spec("ray") is None:
        raise StartMethodError(
            f"{source}='ray' needs Ray, which is not installed: {_INSTALL_HINT}."
        )


def actor_options() -> dict[str, Any]:
    """The options each worker actor is created with.

    :data:`DEFAULT_ACTOR_OPTIONS`, updated with the JSON object in the
    ``COMPATMP_RAY_ACTOR_OPTIONS`` environment variable when it is set (any keyword of Ray's
    ``ActorClass.options``: ``num_cpus``, ``resources``, ``memory``, ``scheduling_strategy``,
    ``runtime_env``...).

    Returns:
        dict[str, Any]: keyword arguments for ``ActorClass.options``.

    Raises:
        ValueError: the variable is not a JSON object; the message shows what it holds.
    """
    options = dict(DEFAULT_ACTOR_OPTIONS)
    text = os.environ.get(ACTOR_OPTIONS_ENV_VAR, "").strip()
    if not text:
        return options
    try:
        extra = json.loads(text)
    except ValueError as exc:
        extra = exc
    if not isinstance(extra, dict):
        raise ValueError(
            f"{ACTOR_OPTIONS_ENV_VAR} must hold a JSON object of Ray actor options, e.g. "
            f'\'{{"resources": {{"loader": 1}}}}\'; got {text!r} ({extra})'
        )
    options.update(extra)
    return options


# ---------------------------------------------------------------------------------------------
# Actor side
# ---------------------------------------------------------------------------------------------


class _ActorChannel:
    """The worker loop's :class:`compatmp._worker.Channel` inside an actor (NOTE above).

    The loop thread calls ``send``/``recv``/``poll``/``close``; the actor's ``step`` calls
    :meth:`exchange`. ``idle`` is True while the loop waits in ``poll`` with nothing to read.
    """

    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.inbox: collections.deque = collections.deque()
        self.outbox: list[tuple] = []
        self.idle = False
        self.closed = False

    def send(self, msg: tuple) -> None:
        """Queue a message for the main side (returned by the current ``step``)."""
        with self.cond:
            if self.closed:
                raise EOFError("the channel is closed")
            self.outbox.append(msg)

    def recv(self) -> tuple:
        """Take the next message from the main side, waiting for one; EOFError once closed."""
        with self.cond:
            self.cond.wait_for(lambda: self.inbox or self.closed)
            if self.inbox:
                return self.inbox.popleft()
            raise EOFError("the channel is closed")

    def poll(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a message; marks the loop idle meanwhile."""
        with self.cond:
            if not self.inbox:
                self.idle = True
                self.cond.notify_all()
            return self.cond.wait_for(lambda: self.inbox or self.closed, timeout)

    def close(self) -> None:
        """The loop ended: every waiting ``exchange`` returns."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def exchange(self, msg: tuple | None, alive: Any) -> list[tuple]:
        """Hand ``msg`` to the loop (None: nothing), wait until it is idle, return its output.

        Args:
            msg (tuple | None): one message of NOTE [ Worker protocol ], or None.
            alive (Callable[[], bool]): whether the loop thread still runs (checked every
                :data:`_STEP_POLL_INTERVAL` seconds, so a dead loop never blocks the call).

        Returns:
            list[tuple]: the messages the loop sent meanwhile, oldest first.
        """
        with self.cond:
            if msg is not None and not self.closed:
                self.inbox.append(msg)
                self.idle = False
                self.cond.notify_all()
            while not self.closed and not (self.idle and not self.inbox):
                self.cond.wait(_STEP_POLL_INTERVAL)
                if not alive():
                    break
            out, self.outbox = self.outbox, []
            return out


def _adopt_paths(sys_path: list[str], cwd: str) -> None:
    """Add the main process's existing ``sys.path`` entries; enter its cwd if it exists."""
    for entry in sys_path:
        if entry and entry not in sys.path and os.path.isdir(entry):
            sys.path.append(entry)
    if cwd and os.path.isdir(cwd):
        try:
            os.chdir(cwd)
        except OSError:
            pass


class _WorkerActor:
    """One worker: :func:`compatmp._worker.worker_main` in a thread, driven by ``step``.

    Args (of the constructor, passed by Ray):
        config (WorkerConfig): without ``dataset``/``init_fn`` (they come as the next two
            arguments, which Ray resolves from the object store: one copy for all actors).
        dataset (object): the pickled dataset (as the pool prepared it for processes).
        init_fn (bytes | None): the pickled ``worker_init_fn``.
        sys_path (list[str]): the main process's ``sys.path``.
        cwd (str): the main process's working directory.
    """

    def __init__(
        self, config: Any, dataset: bytes, init_fn: Any, sys_path: list[str], cwd: str
    ) -> None:
        _adopt_paths(sys_path, cwd)
        # main_pid=0: no parent watchdog; Ray ends an actor whose owner (the pool) is gone.
        config = replace(config, dataset=dataset, init_fn=init_fn, main_pid=0)
        self.channel = _ActorChannel()
        self.thread = threading.Thread(
            target=_worker.worker_main,
            args=(self.channel, config),
            name=f"compatmp-worker-{config.worker_id}",
            daemon=True,
        )
        self.thread.start()

    def start(self) -> dict[str, Any]:
        """Wait for the loop to be ready; where the actor runs and what the loop said."""
        import ray

        return {
            "pid": os.getpid(),
            "node_ip": ray.util.get_node_ip_address(),
            "messages": self.channel.exchange(None, self.thread.is_alive),
        }

    def step(self, msg: tuple) -> list[tuple]:
        """Handle one protocol message; returns what the loop sent (see NOTE [ Ray workers ])."""
        if msg[0] == _worker.DATASET:
            import ray

            if isinstance(msg[2], ray.ObjectRef):  # one put for all actors (RayChannel.send)
                msg = (msg[0], msg[1], ray.get(msg[2]))
        return self.channel.exchange(msg, self.thread.is_alive)


_actor_class_cache: list[Any] = []


def _actor_class() -> Any:
    import ray

    if not _actor_class_cache:
        _actor_class_cache.append(ray.remote(_WorkerActor))
    return _actor_class_cache[0]


# ---------------------------------------------------------------------------------------------
# Ray itself: use the program's, or start (and later stop) our own
# ---------------------------------------------------------------------------------------------

_ray_lock = threading.Lock()
_owned_users = 0  # open pools using a Ray that compatmp initialised


def _acquire_ray(workers: int) -> bool:
    """Make sure Ray is initialised; True if compatmp did it (and must shut it down)."""
    global _owned_users
    import ray

    with _ray_lock:
        if ray.is_initialized():
            if _owned_users:
                _owned_users += 1
                return True
            return False
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": False,
            "logging_level": logging.WARNING,
        }
        if not os.environ.get("RAY_ADDRESS"):
            # A new local instance just big enough for the pool. address="local": without
            # it, ray.init() joins the last cluster that `ray start` (or a test's
            # ray.cluster_utils.Cluster) recorded in /tmp/ray/ray_current_cluster
            # (ray/_private/services.py, get_ray_address_from_environment), and then
            # refuses num_cpus with a ValueError: any other Ray cluster on the machine
            # broke every Ray pool.
            kwargs["address"] = "local"
            kwargs["num_cpus"] = workers
        ray.init(**kwargs)
        _owned_users = 1
        return True


def _release_ray(owned: bool) -> None:
    global _owned_users
    if not owned:
        return
    import ray

    with _ray_lock:
        _owned_users = max(0, _owned_users - 1)
        if _owned_users == 0 and ray.is_initialized():
            ray.shutdown()


class _RayUse:
    """Per pool: whether it owns the Ray instance, and the last dataset update in the store."""

    def __init__(self, owned: bool) -> None:
        self.owned = owned
        self.released = False
        self._payload: Any = None
        self._payload_ref: Any = None

    def put_payload(self, payload: Any) -> Any:
        """One ``ray.put`` per dataset update, shared by every actor's ``step``."""
        import ray

        if payload is not self._payload:
            self._payload, self._payload_ref = payload, ray.put(payload)
        return self._payload_ref

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._payload = self._payload_ref = None
            _release_ray(self.owned)


# ---------------------------------------------------------------------------------------------
# Main side
# ---------------------------------------------------------------------------------------------


class RayChannel:
    """The main side's :class:`compatmp._worker.Channel` to one worker actor.

    ``send`` queues a message; at most :data:`SUBMIT_WINDOW` of them are submitted to the
    actor as ``actor.step.remote`` calls at a time, the next one each time a reply is fetched
    (NOTE [ Ray workers ]). Received messages are the contents of replies fetched by
    :meth:`poll` (or by :meth:`RayTransport.wait`).

    Args:
        actor (ray.actor.ActorHandle): the worker actor.
        ray_use (_RayUse): the pool's Ray bookkeeping.
    """

    def __init__(self, actor: Any, ray_use: _RayUse) -> None:
        self.actor = actor
        self.ray_use = ray_use
        self.pending: collections.deque = collections.deque()  # (ObjectRef, is_start)
        self.queued: collections.deque = collections.deque()  # messages not yet submitted
        self.inbox: collections.deque = collections.deque()
        self.error: str | None = None  # why the actor is gone (None while it lives)
        self.pid: int | None = None
        self.node_ip: str | None = None

    def send(self, msg: tuple) -> None:
        """Queue one message, submitted in order as ``actor.step.remote(msg)``.

        Raises:
            EOFError: the actor is gone (or Ray refused the call).
        """
        if self.error is not None:
            raise EOFError(f"the Ray actor is gone: {self.error}")
        self.queued.append(msg)
        self._submit()
        if self.error is not None:
            raise EOFError(f"the Ray actor is gone: {self.error}")

    def _submit(self) -> None:
        """Submit queued messages while fewer than :data:`SUBMIT_WINDOW` calls are pending."""
        while self.queued and len(self.pending) < SUBMIT_WINDOW and self.error is None:
            msg = self.queued.popleft()
            if msg[0] == _worker.DATASET and isinstance(msg[2], bytes):
                msg = (msg[0], msg[1], self.ray_use.put_payload(msg[2]))
            try:
                ref = self.actor.step.remote(msg)
            except Exception as exc:  # Ray shut down under us, ...
                self.error = _first_line(exc)
                self.queued.clear()
                return
            self.pending.append((ref, False))

    def withdraw(self, send_idxs: set[int]) -> list[int]:
        """Take the tasks of ``send_idxs`` out of the queue (never submitted); which were."""
        return take_back_tasks(self.queued, send_idxs)

    def head(self) -> Any:
        """The oldest pending reply's ObjectRef, or None."""
        return self.pending[0][0] if self.pending else None

    def take_head(self) -> None:
        """Fetch the oldest pending reply (it is ready); on a Ray error, mark the actor gone."""
        import ray

        ref, is_start = self.pending.popleft()
        try:
            reply = ray.get(ref, timeout=ACTOR_START_TIMEOUT)
        except ray.exceptions.GetTimeoutError:
            self.error = f"its reply did not arrive within {ACTOR_START_TIMEOUT:.0f} s"
        except ray.exceptions.RayError as exc:
            self.error = _first_line(exc)
        else:
            if is_start:
                self.pid, self.node_ip = reply["pid"], reply["node_ip"]
                reply = reply["messages"]
            self.inbox.extend(reply)
            self._submit()
            return
        self.pending.clear()
        self.queued.clear()

    def poll(self, timeout: float) -> bool:
        """True when a message can be received; EOFError once the actor is gone and drained."""
        import ray

        deadline = time.monotonic() + timeout
        while not self.inbox:
            if self.error is not None:
                raise EOFError(f"the Ray actor is gone: {self.error}")
            if not self.pending:
                return False
            left = max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait([self.head()], num_returns=1, timeout=left)
            if not ready:
                return False
            self.take_head()
        return True

    def recv(self) -> tuple:
        """The oldest received message (call after :meth:`poll` returned True)."""
        while not self.poll(_worker.WORKER_POLL_INTERVAL):
            if not self.pending:
                raise EOFError("nothing was sent that could be answered")
        return self.inbox.popleft()

    def close(self) -> None:
        """Forget pending replies, unsent and buffered messages (their objects are freed)."""
        self.pending.clear()
        self.queued.clear()
        self.inbox.clear()


class RayHandle(WorkerHandle):
    """The core's view of one worker actor (see :class:`compatmp._transport.WorkerHandle`)."""

    def __init__(self, worker_id: int, channel: RayChannel) -> None:
        super().__init__(worker_id, channel)
        self.started = time.monotonic()

    def is_alive(self) -> bool:
        return self.channel.error is None

    def describe_death(self, code: int | None) -> tuple[str, str]:
        """``(who, how)``: the actor's node and pid, and Ray's error (``code`` is unused)."""
        ch = self.channel
        where = ", ".join(
            part
            for part in (
                f"node {ch.node_ip}" if ch.node_ip else "",
                f"pid {ch.pid}" if ch.pid is not None else "",
            )
            if part
        )
        who = f"worker {self.id} (Ray actor{' on ' + where if where else ''})"
        return who, f"is gone ({ch.error})"

    def stack(self) -> str:
        if not self.ready:
            return "(no stack: the worker is still starting or loading the dataset)"
        # An actor may run on another machine: no local stack file, no signal to its pid.
        return "(no stack: worker stacks are not available for Ray actors)"


def _first_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[:3])[:400]


class RayTransport(Transport):
    """Worker actors on a Ray cluster (``start_method="ray"``, NOTE [ Ray workers ]).

    Args:
        method (str): ``"ray"``.
        stall_timeout (float | None): unused (actors get no stack files).
    """

    def start(self, configs: list[_worker.WorkerConfig]) -> None:
        """Start one worker actor per config; initialises Ray first if the program has not.

        ``dataset`` and ``init_fn`` of the configs are what the pool prepared for processes
        (pickled, the same for every config): put into the object store once.

        Raises:
            StartMethodError: Ray is not installed.
            ValueError: ``COMPATMP_RAY_ACTOR_OPTIONS`` is malformed, or Ray rejected the
                options.
            Exception: whatever ``ray.init`` raised (e.g. ``RAY_ADDRESS`` unreachable).
        """
        check_available()
        import ray

        options = actor_options()
        ray_use = _RayUse(_acquire_ray(len(configs)))
        try:
            try:
                cls = _actor_class().options(**options)
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"Ray rejected the worker actor options {options!r} ({exc}); check "
                    f"{ACTOR_OPTIONS_ENV_VAR}"
                ) from exc
            first = configs[0]
            dataset_ref = ray.put(first.dataset)
            init_ref = None if first.init_fn is None else ray.put(first.init_fn)
            cwd = os.getcwd()
            for config in configs:
                # Batches come back through Ray's object store: no shared-memory prefix.
                bare = replace(
                    config,
                    dataset=None,
                    init_fn=None,
                    in_process=True,
                    shm_prefix=None,
                    stack_file=None,
                )
                actor = cls.remote(bare, dataset_ref, init_ref, list(sys.path), cwd)
                channel = RayChannel(actor, ray_use)
                channel.pending.append((actor.start.remote(), True))
                self.handles.append(RayHandle(config.worker_id, channel))
        except BaseException:
            if not self.handles:
                ray_use.release()
            raise

    def wait(
        self, handles: list[WorkerHandle], timeout: float
    ) -> tuple[list[WorkerHandle], list[WorkerHandle]]:
        """Wait up to ``timeout`` seconds for a reply from any actor.

        An actor not ready within :data:`ACTOR_START_TIMEOUT` counts as gone (its node, or
        the cluster's resources, are missing).
        """
        import ray

        actors: list[RayHandle] = handles  # type: ignore[assignment]
        now = time.monotonic()
        for h in actors:
            if h.channel.error is None and not h.ready and now - h.started > ACTOR_START_TIMEOUT:
                h.channel.error = (
                    f"it did not start within {ACTOR_START_TIMEOUT:.0f} s: the cluster may "
                    f"lack the resources each worker asks for ({actor_options()}); the "
                    f"cluster has {_cluster_resources()}"
                )
        heads = {h.channel.head(): h for h in actors if not h.channel.inbox and h.channel.head()}
        if any(h.channel.inbox or h.channel.error is not None for h in actors):
            timeout = 0.0
        if heads:
            ready, _ = ray.wait(list(heads), num_returns=1, timeout=timeout)
            if ready:
                ready, _ = ray.wait(list(heads), num_returns=len(heads), timeout=0)
            for ref in ready:
                heads[ref].channel.take_head()
        elif timeout > 0:
            time.sleep(timeout)
        readable: list[WorkerHandle] = [h for h in actors if h.channel.inbox]
        dead: list[WorkerHandle] = [
            h for h in actors if h.channel.error is not None and not h.channel.inbox
        ]
        return readable, dead

    def withdraw(self, handle: WorkerHandle, send_idxs: set[int]) -> list[int]:
        """Take back orphaned tasks not yet submitted to the actor (NOTE [ Ray workers ])."""
        return handle.channel.withdraw(send_idxs)

    def shutdown(self, deadline: float, drain: Any) -> None:
        """Kill every actor, drop every pending reply, and release Ray."""
        import ray

        ray_use = None
        for h in self.handles:
            ch = h.channel
            ray_use = ch.ray_use
            try:
                ray.kill(ch.actor, no_restart=True)
            except Exception:
                pass  # already dead, or Ray is shut down (at exit Ray's hook runs first)
            ch.close()
        if ray_use is not None:
            ray_use.release()


def _cluster_resources() -> Any:
    try:
        import ray

        return ray.cluster_resources()
    except Exception as exc:  # pragma: no cover - diagnostics only
        return f"unknown ({exc})"
