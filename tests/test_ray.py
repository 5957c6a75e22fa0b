"""start_method="ray": the pool's workers as Ray actors (compatmp/_ray.py, NOTE [ Ray workers ]).

Ray starts a local instance in ~2-6 s on a loaded 2-core machine, so the tests are few and each
checks several things on one pool. They are marked ``ray`` and skipped (saying why) when Ray is
not importable. The two-node test uses Ray's own ``ray.cluster_utils.Cluster``: several raylets
on this machine, actors placed one per node by a custom resource, then a node removed.
"""

from __future__ import annotations

import importlib.util
import json
import threading
import time

import numpy as np
import pytest
from pool_datasets import ExitDataset, InfoDataset, RaisingDataset, StateDataset, record_init

import compatmp
from compatmp import OrderedPool, StartMethodError, WorkerCrashedError, decide_start_method
from compatmp._worker import derive_seed

HAVE_RAY = importlib.util.find_spec("ray") is not None
requires_ray = pytest.mark.skipif(
    not HAVE_RAY, reason="Ray is not installed here (pip install 'compatmp[ray]')"
)


class LockLambdaDataset:
    """Holds a lock, a lambda and a 2 MiB array; big-ish batches."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.lock = threading.Lock()
        self.scale = lambda i: i * 3
        self.offset = 0
        # 2 MiB: above the shared-dataset threshold, so the Ray path must keep it in the pickle
        # (other nodes cannot map this machine's shared memory).
        self.table = np.arange(512 * 1024, dtype=np.float32)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        assert self.table[i] == i
        with self.lock:
            value = self.scale(i) + self.offset
        info = compatmp.get_worker_info()
        return {
            "x": np.full((64, 1024), value, dtype=np.float32),  # 256 KiB: object-store sized
            "worker": None if info is None else info.id,
        }


class NodeDataset:
    """``dataset[i] -> (i, state, worker id, Ray node id)``."""

    def __init__(self, n: int, state: int = 0) -> None:
        self.n = n
        self.state = state

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple:
        import ray

        time.sleep(0.02)  # so that both workers get a share
        info = compatmp.get_worker_info()
        return i, self.state, info.id, ray.get_runtime_context().get_node_id()


def _ray_initialized() -> bool:
    import ray

    return ray.is_initialized()


# ---------------------------------------------------------------------------------------------
# Without Ray, and "auto"


def test_ray_is_never_chosen_by_auto():
    assert decide_start_method("auto").method != "ray"


def test_ray_without_ray_installed_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a)
    )
    with pytest.raises(StartMethodError, match=r"pip install 'compatmp\[ray\]'"):
        OrderedPool(StateDataset(4), workers=1, start_method="ray")
    monkeypatch.setenv("COMPATMP_START_METHOD", "ray")
    with pytest.raises(StartMethodError, match="COMPATMP_START_METHOD='ray' needs Ray"):
        decide_start_method()


def test_bad_actor_options_are_refused(monkeypatch):
    from compatmp._ray import ACTOR_OPTIONS_ENV_VAR, actor_options

    monkeypatch.setenv(ACTOR_OPTIONS_ENV_VAR, "[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        actor_options()
    monkeypatch.setenv(ACTOR_OPTIONS_ENV_VAR, '{"resources": {"loader": 1}}')
    assert actor_options()["resources"] == {"loader": 1}
    assert actor_options()["max_restarts"] == 0


# ---------------------------------------------------------------------------------------------
# A local Ray started (and stopped) by compatmp


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("no_leaked_workers")
@pytest.mark.ray
@requires_ray
def test_ray_pool_orders_updates_seeds_and_shuts_ray_down(monkeypatch):
    assert not _ray_initialized(), "this test needs a process where Ray is not initialised"
    dataset = LockLambdaDataset(24)
    serial = [dataset[i] for i in range(24)]
    with OrderedPool(dataset, workers=2, start_method="ray", seed=11, max_queue_size=4) as pool:
        assert pool.decision.method == "ray"
        got = []
        for batch in pool.imap(range(24)):
            got.append(batch)
            time.sleep(0.01)  # a slow consumer: at most max_queue_size batches in Ray
            core = pool._core
            in_ray = sum(
                len(h.channel.inbox) + sum(not start for _ref, start in h.channel.pending)
                for h in core.handles
            )
            assert in_ray <= 4 and core.tasks.in_flight() <= 4
        for a, b in zip(got, serial, strict=True):
            np.testing.assert_array_equal(a["x"], b["x"])
        assert {b["worker"] for b in got} <= {0, 1}
        # An update reaches both actors: every batch afterwards has the new offset.
        dataset.offset = 1000
        assert pool.update_dataset(dataset).sent is True
        assert pool.update_dataset(dataset).sent is False  # unchanged pickle: nothing sent
        got = list(pool.imap(range(23, -1, -1)))
        assert [int(b["x"][0, 0]) for b in got] == [i * 3 + 1000 for i in range(23, -1, -1)]
        assert {b["worker"] for b in got} == {0, 1}
    assert not _ray_initialized()  # compatmp started it, so close() shut it down

    # seed, worker_init_fn, get_worker_info: as in worker processes. Ray chosen by the
    # environment variable this time.
    monkeypatch.setenv("COMPATMP_START_METHOD", "ray")
    with OrderedPool(InfoDataset(), workers=2, seed=5, worker_init_fn=record_init) as pool:
        assert pool.decision.method == "ray"
        rows = list(pool.imap(range(40)))
    for info, _random, _np_random, _pid, init in rows:
        assert info.num_workers == 2
        assert info.seed == derive_seed(5, info.id)[0]
        assert init == info.id  # worker_init_fn ran in this actor's worker, with its id
    assert {info.id for info, *_ in rows} == {0, 1}
    assert not _ray_initialized()


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("no_leaked_workers")
@pytest.mark.ray
@requires_ray
def test_ray_failures_crash_error_and_timeout(monkeypatch):
    # A batch error comes back with its own type, and the pool shuts down.
    with OrderedPool(RaisingDataset(8, bad=3), workers=2, start_method="ray") as pool:
        with pytest.raises(ValueError, match="bad index 3"):
            list(pool.imap(range(8)))
        assert pool.closed
    # An actor that dies (os._exit) raises WorkerCrashedError naming the index, within 30 s.
    with OrderedPool(ExitDataset(20, bad=5), workers=2, start_method="ray") as pool:
        list(pool.imap(range(2)))  # both actors ready: the clock below measures detection
        started = time.monotonic()
        got = []
        with pytest.raises(WorkerCrashedError, match="index") as info:
            for batch in pool.imap(range(20)):
                got.append(batch)
        assert time.monotonic() - started < 30
        # The index the dead actor held that never arrived: 5 itself, or (Ray sends replies
        # asynchronously, NOTE [ Ray workers ]) a batch it finished just before os._exit.
        assert len(got) <= info.value.index <= 5
        assert f"index {info.value.index}" in str(info.value)
        assert "Ray actor" in str(info.value)
        assert pool.closed
    assert not _ray_initialized()
    # timeout=: a slow batch raises WorkerTimeoutError.
    from pool_datasets import SlowDataset

    with OrderedPool(
        SlowDataset(6, slow=2, seconds=60), workers=2, start_method="ray", timeout=3
    ) as pool:
        with pytest.raises(compatmp.WorkerTimeoutError, match="index 2"):
            list(pool.imap(range(6)))
    assert not _ray_initialized()
    # An actor Ray cannot place (a resource no node has) is reported, never waited for.
    from compatmp import _ray

    monkeypatch.setattr(_ray, "ACTOR_START_TIMEOUT", 5.0)
    monkeypatch.setenv(_ray.ACTOR_OPTIONS_ENV_VAR, '{"resources": {"no_such_node": 1}}')
    with OrderedPool(StateDataset(4), workers=1, start_method="ray") as pool:
        with pytest.raises(WorkerCrashedError, match="did not start within 5 s"):
            list(pool.imap(range(4)))
    assert not _ray_initialized()


@pytest.mark.timeout(180)
@pytest.mark.usefixtures("no_leaked_workers")
@pytest.mark.ray
@requires_ray
def test_update_takes_back_the_orphaned_prefetches_no_actor_received(tmp_path):
    # Issue 17: Ray actors computed every orphaned prefetch (each call queued in Ray runs)
    # before a dataset update could run. Now at most SUBMIT_WINDOW calls per actor are in
    # Ray; the orphans behind them are taken back (NOTE [ Ray workers ]).
    from edge_helpers import LoggedShared, computed_indices

    from compatmp import _ray

    log = str(tmp_path)
    dataset = LoggedShared(delay=1.0, log_dir=log)
    with OrderedPool(dataset, workers=2, start_method="ray", max_queue_size=8) as pool:
        it = pool.imap(range(16))
        assert [float(next(it)[0]) for _ in range(2)] == [0.0, 1.0]
        del it  # indices 2..9 dispatched and orphaned
        counts = pool._core.tasks.counts
        dataset.x[:, 0] = 50.0
        started = time.monotonic()
        assert pool.update_dataset(dataset).sent
        waited = time.monotonic() - started
        pool._core.tasks.check()  # NOTE [ Task records ]: every invariant holds
        old = computed_indices(log)
        assert len(old) == len(set(old)), f"an index was computed twice: {sorted(old)}"
        assert len(old) + counts["skipped"] == counts["dispatched"], (sorted(old), counts)
        # Per actor, at most the calls in Ray's hands ran for nothing: 2 + 2 of 2..9.
        assert len(set(old) - {0, 1}) <= 2 * _ray.SUBMIT_WINDOW, sorted(old)
        # The rest of the dispatched orphans (2..8 or 2..9) were taken back, never computed.
        assert counts["skipped"] >= counts["dispatched"] - 2 - 2 * _ray.SUBMIT_WINDOW, counts
        assert waited < 30, waited  # was ~4 s of 1 s orphans; here at most ~2 s
        for f in tmp_path.iterdir():
            f.unlink()
        got = [b.tolist() for b in pool.imap(range(6))]
        assert got == [(dataset.x[i % 4, :8] + i).tolist() for i in range(6)]
        assert sorted(computed_indices(log)) == list(range(6))
        pool._core.tasks.check()


_OWN_INSTANCE_SCRIPT = """
import json
import compatmp


