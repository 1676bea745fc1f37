"""engine.fair_queue.FairQueue: keys served in turn, arrival order within a key, steps filled across keys."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest

from engine import (
    AsyncDiffusionEngine,
    DiffusionOutput,
    EngineOverloadedError,
    OmniDiffusionConfig,
    OmniDiffusionRequest,
)
from engine.fair_queue import FairQueue
from engine.running_sets import RunningSetRoom


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


def test_a_key_served_until_it_had_nothing_left_waits_behind_the_old_keys_when_it_sends_again():
    queue = queue_of(Item("a", "a1"), Item("a", "a2"), Item("b", "b1"))
    assert queue.popleft().name == "a1"  # a goes behind b
    assert queue.popleft().name == "b1"  # b has nothing left, and keeps its place behind a
    queue.append(Item("b", "b2"))
    assert drain(queue) == ["a2", "b2"]


def test_a_key_that_sends_again_as_soon_as_it_is_served_cannot_starve_a_key_with_a_backlog():
    queue = queue_of(*(Item("backlog", f"w{i}") for i in range(4)), Item("refill", "r0"))
    taken = []
    for _ in range(8):
        item = queue.popleft()
        taken.append(item.name)
        if item.key == "refill":  # its next request arrives before the next step is taken
            queue.append(Item("refill", f"r{int(item.name[1:]) + 1}"))
    assert taken == ["w0", "r0", "w1", "r1", "w2", "r2", "w3", "r3"]


def test_a_flood_of_small_requests_that_fills_each_step_cannot_starve_a_request_that_cannot_join_it():
    queue = queue_of(*(Item("waits", name, images=8, size="128x128") for name in ("big1", "big2")))
    assert names(queue.take_batch(8, by_size)) == ["big1"]  # "waits" is an old key now
    steps = []
    for round_ in range(3):
        for i in range(8):  # the flood's clients send again as soon as their images come back
            queue.append(Item("flood", f"f{round_}.{i}"))
        steps.append(names(queue.take_batch(8, by_size)))
    # The flood fills one step, and empties; refilled, it waits behind "waits" for its next turn.
    assert steps[0] == [f"f0.{i}" for i in range(8)]
    assert steps[1] == ["big2"]
    assert steps[2] == [f"f1.{i}" for i in range(8)]


def test_a_key_cannot_jump_the_turns_by_dropping_its_queued_requests_and_sending_again():
    b2 = Item("b", "b2")
    queue = queue_of(Item("a", "a1"), Item("b", "b1"), b2, Item("a", "a2"))
    assert [queue.popleft().name for _ in range(2)] == ["a1", "b1"]
    queue.remove(b2)  # b's client left; b keeps its place behind a
    queue.append(Item("b", "b3"))
    assert drain(queue) == ["a2", "b3"]


def test_once_nothing_is_queued_every_key_starts_anew_in_arrival_order():
    queue = queue_of(Item("a", "a1"), Item("b", "b1"))
    assert drain(queue) == ["a1", "b1"]
    queue.append(Item("b", "b2"))
    queue.append(Item("a", "a2"))
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


# -- the batcher over it (engine.batcher.AsyncDiffusionEngine), with a fake engine -------------------


class FakeEngine:
    """What AsyncDiffusionEngine uses of a DiffusionEngine. Each request's step() returns once the test
    releases it; ``sent`` lists the requests in the order they were sent to the workers, whose one running
    set is the engine's own RunningSetRoom."""

    def __init__(self, scheduling: str, ready: bool = True, **settings):
        self.od_config = OmniDiffusionConfig(model="tiny", **settings)
        self.scheduling = scheduling
        self.ready = ready
        self.fatal_error = None
        self.progress_listeners = []
        self.finishing_listeners = []
        self.running_sets = RunningSetRoom(self.od_config.max_batch_size, 1)
        self.sent: list[str] = []
        self._released: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def prepare(self, request, admitted=False):
        return request

    def is_ready(self) -> bool:
        return self.ready

    def check_health(self) -> None:
        pass

    def cancel(self, request_ids) -> None:
        pass

    def runs_at_once(self, request) -> bool:
        return self.running_sets.choose([request], [0])[1]

    def place(self, requests) -> None:
        self.running_sets.place(requests, [0])

    def release(self, prompt: str) -> None:
        self._event(prompt).set()

    def _event(self, prompt: str):
        with self._lock:
            return self._released.setdefault(prompt, threading.Event())

    def step(self, requests):
        for request in requests:
            self.sent.append(request.prompt)
        for request in requests:
            assert self._event(request.prompt).wait(30), f"{request.prompt} was never released"
        self.running_sets.answered(request.request_id for request in requests)
        return [DiffusionOutput(request.request_id, [], 0) for request in requests]


