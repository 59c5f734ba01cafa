"""Every request to the Hub is bounded: a Hub that accepts connections and never answers
cannot hang a worker or the orchestrator's budget admission; a tree listing whose next page
is itself, or on another host, is refused (the token never leaves the Hub's origin); an
adapter whose base is `/` does not make the loader list the filesystem root; downloads and
streams say how far they are, and the HTTP client's per-request lines stay out of the log.
Real huggingface_hub client, stand-in Hub on 127.0.0.1, workers as subprocesses."""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys
from pathlib import Path

import pytest

from esd.failures import ESDFailure, read_failures
from hub_server import hub  # noqa: F401  (fixture)
from tiny_models import save_adapter, save_model

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "hf_bounded_token"


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_model("llama", tmp_path_factory.mktemp("models") / "llama")


@pytest.fixture
def in_process_hub(hub, monkeypatch):
    """huggingface_hub in this process pointed at the stand-in (our code reads the endpoint
    at call time), with a token."""
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("ESD_HUB_BACKOFF_S", "0.01")
    monkeypatch.setenv("ESD_HUB_TIMEOUT_S", "2")
    return hub


def env_for(hub, tmp_path: Path) -> dict:
    env = hub.subprocess_env(tmp_path / "hf_home", TOKEN)
    env.update(PYTHONPATH=str(ROOT), ESD_HUB_BACKOFF_S="0.01", ESD_HUB_RETRIES="2",
               ESD_HUB_TIMEOUT_S="2", TOKENIZERS_PARALLELISM="false")
    return env


def run_worker(hub, tmp_path: Path, model_id: str, *flags) -> tuple[str, dict]:
    done = subprocess.run([sys.executable, str(ROOT / "esd_worker.py"), f"--model_id={model_id}",
                           "--output_dir", str(tmp_path / "out"), "--device", "cpu", *flags],
                          env=env_for(hub, tmp_path), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    records = read_failures(tmp_path / "out")
    return done.stdout + done.stderr, {k: (r.reason, r.retryable, r.message)
                                       for k, r in records.items()}


# ---------------------------------------------------------------- a silent Hub

def test_a_silent_api_fails_the_listing_after_the_timeout_instead_of_hanging(in_process_hub,
                                                                            llama):
    from esd.loading.hub import hub_listing
    from esd.loading.hub_http import HubUnreachable
    in_process_hub.add_repo("org/m", llama)
    in_process_hub.faults.silent_api = True
    with pytest.raises(HubUnreachable) as info:
        hub_listing("org/m", "main")
    assert "no answer within 2 s" in str(info.value)


def test_a_silent_api_ends_a_streaming_worker_with_a_network_error(hub, llama, tmp_path):
    hub.add_repo("org/m", llama)
    hub.faults.silent_api = True
    output, records = run_worker(hub, tmp_path, "org/m", "--stream")
    ((reason, retryable, message),) = records.values()
    assert (reason, retryable) == ("network_error", True), output
    assert "no answer within" in message


def test_a_silent_api_cannot_hang_the_budget_admission(hub, llama, tmp_path):
    hub.add_repo("org/m", llama)
    hub.faults.silent_api = True
    (tmp_path / "models.csv").write_text("model_id\norg/m\n")
    done = subprocess.run([sys.executable, str(ROOT / "run_esd_experiment.py"), "--model_list",
                           str(tmp_path / "models.csv"), "--output_dir", str(tmp_path / "out"),
                           "--gpus", "none", "--cpu_workers", "1", "--poll_interval", "0.05",
                           "--max_check", "1", "--max_retries", "0", "--disk_budget", "1"],
                          env=env_for(hub, tmp_path), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    record = read_failures(tmp_path / "out")["org/m"]
    assert (record.reason, record.retryable) == ("network_error", True)


# ---------------------------------------------------------------- pagination

def test_a_tree_page_linking_to_itself_is_refused_not_followed_for_ever(in_process_hub, llama):
    from esd.loading.hub import hub_listing
    in_process_hub.add_repo("org/m", llama)
    in_process_hub.faults.tree_link = "self"
    with pytest.raises(ESDFailure) as info:
        hub_listing("org/m", "main")
    assert (info.value.reason, info.value.retryable) == ("bad_hub_response", False)
    assert "already read" in info.value.message
    assert len(in_process_hub.requests("hub", contains="/tree/")) == 1


def test_a_tree_page_linking_to_another_host_is_not_followed_with_the_token(in_process_hub,
                                                                            llama):
    from esd.loading.hub import hub_listing
    in_process_hub.add_repo("org/m", llama)
    in_process_hub.faults.tree_link = "foreign"
    with pytest.raises(ESDFailure) as info:
        hub_listing("org/m", "main")
    assert info.value.reason == "bad_hub_response" and "another host" in info.value.message
    assert all(r.token == TOKEN for r in in_process_hub.requests("hub"))
    assert not any("authorization" in r.headers for r in in_process_hub.requests("cdn"))


def test_a_streaming_worker_on_a_looping_listing_ends_typed(hub, llama, tmp_path):
    hub.add_repo("org/m", llama)
    hub.faults.tree_link = "self"
    output, records = run_worker(hub, tmp_path, "org/m", "--stream")
    ((reason, retryable, _),) = records.values()
    assert (reason, retryable) == ("bad_hub_response", False), output
    assert len(hub.requests("hub", contains="/tree/")) <= 2     # the page, and its one repeat


# ---------------------------------------------------------------- an adapter on `/`

def test_an_adapter_whose_base_is_the_filesystem_root_never_lists_it(llama, tmp_path,
                                                                     monkeypatch):
    from model_loader import resolve_model
    adapter = save_adapter("llama", llama, tmp_path / "adapter", base_id="/",
                           target_modules=["q_proj"])
    listed = []
    for name in ("iterdir", "glob", "rglob"):
        original = getattr(pathlib.Path, name)

        def spy(self, *args, _original=original, **kwargs):
            if self.resolve() == Path("/"):
                listed.append(name)
            return _original(self, *args, **kwargs)
        monkeypatch.setattr(pathlib.Path, name, spy)
    with pytest.raises(ESDFailure) as info:
        resolve_model(str(adapter))
    assert info.value.reason == "adapter_base_unresolved" and "filesystem root" in \
        info.value.message
    assert listed == []


# ---------------------------------------------------------------- progress

def test_downloads_and_streams_print_bytes_and_rate_and_no_http_request_lines(hub, llama,
                                                                             tmp_path):
    import re
    from esd.progress import current_activity
    hub.add_repo("org/m", llama)
    for flags, verb in (((), "downloaded"), (("--stream",), "streamed")):
        out = tmp_path / verb
        out.mkdir()
        output, records = run_worker(hub, out, "org/m", *flags)
        assert records == {}, output
        lines = [line for line in output.splitlines() if f"{verb} org/m" in line]
        assert lines, output
        done, total = re.search(r"([\d.]+) of ([\d.]+) MB at [\d.]+ MB/s", lines[-1]).groups()
        assert done == total and float(total) > 0, lines[-1]
        assert "HTTP Request:" not in output
        log = out / "worker.log"
        log.write_text("  layer    3/9  model.layers.0.mlp\n" + lines[0] + "\n")
        assert current_activity(log).startswith(verb)       # what the run's status shows
