"""The adaptive poll budget of a request queue (device.PollBudget)."""

from __future__ import annotations

from vhostfs.device import POLL_GROW_START_NS, POLL_PATIENCE, PollBudget

MAX = 500_000


def test_starts_at_the_limit_and_a_guest_that_pauses_longer_stops_the_polling():
    b = PollBudget(MAX)
    assert b.ns == MAX
    seen = []
    while b.ns:
        b.slept(2 * MAX)
        seen.append(b.ns)
    assert seen == sorted(seen, reverse=True) and len(seen) <= POLL_PATIENCE + 6
    assert seen[:POLL_PATIENCE - 1] == [MAX] * (POLL_PATIENCE - 1)
    b.slept(10 * MAX)
    assert b.ns == 0


def test_polls_that_find_requests_between_long_pauses_keep_the_budget():
    b = PollBudget(MAX)
    for _ in range(100):
        b.slept(2 * MAX)
        b.hit()
    assert b.ns == MAX and b.found == 100


def test_requests_that_come_soon_after_a_sleep_grow_it_back_to_the_limit():
    b = PollBudget(MAX)
    for _ in range(20):
        b.slept(2 * MAX)
    assert b.ns == 0
    b.slept(MAX // 10)
    assert b.ns == POLL_GROW_START_NS
    steps = 0
    while b.ns < MAX:
        b.slept(MAX // 10)
        steps += 1
    assert b.ns == MAX and steps <= 6
    b.slept(MAX - 1)
    assert b.ns == MAX


def test_a_zero_limit_never_polls():
    b = PollBudget(0)
    for idle in (0, 1, 10**9):
        b.slept(idle)
        assert b.ns == 0


def test_a_limit_below_the_start_is_the_budget():
    b = PollBudget(POLL_GROW_START_NS // 2)
    for _ in range(POLL_PATIENCE):
        b.slept(10**9)
    assert b.ns == 0
    b.slept(1)
    assert b.ns == POLL_GROW_START_NS // 2
