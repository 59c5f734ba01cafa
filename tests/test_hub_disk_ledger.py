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


def cache_state(cache: Path, repo_id: str) -> dict[str, object]:
    """Everything of `repo_id` in the cache: refs with their commits, snapshot entries with
    their contents, blobs with their sizes."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    state = {}
    for path in sorted(folder.rglob("*")) if folder.is_dir() else ():
        name = path.relative_to(folder).as_posix()
        if path.is_file():
            state[name] = path.read_bytes()
    return state


def test_the_users_refs_are_restored_after_the_run_deleted_the_revision_main_moved_to(
        hub, tmp_path, online):
    source = save_model("gpt2", tmp_path / "m", seed=0)
    old = hub.add_repo("org/m0", source)
    cache = tmp_path / "cache"
    download(hub, cache, "org/m0", "main")               # the user's: refs/main -> old
    before = cache_state(cache, "org/m0")
    new = hub.move_ref("org/m0", {**{p.name: p.read_bytes() for p in source.iterdir()},
                                  "extra.json": b"{}"})
    ledger = DownloadLedger(tmp_path / "out", cache)
    assert ledger.before_download("org/m0", new, files_of(hub, "org/m0", new), "k") is True
    download(hub, cache, "org/m0", "main")               # as a run would: refs/main -> new
    assert (cache / "models--org--m0" / "refs" / "main").read_text() == new
    assert ledger.release("k") == [f"org/m0@{new}"]
    assert cache_state(cache, "org/m0") == before
    from huggingface_hub import snapshot_download
    offline = snapshot_download("org/m0", cache_dir=cache, local_files_only=True)
    assert Path(offline).name == old


def test_files_added_to_a_revision_the_user_partly_had_are_counted_then_deleted(
        hub, tmp_path, two_repos):
    from huggingface_hub import hf_hub_download
    a, _ = two_repos
    cache = tmp_path / "cache"
    hf_hub_download("org/a", "config.json", cache_dir=cache, endpoint=hub.endpoint)  # AutoConfig
    before = cache_state(cache, "org/a")
    ledger = DownloadLedger(tmp_path / "out", cache)
    weights = {"model.safetensors": files_of(hub, "org/a", a)["model.safetensors"]}
    assert ledger.before_download("org/a", a, weights, "k") is False
    hf_hub_download("org/a", "model.safetensors", revision=a, cache_dir=cache,
                    endpoint=hub.endpoint)
    ledger.downloaded("org/a", a)
    assert ledger.bytes_on_disk() == weights["model.safetensors"]
    assert ledger.release("k") == [f"org/a@{a}"]
    assert cache_state(cache, "org/a") == before
    assert ledger.bytes_on_disk() == 0


def test_what_is_on_disk_is_counted_when_the_listing_under_reports_it(hub, tmp_path, two_repos):
    a, _ = two_repos
    cache = tmp_path / "cache"
    ledger = DownloadLedger(tmp_path / "out", cache)
    true = files_of(hub, "org/a", a)
    listed = {name: size // 100 for name, size in true.items()}   # a listing that lies
    ledger.before_download("org/a", a, listed, "k")
    download(hub, cache, "org/a", a)
    ledger.downloaded("org/a", a)
    assert ledger.bytes_on_disk() == sum(true.values())


DAMAGED = {"not JSON": "{\"revisions\": {", "a list": "[]", "revisions a list": '{"revisions": []}',
           "an entry without fields": '{"revisions": {"org/a@1": {}}}',
           "ours not a boolean": None, "nested too deeply": "[" * 100_000 + "]" * 100_000}


@pytest.mark.parametrize("damage", sorted(DAMAGED))
def test_a_damaged_ledger_is_said_and_nothing_is_deleted_from_it(hub, tmp_path, two_repos, damage):
    import json
    from esd.disk_budget import LedgerDamaged
    a, _ = two_repos
    cache = tmp_path / "cache"
    snapshot = download(hub, cache, "org/a", a)          # the user's
    ledger = DownloadLedger(tmp_path / "out", cache)
    text = DAMAGED[damage] or json.dumps({"revisions": {f"org/a@{a}": {
        "repo_id": "org/a", "commit": a, "ours": "no", "users": [], "had": [], "bytes": 1,
        "files": {"model.safetensors": 1}, "state": "present"}}})
    ledger.path.parent.mkdir(parents=True)
    ledger.path.write_text(text)
    for call in (ledger.sweep, lambda: ledger.release("k"), ledger.check, ledger.bytes_on_disk):
        with pytest.raises(LedgerDamaged) as caught:
            call()
        assert ".hub_downloads.json is damaged" in caught.value.message
        assert "Move it aside" in caught.value.message
    assert (snapshot / "model.safetensors").is_file()
    assert ledger.path.read_text() == text


def test_the_gate_counts_what_a_running_model_has_on_disk_when_it_exceeds_its_reservation():
    gate = BudgetGate(100)
    gate.take("a", {"a@1": 10})                          # the listing promised 10
    assert gate.fits({"b@1": 50}, kept={"a@1": 10})
    assert not gate.fits({"b@1": 50}, kept={"a@1": 60})  # 60 are on disk
    assert gate.used(kept={"a@1": 5}) == {"a@1": 10}     # still downloading: the reservation
