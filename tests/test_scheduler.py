"""The batching scheduler: pure bookkeeping, no GPU."""

import pytest

from daemon.scheduler import BatchScheduler


def test_earliest_deadline_first_across_sessions():
    s = BatchScheduler()
    s.add("a", 0, 0, deadline=3.0, job="a0")
    s.add("b", 0, 0, deadline=1.0, job="b0")
    s.add("a", 0, 1, deadline=2.0, job="a1")
    s.add("c", 0, 0, deadline=1.0, job="c0")
    assert len(s) == 4
    batch = s.next_batch(3)
    # Ties keep arrival order.
    assert [p.job for p in batch] == ["b0", "c0", "a1"]
    assert len(s) == 1
    assert [p.job for p in s.next_batch(8)] == ["a0"]
    assert s.next_batch(8) == [] and len(s) == 0


def test_cancel_session_utterance_and_played_frames():
    s = BatchScheduler()
    for f in range(5):
        s.add("a", 1, f, deadline=float(f), job=f"a1-{f}")
    s.add("a", 2, 0, deadline=0.5, job="a2-0")
    s.add("b", 1, 0, deadline=0.1, job="b1-0")
    assert s.cancel("a", utterance=1, before_frame=2) == 2
    assert s.pending_by_session() == {"a": 4, "b": 1}
    assert s.cancel("a", utterance=2) == 1
    assert [p.job for p in s.next_batch(10)] == ["b1-0", "a1-2", "a1-3", "a1-4"]
    s.add("a", 3, 0, deadline=0.0, job="x")
    assert s.cancel("a") == 1
    assert s.next_batch(10) == [] and len(s) == 0


def test_batch_is_capped_and_formed_fresh_each_step():
    s = BatchScheduler()
    for f in range(10):
        s.add("a", 0, f, deadline=f * 0.04, job=f)
    first = s.next_batch(4)
    assert [p.job for p in first] == [0, 1, 2, 3]
    # A more urgent frame of another session arriving between steps goes first.
    s.add("b", 0, 0, deadline=-1.0, job="urgent")
    assert [p.job for p in s.next_batch(2)] == ["urgent", 4]


def test_frames_that_cannot_make_their_tick_are_dropped():
    s = BatchScheduler()
    for f, deadline in enumerate((0.9, 1.0, 1.1, 1.2)):
        s.add("a", 0, f, deadline=deadline, job=f)
    # A step that would finish at t=1.05 cannot save frames due at 0.9 and 1.0.
    batch = s.next_batch(8, not_before=1.05)
    assert [p.job for p in batch] == [2, 3]
    assert s.dropped_late == 2 and len(s) == 0


def test_earliest_deadline_skips_cancelled():
    s = BatchScheduler()
    assert s.earliest_deadline() == float("inf")
    s.add("a", 0, 0, deadline=1.0, job=0)
    s.add("b", 0, 0, deadline=2.0, job=1)
    s.cancel("a")
    assert s.earliest_deadline() == 2.0


def test_batch_wait_fills_the_batch_while_the_most_urgent_frame_can_wait():
    from daemon.scheduler import batch_wait

    # 3 of 8 frames, due in 200 ms, a full step takes 50 ms: keep gathering (in slices).
    assert 0 < batch_wait(10.0, 3, 8, 10.2, 10.0, 0.05, 0.004) <= 0.002
    # A new frame does not end the wait; the full batch does.
    assert batch_wait(10.0, 7, 8, 10.2, 10.0, 0.05, 0.004) > 0
    assert batch_wait(10.0, 8, 8, 10.2, 10.0, 0.05, 0.004) == 0.0


def test_batch_wait_launches_a_frame_that_cannot_wait_alone():
    from daemon.scheduler import batch_wait

    # Due in 50 ms with a 50 ms full step: launch now, even as a batch of one.
    assert batch_wait(10.0, 1, 8, 10.055, 10.0, 0.05, 0.004) == 0.0
    # The GPU is busy for 150 ms more: a frame due in 200 ms cannot wait either.
    assert batch_wait(10.0, 1, 8, 10.2, 10.15, 0.05, 0.004) == 0.0
    # Nothing pending: just poll.
    assert batch_wait(10.0, 0, 8, float("inf"), 10.0, 0.05, 0.004) > 0


def test_batch_wait_fills_a_step_while_the_gpu_is_busy():
    from daemon.scheduler import batch_wait

    # A saturated GPU: the most urgent frame is already past its last safe moment, so
    # without a fill lead a partial batch goes now ...
    assert batch_wait(10.0, 5, 16, 10.05, 10.02, 0.024, 0.004) == 0.0
    # ... but the GPU is busy 20 ms more: launched now it would start no sooner, so a step
    # with a 9 ms lead waits (in slices) for more frames ...
    assert 0 < batch_wait(10.0, 5, 16, 10.05, 10.02, 0.024, 0.004, fill_lead_s=0.009) <= 0.002
    # ... until the GPU is free within the lead, or the batch is full.
    assert batch_wait(10.012, 5, 16, 10.05, 10.02, 0.024, 0.004, fill_lead_s=0.009) == 0.0
    assert batch_wait(10.0, 16, 16, 10.05, 10.02, 0.024, 0.004, fill_lead_s=0.009) == 0.0
    # An idle GPU: the deadline rule alone decides, as without the lead.
    assert batch_wait(10.0, 1, 8, 10.055, 10.0, 0.05, 0.004, fill_lead_s=0.009) == 0.0
    assert 0 < batch_wait(10.0, 3, 8, 10.2, 10.0, 0.05, 0.004, fill_lead_s=0.009) <= 0.002


