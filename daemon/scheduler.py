"""Which frames of which sessions go into the next generation step.

Pure bookkeeping, like an inference server's scheduler: it never touches a tensor, and it
is tested without a GPU. The GPU worker asks ``next_batch`` once per step; stops and
interrupts (``cancel``) are applied between steps. Policy: earliest deadline first (a
frame due sooner is generated sooner, whatever its session), so that with many sessions
the batch is formed fresh each step from the most urgent frames of all of them.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(order=True)
class PendingFrame:
    deadline: float
    order: tuple[int, int]  # (tie-break rank, insertion order): equal deadlines go to the lower rank
    session_id: str = field(compare=False)
    utterance: int = field(compare=False)
    frame_no: int = field(compare=False)
    job: Any = field(compare=False)  # daemon.worker.FrameJob
    cancelled: bool = field(default=False, compare=False)


class BatchScheduler:
    def __init__(self) -> None:
        self._heap: list[PendingFrame] = []
        self._order = itertools.count()
        self._live = 0
        self.dropped_late = 0
        self.last_dropped: list[PendingFrame] = []

    def add(self, session_id: str, utterance: int, frame_no: int, deadline: float, job: Any,
            rank: int = 0) -> PendingFrame:
        """``rank`` breaks ties between equal deadlines (lower first): the worker passes
        how many frames the session was served, so equal deadlines take turns."""
        item = PendingFrame(deadline, (rank, next(self._order)), session_id, utterance, frame_no, job)
        heapq.heappush(self._heap, item)
        self._live += 1
        return item

    def cancel(self, session_id: str, utterance: int | None = None, before_frame: int | None = None) -> int:
        """Drop a session's frames: all of them, those of one utterance, or those of one
        utterance numbered below ``before_frame`` (already played with a fallback)."""
        n = 0
        for item in self._heap:
            if item.cancelled or item.session_id != session_id:
                continue
            if utterance is not None and item.utterance != utterance:
                continue
            if before_frame is not None and item.frame_no >= before_frame:
                continue
            item.cancelled = True
            n += 1
        self._live -= n
        if n:
            # Drop them now: their callbacks hold the session's utterance alive.
            self._heap = [item for item in self._heap if not item.cancelled]
            heapq.heapify(self._heap)
        return n

    def shift(self, session_id: str, utterance: int | None, delta: float) -> int:
        """Move the deadlines of a session's frames (of one utterance, or all) by
        ``delta`` seconds: they will play that much later."""
        n = 0
        for item in self._heap:
            if item.session_id == session_id and (utterance is None or item.utterance == utterance):
                item.deadline += delta
                n += 1
        if n:
            heapq.heapify(self._heap)
        return n

    def next_batch(self, max_batch: int, not_before: float | None = None,
                   tie_window_s: float = 0.0,
                   rank: Callable[[PendingFrame], int] | None = None) -> list[PendingFrame]:
        """The ``max_batch`` most urgent frames. Frames due before ``not_before`` (the
        time the step would finish) cannot be shown any more: they are dropped, so that an
        overloaded GPU spends its time on frames that can still make their tick (the
        session shows its idle frame for the dropped ones).

        Frames due within ``tie_window_s`` of the most urgent one count as equally urgent
        (the worker passes one step: which of them a step takes decides nothing about its
        timing). When they are more than a batch, the lower ranks go first: under
        overload the sessions served least so far lose the fewest frames, and no phase
        of the sessions' clocks favours one of them. ``rank`` gives an item's rank now
        (the worker: its session's frames served so far); without it, the rank it was
        added with."""
        self.dropped_late = 0
        self.last_dropped = []
        tied: list[PendingFrame] = []
        while self._heap:
            item = self._heap[0]
            if item.cancelled:
                heapq.heappop(self._heap)
                continue
            if not_before is not None and item.deadline < not_before:
                heapq.heappop(self._heap)
                self.dropped_late += 1
                self.last_dropped.append(item)
                self._live -= 1
                continue
            if tied and item.deadline > tied[0].deadline + tie_window_s and len(tied) >= max_batch:
                break
            tied.append(heapq.heappop(self._heap))
        if len(tied) > max_batch:
            tied.sort(key=lambda it: (rank(it) if rank is not None else it.order[0], it.deadline, it.order[1]))
            for item in tied[max_batch:]:
                heapq.heappush(self._heap, item)
            tied = tied[:max_batch]
        self._live -= len(tied)
        return tied

    def earliest_deadline(self) -> float:
        """Deadline of the most urgent live frame (inf when there is none)."""
        while self._heap and self._heap[0].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0].deadline if self._heap else float("inf")

    def __len__(self) -> int:
        return self._live

    def pending_by_session(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for item in self._heap:
            if not item.cancelled:
                counts[item.session_id] = counts.get(item.session_id, 0) + 1
        return counts


def batch_wait(now: float, pending: int, max_batch: int, earliest_deadline: float, gpu_free_at: float,
               full_step_s: float, margin_s: float, poll_s: float = 0.002, fill_lead_s: float | None = None) -> float:
    """How long the worker may still wait for more frames before it launches a step: 0 =
    launch now. It launches when the batch is full, or when the most urgent frame could
    no longer make its deadline if the step waited (the GPU's queue, then a full step,
    then delivery). Otherwise it waits in short slices, re-checking as frames arrive:
    a new frame never ends the wait by itself (only a full batch or the deadline do).

    With ``fill_lead_s``, a step that is not full also waits while the GPU is busy for
    longer than that (the host's launch time and a wake-up): launched earlier it would
    start on the GPU no sooner, only with fewer frames. A saturated GPU otherwise runs
    what came in during the last step, partial batches that cost more a frame."""
    if pending <= 0:
        return poll_s
    if pending >= max_batch:
        return 0.0
    if fill_lead_s is not None and gpu_free_at - now > fill_lead_s:
        return min(gpu_free_at - now - fill_lead_s, poll_s)
    # One wait slice early: the loop wakes up to a slice late, and a frame launched
    # after its last safe moment would only be dropped as too late.
    launch_by = earliest_deadline - margin_s - full_step_s - max(0.0, gpu_free_at - now) - 2 * poll_s
    return 0.0 if now >= launch_by else min(launch_by - now, poll_s)


# batch_cap beyond the GPU's share: sizes whose estimated cost per frame is within this
# fraction of the cheapest count as equally cheap (the estimates move more than that),
# and the largest of them is taken.
OVERLOAD_TIE = 0.05


def batch_cap(demand_fps: float, sizes: list[int], step_s: Callable[[int], float], utilization: float) -> int:
    """The batch size the worker fills before it launches: the smallest of ``sizes`` whose
    steps keep up with ``demand_fps`` (the frame rates of all open sessions) using at most
    ``utilization`` of the GPU. A smaller batch is a shorter step, and every frame waits
    for about two steps (the one on the GPU, then its own), so the smallest batch that
    keeps up is also the shortest latency. When none keeps up (more demand than the GPU
    has), the size that makes the most frames per second; sizes within ``OVERLOAD_TIE``
    of it count as equal and the largest is taken. Near saturation the costs per frame of
    adjacent sizes differ by less than their estimates move (an H100 at 24-26 sessions:
    the 12-frame estimate 18.5-21.5 ms, the 16-frame one 23.6-25.7 ms, at one moment
    1.539 ms a frame at 12 against 1.543 at 16, by the device's own timing 1.53 and
    1.51), and the cap also sets the processing budget of the speech placed meanwhile:
    a flip to the smaller size placed one session of 26 with 11 ms less budget than the
    other 25, and it lost twice their frames (docs/BENCHMARKS.md)."""
    if not sizes:
        raise ValueError("batch_cap needs at least one batch size")
    for size in sorted(sizes):
        if demand_fps * step_s(size) / size <= utilization:
            return size
    cheapest = min(step_s(size) / size for size in sizes)
    return max(size for size in sizes if step_s(size) / size <= cheapest * (1 + OVERLOAD_TIE))
