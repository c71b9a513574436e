"""CPU streams: how a batch is cut into parts, and how the parts run."""

from __future__ import annotations

import threading

import pytest
import torch

from patchedserve.layout import CSPLayout
from patchedserve.patch.partition import PartCost, best_split, stream_parts
from patchedserve.streams import balanced_cuts, resolve_streams, run_parts, set_default_streams


@pytest.mark.parametrize(
    ("weights", "parts", "cuts"),
    [
        ([1, 1, 1, 1], 2, [(0, 2), (2, 4)]),
        ([4, 4, 1, 1, 2, 2], 2, [(0, 2), (2, 6)]),  # 8 | 6: the closest cut to 7
        ([1, 2, 2, 4, 4], 2, [(0, 3), (3, 5)]),  # 5 | 8 against 9 | 4
        ([16], 2, [(0, 1)]),  # never an empty part
        ([1, 1, 9], 3, [(0, 1), (1, 2), (2, 3)]),
        ([3, 3, 3], 1, [(0, 3)]),
    ],
)
def test_balanced_cuts_are_contiguous_and_even(
    weights: list[int], parts: int, cuts: list[tuple[int, int]]
) -> None:
    assert balanced_cuts(weights, parts) == cuts


def test_cuts_cover_every_item_once() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(1, 12, (1,), generator=g))
        weights = torch.randint(1, 17, (n,), generator=g).tolist()
        parts = int(torch.randint(1, 5, (1,), generator=g))
        cuts = balanced_cuts(weights, parts)
        assert len(cuts) == min(parts, n)
        assert cuts[0][0] == 0 and cuts[-1][1] == n
        assert all(a < b for a, b in cuts) and all(cuts[i][1] == cuts[i + 1][0] for i in range(len(cuts) - 1))


def test_parts_run_on_workers_with_a_share_of_the_threads_and_the_callers_mode() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []

        def probe(k: int) -> int:
            mode = torch.is_inference_mode_enabled()
            seen.append((threading.current_thread().name, torch.get_num_threads(), mode))
            return k * k

        with torch.inference_mode():
            assert run_parts(probe, [1, 2, 3]) == [1, 4, 9]
        assert sorted(t for _, t, _ in seen) == [1, 1, 1] and all(m for _, _, m in seen)
        assert all(name.startswith("stream") for name, _, _ in seen)
        assert torch.get_num_threads() == 2  # the caller keeps its own
        seen.clear()
        run_parts(probe, [5])  # one part: in the caller, on all of its threads
        assert seen == [(threading.current_thread().name, 2, False)]
    finally:
        torch.set_num_threads(before)


def test_stream_count_by_device_default_and_request() -> None:
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert resolve_streams(None, torch.device("cpu")) == 2
        assert resolve_streams(None, torch.device("cuda")) == 1
        assert resolve_streams(3, torch.device("cpu")) == 3
        set_default_streams(1)
        assert resolve_streams(None, torch.device("cpu")) == 1
        torch.set_num_threads(1)
        set_default_streams(None)
        assert resolve_streams(None, torch.device("cpu")) == 1
        with pytest.raises(ValueError, match="at least 1"):
            resolve_streams(0, torch.device("cpu"))
    finally:
        set_default_streams(None)
        torch.set_num_threads(before)


def test_engine_threads_keep_the_creators_thread_count_after_stream_workers_exist() -> None:
    from patchedserve.engine import Engine
    from patchedserve.request import GenerationRequest

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        run_parts(lambda k: k, [1, 2])  # workers on one thread each: the process-wide last setting
        engine = Engine.from_model("tiny-sdxl", patch_size=64, streams=1)
        seen = []

        class Probe:
            def on_step(self, *args: object) -> None:
                seen.append(torch.get_num_threads())

            def on_result(self, *args: object) -> None:
                seen.append(torch.get_num_threads())

        engine.observers.append(Probe())
        engine.start()
        try:
            engine.submit(GenerationRequest("a cat", width=64, height=64, steps=2, seed=0)).result(timeout=60)
        finally:
            engine.stop()
        assert seen and set(seen) == {2}  # the loop's steps and the decode worker's result
    finally:
        torch.set_num_threads(before)


def test_a_step_splits_where_its_slower_part_is_cheapest() -> None:
    cost = PartCost()

    def slower(groups: tuple[tuple[int, int], ...], taken: tuple[int, ...]) -> float:
        rest = tuple(n - k for (n, _), k in zip(groups, taken, strict=True))
        return max(cost(groups, taken), cost(groups, rest))

    # One resolution: equal halves, each run by the model's own forward.
    assert best_split(((4, 1),)) == (2,)
    assert best_split(((2, 4),)) == (1,)
    # Two 256x256 and two 512x256 entries: a part of each size beats the contiguous cut of equal
    # patch counts (256, 256, 512x256 | 512x256), which pays the patched path's fixed cost.
    small = ((2, 1), (2, 2))
    assert best_split(small) in {(2, 0), (0, 2)}  # the same two parts either way round
    assert slower(small, best_split(small)) < slower(small, (2, 1))
    # One 512x256 and three 512x512 entries: whole groups would leave three 512x512 on one
    # thread; one part takes a 512x512 beside the 512x256.
    large = ((1, 2), (3, 4))
    assert sorted([best_split(large), (1 - best_split(large)[0], 3 - best_split(large)[1])]) == [
        (0, 2),
        (1, 1),
    ]
    assert slower(large, best_split(large)) < slower(large, (1, 0))


def test_stream_parts_cover_every_entry_once_in_layout_order() -> None:
    sizes = [(32, 32)] * 3 + [(32, 64)] * 2 + [(64, 64)] * 2  # latent sizes; patch side 32
    layout = CSPLayout.build(sizes, 32)
    for streams in (1, 2, 3):
        parts = stream_parts(layout, streams)
        assert len(parts) == streams
        assert sorted(i for p in parts for i in p) == list(range(layout.num_entries))
        assert all(p == sorted(p) and p for p in parts)
    assert stream_parts(CSPLayout.build([(32, 32)], 32), 2) == [[0]]
