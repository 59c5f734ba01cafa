"""The stand-in Hub speaks the protocol huggingface_hub 2.4 expects: checked with the real
client in a subprocess (HF_ENDPOINT set before import)."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from hub_server import hub  # noqa: F401  (fixture)
from tiny_models import save_model


def run_client(hub, tmp_path, code: str, token: str | None = None, timeout: int = 120) -> list:
    """Run `code` (which appends to `out`) with huggingface_hub pointed at `hub`."""
    script = "import json\nout = []\n" + textwrap.dedent(code) + "\nprint('OUT' + json.dumps(out))\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            env=hub.subprocess_env(tmp_path / "hf", token), timeout=timeout)
    lines = [line for line in result.stdout.splitlines() if line.startswith("OUT")]
    assert lines, result.stdout + result.stderr
    return json.loads(lines[-1][3:])


@pytest.fixture
def tiny_repo(hub, tmp_path):
    source = save_model("gpt2", tmp_path / "gpt2")
    (source / "pytorch_model.bin").write_bytes(b"b" * 1000)
    (source / "optimizer.pt").write_bytes(b"o" * 1000)
    sha = hub.add_repo("org/tiny", source)
    pr = hub.add_repo("org/tiny", {"config.json": b'{"pr": 1}'}, revision="refs/pr/1")
    return source, sha, pr


def test_snapshot_download_model_info_and_revisions_work_through_the_real_client(hub, tmp_path, tiny_repo):
    source, sha, pr = tiny_repo
    out = run_client(hub, tmp_path, """
        from pathlib import Path
        from huggingface_hub import HfApi, hf_hub_download, snapshot_download
        out.append(HfApi().model_info("org/tiny").sha)
        snap = Path(snapshot_download("org/tiny", allow_patterns=["*.json", "*.safetensors"]))
        out.append(sorted(p.name for p in snap.iterdir()))
        out.append((snap / "model.safetensors").read_bytes().hex())
        out.append(Path(hf_hub_download("org/tiny", "config.json", revision="refs/pr/1")).read_text())
        out.append(HfApi().model_info("org/tiny", revision="refs/pr/1").sha)
    """)
    assert out[0] == sha
    assert out[1] == ["config.json", "generation_config.json", "model.safetensors"]
    assert bytes.fromhex(out[2]) == (source / "model.safetensors").read_bytes()
    assert json.loads(out[3]) == {"pr": 1} and out[4] == pr
    weights = [r for r in hub.requests("hub") if r.path.endswith("model.safetensors")]
    assert weights and all(r.status == 302 for r in weights)        # LFS: redirected
    assert [r.status for r in hub.requests("cdn")] == [200]
    assert "pytorch_model.bin" not in hub.fetched_files("org/tiny")


def test_typed_errors_reach_the_client_as_its_own_exception_types(hub, tmp_path, tiny_repo):
    hub.add_repo("org/gated", tiny_repo[0], gated=True, tokens=("hf_good",))
    out = run_client(hub, tmp_path, """
        from huggingface_hub import HfApi, hf_hub_download
        def name(call):
            try:
                call()
                return "ok"
            except Exception as exc:
                return type(exc).__name__
        out.append(name(lambda: HfApi().model_info("org/absent")))
        out.append(name(lambda: HfApi().model_info("org/tiny", revision="v9")))
        out.append(name(lambda: hf_hub_download("org/tiny", "absent.json")))
        out.append(name(lambda: hf_hub_download("org/gated", "config.json", token=False)))
        out.append(name(lambda: hf_hub_download("org/gated", "config.json", token="hf_bad")))
        out.append(name(lambda: hf_hub_download("org/gated", "config.json", token="hf_good")))
        out.append(name(lambda: HfApi().model_info("org/gated", token=False)))
    """)
    assert out == ["RepositoryNotFoundError", "RevisionNotFoundError", "RemoteEntryNotFoundError",
                   "GatedRepoError", "GatedRepoError", "ok", "ok"]
    statuses = [r.status for r in hub.requests("hub", contains="org/gated/resolve")]
    assert statuses[:2] == [401, 403]


def test_cdn_answers_ranges_with_206_and_the_exact_content_range(hub, tmp_path, tiny_repo):
    out = run_client(hub, tmp_path, """
        from huggingface_hub import get_safetensors_metadata
        meta = get_safetensors_metadata("org/tiny")
        out.append(len(meta.files_metadata["model.safetensors"].tensors))
    """)
    assert out[0] > 10
    (cdn,) = hub.requests("cdn")
    assert cdn.headers["range"] == "bytes=0-100000" and cdn.status == 206


def test_a_cut_transfer_above_10_mib_resumes_from_10_mib(hub, tmp_path):
    blob = bytes(range(256)) * (60 * 1024 * 16 // 16 * 1)   # 15 MiB
    hub.add_repo("org/big", {"config.json": b"{}", "model.safetensors": blob})
    hub.faults.cut_after, hub.faults.cut_count = 12 * 1024 * 1024, 1
    out = run_client(hub, tmp_path, """
        import hashlib
        from huggingface_hub import hf_hub_download
        path = hf_hub_download("org/big", "model.safetensors")
        out.append(hashlib.sha256(open(path, "rb").read()).hexdigest())
    """)
    import hashlib
    assert out[0] == hashlib.sha256(blob).hexdigest()
    ranges = [r.headers.get("range") for r in hub.requests("cdn")]
    assert ranges == [None, "bytes=10485760-"]


def test_429_on_resolve_is_retried_by_the_client_and_the_token_never_goes_to_the_cdn(
        hub, tmp_path, tiny_repo):
    # (the client retries 429 only on resolve/downloads; a 429 on /api/models is not retried
    # and surfaces as LocalEntryNotFoundError: the loader retries those itself)
    hub.faults.rate_limit, hub.faults.retry_after = 2, 0
    hub.faults.rate_limit_paths = "/resolve/"
    out = run_client(hub, tmp_path, """
        from huggingface_hub import snapshot_download
        out.append(bool(snapshot_download("org/tiny", allow_patterns=["*.json", "*.safetensors"])))
    """, token="hf_secret")
    assert out == [True]
    assert [r.status for r in hub.requests("hub", contains="/resolve/")][:2] == [429, 429]
    assert all(r.token == "hf_secret" for r in hub.requests("hub"))
    assert hub.requests("cdn") and all("authorization" not in r.headers for r in hub.requests("cdn"))
