"""--disk_budget and --stream end to end through run_esd_experiment.py against the stand-in
Hub: what the run downloaded is deleted, what was in the cache stays, a shared base is
downloaded once, a model larger than the budget fails typed; streamed results equal the
downloaded ones bit for bit with no weights on disk and one resolve per weight file."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from hub_server import hub, sha256  # noqa: F401  (fixture)
from test_hub_online import built, failures, repos, run_experiment  # noqa: F401  (fixtures)

GB = 1000 ** 3


def snapshots(hf_home: Path, repo_id: str) -> list[str]:
    folder = hf_home / "hub" / ("models--" + repo_id.replace("/", "--")) / "snapshots"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def weight_blobs(hf_home: Path) -> list[Path]:
    """Files in the cache holding model weights (not adapters)."""
    return [p for p in (hf_home / "hub").rglob("*") if p.is_file()
            and p.stat().st_size > 50_000 and "adapter" not in p.name]


def cdn_gets(hub, repo_id: str, filename: str) -> int:
    digest = sha256(next(iter(hub.repos[repo_id].commits.values()))[filename])
    return sum(1 for r in hub.requests("cdn", "GET") if r.path.endswith(digest))


def test_disk_budget_deletes_what_the_run_downloaded_keeps_the_users_cache_and_shares_a_base(
        hub, tmp_path, repos):
    home = tmp_path / "hf_home"
    result, _ = run_experiment(hub, tmp_path, [{"model_id": "org/tiny@v1"}], out=tmp_path / "before")
    assert result.returncode == 0
    users_own = snapshots(home, "org/tiny")
    assert users_own == [repos["org/tiny@v1"]]
    hub.log.clear()
    rows = [{"model_id": "org/tiny-gpt2"}, {"model_id": "org/tiny"}, {"model_id": "org/tiny@v1"},
            {"model_id": "org/lora", "source_model": "org/base"},
            {"model_id": "org/lora2", "source_model": "org/base"}]
    result, out = run_experiment(hub, tmp_path, rows, "--disk_budget", "0.002")
    assert result.returncode == 0, result.stdout + result.stderr
    assert len([p for p in out.glob("org--*.csv")]) == 5
    # the run's downloads are gone; the user's own revision is still there
    assert snapshots(home, "org/tiny-gpt2") == [] and snapshots(home, "org/base") == []
    assert snapshots(home, "org/lora") == [] and snapshots(home, "org/lora2") == []
    assert snapshots(home, "org/tiny") == users_own
    assert (home / "hub" / "models--org--tiny" / "snapshots" / users_own[0] /
            "model.safetensors").is_file()
    # the base both adapters need was downloaded once, and kept until the second was done
    assert cdn_gets(hub, "org/base", "model.safetensors") == 1


def test_a_model_larger_than_the_whole_budget_fails_typed_and_is_not_retried(hub, tmp_path, repos):
    result, out = run_experiment(hub, tmp_path, [{"model_id": "org/tiny-gpt2"}],
                                 "--disk_budget", "0.0001")
    assert result.returncode == 1
    record = failures(out)["org/tiny-gpt2"]
    assert (record["reason"], record["retryable"], record["attempts"]) == \
        ("disk_budget_exceeded", False, 1)
    assert "GB" in record["message"] and "0.0001" in record["message"]
    assert not hub.requests("cdn")                   # nothing was downloaded


def test_a_worker_alone_refuses_a_model_larger_than_its_budget(hub, tmp_path, repos):
    """The worker checks too (a Slurm task has no orchestrator beside it)."""
    import subprocess
    import sys
    from test_hub_online import ROOT
    env = hub.subprocess_env(tmp_path / "hf_home")
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, str(ROOT / "esd_worker.py"), "--model_id=org/tiny-gpt2",
                           "--output_dir", str(tmp_path / "out"), "--disk_budget", "0.0001",
                           "--device", "cpu"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert failures(tmp_path / "out")["org/tiny-gpt2"]["reason"] == "disk_budget_exceeded"


def test_streamed_results_equal_downloaded_ones_bit_for_bit_with_no_weights_on_disk(
        hub, tmp_path, repos):
    rows = [{"model_id": "org/tiny-gpt2"}, {"model_id": "org/sharded"}, {"model_id": "org/lora"},
            {"model_id": "org/binonly"}]
    result, downloaded = run_experiment(hub, tmp_path, rows, out=tmp_path / "downloaded",
                                        hf_home=tmp_path / "home_download")
    assert result.returncode == 0, result.stdout + result.stderr
    hub.log.clear()
    home = tmp_path / "home_stream"
    result, streamed = run_experiment(hub, tmp_path, rows, "--stream", out=tmp_path / "streamed",
                                      hf_home=home)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("org--tiny-gpt2.csv", "org--sharded.csv", "org--lora.csv", "org--binonly.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(streamed / name), pd.read_csv(downloaded / name),
                                      check_exact=True)
    # no weights written to the cache, and the .bin fallback was deleted after use
    assert weight_blobs(home) == []
    log = (streamed / "logs" / "workers" / "org--binonly.log").read_text()
    assert "no safetensors weights to stream" in log
    # one resolve (a HEAD) per streamed weight file, never a resolve GET of weights
    shards = [n for n in next(iter(hub.repos["org/sharded"].commits.values()))
              if n.endswith(".safetensors")]
    calls = hub.resolve_calls("org/sharded")
    for shard in shards:
        assert [m for m, _, f in calls if f == shard] == ["HEAD"], shard
    assert [m for m, _, f in hub.resolve_calls("org/base") if f == "model.safetensors"] == ["HEAD"]
    assert all(r.status == 206 for r in hub.requests("cdn")
               if r.headers.get("range") and "bytes=0-" not in r.headers["range"][:8])


def test_streaming_survives_cdn_faults_and_results_stay_exact(hub, tmp_path, repos):
    rows = [{"model_id": "org/tiny-gpt2"}]
    result, downloaded = run_experiment(hub, tmp_path, rows, out=tmp_path / "downloaded",
                                        hf_home=tmp_path / "home_download")
    assert result.returncode == 0
    hub.log.clear()
    hub.faults.cdn_forbidden, hub.faults.cdn_server_error = 1, 1
    hub.faults.cut_after, hub.faults.cut_count = 3000, 1
    result, streamed = run_experiment(hub, tmp_path, rows, "--stream", out=tmp_path / "streamed",
                                      hf_home=tmp_path / "home_stream")
    assert result.returncode == 0, result.stdout + result.stderr
    pd.testing.assert_frame_equal(pd.read_csv(streamed / "org--tiny-gpt2.csv"),
                                  pd.read_csv(downloaded / "org--tiny-gpt2.csv"), check_exact=True)
    heads = [m for m, _, f in hub.resolve_calls("org/tiny-gpt2") if f == "model.safetensors"]
    assert heads == ["HEAD", "HEAD"]                 # the expired URL was refreshed once
