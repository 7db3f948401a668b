"""TimingWheel: every key handed out once, never early, at most a tick late; moves and cancels."""

from __future__ import annotations

import math
import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mailingestd.sched.wheel import TimingWheel

TICK = 0.1


def test_far_future_key_cascades_down_and_fires_on_time() -> None:
    wheel = TimingWheel(TICK, now=0.0, slots=8)
    wheel.schedule(1, 3 * 3600.0)
    wheel.schedule(2, 0.35)
    assert wheel.next_due() == 0.35
    assert wheel.advance(0.3).tolist() == []
    assert wheel.advance(0.4).tolist() == [2]
    assert wheel.next_due() == 3 * 3600.0
    assert wheel.advance(3 * 3600.0 - 0.2).tolist() == []
    assert 1 in wheel
    assert wheel.advance(3 * 3600.0).tolist() == [1]
    assert len(wheel) == 0 and wheel.next_due() is None


def test_reschedule_moves_and_cancel_removes() -> None:
    wheel = TimingWheel(TICK, now=0.0, slots=16)
    wheel.schedule(0, 1.0)
    wheel.schedule(0, 5.0)
    assert len(wheel) == 1 and wheel.due_at(0) == 5.0
    assert wheel.advance(2.0).tolist() == []
    assert wheel.cancel(0) is True and wheel.cancel(0) is False
    assert wheel.advance(10.0).tolist() == []


def test_overdue_key_is_handed_out_by_the_next_advance() -> None:
    wheel = TimingWheel(TICK, now=100.0)
    wheel.advance(100.0).tolist()
    wheel.schedule(5, 99.0)
    wheel.schedule(6, 100.0)
    assert sorted(wheel.advance(100.0).tolist()) == [5, 6]


def test_advance_orders_by_tick() -> None:
    wheel = TimingWheel(TICK, now=0.0, slots=4)
    for index, due_at in enumerate([2.05, 0.55, 1.25, 0.15, 3.95]):
        wheel.schedule(index, due_at)
    assert wheel.advance(10.0).tolist() == [3, 1, 2, 0, 4]


operation = st.one_of(
    st.tuples(st.just("schedule"), st.integers(0, 30), st.floats(0, 2000, allow_nan=False)),
    st.tuples(st.just("cancel"), st.integers(0, 30), st.just(0.0)),
    st.tuples(st.just("advance"), st.just(0), st.floats(0, 300, allow_nan=False)),
)


@settings(max_examples=300, deadline=None)
@given(slots=st.sampled_from([2, 3, 8, 64]), operations=st.lists(operation, max_size=80))
def test_matches_a_dictionary_model(slots: int, operations: list[tuple[str, int, float]]) -> None:
    """Against a plain dict: each key out once, never before due, at most one tick after, none lost."""
    now = 0.0
    wheel = TimingWheel(TICK, now, slots)
    model: dict[int, float] = {}
    for kind, key, value in operations:
        if kind == "schedule":
            wheel.schedule(key, value)
            model[key] = value
        elif kind == "cancel":
            assert wheel.cancel(key) == (model.pop(key, None) is not None)
        else:
            now += value
            handed_out = wheel.advance(now).tolist()
            assert len(handed_out) == len(set(handed_out))
            for out in handed_out:
                assert model[out] <= now + 1e-9
                del model[out]
            # Whatever is left is not yet due at tick granularity.
            for due_at in model.values():
                assert math.ceil(due_at / TICK) > math.floor(now / TICK)
        assert len(wheel) == len(model)
        assert all(wheel.due_at(key) == due_at for key, due_at in model.items())
        assert wheel.next_due() == (min(model.values()) if model else None)
    handed_out = wheel.advance(now + 2000.0).tolist()
    assert sorted(handed_out) == sorted(model)


def test_batches_and_single_keys_against_a_dictionary_model() -> None:
    """Random schedules (single and batched), moves, cancels and advances of every size on small
    blocks: each key handed out once, in tick order after the overdue ones, never early, none lost,
    and the count of stale entries never below zero (a move that re-files every key must not
    leave the key's old entry counted as live)."""
    for seed in range(150):
        rng = random.Random(seed)
        slots = rng.choice([2, 3, 8, 64])
        now = rng.choice([0.0, 7.3, 100.0])
        wheel = TimingWheel(TICK, now, slots, capacity=rng.choice([1, 64]))
        keys = rng.choice([5, 30, 200])
        wheel.reserve(keys)
        model: dict[int, float] = {}
        for _ in range(rng.randrange(200)):
            draw = rng.random()
            if draw < 0.3:
                key, due_at = rng.randrange(keys), now + rng.uniform(-5, 300) * rng.choice([0.01, 1, 10])
                wheel.schedule(key, due_at)
                model[key] = due_at
            elif draw < 0.5:
                batch = rng.sample(range(keys), rng.randrange(min(keys, 50)))
                due_ats = [now + rng.uniform(-2, 400) * rng.choice([0.01, 1, 10]) for _ in batch]
                wheel.schedule_many(np.array(batch, dtype=np.int64), np.array(due_ats))
                model.update(zip(batch, due_ats))
            elif draw < 0.6:
                key = rng.randrange(keys)
                assert wheel.cancel(key) == (model.pop(key, None) is not None)
            else:
                cursor = math.floor(now / TICK) + 1
                now += rng.choice([0.0, 0.05, 0.1, 0.3, 1, 7, 50, 500])
                handed_out = wheel.advance(now).tolist()
                assert len(handed_out) == len(set(handed_out)), seed
                ticks = []
                for key in handed_out:
                    assert model[key] <= now + 1e-9, seed
                    ticks.append(math.ceil(model.pop(key) / TICK))
                on_time = [tick for tick in ticks if tick >= cursor]
                assert on_time == sorted(on_time) and ticks[len(ticks) - len(on_time):] == on_time, seed
                assert all(math.ceil(due_at / TICK) > math.floor(now / TICK) for due_at in model.values())
            assert len(wheel) == len(model), seed
            assert wheel.next_due() == (min(model.values()) if model else None), seed
            assert wheel._stale >= 0, seed
        assert sorted(wheel.advance(now + 10**6).tolist()) == sorted(model), seed


def test_next_due_on_a_dense_wheel() -> None:
    """Many keys per tick (next_due looks tick by tick): still the earliest live due time."""
    rng = random.Random(5)
    wheel = TimingWheel(TICK, 0.0, slots=128, capacity=50_000)
    due_ats = [rng.random() * 100 for _ in range(50_000)]  # over 6,000 a block
    wheel.schedule_many(np.arange(50_000), np.array(due_ats))
    model = dict(enumerate(due_ats))
    now = 0.0
    for _ in range(200):
        now += 0.1
        for key in wheel.advance(now).tolist():
            del model[key]
        for _ in range(20):
            key = rng.randrange(50_000)
            if rng.random() < 0.5:
                model[key] = now + rng.random() * 20
                wheel.schedule(key, model[key])
            else:
                assert wheel.cancel(key) == (model.pop(key, None) is not None)
        assert wheel.next_due() == min(model.values())
