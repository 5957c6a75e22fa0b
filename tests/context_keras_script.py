"""Run as ``KERAS_BACKEND=torch python context_keras_script.py``: compatmp.fit with a torch
DataLoader in a program that called ``multiprocessing.set_start_method("spawn")``.

The dataset class, its lock and its lambda are defined here, in ``__main__``. Prints one JSON
line; tests/test_context.py asserts on it.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import threading

import numpy as np


class LockedPairs:
    """A map-style torch dataset (x, y) holding a lock and a lambda."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.target = lambda row: row.sum(keepdims=True) * 0.5
        rng = np.random.default_rng(0)
        self.x = rng.normal(size=(48, 4)).astype("float32")

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        with self.lock:
            return self.x[i], self.target(self.x[i])


def main() -> None:
    multiprocessing.set_start_method("spawn")
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logging.getLogger("compatmp").addHandler(Keep())
    logging.getLogger("compatmp").setLevel(logging.INFO)

    import keras
    import psutil
    from torch.utils.data import DataLoader

    import compatmp

    out: dict = {"backend": keras.backend.backend()}
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    start = model.get_weights()

    def loader(workers: int, **kw) -> DataLoader:
        return DataLoader(LockedPairs(), batch_size=8, num_workers=workers, **kw)

    try:
        model.fit(loader(1), epochs=1, verbose=0)
        out["plain_fit"] = "trained"
    except Exception as exc:  # the bug this fixes: TypeError: cannot pickle '_thread.lock'
        out["plain_fit"] = f"{type(exc).__name__}: {exc}"[:200]

    model.set_weights(start)
    reference = model.fit(loader(0), epochs=2, verbose=0, shuffle=False).history["loss"]
    model.set_weights(start)
    mine = loader(2, persistent_workers=True)  # one set of workers for both epochs
    history = compatmp.fit(
        model, mine, epochs=2, verbose=0, shuffle=False, validation_data=loader(1)
    )
    out["same_loss"] = bool(np.allclose(history.history["loss"], reference, rtol=1e-5))
    out["val_loss"] = "val_loss" in history.history
    out["user_loader_untouched"] = mine.multiprocessing_context is None and mine._iterator is None
    out["evaluate"] = float(compatmp.evaluate(model, loader(1), verbose=0))
    out["evaluate_ref"] = float(model.evaluate(loader(0), verbose=0))
    predicted = compatmp.predict(model, loader(1), verbose=0)
    out["predict_same"] = bool(np.allclose(predicted, model.predict(loader(0), verbose=0)))
    out["children_left"] = [
        p.pid
        for p in psutil.Process().children(recursive=True)
        if "resource_tracker" not in " ".join(p.cmdline())
    ]
    out["said"] = [r for r in records if "torch DataLoader" in r]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
