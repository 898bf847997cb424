"""The replica's batcher: interactive first, bounds by texts and tokens, no idle wait, callers that leave."""

from __future__ import annotations

import asyncio
import functools

import pytest

from deployments.batcher import BatchFormed, PriorityBatcher


class Model:
    """A model whose forward pass waits until the test lets it finish; records each batch."""

    def __init__(self) -> None:
        self.batches: list[list[list[str]]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.fail: Exception | None = None

    async def run(self, requests: list[list[str]]) -> list[str]:
        self.batches.append([list(r) for r in requests])
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        return ["+".join(r) for r in requests]


def in_a_loop(test):
    """Run an async test in its own event loop (as the rest of the unit tests do, with asyncio.run)."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        return asyncio.run(test(*args, **kwargs))

    return run


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
def model() -> Model:
    return Model()


@in_a_loop
async def test_an_idle_batcher_starts_the_first_request_at_once_and_batches_what_queued_meanwhile(model):
    batcher = PriorityBatcher(model.run, max_texts=64, max_tokens=10_000)
    model.release.clear()
    first = asyncio.ensure_future(batcher.submit(["a"], 3))
    await settle()
    assert model.batches == [[["a"]]]  # running alone: it did not wait for company
    rest = [asyncio.ensure_future(batcher.submit([t], 3)) for t in "bcd"]
    await settle()
    model.release.set()
    assert await first == "a"
    assert await asyncio.gather(*rest) == ["b", "c", "d"]
    assert model.batches == [[["a"]], [["b"], ["c"], ["d"]]]


@in_a_loop
async def test_interactive_requests_go_before_queued_background_ones(model):
    batcher = PriorityBatcher(model.run, max_texts=64, max_tokens=10_000, background_max_texts=64)
    model.release.clear()
    busy = asyncio.ensure_future(batcher.submit(["busy"], 1, "background"))
    await settle()
    jobs = [asyncio.ensure_future(batcher.submit([f"job{i}"], 1, "background")) for i in range(3)]
    await settle()
    person = asyncio.ensure_future(batcher.submit(["person"], 1, "interactive"))
    await settle()
    model.release.set()
    await asyncio.gather(busy, person, *jobs)
    # The person came last and went first, in a batch of their own; then the jobs, together.
    assert model.batches == [[["busy"]], [["person"]], [["job0"], ["job1"], ["job2"]]]


@in_a_loop
async def test_background_batches_are_short_and_interactive_ones_are_not(model):
    batcher = PriorityBatcher(model.run, max_texts=8, max_tokens=10_000, background_max_texts=2)
    model.release.clear()
    blocker = asyncio.ensure_future(batcher.submit(["x"], 1))
    await settle()
    jobs = [asyncio.ensure_future(batcher.submit([f"j{i}"], 1, "background")) for i in range(4)]
    people = [asyncio.ensure_future(batcher.submit([f"p{i}"], 1)) for i in range(4)]
    await settle()
    model.release.set()
    await asyncio.gather(blocker, *jobs, *people)
    assert [sum(len(r) for r in b) for b in model.batches] == [1, 4, 2, 2]
    assert model.batches[1] == [["p0"], ["p1"], ["p2"], ["p3"]]


@in_a_loop
async def test_a_batch_holds_at_most_max_tokens_and_an_entry_bigger_than_that_runs_alone(model):
    batcher = PriorityBatcher(model.run, max_texts=64, max_tokens=100)
    model.release.clear()
    blocker = asyncio.ensure_future(batcher.submit(["x"], 1))
    await settle()
    sizes = {"a": 60, "b": 30, "c": 20, "huge": 500, "d": 5}
    waiting = [asyncio.ensure_future(batcher.submit([name], tokens)) for name, tokens in sizes.items()]
    await settle()
    model.release.set()
    await asyncio.gather(blocker, *waiting)
    # In order, never skipping ahead: a+b (90) then c (20 would pass 100), huge alone, then d.
    assert model.batches[1:] == [[["a"], ["b"]], [["c"]], [["huge"]], [["d"]]]


@in_a_loop
async def test_a_batch_holds_at_most_max_texts(model):
    batcher = PriorityBatcher(model.run, max_texts=4, max_tokens=10_000)
    model.release.clear()
    blocker = asyncio.ensure_future(batcher.submit(["x"], 1))
    await settle()
    waiting = [asyncio.ensure_future(batcher.submit(list(texts), 1)) for texts in ("ab", "cd", "e", "fghijk")]
    await settle()
    model.release.set()
    await asyncio.gather(blocker, *waiting)
    assert model.batches[1:] == [[list("ab"), list("cd")], [["e"]], [list("fghijk")]]


@in_a_loop
async def test_a_caller_that_left_is_not_computed(model):
    batcher = PriorityBatcher(model.run, max_texts=64, max_tokens=10_000)
    model.release.clear()
    blocker = asyncio.ensure_future(batcher.submit(["x"], 1))
    await settle()
    gone = asyncio.ensure_future(batcher.submit(["gone"], 1))
    stays = asyncio.ensure_future(batcher.submit(["stays"], 1))
    await settle()
    gone.cancel()
    await settle()
    model.release.set()
    assert await stays == "stays"
    await blocker
    assert model.batches == [[["x"]], [["stays"]]]


@in_a_loop
async def test_a_failed_batch_fails_each_of_its_requests_and_the_next_batch_still_runs(model):
    batcher = PriorityBatcher(model.run, max_texts=64, max_tokens=10_000)
    model.release.clear()
    model.fail = RuntimeError("forward pass failed")
    first = asyncio.ensure_future(batcher.submit(["a"], 1))
    await settle()
    second = asyncio.ensure_future(batcher.submit(["b"], 1))
    await settle()
    model.release.set()
    with pytest.raises(RuntimeError, match="forward pass failed"):
        await first
    with pytest.raises(RuntimeError, match="forward pass failed"):
        await second
    model.fail = None
    assert await batcher.submit(["c"], 1) == "c"


@in_a_loop
async def test_new_bounds_apply_to_the_next_batch(model):
    batcher = PriorityBatcher(model.run, max_texts=64, max_tokens=10_000)
    batcher.configure(max_texts=1, max_tokens=10_000, background_max_texts=1, wait_s=0)
    model.release.clear()
    blocker = asyncio.ensure_future(batcher.submit(["x"], 1))
    await settle()
    waiting = [asyncio.ensure_future(batcher.submit([t], 1)) for t in "ab"]
    await settle()
    model.release.set()
    await asyncio.gather(blocker, *waiting)
    assert model.batches == [[["x"]], [["a"]], [["b"]]]
    with pytest.raises(ValueError, match="at least 1"):
        batcher.configure(max_texts=0, max_tokens=1, background_max_texts=1, wait_s=0)


@in_a_loop
async def test_with_a_wait_a_batch_collects_what_arrives_during_it(model):
    batcher = PriorityBatcher(model.run, max_texts=64, max_tokens=10_000, wait_s=0.05)
    first = asyncio.ensure_future(batcher.submit(["a"], 1))
    await settle()
    second = asyncio.ensure_future(batcher.submit(["b"], 1))
    assert await asyncio.gather(first, second) == ["a", "b"]
    assert model.batches == [[["a"], ["b"]]]


@in_a_loop
async def test_each_batch_is_reported_with_its_lane_size_tokens_and_waits(model):
    seen: list[BatchFormed] = []
    batcher = PriorityBatcher(model.run, max_texts=64, max_tokens=10_000, on_batch=seen.append)
    await asyncio.gather(batcher.submit(["a", "b"], 7, "background"))
    assert [(b.lane, b.requests, b.items, b.tokens, len(b.waits_s)) for b in seen] == [("background", 1, 2, 7, 1)]
    assert seen[0].waits_s[0] >= 0


@in_a_loop
async def test_an_unknown_lane_is_refused(model):
    batcher = PriorityBatcher(model.run)
    with pytest.raises(ValueError, match="lane"):
        await batcher.submit(["a"], 1, "urgent")  # type: ignore[arg-type]


@in_a_loop
async def test_a_background_share_gives_jobs_that_share_of_the_batches_while_both_lanes_wait(model):
    batcher = PriorityBatcher(model.run, max_texts=1, max_tokens=10_000, background_max_texts=1)
    batcher.configure(max_texts=1, max_tokens=10_000, background_max_texts=1, wait_s=0, background_share=0.5)
    model.release.clear()
    blocker = asyncio.ensure_future(batcher.submit(["x"], 1))
    await settle()
    jobs = [asyncio.ensure_future(batcher.submit([f"j{i}"], 1, "background")) for i in range(3)]
    people = [asyncio.ensure_future(batcher.submit([f"p{i}"], 1)) for i in range(3)]
    await settle()
    model.release.set()
    await asyncio.gather(blocker, *jobs, *people)
    # Alternating while both wait (people first), then what is left.
    assert [b[0][0] for b in model.batches[1:]] == ["p0", "j0", "p1", "j1", "p2", "j2"]
    with pytest.raises(ValueError, match="share"):
        batcher.configure(max_texts=1, max_tokens=1, background_max_texts=1, wait_s=0, background_share=1.5)


@in_a_loop
async def test_time_with_a_share_of_0_builds_no_debt_for_later(model):
    batcher = PriorityBatcher(model.run, max_texts=1, max_tokens=10_000, background_max_texts=1)
    model.release.clear()
    blocker = asyncio.ensure_future(batcher.submit(["x"], 1))
    await settle()
    waiting = [asyncio.ensure_future(batcher.submit([f"j{i}"], 1, "background")) for i in range(4)]
    waiting += [asyncio.ensure_future(batcher.submit([f"p{i}"], 1)) for i in range(4)]
    await settle()
    model.release.set()
    await asyncio.gather(blocker, *waiting)  # share 0: four contested batches, all people
    batcher.configure(max_texts=1, max_tokens=10_000, background_max_texts=1, wait_s=0, background_share=0.5)
    model.batches.clear()
    model.release.clear()
    blocker = asyncio.ensure_future(batcher.submit(["x"], 1))
    await settle()
    waiting = [asyncio.ensure_future(batcher.submit([f"j{i}"], 1, "background")) for i in range(2)]
    waiting += [asyncio.ensure_future(batcher.submit([f"p{i}"], 1)) for i in range(2)]
    await settle()
    model.release.set()
    await asyncio.gather(blocker, *waiting)
    assert [b[0][0] for b in model.batches[1:]] == ["p0", "j0", "p1", "j1"]  # alternating, not jobs first


@in_a_loop
async def test_idle_means_nothing_queued_and_nothing_running_and_a_closed_batcher_starts_again(model):
    batcher = PriorityBatcher(model.run, max_texts=64, max_tokens=10_000)
    assert batcher.idle()
    model.release.clear()
    running = asyncio.ensure_future(batcher.submit(["a"], 1))
    await settle()
    assert not batcher.idle()  # a batch at the model
    queued = asyncio.ensure_future(batcher.submit(["b"], 1, "background"))
    await settle()
    model.release.set()
    assert await running == "a"
    assert await queued == "b"
    await settle()
    assert batcher.idle()
    batcher.close()  # the pool stops the batcher of a model it dropped
    await settle()
    assert await batcher.submit(["c"], 1) == "c"  # and one used again gets a worker again
