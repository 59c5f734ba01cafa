"""Streaming overlaps reading with compute (esd/loading/stream.py) against the stand-in Hub:
a layer asked for in model order is one range read, the read-ahead starts when the plan is
known and runs ahead of the caller by its window, and never further (a chunk larger than
the window is read ahead alone)."""
from __future__ import annotations

from concurrent.futures import wait

import pytest
import torch
from safetensors.torch import load_file

from esd.loading.stream import RemoteFile, StreamedSafetensors
from hub_server import hub  # noqa: F401  (fixture)
from tiny_models import save_model

LAYERS = 4
MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setenv("ESD_HUB_BACKOFF_S", "0.01")
    monkeypatch.setenv("ESD_HUB_RETRIES", "4")
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def llama(hub, tmp_path):
    """A bf16 Llama of 4 layers (a layer's matrices: about 72 kB) served by the Hub."""
    source = save_model("llama", tmp_path / "llama", dtype=torch.bfloat16,
                        config={"num_hidden_layers": LAYERS})
    return source, hub.add_repo("org/llama", source)


def model_order() -> list[str]:
    """The matrices as the layer planner asks for them: per layer q, k, v, o, gate, up, down
    (the file stores them by name: down, gate, up, …, k, o, q, v)."""
    return [f"model.layers.{i}.{m}.weight" for i in range(LAYERS) for m in MATRICES]


def streamed(hub, sha, **options) -> StreamedSafetensors:
    return StreamedSafetensors([RemoteFile("org/llama", sha, "model.safetensors",
                                           endpoint=hub.endpoint)], **options)


def ranges_read(hub) -> list[tuple[int, int]]:
    """[first, last + 1) of every range the CDN answered after the header's."""
    spans = []
    for request in hub.requests("cdn")[1:]:
        first, last = request.headers["range"].split("=")[1].split("-")
        spans.append((int(first), int(last) + 1))
    return spans


def settle(source: StreamedSafetensors) -> None:
    """Wait until every read started so far has ended (each starts the next when it may)."""
    while True:
        futures = list(source._pending.values())
        if all(f.done() for f in futures):
            return
        wait(futures)


def test_a_layer_asked_in_model_order_is_one_read_and_no_byte_is_read_twice(hub, llama):
    source, sha = llama
    stream = streamed(hub, sha, chunk_bytes=100_000)
    keys = model_order()
    stream.plan(keys)
    try:
        got = {k: stream.tensor(k) for k in keys}
    finally:
        stream.close()
    want = load_file(source / "model.safetensors")
    assert all(torch.equal(got[k], want[k].float()) for k in keys)
    spans = sorted(ranges_read(hub))
    assert len(spans) <= LAYERS < len(keys)
    assert all(end <= begin for (_, end), (begin, _) in zip(spans, spans[1:]))  # disjoint
    assert max(end - begin for begin, end in spans) <= 100_000


def test_reading_starts_at_the_plan_and_runs_ahead_by_the_window(hub, llama):
    _, sha = llama
    stream = streamed(hub, sha, chunk_bytes=100_000, window_bytes=160_000)
    keys = model_order()
    try:
        stream.plan(keys)
        settle(stream)                      # no tensor asked for yet
        ahead = ranges_read(hub)
        assert len(ahead) == 2              # two layers (~72 kB each) fit in 160 kB, not three
        assert sum(end - begin for begin, end in ahead) <= 160_000
        for key in keys[:len(MATRICES) - 1]:
            stream.tensor(key)              # the first layer, but for its last matrix
        settle(stream)
        assert len(ranges_read(hub)) == 2   # the chunk is not used up: no room yet
        stream.tensor(keys[len(MATRICES) - 1])
        settle(stream)
        assert len(ranges_read(hub)) == 3   # used up: its room went to the next layer
    finally:
        stream.close()


def test_the_bytes_read_ahead_never_exceed_the_window(hub, llama):
    _, sha = llama
    window = 160_000
    stream = streamed(hub, sha, chunk_bytes=100_000, window_bytes=window)
    keys = model_order()
    used_up, asked = 0, set()
    try:
        stream.plan(keys)
        for key in keys:
            stream.tensor(key)
            asked.add(key)
            settle(stream)
            used_up = sum(c.size for c in stream._chunks if set(c.keys) <= asked)
            requested = sum(end - begin for begin, end in ranges_read(hub))
            assert requested - used_up <= window, key
        assert stream.peak_ahead_bytes <= window
    finally:
        stream.close()
    assert used_up == sum(end - begin for begin, end in ranges_read(hub))


def test_a_chunk_larger_than_the_window_is_read_ahead_alone(hub, llama):
    source, sha = llama
    window = 50_000                         # a layer (~72 kB) is one chunk larger than this
    stream = streamed(hub, sha, chunk_bytes=100_000, window_bytes=window)
    keys = model_order()
    want = load_file(source / "model.safetensors")
    try:
        stream.plan(keys)
        settle(stream)
        assert len(ranges_read(hub)) == 1   # the first layer, alone: nothing else is ahead
        for key in keys[:len(MATRICES)]:
            assert torch.equal(stream.tensor(key), want[key].float())
        settle(stream)
        assert len(ranges_read(hub)) == 2   # used up: the next layer, alone again
        assert all(torch.equal(stream.tensor(k), want[k].float()) for k in keys[len(MATRICES):])
        assert stream.peak_ahead_bytes <= max(end - begin for begin, end in ranges_read(hub))
    finally:
        stream.close()
    assert len(ranges_read(hub)) == LAYERS
