"""The download ledger of --disk_budget (esd/disk_budget.py) on a real hub cache filled by
the real client from the stand-in Hub: only what the run downloaded is deleted, through
huggingface_hub's cache API; never what was there before, never what another worker reads."""
from __future__ import annotations

from pathlib import Path

import pytest

from esd.disk_budget import BudgetGate, DownloadLedger, gigabytes
from hub_server import hub  # noqa: F401  (fixture)
from tiny_models import save_model


@pytest.fixture
def online(monkeypatch):
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def download(hub, cache: Path, repo_id: str, revision: str = "main") -> Path:
    from huggingface_hub import snapshot_download
    return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache,
                                  endpoint=hub.endpoint))


def files_of(hub, repo_id, sha):
    return {name: len(data) for name, data in hub.repos[repo_id].commits[sha].items()}


@pytest.fixture
def two_repos(hub, tmp_path, online):
    a = hub.add_repo("org/a", save_model("gpt2", tmp_path / "a", seed=0))
    b = hub.add_repo("org/b", save_model("gpt2", tmp_path / "b", seed=1))
    return a, b


def test_what_the_run_downloaded_is_deleted_after_release(hub, tmp_path, two_repos):
    a, _ = two_repos
    cache = tmp_path / "cache"
    ledger = DownloadLedger(tmp_path / "out", cache)
    assert ledger.before_download("org/a", a, files_of(hub, "org/a", a), "org/a") is True
    snapshot = download(hub, cache, "org/a", a)
    ledger.downloaded("org/a", a)
    assert ledger.bytes_on_disk() > 0 and (snapshot / "model.safetensors").exists()
    assert ledger.release("org/a") == [f"org/a@{a}"]
    assert not snapshot.exists()
    assert not any((cache / "models--org--a" / "blobs").glob("*"))
    assert ledger.bytes_on_disk() == 0


def test_a_revision_in_the_cache_before_the_run_is_never_deleted(hub, tmp_path, two_repos):
    a, _ = two_repos
    cache = tmp_path / "cache"
    snapshot = download(hub, cache, "org/a")          # the user's own cache entry
    ledger = DownloadLedger(tmp_path / "out", cache)
    assert ledger.before_download("org/a", a, files_of(hub, "org/a", a), "org/a") is False
    assert ledger.release("org/a") == [] and ledger.sweep() == []
    assert (snapshot / "model.safetensors").is_file()


def test_a_revision_another_worker_reads_is_kept_until_it_is_done(hub, tmp_path, two_repos):
    a, _ = two_repos
    cache = tmp_path / "cache"
    mine = DownloadLedger(tmp_path / "out", cache)
    other = DownloadLedger(tmp_path / "out", cache)   # another worker of the same run
    mine.before_download("org/a", a, files_of(hub, "org/a", a), "model-1")
    snapshot = download(hub, cache, "org/a", a)
    with other.reading("org/a", a):
        assert mine.release("model-1") == []
        assert mine.sweep() == []
        assert snapshot.exists()
    assert mine.sweep() == [f"org/a@{a}"] and not snapshot.exists()


def test_a_planned_base_stays_until_the_last_adapter_needing_it_is_released(hub, tmp_path,
                                                                             two_repos):
    a, _ = two_repos
    cache = tmp_path / "cache"
    ledger = DownloadLedger(tmp_path / "out", cache)
    ledger.plan_bases({"org/a": ["adapter-1", "adapter-2"]})
    ledger.before_download("org/a", a, files_of(hub, "org/a", a), "adapter-1")
    snapshot = download(hub, cache, "org/a", a)
    assert ledger.release("adapter-1") == [] and snapshot.exists()
    ledger.before_download("org/a", a, files_of(hub, "org/a", a), "adapter-2")  # no new download
    assert ledger.release("adapter-2") == [f"org/a@{a}"] and not snapshot.exists()


def test_deleting_one_revision_keeps_the_blobs_another_revision_shares(hub, tmp_path, online):
    source = save_model("gpt2", tmp_path / "m")
    main = hub.add_repo("org/r", source)
    v2 = hub.add_repo("org/r", {**{p.name: p.read_bytes() for p in source.iterdir()},
                                "extra.json": b"{}"}, revision="v2")
    cache = tmp_path / "cache"
    user = download(hub, cache, "org/r", "main")        # the user's, before the run
    ledger = DownloadLedger(tmp_path / "out", cache)
    assert ledger.before_download("org/r", v2, files_of(hub, "org/r", v2), "k")
    mine = download(hub, cache, "org/r", "v2")
    assert ledger.release("k") == [f"org/r@{v2}"]
    assert not mine.exists()
    assert (user / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert main != v2


def test_the_gate_admits_what_fits_beside_the_running_models_counting_a_shared_base_once():
    gate = BudgetGate(100)
    assert gate.fits({"m@1": 100}) and not gate.fits({"m@1": 101})
    gate.take("a", {"a@1": 50, "base@1": 30})
    assert not gate.fits({"b@1": 30}) and gate.fits({"b@1": 20})
    assert gate.fits({"c@1": 20, "base@1": 30})          # the base is on disk already
    assert not gate.fits({"b@1": 10}, kept={"kept@1": 20})
    gate.give_back("a")
    assert gate.fits({"m@1": 100})


def test_disk_budget_takes_a_positive_number_of_gb():
    import argparse
    assert gigabytes("1.5") == 1.5
    for bad in ("0", "-1", "x", "nan", "inf"):
        with pytest.raises(argparse.ArgumentTypeError):
            gigabytes(bad)
