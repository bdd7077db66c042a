"""The continuous-batching scheduler, without a model: admission order, slot choice, the prefill
budget, the queue limit, and slots freed by finished or cancelled sequences."""

from dataclasses import dataclass

import pytest

from blitzgen.server.scheduler import MIN_PREFIX_REUSE, QueueFull, Scheduler, common_prefix


@dataclass(eq=False)
class Seq:
    prompt: list[int]
    name: str = ""


def seqs(*lengths, start=0):
    return [Seq(list(range(start + 100 * i, start + 100 * i + n)), f"s{i}") for i, n in enumerate(lengths)]


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([], [1]) == 0
    assert common_prefix([1, 2], [1, 2, 3]) == 2


def test_admits_first_come_first_served_into_the_lowest_free_slots():
    s = Scheduler(num_slots=3, max_queue=10, max_prefill_tokens=1000)
    a, b, c, d = seqs(5, 6, 7, 8)
    s.submit([a])
    s.submit([b, c])
    s.submit([d])
    plan = s.plan()
    assert plan.prefill == [(0, a), (1, b), (2, c)]
    assert plan.decode == [(0, a), (1, b), (2, c)] and plan.rows == 3
    assert plan.num_tokens == {0: 6, 1: 7, 2: 8}  # prompt + the decode step
    assert plan.prefill_tokens == 18
    assert s.num_waiting == 1 and s.waiting_requests == 1

    # Nothing frees: d waits, the three decode.
    plan = s.plan()
    assert plan.prefill == [] and [seq for _, seq in plan.decode] == [a, b, c]
    assert plan.num_tokens == {0: 1, 1: 1, 2: 1}

    s.finish(b)  # a finished sequence frees its slot for the next plan
    plan = s.plan()
    assert plan.prefill == [(1, d)]
    assert plan.decode == [(0, a), (1, d), (2, c)]
    assert s.num_waiting == 0 and s.waiting_requests == 0

    s.finish(c)  # the step runs up to the highest busy slot
    assert s.plan().rows == 2
    s.finish(a)
    assert s.plan().rows == 2
    s.finish(d)
    assert s.plan().rows == 0


def test_prefill_budget_spreads_long_prompts_over_steps_but_always_admits_one():
    s = Scheduler(num_slots=4, max_queue=10, max_prefill_tokens=10)
    a, b, c = seqs(30, 6, 5)
    s.submit([a])
    s.submit([b])
    s.submit([c])
    assert s.plan().prefill == [(0, a)]  # over budget alone: admitted anyway
    assert s.plan().prefill == [(1, b)]  # 6 + 5 > 10: c waits for the next step
    assert s.plan().prefill == [(2, c)]


def test_a_free_slot_holding_a_long_prefix_is_chosen_over_the_lowest():
    s = Scheduler(num_slots=3, max_queue=10, max_prefill_tokens=1000)
    system = [7] * MIN_PREFIX_REUSE
    first = [Seq([5, 5, 5]), Seq([9]), Seq(system + [1])]
    s.submit(first)
    s.plan()
    for seq in first:
        s.finish(seq)
    again = Seq(system + [2, 3])
    s.submit([again])
    plan = s.plan()
    assert plan.prefill == [(2, again)]
    assert plan.num_tokens[2] == 2 + 1  # the shared system prompt is not prefilled again
    # A short shared prefix is not worth a higher slot: the lowest free one is taken.
    other = Seq([9, 9, 9])
    s.submit([other])
    assert s.plan().prefill == [(0, other)]
    # A prompt the cache holds entirely still runs its last token.
    s.finish(again)
    same = Seq(system + [2, 3])
    s.submit([same])
    plan = s.plan()
    assert plan.prefill == [(2, same)] and plan.num_tokens[2] == 1 + 1
    s.forget_cached()
    s.finish(same)
    s.submit([Seq(system + [2, 3])])
    plan = s.plan()
    assert plan.prefill[0][0] == 1 and plan.num_tokens[1] == MIN_PREFIX_REUSE + 2 + 1  # nothing reused


def test_queue_limit_counts_waiting_requests():
    s = Scheduler(num_slots=1, max_queue=2, max_prefill_tokens=1000)
    a, b, c, d = seqs(3, 3, 3, 3)
    s.submit([a])
    s.submit([b, c])  # one request of two sequences
    assert s.waiting_requests == 2 and s.num_waiting == 3
    with pytest.raises(QueueFull):
        s.submit([d])
    s.plan()  # a takes the slot: one request waits
    s.submit([d])
    with pytest.raises(QueueFull):
        s.submit([Seq([1])])
    assert s.waiting_requests == 2


def test_no_queue_still_admits_a_request_that_can_start_now():
    s = Scheduler(num_slots=2, max_queue=0, max_prefill_tokens=1000)
    a, b, c = seqs(3, 3, 3)
    s.submit([a])
    with pytest.raises(QueueFull):  # a has not started yet: b would have to wait behind it
        s.submit([b])
    s.plan()
    s.submit([b])
    s.plan()
    with pytest.raises(QueueFull):  # no free slot
        s.submit([c])


def test_cancelling_frees_the_slot_or_leaves_the_queue():
    s = Scheduler(num_slots=1, max_queue=10, max_prefill_tokens=1000)
    a, b, c = seqs(3, 3, 3)
    s.submit([a])
    s.submit([b])
    s.submit([c])
    s.plan()
    s.finish(b)  # cancelled while waiting
    assert s.waiting_requests == 1
    s.finish(a)
    s.finish(a)  # twice is harmless
    plan = s.plan()
    assert plan.prefill == [(0, c)] and plan.decode == [(0, c)]
    s.finish(c)
    assert not s.has_work() and s.plan().decode == []
