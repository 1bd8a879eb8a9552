"""A process pool for building the toy models side by side.

The toy models' training steps are small: two torch threads on one model run about 1.5x faster
than one, while two models on one thread each run 2x. Each worker process (spawned: forking a
process whose torch thread pools are running is unsafe) therefore trains with a single thread.

    >>> with build_pool(2) as pool:
    ...     clip = pool.submit(build_toy_clip, "runs/toy/clip")
    ...     build_toy_codecs("runs/toy/codecs", pool=pool)
    ...     clip.result()
"""

import multiprocessing
from concurrent.futures import ProcessPoolExecutor


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def build_pool(workers: int) -> ProcessPoolExecutor:
    """`workers` spawned processes with one torch thread each."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread)
