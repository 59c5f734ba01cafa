"""Streaming safetensors by HTTP ranges (esd/loading/stream.py) against the stand-in Hub:
bit-exact tensors, one resolve per file, every range answer checked, faults retried."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from esd.failures import ESDFailure
from esd.loading.stream import RemoteFile, StreamedSafetensors, StreamStats
from hub_server import hub  # noqa: F401  (fixture)
from tiny_models import save_model


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setenv("ESD_HUB_BACKOFF_S", "0.01")
    monkeypatch.setenv("ESD_HUB_RETRIES", "4")
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def remote(hub, repo_id, sha, filename, stats=None, token=None):
    return RemoteFile(repo_id, sha, filename, endpoint=hub.endpoint, stats=stats, token=token)


def read_all(source: StreamedSafetensors, order=None) -> dict:
    keys = list(order or source.keys())
    source.plan(keys)
    try:
        return {k: source.tensor(k) for k in keys}
    finally:
        source.close()


@pytest.fixture
def llama_repo(hub, tmp_path):
    source = save_model("llama", tmp_path / "llama", dtype=torch.bfloat16)
    sha = hub.add_repo("org/llama", source)
    return source, sha


def test_streamed_tensors_equal_the_file_bit_for_bit_with_one_resolve(hub, llama_repo):
    source, sha = llama_repo
    stats = StreamStats()
    got = read_all(StreamedSafetensors([remote(hub, "org/llama", sha, "model.safetensors", stats)],
                                       chunk_bytes=40_000))
    want = load_file(source / "model.safetensors")
    assert set(got) == set(want)
    for key in want:
        assert got[key].dtype == torch.float32
        assert torch.equal(got[key], want[key].to(torch.float32)), key
    assert stats.resolves == 1
    assert [m for m, _, _ in hub.resolve_calls("org/llama")] == ["HEAD"]
    assert hub.resolved_revisions("org/llama") == {sha}
    ranged = hub.requests("cdn")
    assert all(r.status == 206 for r in ranged) and 1 < len(ranged) < len(want)


def test_adjacent_tensors_merge_into_chunks_no_larger_than_the_bound(hub, llama_repo):
    source, sha = llama_repo
    got = read_all(StreamedSafetensors([remote(hub, "org/llama", sha, "model.safetensors")],
                                       chunk_bytes=40_000, readers=2))
    assert got
    sizes = []
    for r in hub.requests("cdn")[1:]:           # after the header read
        first, last = r.headers["range"].split("=")[1].split("-")
        sizes.append(int(last) - int(first) + 1)
    biggest_tensor = max(t.numel() * 2 for t in load_file(source / "model.safetensors").values())
    assert max(sizes) <= max(40_000, biggest_tensor)
    assert len(sizes) < len(got)


def test_sharded_checkpoint_is_one_resolve_per_shard(hub, tmp_path):
    source = save_model("llama", tmp_path / "sharded", max_shard_size="60KB")
    shards = sorted(p.name for p in source.glob("*.safetensors"))
    assert len(shards) > 1
    sha = hub.add_repo("org/sharded", source)
    stats = StreamStats()
    files = [remote(hub, "org/sharded", sha, name, stats) for name in shards]
    got = read_all(StreamedSafetensors(files))
    want = {}
    for name in shards:
        want.update(load_file(source / name))
    assert all(torch.equal(got[k], want[k]) for k in want) and set(got) == set(want)
    assert stats.resolves == len(shards)


def test_a_server_ignoring_range_is_a_wrong_answer_not_data(hub, llama_repo):
    _, sha = llama_repo
    hub.faults.ignore_range = True
    with pytest.raises(ESDFailure) as info:
        StreamedSafetensors([remote(hub, "org/llama", sha, "model.safetensors")])
    assert info.value.reason == "bad_range_response" and "status 200" in info.value.message


def test_cut_connections_and_5xx_are_retried_and_the_bytes_are_exact(hub, llama_repo):
    source, sha = llama_repo
    hub.faults.cut_after, hub.faults.cut_count = 5000, 2
    hub.faults.cdn_server_error = 1
    got = read_all(StreamedSafetensors([remote(hub, "org/llama", sha, "model.safetensors")],
                                       chunk_bytes=100_000))
    want = load_file(source / "model.safetensors")
    assert all(torch.equal(got[k], want[k].float()) for k in want)
    statuses = [r.status for r in hub.requests("cdn")]
    assert statuses.count(-1) == 2 and 503 in statuses


def test_an_expired_signed_url_is_refreshed_with_a_new_head(hub, llama_repo):
    source, sha = llama_repo
    hub.faults.cdn_forbidden = 1
    stats = StreamStats()
    got = read_all(StreamedSafetensors([remote(hub, "org/llama", sha, "model.safetensors", stats)]))
    assert len(got) == len(load_file(source / "model.safetensors"))
    assert stats.resolves == 2
    assert [m for m, _, _ in hub.resolve_calls("org/llama")] == ["HEAD", "HEAD"]


def test_a_429_storm_is_rate_limited_and_retryable(hub, llama_repo):
    _, sha = llama_repo
    hub.faults.rate_limit, hub.faults.retry_after = 100, 0
    with pytest.raises(ESDFailure) as info:
        StreamedSafetensors([remote(hub, "org/llama", sha, "model.safetensors")])
    assert (info.value.reason, info.value.retryable) == ("rate_limited", True)
    assert len(hub.requests("hub")) == 4           # ESD_HUB_RETRIES


def test_the_token_goes_to_the_hub_and_never_to_the_cdn(hub, llama_repo):
    _, sha = llama_repo
    read_all(StreamedSafetensors([remote(hub, "org/llama", sha, "model.safetensors",
                                         token="hf_secret")]))
    assert all(r.token == "hf_secret" for r in hub.requests("hub"))
    assert hub.requests("cdn") and not any("authorization" in r.headers
                                           for r in hub.requests("cdn"))


def test_a_gated_repo_without_access_is_typed_gated(hub, llama_repo):
    source, _ = llama_repo
    sha = hub.add_repo("org/gated", source, gated=True, tokens=("hf_good",))
    with pytest.raises(ESDFailure) as info:
        StreamedSafetensors([remote(hub, "org/gated", sha, "model.safetensors", token="hf_bad")])
    assert info.value.reason == "gated"
    assert StreamedSafetensors([remote(hub, "org/gated", sha, "model.safetensors",
                                       token="hf_good")]).shapes
