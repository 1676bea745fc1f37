"""FairQueue: the batcher's queue, which serves its keys in turn so that one client's flood does not starve the rest.

A key names who sent a request (a digest of the API key that matched, the client's address, or
the --fairness-header value; server/serving.py decides). Each key keeps its requests in arrival
order, and the keys take turns, as fq_codel's flows do:

- a key with no place in the turns joins the *new* keys, which are served before the old ones, in the
  order they came: a client that sends one request at a time is served at the next step;
- a key that was just served goes to the end of the *old* keys, even when it has nothing left
  queued: it keeps that place until its turn comes round, and dropped only then, with nothing
  queued. So a key whose queue empties at each step and fills again before the next (a flood of
  small requests) waits behind the old keys, as fq_codel moves a new flow that empties to the old
  list: were it new again each time, it would go first at every step and starve a key that waits;
- a key whose requests all leave before it was served (timed out, its client left) loses its place.

A step takes the next key's oldest request, then fills up across keys: round by round, each key in
turn gives its oldest request that can share the step and still fits (request mode; in step mode a
step is one request). Every key that gave a request goes to the end of the old keys.

Each key's queued images are counted, so the batcher can refuse a key past its share
(--max-queued-images-per-key) while the others still get in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Iterator
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    """What the queue holds: who sent it, and how many images it asks for."""

    @property
    def key(self) -> str: ...

    @property
    def images(self) -> int: ...


Q = TypeVar("Q", bound=Queued)


class FairQueue(Generic[Q]):
    """Queued requests by key, taken key by key in turn; arrival order within a key."""

    def __init__(self) -> None:
        self._by_key: dict[str, deque[Q]] = {}
        self._images: dict[str, int] = {}
        # The turn order: keys that joined since they were last served, then the ones served before
        # (some with nothing queued, keeping their place until their turn comes).
        self._new: deque[str] = deque()
        self._old: deque[str] = deque()
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[Q]:
        """Every queued request, key by key (not in the order they will be taken)."""
        for items in list(self._by_key.values()):
            yield from list(items)

    def __contains__(self, item: object) -> bool:
        items = self._by_key.get(getattr(item, "key", None))
        return items is not None and item in items

    def images(self, key: str | None = None) -> int:
        """Images queued, by everyone or by ``key``."""
        if key is None:
            return sum(self._images.values())
        return self._images.get(key, 0)

    def oldest(self, key: str) -> Q:
        """``key``'s oldest queued request; KeyError when it has none."""
        items = self._by_key.get(key)
        if not items:
            raise KeyError(key)
        return items[0]

    def keys(self) -> list[str]:
        """The keys with requests queued, in the order their turns come."""
        return [key for key in (*self._new, *self._old) if self._by_key[key]]

    def append(self, item: Q) -> None:
        if not self._length:  # nobody waits, so nobody can be starved: every key starts anew, in arrival order
            self._by_key.clear()
            self._images.clear()
            self._old.clear()
        items = self._by_key.get(item.key)
        if items is None:
            items = self._by_key[item.key] = deque()
            self._images[item.key] = 0
            self._new.append(item.key)
        items.append(item)  # a key still in the old turns waits there: it was served since they last were
        self._images[item.key] += item.images
        self._length += 1

    def remove(self, item: Q) -> None:
        """Take ``item`` out (it timed out, or its client left); ValueError when it is not queued."""
        self._by_key.get(item.key, deque()).remove(item)
        self._taken(item)
        if not self._by_key[item.key] and item.key in self._new:  # never served: nothing to wait behind
            self._new.remove(item.key)
            self._forget(item.key)

    def peek(self) -> Q:
        """The request popleft() would take; IndexError when nothing is queued."""
        return self._by_key[self._next_key()][0]

    def popleft(self) -> Q:
        """The oldest request of the key whose turn it is; IndexError when nothing is queued."""
        item = self.peek()
        self.take(item)
        return item

    def in_turn(self) -> Iterator[Q]:
        """Every queued request: the keys in the order their turns come, each key's in arrival order."""
        for key in self.keys():
            yield from list(self._by_key[key])

    def take(self, item: Q) -> None:
        """Take ``item`` out as served (out of its turn: a request that may pass the next one; see the batcher)."""
        self._by_key[item.key].remove(item)
        self._taken(item)
        self._served([item.key])

    def take_batch(self, capacity: int, batch_key: Callable[[Q], Hashable]) -> list[Q]:
        """The oldest request of the key whose turn it is, then requests with its ``batch_key`` from each
        key in turn (its oldest such request, round after round) while the batch holds at most
        ``capacity`` images. IndexError when nothing is queued."""
        first = self.popleft()
        batch, images, served = [first], first.images, [first.key]
        wanted = batch_key(first)
        taken = True
        while taken and images < capacity:
            taken = False
            for key in self.keys():
                items = self._by_key[key]
                fits = next((q for q in items if images + q.images <= capacity and batch_key(q) == wanted), None)
                if fits is not None:
                    items.remove(fits)
                    self._taken(fits)
                    batch.append(fits)
                    images += fits.images
                    served.append(key)
                    taken = True
        self._served(served)
        return batch

    def _next_key(self) -> str:
        """The key whose turn it is. Old keys whose turn came with nothing queued leave the turns here."""
        if self._new:
            return self._new[0]
        while self._old and not self._by_key[self._old[0]]:
            self._forget(self._old.popleft())
        if not self._old:
            raise IndexError("nothing is queued")
        return self._old[0]

    def _taken(self, item: Q) -> None:
        self._length -= 1
        self._images[item.key] -= item.images

    def _forget(self, key: str) -> None:
        del self._by_key[key], self._images[key]

    def _served(self, keys: list[str]) -> None:
        """Each of ``keys`` waits for its next turn behind every other key, queued requests or not."""
        for key in dict.fromkeys(keys):
            for turns in (self._new, self._old):
                if key in turns:
                    turns.remove(key)
            self._old.append(key)