def test_frames_due_within_the_tie_window_go_to_the_least_served_first():
    s = BatchScheduler()
    # Session a (served 10) is due a little sooner than b (served 2) and c (served 5):
    # within one step of each other, so the ranks decide.
    for f in range(3):
        s.add("a", 0, f, 1.000 + 0.001 * f, None, rank=10)
        s.add("b", 0, f, 1.010 + 0.001 * f, None, rank=2)
        s.add("c", 0, f, 1.020 + 0.001 * f, None, rank=5)
    s.add("d", 0, 0, 2.0, None, rank=0)  # far outside the window: rank does not pull it in
    batch = s.next_batch(4, tie_window_s=0.030)
    assert [(i.session_id, i.frame_no) for i in batch] == [("b", 0), ("b", 1), ("b", 2), ("c", 0)]
    assert len(s) == 6
    # Without a window it is plain earliest deadline first.
    assert [i.session_id for i in s.next_batch(3)] == ["a", "a", "a"]
    # A window holding fewer frames than a batch is filled by deadline, beyond it too.
    assert [(i.session_id, i.frame_no) for i in s.next_batch(4, tie_window_s=0.030)] == [
        ("c", 1), ("c", 2), ("d", 0)]
    assert len(s) == 0


def test_shift_moves_one_sessions_deadlines():
    s = BatchScheduler()
    s.add("a", 1, 0, 1.0, "a1")
    s.add("a", 2, 0, 1.1, "a2")
    s.add("b", 1, 0, 1.5, "b1")
    assert s.shift("a", 1, 1.0) == 1  # a's utterance 1 now due at 2.0
    assert [p.job for p in s.next_batch(3)] == ["a2", "b1", "a1"]
    for job, sid in (("x", "a"), ("y", "b")):
        s.add(sid, 1, 0, 1.0, job)
    assert s.shift("a", None, 0.5) == 1 and s.earliest_deadline() == 1.0


def test_the_tie_rank_can_be_read_at_batch_time():
    """Frames queued together carry the same rank; the rank function gives the one that
    holds when the batch is formed."""
    s = BatchScheduler()
    for f in range(3):
        for sid in ("a", "b"):
            s.add(sid, 0, f, 1.0 + 0.001 * f, None, rank=0)
    served = {"a": 5, "b": 1}
    batch = s.next_batch(2, tie_window_s=0.01, rank=lambda it: served[it.session_id])
    assert [(i.session_id, i.frame_no) for i in batch] == [("b", 0), ("b", 1)]


# Step times of an H200 (docs/BENCHMARKS.md), seconds per bucket.
H200_STEP_S = {4: 0.0135, 8: 0.0205, 12: 0.028, 16: 0.036, 24: 0.052, 32: 0.068}


def test_batch_cap_is_the_smallest_batch_that_keeps_up_with_the_demand():
    from daemon.scheduler import batch_cap

    sizes, step = sorted(H200_STEP_S), H200_STEP_S.__getitem__
    # One session (25 frames/s): steps of 4 keep up with room to spare.
    assert batch_cap(25, sizes, step, 0.8) == 4
    # 8 sessions: 200 x 3.4 ms a frame = 0.68 of the GPU at 4.
    assert batch_cap(200, sizes, step, 0.8) == 4
    assert batch_cap(200, sizes, step, 0.6) == 8  # a lower share: bigger, cheaper-per-frame steps
    # 12 sessions: 8 (2.6 ms a frame) uses 0.77; 13: 8 would use 0.83, 12 (2.3 ms) 0.76.
    assert batch_cap(300, sizes, step, 0.8) == 8
    assert batch_cap(325, sizes, step, 0.8) == 12
    assert batch_cap(350, sizes, step, 0.8) == 16  # 12 would use 0.82
    # More than the GPU makes at any size within the share: the most frames per second.
    assert batch_cap(600, sizes, step, 0.8) == 32
    with pytest.raises(ValueError):
        batch_cap(25, [], step, 0.8)


def test_batch_cap_beyond_the_share_takes_the_largest_of_the_near_cheapest():
    """Saturated (24-26 sessions on an H100, the seventeenth session's estimates): 12 and
    16 cost within a few per cent a frame, whichever the estimates' noise puts first; the
    cap, and with it the budget of speech placed meanwhile, stays at 16 either way."""
    from daemon.scheduler import OVERLOAD_TIE, batch_cap

    sizes = [1, 4, 8, 12, 16]
    for step12, step16 in ((0.01847, 0.02469), (0.01847, 0.02549), (0.0196, 0.02574), (0.02148, 0.02549)):
        steps = {1: 0.0114, 4: 0.0108, 8: 0.0137, 12: step12, 16: step16}
        assert batch_cap(650, sizes, steps.__getitem__, 0.9) == 16, (step12, step16)
        assert batch_cap(600, sizes, steps.__getitem__, 0.9) == 16, (step12, step16)
    # Beyond the tie the cheaper size is still taken: 16 at 1.65 ms a frame, 7 % dearer.
    steps = {1: 0.0114, 4: 0.0108, 8: 0.0137, 12: 0.01847, 16: 0.0264}
    assert 0.0264 / 16 > (0.01847 / 12) * (1 + OVERLOAD_TIE)
    assert batch_cap(650, sizes, steps.__getitem__, 0.9) == 12