def fox(prompt: str, n: int = 1, steps: int = 4):
    return OmniDiffusionRequest(prompt, num_images=n, num_inference_steps=steps)


async def until(condition, what: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def test_a_key_past_its_share_is_refused_while_other_keys_get_in():
    # Not ready: nothing leaves the queue. A queue of 8 images, 2 a key.
    engine = FakeEngine("request", ready=False, max_queue_size=8)

    async def scenario():
        front = AsyncDiffusionEngine(engine)
        front.start()
        tasks = [asyncio.ensure_future(front.generate(fox("a2", 2), "a"))]
        await until(lambda: front.queue_room("a").remaining == 0, "a's two images to queue")
        with pytest.raises(EngineOverloadedError, match="at most 2 waiting"):
            await front.generate(fox("a1"), "a")
        tasks.append(asyncio.ensure_future(front.generate(fox("b1"), "b")))
        # A key with nothing waiting may queue one request larger than its share.
        tasks.append(asyncio.ensure_future(front.generate(fox("c5", 5), "c")))
        await until(lambda: front.queue_room("c").remaining == 0, "c's request to queue")
        assert front.queue_room("b").remaining == 1
        assert front.queue_room("a").limit == 2 and front.queue_room("a").reset_s >= 0
        with pytest.raises(EngineOverloadedError, match="8 images are already waiting"):
            await front.generate(fox("d1"), "d")  # 2 + 1 + 5 fill the whole queue
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await front.close()

    asyncio.run(scenario())


def test_step_mode_sends_a_request_only_when_the_running_set_has_room_so_the_fair_queue_decides():
    engine = FakeEngine("step", max_batch_size=8)

    async def scenario():
        front = AsyncDiffusionEngine(engine)
        front.start()
        floods = [asyncio.ensure_future(front.generate(fox(f"f{i}", 8), "flood")) for i in range(3)]
        await until(lambda: engine.sent == ["f0"], "the first flood request to be sent")
        single = asyncio.ensure_future(front.generate(fox("s", 1), "single"))
        await until(lambda: front.queue_room("single").remaining == 63, "the single request to queue")
        assert engine.sent == ["f0"]  # the running set is full: the rest wait in the fair queue
        engine.release("f0")
        await until(lambda: engine.sent == ["f0", "s"], "the single request to go next")
        assert engine.sent == ["f0", "s"]  # f1 does not fit beside it
        engine.release("s")
        await single
        for name in ("f1", "f2"):
            await until(lambda name=name: name in engine.sent, f"{name} to be sent")
            engine.release(name)
        await asyncio.gather(*floods)
        assert engine.sent == ["f0", "s", "f1", "f2"]
        await front.close()

    asyncio.run(scenario())


def test_step_mode_lets_a_short_request_pass_a_long_one_waiting_for_room_until_the_long_one_is_due():
    engine = FakeEngine("step", max_batch_size=8)

    async def scenario():
        front = AsyncDiffusionEngine(engine)
        front.start()
        running = asyncio.ensure_future(front.generate(fox("long", 4, steps=40)))
        await until(lambda: engine.sent == ["long"], "the long one to be sent")
        waiting = asyncio.ensure_future(front.generate(fox("waiting", 8, steps=40)))  # due at 40: 4 + 8 images
        first = asyncio.ensure_future(front.generate(fox("short", 1)))  # due at 4: it runs before both
        await until(lambda: engine.sent == ["long", "short"], "the short request to pass")
        engine.release("short")
        await first
        for _ in range(37):  # the running set's iterations: a short request sent now is due at 41, after it
            engine.running_sets.iterated(0, ())
        later = asyncio.ensure_future(front.generate(fox("later", 1)))
        await until(lambda: front.queue_room("").remaining == front.queue_room("").limit - 9, "both to queue")
        assert engine.sent == ["long", "short"]  # it would fit beside the long one, but it is due after the waiting one
        engine.release("long")
        await until(lambda: engine.sent == ["long", "short", "waiting", "later"], "the waiting one, then the later")
        for name in ("waiting", "later"):
            engine.release(name)
        await asyncio.gather(running, waiting, later)
        await front.close()

    asyncio.run(scenario())
