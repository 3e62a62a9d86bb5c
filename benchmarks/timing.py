"""Side-by-side timing in one process: interleaved repetitions in a fresh random order, with pauses."""

from __future__ import annotations

import gc
import time
from collections.abc import Callable

import numpy as np

PAUSE_S = 0.02  # before each timed repetition: torch's OpenMP threads spin after a step


def interleaved(
  runners: dict[str, Callable[[int], float]], reps: int, target_s: float
) -> dict[str, list[float]]:
  """Seconds per step of each runner (``run(k)`` times `k` steps), `reps` times each.

  Each runner is first sized to about `target_s` per repetition; the live
  objects are frozen out of Python's garbage collector while timing (large
  trees of arrays would otherwise be rescanned at every step). Each
  repetition visits the runners in a fresh random order (a fixed order would
  always run one method right after torch's threads, or after the same
  neighbour), after a pause.
  """
  gc.collect()
  gc.freeze()
  try:
    inner = {}
    for name, run in runners.items():
      run(2)
      inner[name] = max(1, min(500, round(target_s / max(run(1), 1e-6))))
    times: dict[str, list[float]] = {name: [] for name in runners}
    rng = np.random.default_rng(0)
    for _ in range(reps):
      for name in rng.permutation(list(runners)):
        time.sleep(PAUSE_S)
        times[name].append(runners[name](inner[name]))
    return times
  finally:
    gc.unfreeze()
    gc.collect()


def donated_step(compiled: Callable, params, state, grads) -> Callable[[int], float]:
  """``run(k)``: seconds per call of `compiled` (params, state donated) over `k` calls in a row."""
  import jax

  box = [params, state]

  def run(k: int) -> float:
    t0 = time.perf_counter()
    for _ in range(k):
      box[0], box[1] = compiled(box[0], box[1], grads)
    jax.block_until_ready(box[0])
    return (time.perf_counter() - t0) / k

  return run
