"""The hub path against a Hub that lies: a safetensors header whose tensors overlap, a
revision or commit that would name a path outside the cache, a CDN that ignores `Range`, a
429 on `/resolve`, an expired CDN link. Workers run as subprocesses with the real
huggingface_hub client against the stand-in Hub on 127.0.0.1; nothing the Hub answers may
make the tool read wrong bytes, write outside its output directory and the cache, read a
whole file for a range, or blame the wrong thing."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open

from esd.failures import ESDFailure, read_failures
from esd.loading.checkpoint import FileCheckpoint
from esd.loading.stream import RemoteFile, StreamedSafetensors
from hub_server import hub, overlapping_safetensors  # noqa: F401  (fixture)
from tiny_models import save_model

ROOT = Path(__file__).resolve().parents[1]
MODES = {"cache": [], "stream": ["--stream"], "budget": ["--disk_budget", "1"]}


@pytest.fixture(autouse=True)
def fast_backoff(monkeypatch):
    monkeypatch.setenv("ESD_HUB_BACKOFF_S", "0.01")
    monkeypatch.setenv("ESD_HUB_RETRIES", "3")
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_model("llama", tmp_path_factory.mktemp("models") / "llama")


def run_workers(hub, tmp_path: Path, model_id: str, modes=tuple(MODES)) -> dict[str, dict]:
    """esd_worker.py on `model_id` in each mode, at once; {mode: {reason, retryable, message}}
    of its failure record ({} when it succeeded)."""
    procs = {}
    for mode in modes:
        (tmp_path / mode).mkdir(parents=True, exist_ok=True)
        env = hub.subprocess_env(tmp_path / mode / "hf_home")
        env.update(PYTHONPATH=str(ROOT), ESD_HUB_BACKOFF_S="0.01", ESD_HUB_RETRIES="2",
                   ESD_HUB_TIMEOUT_S="5")
        procs[mode] = subprocess.Popen(
            [sys.executable, str(ROOT / "esd_worker.py"), f"--model_id={model_id}",
             "--output_dir", str(tmp_path / mode / "out"), "--device", "cpu", *MODES[mode]],
            env=env, cwd=tmp_path / mode, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
    results = {}
    for mode, proc in procs.items():
        output, _ = proc.communicate(timeout=300)
        records = read_failures(tmp_path / mode / "out")
        assert "Traceback" not in output, output
        results[mode] = {k: (r.reason, r.retryable, r.message) for k, r in records.items()}
    return results


def files_outside(tmp_path: Path) -> list[str]:
    """Files the runs left anywhere under tmp_path but in their HF_HOMEs and output dirs."""
    allowed = [tmp_path / mode / d for mode in MODES for d in ("hf_home", "out")]
    return sorted(str(p) for p in tmp_path.rglob("*") if p.is_file()
                  and not any(p.is_relative_to(a) for a in allowed))


# ---------------------------------------------------------------- a lying header

def test_a_header_whose_tensors_overlap_is_refused_on_disk_as_the_library_refuses_it(llama,
                                                                                      tmp_path):
    lying = tmp_path / "model.safetensors"
    lying.write_bytes(overlapping_safetensors((llama / "model.safetensors").read_bytes()))
    with pytest.raises(SafetensorError):
        safe_open(str(lying), "pt")
    with pytest.raises(ESDFailure) as info:
        FileCheckpoint((lying,))
    assert info.value.reason == "corrupt_file" and "overlaps" in info.value.message


def test_a_header_leaving_bytes_unused_is_refused_on_disk(llama, tmp_path):
    data = (llama / "model.safetensors").read_bytes()
    padded = tmp_path / "model.safetensors"
    padded.write_bytes(data + b"\0" * 64)             # 64 bytes no tensor owns
    with pytest.raises(SafetensorError):
        safe_open(str(padded), "pt")
    with pytest.raises(ESDFailure) as info:
        FileCheckpoint((padded,))
    assert info.value.reason == "corrupt_file"


def test_a_header_whose_tensors_overlap_is_refused_streamed(hub, llama):
    files = {"config.json": (llama / "config.json").read_bytes(),
             "model.safetensors": overlapping_safetensors(
                 (llama / "model.safetensors").read_bytes())}
    sha = hub.add_repo("org/lying", files)
    with pytest.raises(ESDFailure) as info:
        StreamedSafetensors([RemoteFile("org/lying", sha, "model.safetensors",
                                        endpoint=hub.endpoint)])
    assert info.value.reason == "corrupt_file" and "overlaps" in info.value.message


# ---------------------------------------------------------------- paths out of the cache

def test_a_revision_climbing_out_of_the_cache_is_refused_in_all_three_modes(hub, llama,
                                                                           tmp_path):
    evil = "../../../../escaped"
    hub.add_repo("org/m", llama)
    hub.add_repo("org/m", llama, revision=evil)          # the Hub would answer it
    results = run_workers(hub, tmp_path, f"org/m@{evil}")
    for mode, records in results.items():
        ((reason, retryable, message),) = records.values()
        assert (reason, retryable) == ("invalid_id", False), (mode, records)
        assert "revision" in message
    assert files_outside(tmp_path) == []
    assert not hub.requests("hub")                        # refused before any request


def test_a_commit_from_the_hub_that_is_not_40_hex_digits_is_refused_in_all_three_modes(
        hub, llama, tmp_path):
    hub.add_repo("org/m", llama)
    hub.faults.commit_sha = "../../../../escaped"
    results = run_workers(hub, tmp_path, "org/m")
    for mode, records in results.items():
        ((reason, retryable, message),) = records.values()
        assert (reason, retryable) == ("bad_hub_response", False), (mode, records)
        assert "40 hex digits" in message
    assert files_outside(tmp_path) == []
    assert not hub.requests("cdn")                        # no weights fetched


def test_install_into_the_cache_refuses_a_climbing_revision(llama, tmp_path, monkeypatch):
    from model_loader import install_into_hub_cache
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    with pytest.raises(ESDFailure) as info:
        install_into_hub_cache("org/m", llama, revision="../../../escaped")
    assert info.value.reason == "invalid_id"
    assert not any(tmp_path.rglob("escaped"))


# ---------------------------------------------------------------- a CDN ignoring Range

def test_a_200_to_a_range_request_is_refused_before_its_body_is_read(hub, tmp_path):
    big = torch.zeros(12 * 1024 * 1024)                  # 48 MiB of float32
    from safetensors.torch import save_file
    save_file({"w": big}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    sha = hub.add_repo("org/big", {"model.safetensors": data})
    hub.faults.ignore_range = True
    remote = RemoteFile("org/big", sha, "model.safetensors", endpoint=hub.endpoint)
    with pytest.raises(ESDFailure) as info:
        remote.read(0, 1000)
    assert info.value.reason == "bad_range_response" and "status 200" in info.value.message
    answers = [r for r in hub.requests("cdn") if r.status == 200]
    assert len(answers) == 3                              # ESD_HUB_RETRIES
    assert max(r.body_bytes_sent for r in answers) < len(data) // 2


# ---------------------------------------------------------------- the right cause

def test_a_429_on_resolve_while_downloading_is_rate_limited_not_a_network_error(hub, llama,
                                                                              tmp_path):
    hub.add_repo("org/m", llama)
    hub.faults.rate_limit, hub.faults.rate_limit_paths = 10_000, "/resolve/"
    results = run_workers(hub, tmp_path, "org/m", modes=("cache",))
    ((reason, retryable, message),) = results["cache"].values()
    assert (reason, retryable) == ("rate_limited", True)
    assert "429" in message and "HF_HUB_OFFLINE" not in message


def test_an_expired_cdn_link_while_downloading_is_fetched_again(hub, llama, tmp_path):
    hub.add_repo("org/m", llama)
    hub.faults.cdn_forbidden = 1
    results = run_workers(hub, tmp_path, "org/m", modes=("cache",))
    assert results["cache"] == {}
    assert (tmp_path / "cache" / "out" / "org--m.csv").exists()


def test_a_cdn_refusing_every_link_is_an_expired_url_not_the_token(hub, llama, tmp_path):
    hub.add_repo("org/m", llama)
    hub.faults.cdn_forbidden = 10_000
    results = run_workers(hub, tmp_path, "org/m", modes=("cache",))
    ((reason, retryable, message),) = results["cache"].values()
    assert (reason, retryable) == ("expired_url", True)
    assert "unauthorized" not in message and "HF_TOKEN" not in message