class Where:
    def __len__(self):
        return 4

    def __getitem__(self, i):
        import ray

        return i, ray.get_runtime_context().gcs_address


with compatmp.OrderedPool(Where(), workers=1, start_method="ray") as pool:
    rows = list(pool.imap(range(4)))
print(json.dumps(rows))
"""


@pytest.mark.timeout(300)
@pytest.mark.ray
@requires_ray
def test_a_pool_starts_its_own_ray_beside_a_cluster_started_on_this_machine():
    # Ray's ray.init() without an address joins the last cluster `ray start` (or a Cluster,
    # as here) recorded in /tmp/ray/ray_current_cluster, then refuses num_cpus: every Ray
    # pool failed with ValueError while another Ray cluster ran on the machine (found running
    # two copies of the suite side by side). Without RAY_ADDRESS, a pool starts its own.
    import os
    import subprocess
    import sys

    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.run(
            [sys.executable, "-c", _OWN_INSTANCE_SCRIPT],
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = json.loads(proc.stdout.strip().splitlines()[-1])
        assert [i for i, _ in rows] == [0, 1, 2, 3]
        assert {gcs for _, gcs in rows} != {cluster.address}  # its own instance
    finally:
        cluster.shutdown()


@pytest.mark.keras
@pytest.mark.timeout(300)
@pytest.mark.ray
@requires_ray
def test_fit_trains_on_ray():
    pytest.importorskip("keras")
    import keras
    import keras_datasets as kd

    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((kd.N_FEATURES,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    history = compatmp.fit(
        model, kd.ArrayDataset(reshuffle=True), workers=2, start_method="ray", epochs=3, verbose=0
    )
    assert len(history.history["loss"]) == 3
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert not _ray_initialized()


# ---------------------------------------------------------------------------------------------
# Two nodes: Ray's Cluster starts several raylets on this machine


@pytest.mark.timeout(300)
@pytest.mark.ray
@requires_ray
def test_two_node_cluster_order_updates_and_node_loss(monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    from compatmp._ray import ACTOR_OPTIONS_ENV_VAR

    assert not ray.is_initialized()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,  # the driver's node runs no worker
            "include_dashboard": False,
            # Declare a lost node dead after ~2 s instead of Ray's default ~30 s.
            "_system_config": {
                "health_check_initial_delay_ms": 0,
                "health_check_period_ms": 500,
                "health_check_failure_threshold": 4,
            },
        },
    )
    try:
        nodes = [
            cluster.add_node(num_cpus=1, resources={"compatmp_test_loader": 1}) for _ in range(2)
        ]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        # One loader resource per node, one per actor: the two actors land on different nodes.
        monkeypatch.setenv(
            ACTOR_OPTIONS_ENV_VAR, json.dumps({"resources": {"compatmp_test_loader": 1}})
        )
        dataset = NodeDataset(30)
        pool = OrderedPool(dataset, workers=2, start_method="ray")
        try:
            got = list(pool.imap(range(30)))
            assert [row[0] for row in got] == list(range(30))
            node_of = {worker: node for _i, _s, worker, node in got}
            assert set(node_of) == {0, 1}
            assert node_of[0] != node_of[1]
            assert set(node_of.values()) == {n.node_id for n in nodes}

            dataset.state = 7
            assert pool.update_dataset(dataset)
            got = list(pool.imap(range(30)))
            assert [row[:2] for row in got] == [(i, 7) for i in range(30)]
            assert {row[2] for row in got} == {0, 1}

            victim = next(n for n in nodes if n.node_id == node_of[1])
            cluster.remove_node(victim, allow_graceful=False)
            # The actor process may outlive its raylet for a moment (calls go straight from
            # the driver to the actor): keep asking until the loss is noticed.
            started = time.monotonic()
            with pytest.raises(WorkerCrashedError, match="worker 1 ") as info:
                while time.monotonic() - started < 60:
                    list(pool.imap(range(30)))
            assert time.monotonic() - started < 60
            assert "Ray actor" in str(info.value)
            assert pool.closed
        finally:
            pool.close()
        assert ray.is_initialized()  # the program's Ray is left running
    finally:
        ray.shutdown()
        cluster.shutdown()
