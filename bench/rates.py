"""Images/s of a source of batches, the way every benchmark here times one."""

import statistics
import time
from collections.abc import Callable, Iterable


def images_per_second(source: Iterable, batches: int, warmup: int, windows: int = 3,
                      after_warmup: Callable[[], None] | None = None) -> float:
    """Median rate over ``windows`` timed windows of ``batches`` batches, after ``warmup``
    batches; ``source`` is iterated again whenever it ends (a loader's epoch, a stream's).
    ``after_warmup`` runs between warm-up and timing (to reset a counter of the source's)."""
    def forever():
        while True:
            yield from source

    iterator = forever()
    for _ in range(warmup):
        next(iterator)
    if after_warmup is not None:
        after_warmup()
    rates = []
    for _ in range(windows):
        start, images = time.perf_counter(), 0
        for _ in range(batches):
            images += next(iterator).shape[0]
        rates.append(images / (time.perf_counter() - start))
    iterator.close()  # stops the loader's workers before the next contender runs
    return statistics.median(rates)
