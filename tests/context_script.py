"""Run as ``python context_script.py METHOD MARKER_FILE``: compatmp.get_context() from __main__.

Everything the children need is defined here, in ``__main__``: a torch ``Dataset`` holding a
lock and a lambda, lambdas and closures as tasks. Each import of this file as a module appends
a line to MARKER_FILE, so the parent can check that no child re-ran ``__main__``. Prints one
JSON line with what it saw; tests/test_context.py asserts on it.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import sys
import threading

with open(sys.argv[2], "a") as _marker:
    _marker.write(f"{os.getpid()} {__name__}\n")

import torch
from torch.utils.data import DataLoader, Dataset

import compatmp

SCALE = 3


class LockedDataset(Dataset):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.transform = lambda i: [i * SCALE, i * SCALE + 1]

    def __len__(self) -> int:
        return 11

    def __getitem__(self, i: int) -> torch.Tensor:
        with self.lock:
            return torch.tensor(self.transform(i), dtype=torch.float32)


def main() -> None:
    method = sys.argv[1]
    ctx = compatmp.get_context(method)
    out: dict = {"method": ctx.get_start_method()}
    reference = list(DataLoader(LockedDataset(), batch_size=4, num_workers=0))
    batches = list(
        DataLoader(LockedDataset(), batch_size=4, num_workers=2, multiprocessing_context=ctx)
    )
    out["dataloader_same"] = len(batches) == len(reference) and all(
        torch.equal(a, b) for a, b in zip(reference, batches, strict=True)
    )
    offset = 7
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        out["executor_map"] = list(ex.map(lambda v: v + offset, range(6)))
        out["executor_closure_result"] = ex.submit(lambda: lambda v: v * offset).result(60)(2)
    with ctx.Pool(2) as pool:
        out["pool_map"] = pool.map(lambda v: v * SCALE, range(6))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
