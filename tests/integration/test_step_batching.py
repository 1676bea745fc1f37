"""Step-level continuous batching (workers/runtime/step_batching.py): a RunningSet on one worker in this
process, with the real tiny SD (Euler), the demo model (DPM-Solver++ multistep, v-prediction) and
tiny-flux (flow matching). Pixels are compared with request mode (WorkerWrapperBase.generate) of the
same request alone: a different batch, so within the cross-batch tolerance; a replay of the same
running set is the same computation, so bit for bit."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from helpers import assert_pixels_close
from lora_adapters import make_lora

from workers.config import OmniDiffusionConfig
from workers.data import LoraWeight, OmniDiffusionRequest, PartialImageOutput, StepProgress, with_defaults
from workers.runtime.step_batching import CANCELLED, RunningSet, request_refusal, step_mode_refusal
from workers.worker import WorkerWrapperBase

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def worker_of(model_cache):
    """The loaded worker of a model and settings, loaded once per module."""
    workers: dict[str, WorkerWrapperBase] = {}

    def load(model: str, **settings) -> WorkerWrapperBase:
        key = f"{model}{sorted(settings.items())}"
        if key not in workers:
            workers[key] = WorkerWrapperBase(0, OmniDiffusionConfig(model=model, **settings))
            workers[key].initialize()
        return workers[key]

    yield load
    for worker in workers.values():
        worker.shutdown()


def filled(worker, steps: int, seed: int, **fields) -> OmniDiffusionRequest:
    request = OmniDiffusionRequest("a red fox", height=64, width=64, num_inference_steps=steps, seed=seed, **fields)
    return with_defaults(request, worker.od_config, worker.describe())


def alone(worker, request: OmniDiffusionRequest):
    """The request in request mode, by itself."""
    (output,) = worker.generate([dataclasses.replace(request)])
    assert output.error is None, output.error
    return output


def run_to_the_end(running: RunningSet, sink=None) -> tuple[dict, list[str]]:
    """Iterate until idle (a bounded loop); returns the outputs by id and the ids in the order they left."""
    outputs, order = {}, []
    for _ in range(1000):
        if running.idle:
            return outputs, order
        for output in running.iterate(sink):
            outputs[output.request_id] = output
            order.append(output.request_id)
    raise AssertionError("the running set never drained")


def assert_same_pixels_as_alone(worker, requests, outputs) -> None:
    for request in requests:
        output = outputs[request.request_id]
        assert output.error is None, output.error
        expected = alone(worker, request)
        assert len(output.images) == request.num_images
        for made, wanted in zip(output.images, expected.images, strict=True):
            assert_pixels_close(made, wanted)


@pytest.mark.parametrize("model", ["tiny", "demo", "tiny-flux"])
def test_mixed_step_counts_share_a_running_set_and_match_request_mode_within_tolerance(worker_of, model):
    worker = worker_of(model)
    # Three step counts, two images in one request; with the demo model's DPM-Solver++ (order 2) each
    # request must keep its own history of model outputs.
    requests = [filled(worker, 7, 1), filled(worker, 3, 2, num_images=2), filled(worker, 5, 3)]
    running = RunningSet(worker)
    running.add(requests)
    first = running.iterate()
    assert first == [] and running.size == 3 and running.admitted == 3
    outputs, order = run_to_the_end(running)
    assert order == [requests[1].request_id, requests[2].request_id, requests[0].request_id]
    assert_same_pixels_as_alone(worker, requests, outputs)


def test_short_request_joining_mid_flight_finishes_first_with_its_alone_pixels(worker_of):
    worker = worker_of("tiny")
    long, short = filled(worker, 12, 11), filled(worker, 3, 12, negative_prompt="blurry")
    long = dataclasses.replace(long, negative_prompt="dark")  # the same step key as the short one
    running = RunningSet(worker)
    running.add([long])
    for _ in range(4):
        assert running.iterate() == []
    running.add([short])
    assert running.iterate() == [] and running.size == 2 and running.admitted == 1
    outputs, order = run_to_the_end(running)
    assert order == [short.request_id, long.request_id]
    assert_same_pixels_as_alone(worker, [long, short], outputs)


def test_replaying_a_running_set_gives_the_same_pixels_bit_for_bit(worker_of):
    worker = worker_of("demo")
    made = []
    for _ in range(2):
        requests = [filled(worker, 6, 21), filled(worker, 2, 22, num_images=2)]
        running = RunningSet(worker)
        running.add(requests[:1])
        running.iterate()
        running.add(requests[1:])
        outputs, _ = run_to_the_end(running)
        made.append([image for request in requests for image in outputs[request.request_id].images])
    for first, again in zip(*made, strict=True):
        assert (first == again).all()


def test_cancelled_request_leaves_the_running_set_at_the_next_iteration(worker_of):
    worker = worker_of("tiny")
    doomed, kept, queued = filled(worker, 20, 31), filled(worker, 4, 32), filled(worker, 4, 33)
    running = RunningSet(worker)
    running.add([doomed, kept])
    running.iterate()
    assert running.size == 2
    running.add([queued])
    worker.cancel([doomed.request_id, queued.request_id])  # one running, one not yet admitted
    left = {output.request_id: output for output in running.iterate()}
    assert running.size == 1 and running.admitted == 0
    assert {left[doomed.request_id].error, left[queued.request_id].error} == {CANCELLED}
    assert left[doomed.request_id].images == []
    outputs, _ = run_to_the_end(running)
    assert_same_pixels_as_alone(worker, [kept], outputs)


def test_an_incompatible_request_waits_for_the_running_set_to_drain_and_blocks_later_ones(worker_of):
    worker = worker_of("tiny")
    first = filled(worker, 3, 41)
    other_size = dataclasses.replace(filled(worker, 2, 42), height=32, width=32)
    compatible_but_later = filled(worker, 2, 43)
    running = RunningSet(worker)
    running.add([first, other_size, compatible_but_later])
    sizes = []
    outputs, order = {}, []
    while not running.idle:
        for output in running.iterate():
            outputs[output.request_id] = output
            order.append(output.request_id)
        sizes.append(running.size)
    # Arrival order holds: the later compatible request never overtakes the waiting 32x32 one.
    assert order == [first.request_id, other_size.request_id, compatible_but_later.request_id]
    assert max(sizes) == 1
    assert outputs[other_size.request_id].images[0].shape == (32, 32, 3)
    assert_same_pixels_as_alone(worker, [first, other_size, compatible_but_later], outputs)


def test_max_batch_size_caps_the_images_in_the_running_set(worker_of):
    worker = worker_of("tiny", max_batch_size=3)
    requests = [filled(worker, 2, 51, num_images=2), filled(worker, 2, 52, num_images=2), filled(worker, 2, 53)]
    running = RunningSet(worker)
    running.add(requests)
    left = running.iterate()
    assert running.size == 1 and len(running.waiting) == 2  # 2 + 2 images would be over 3
    left += running.iterate()  # the first leaves after its second step; the next two fit then
    assert running.size == 0 and [output.request_id for output in left] == [requests[0].request_id]
    left += running.iterate()
    assert running.size == 2 and running.admitted == 2
    outputs, _ = run_to_the_end(running)
    assert_same_pixels_as_alone(worker, requests, {**outputs, left[0].request_id: left[0]})


def test_each_request_is_named_finishing_while_it_has_its_last_two_steps(worker_of):
    worker = worker_of("tiny", max_batch_size=4)
    short, long = filled(worker, 2, 71), filled(worker, 4, 72, num_images=2)
    running = RunningSet(worker)
    running.add([short, long])
    finishing, left = [], []
    for _ in range(10):  # bounded: 4 iterations
        if running.idle:
            break
        left.append([output.request_id for output in running.iterate()])
        finishing.append(running.finishing)
    # The engine sends the next requests for their room while their last steps run.
    assert finishing == [(short.request_id,), (long.request_id,), (long.request_id,), ()]
    assert left == [[], [short.request_id], [], [long.request_id]]


def test_a_short_request_at_a_full_running_set_goes_first_while_a_long_one_pauses(worker_of):
    worker = worker_of("tiny", max_batch_size=2)
    longs = [filled(worker, 10, 61), filled(worker, 10, 62)]
    short = filled(worker, 2, 63)
    running = RunningSet(worker)
    running.add(longs)
    running.iterate()
    running.add([short])  # deadline 1 + 2 = 3, before the longs' 0 + 10
    in_calls = []
    outputs, order = {}, []
    for _ in range(100):  # bounded: 22 steps in all
        if running.idle:
            break
        for output in running.iterate():
            outputs[output.request_id] = output
            order.append(output.request_id)
        in_calls.append(sorted(r.request.request_id for r in running.batch))
    assert order[0] == short.request_id and running.idle
    # The cap held: one long paused for the short one's two steps, then both longs ran again.
    assert in_calls[0] == sorted([short.request_id, longs[0].request_id])
    assert sorted(in_calls[2]) == sorted(r.request_id for r in longs)
    # Pausing keeps a request's latents and scheduler: every request has its alone pixels.
    assert_same_pixels_as_alone(worker, [*longs, short], outputs)


def test_requests_past_their_deadline_take_half_a_call_while_requests_on_time_wait(worker_of):
    worker = worker_of("tiny", max_batch_size=2)
    # Deadlines: arrival + steps + FINISHING_STEPS (2), the iterations a request sent ahead may wait for room.
    late = [filled(worker, 5, 81), filled(worker, 5, 82)]  # due at iteration 7
    running = RunningSet(worker)
    running.add(late)
    running.iterate()
    running.add([filled(worker, 3, 83), filled(worker, 3, 84)])  # due at 6: they go first, the two pause
    for _ in range(3 + 3):
        running.iterate()  # theirs, then the two again: one step left each, and at iteration 7 they are late
    on_time = [filled(worker, 2, 85), filled(worker, 2, 86)]  # due at 11
    running.add(on_time)
    (left,) = running.iterate()
    # One late request (half of 2 images) had its last step beside one on time; the other late one waits.
    assert left.request_id == late[0].request_id
    assert [r.request.request_id for r in running.batch] == [on_time[0].request_id]
    outputs, _ = run_to_the_end(running)
    assert_same_pixels_as_alone(worker, [*late, *on_time], {**outputs, left.request_id: left})


def test_requests_sent_for_a_groups_room_join_and_leave_together_as_that_group_did(worker_of):
    # The engine sends a request for the room of each one named finishing (engine.running_sets.RunningSetRoom), so
    # it waits up to FINISHING_STEPS iterations for that room. A group that joined together keeps leaving together
    # (one decode, and its replacements one text-encoder call): none of it is late for that wait and paused while
    # the rest of it runs.
    worker = worker_of("tiny", max_batch_size=8)
    seeds = itertools.count(300)
    running = RunningSet(worker)
    running.add([filled(worker, 4, next(seeds))])  # alone at first, as when the load begins
    running.iterate()
    running.add([filled(worker, 4, next(seeds)) for _ in range(7)])
    replaced, left = set(), []
    for _ in range(40):  # bounded: three generations of 8 requests of 4 steps, about 14 iterations
        if running.idle:
            break
        left.append([output.request_id for output in running.iterate()])
        finishing = [request_id for request_id in running.finishing if request_id not in replaced]
        replaced.update(finishing)
        if len(replaced) <= 16:  # two generations of replacements
            running.add([filled(worker, 4, next(seeds)) for _ in finishing])
    assert [len(ids) for ids in left if ids] == [1, 7, 1, 7, 1, 7]


def test_requests_with_different_lora_adapter_sets_never_share_a_denoiser_call(worker_of, model_cache, tmp_path):
    worker = worker_of("tiny", max_batch_size=4)  # its own worker: the adapters stay loaded on it
    for name, seed in (("sharp", 1), ("pastel", 2)):
        assert "error" not in worker.load_lora_adapter(name, str(make_lora(tmp_path / name, model_cache, seed)))
    sharp = filled(worker, 3, 71, loras=(LoraWeight("sharp", 1.0),))
    # A set that holds sharp is still another set.
    both = filled(worker, 3, 72, loras=(LoraWeight("sharp", 1.0), LoraWeight("pastel", 1.0)))
    sharp_too = filled(worker, 2, 73, loras=(LoraWeight("sharp", 1.0),))
    running = RunningSet(worker)
    running.add([sharp, sharp_too, both])
    outputs, order, iterations = {}, [], 0
    while not running.idle and iterations < 100:  # bounded: 8 steps in all
        for output in running.iterate():
            outputs[output.request_id] = output
            order.append(output.request_id)
        iterations += 1
        assert len({r.request.loras for r in running.batch}) <= 1
    # The two sharp requests shared their calls; sharp + pastel waited until they had left: 3 + 3 iterations.
    assert order == [sharp_too.request_id, sharp.request_id, both.request_id] and iterations == 6
    assert_same_pixels_as_alone(worker, [sharp, sharp_too, both], outputs)


def test_partial_images_and_progress_are_each_requests_own(worker_of):
    worker = worker_of("tiny")
    with_partials = filled(worker, 6, 61, partial_images=2, progress=True)
    plain = filled(worker, 3, 62, progress=True)
    sent = []
    running = RunningSet(worker)
    running.add([with_partials, plain])
    outputs, _ = run_to_the_end(running, sent.append)
    progress = [(p.request_id, p.step, p.total_steps) for p in sent if isinstance(p, StepProgress)]
    assert [p for p in progress if p[0] == plain.request_id] == [(plain.request_id, s, 3) for s in (1, 2, 3)]
    assert [p[1:] for p in progress if p[0] == with_partials.request_id] == [(s, 6) for s in range(1, 7)]
    partials = [p for p in sent if isinstance(p, PartialImageOutput)]
    assert [(p.request_id, p.index) for p in partials] == [(with_partials.request_id, 0), (with_partials.request_id, 1)]
    # Without a sink, request mode hands partial images back in the output: compare them so.
    expected = alone(worker, with_partials).partial_images
    assert [p.index for p in expected] == [0, 1]
    for made, wanted in zip(partials, expected, strict=True):
        assert_pixels_close(made.images[0], wanted.images[0])
    assert outputs[with_partials.request_id].partial_images == []  # they went to the sink


def test_unsupported_pipelines_and_edits_are_refused_with_the_reason(worker_of, model_cache):
    sd3 = worker_of("tiny-sd3")
    assert "StableDiffusion3Pipeline has no step loop" in step_mode_refusal(sd3)
    with pytest.raises(ValueError, match="step mode: StableDiffusion3Pipeline"):
        RunningSet(sd3)
    tiny = worker_of("tiny")
    assert step_mode_refusal(tiny) is None
    # Decided from the settings, before anything is compiled.
    compiled = WorkerWrapperBase(0, OmniDiffusionConfig(model="tiny", compile="regional", scheduling="step"))
    assert step_mode_refusal(compiled) == "--compile regional is warmed up for request mode's calls"
    edit = OmniDiffusionRequest("a red fox", images=tiny.generate([filled(tiny, 1, 0)])[0].images[:1])
    assert request_refusal(edit) == "img2img runs in request mode (its pipeline starts from an image)"
    with pytest.raises(ValueError, match="img2img"):
        RunningSet(tiny).add([edit])
