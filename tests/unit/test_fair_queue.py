"""engine.fair_queue.FairQueue: keys served in turn, arrival order within a key, steps filled across keys."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from engine.fair_queue import FairQueue


@dataclass(eq=False)
class Item:
    key: str
    name: str
    images: int = 1
    size: str = "64x64"


def queue_of(*items: Item) -> FairQueue[Item]:
    queue: FairQueue[Item] = FairQueue()
    for item in items:
        queue.append(item)
    return queue


def names(items) -> list[str]:
    return [item.name for item in items]


def drain(queue: FairQueue[Item]) -> list[str]:
    return [queue.popleft().name for _ in range(len(queue))]


def by_size(item: Item) -> str:
    return item.size


def test_keys_take_turns_and_each_key_keeps_its_arrival_order():
    queue = queue_of(
        Item("a", "a1"), Item("a", "a2"), Item("a", "a3"), Item("b", "b1"), Item("b", "b2"), Item("c", "c1")
    )
    assert drain(queue) == ["a1", "b1", "c1", "a2", "b2", "a3"]
    assert len(queue) == 0 and not queue


def test_a_key_that_had_nothing_queued_goes_before_keys_already_served():
    queue = queue_of(Item("flood", "f1"), Item("flood", "f2"), Item("flood", "f3"))
    assert queue.popleft().name == "f1"
    queue.append(Item("single", "s1"))
    # flood was served and still waits: the newcomer's turn comes first.
    assert drain(queue) == ["s1", "f2", "f3"]


def test_new_keys_are_served_in_the_order_they_came():
    queue = queue_of(Item("a", "a1"), Item("b", "b1"), Item("c", "c1"))
    assert drain(queue) == ["a1", "b1", "c1"]


def test_a_key_whose_last_request_left_joins_again_as_new():
    queue = queue_of(Item("a", "a1"), Item("a", "a2"), Item("b", "b1"))
    assert queue.popleft().name == "a1"  # a goes behind b
    assert queue.popleft().name == "b1"  # b has nothing left
    queue.append(Item("b", "b2"))
    assert drain(queue) == ["b2", "a2"]


def test_a_batch_starts_with_the_next_key_and_fills_across_keys_in_turn():
    queue = queue_of(
        Item("a", "a1"), Item("a", "a2"), Item("a", "a3"), Item("b", "b1"), Item("b", "b2"), Item("c", "c1")
    )
    batch = queue.take_batch(4, by_size)
    # One of each key in turn, then round two: a2 fills the fourth place.
    assert names(batch) == ["a1", "b1", "c1", "a2"]
    assert drain(queue) == ["a3", "b2"]


def test_a_batch_takes_only_compatible_requests_and_keeps_each_keys_order_among_them():
    queue = queue_of(
        Item("a", "a1"), Item("a", "a-big", size="128x128"), Item("a", "a2"), Item("b", "b-big", size="128x128"),
        Item("b", "b1"),
    )
    assert names(queue.take_batch(8, by_size)) == ["a1", "b1", "a2"]
    assert names(queue.take_batch(8, by_size)) == ["a-big", "b-big"]
    assert len(queue) == 0


def test_a_batch_never_holds_more_images_than_its_capacity():
    queue = queue_of(Item("a", "a1", images=1), Item("b", "b8", images=8), Item("c", "c4", images=4))
    batch = queue.take_batch(8, by_size)
    assert names(batch) == ["a1", "c4"]  # b8 does not fit beside a1
    assert sum(item.images for item in batch) <= 8
    assert names(queue.take_batch(8, by_size)) == ["b8"]


def test_a_flooding_key_cannot_keep_a_single_request_out_of_the_next_batch():
    queue: FairQueue[Item] = FairQueue()
    for i in range(8):
        queue.append(Item("flood", f"f{i}", images=8))
    assert names(queue.take_batch(8, by_size)) == ["f0"]
    queue.append(Item("single", "s1"))
    assert names(queue.take_batch(8, by_size)) == ["s1"]
    assert names(queue.take_batch(8, by_size)) == ["f1"]


def test_images_are_counted_per_key_and_in_all():
    queue = queue_of(Item("a", "a1", images=3), Item("a", "a2", images=2), Item("b", "b1", images=4))
    assert (queue.images(), queue.images("a"), queue.images("b"), queue.images("nobody")) == (9, 5, 4, 0)
    queue.popleft()
    assert (queue.images(), queue.images("a")) == (6, 2)


def test_remove_takes_a_request_out_and_its_key_out_of_turn_when_it_was_the_last():
    a1, b1, b2 = Item("a", "a1"), Item("b", "b1"), Item("b", "b2")
    queue = queue_of(a1, b1, b2)
    queue.remove(a1)
    assert a1 not in queue and b1 in queue
    assert queue.keys() == ["b"] and queue.images("a") == 0
    queue.remove(b2)
    assert drain(queue) == ["b1"]
    with pytest.raises(ValueError):
        queue.remove(b2)


def test_oldest_is_a_keys_first_arrival_and_iteration_sees_every_request():
    a1, a2, b1 = Item("a", "a1"), Item("a", "a2"), Item("b", "b1")
    queue = queue_of(a1, a2, b1)
    assert queue.oldest("a") is a1 and queue.oldest("b") is b1
    assert sorted(names(queue)) == ["a1", "a2", "b1"]


def test_popleft_on_an_empty_queue_raises_index_error():
    with pytest.raises(IndexError):
        FairQueue().popleft()


def test_peek_names_the_request_popleft_takes_without_taking_it():
    queue = queue_of(Item("a", "a1"), Item("a", "a2"), Item("b", "b1"))
    assert queue.popleft().name == "a1"
    assert queue.peek().name == "b1" and len(queue) == 2
    assert queue.popleft().name == "b1"
