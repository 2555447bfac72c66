"""worker_cost: the model thread's cost of reading replies is timed; the wire's time is not."""

import time

import numpy as np

from engram_ray.agent.measure import worker_cost


class _Fetch:
    def __init__(self, lands_at: float, read_s: float):
        self.lands_at, self.read_s, self.read = lands_at, read_s, False

    def done(self) -> bool:
        if not self.read and time.perf_counter() >= self.lands_at:
            t = time.perf_counter()
            while time.perf_counter() - t < self.read_s:  # reading the reply: the thread's own work
                pass
            self.read = True
        return self.read

    def result(self):
        while not self.done():  # blocking: asleep until the reply is in (as a recv is)
            time.sleep(0.0005)

    def release(self) -> None:
        pass


class _Agent:
    """Replies land ``travel_s`` after the issue and take ``read_s`` of the caller's time to read."""
    timeout = 5.0

    def __init__(self, travel_s: float, read_s: float):
        self.travel_s, self.read_s = travel_s, read_s

    def prefetch_unique_many(self, layers):
        return [_Fetch(time.perf_counter() + self.travel_s, self.read_s) for _ in layers]


def test_reading_is_timed_even_when_done_reads_the_reply():
    out = worker_cost(_Agent(travel_s=0.0, read_s=0.0003), [np.arange(4)] * 2, iters=20, gap_s=0.001)
    assert out["in_by_gap"] == 1.0
    assert out["ready_us"]["median"] >= 2 * 300  # two replies read, 300 us each


def test_rows_still_travelling_after_the_gap_are_not_counted():
    out = worker_cost(_Agent(travel_s=0.01, read_s=0.0), [np.arange(4)], iters=10, gap_s=0.001)
    assert out["in_by_gap"] == 0.0
    assert out["ready_us"]["median"] < 3_000  # the 9 ms still on the wire are not the thread's
