"""--disk_budget (and --stream) against a stand-in Hub that moves `main`, lies about sizes or
serves adapters naming each other as base, with a user's cache and a run's ledger that are
not as expected, end to end through run_esd_experiment.py and the real huggingface_hub
client. Expect the user's cache exactly as it was, the budget held by what is on disk, a
bounded number of Hub requests, a damaged ledger said (nothing deleted from it), a missing
id failed at planning time, and a full cache named as the disk that filled."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from hub_server import hub  # noqa: F401  (fixture)
from test_hub_disk_ledger import cache_state
from test_hub_online import (built, dir_files, failures, repos, run_experiment,  # noqa: F401
                             small_disk)
from tiny_models import save_adapter

GB = 1000 ** 3


@pytest.fixture
def online(monkeypatch):
    import huggingface_hub.constants as constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def said(result) -> str:
    return result.stdout + result.stderr


def users_download(hub, hf_home: Path, repo_id: str, filename: str | None = None) -> None:
    """What the user did before the run: a snapshot (or one file, as AutoConfig does) of
    `repo_id@main` in the cache, refs/main written by the client."""
    from huggingface_hub import hf_hub_download, snapshot_download
    if filename:
        hf_hub_download(repo_id, filename, cache_dir=hf_home / "hub", endpoint=hub.endpoint)
    else:
        snapshot_download(repo_id, cache_dir=hf_home / "hub", endpoint=hub.endpoint)


@pytest.mark.parametrize("flags", [("--disk_budget", "0.01"), ("--stream",)], ids=["budget", "stream"])
def test_the_users_model_still_loads_offline_by_name_after_a_run_when_main_moved(
        hub, tmp_path, built, online, flags):
    old = hub.add_repo("org/m0", built["gpt2"])
    home = tmp_path / "hf_home"
    users_download(hub, home, "org/m0")
    before = cache_state(home / "hub", "org/m0")
    new = hub.move_ref("org/m0", built["llama-main"])
    hub.log.clear()
    result, out = run_experiment(hub, tmp_path, [{"model_id": "org/m0"}], *flags, hf_home=home)
    assert result.returncode == 0, said(result)
    assert hub.resolved_revisions("org/m0") == {new}          # the run analysed the new main
    assert (out / "org--m0.csv").is_file()
    assert cache_state(home / "hub", "org/m0") == before
    from huggingface_hub import snapshot_download
    offline = snapshot_download("org/m0", cache_dir=home / "hub", local_files_only=True)
    assert Path(offline).name == old


def test_weights_a_run_adds_to_a_revision_the_user_partly_had_are_deleted(hub, tmp_path, repos,
                                                                          online):
    home = tmp_path / "hf_home"
    users_download(hub, home, "org/tiny-gpt2", "config.json")
    before = cache_state(home / "hub", "org/tiny-gpt2")
    result, out = run_experiment(hub, tmp_path, [{"model_id": "org/tiny-gpt2"}],
                                 "--disk_budget", "0.01", hf_home=home)
    assert result.returncode == 0, said(result)
    assert "model.safetensors" in hub.fetched_files("org/tiny-gpt2")
    assert cache_state(home / "hub", "org/tiny-gpt2") == before


def test_a_listing_that_under_reports_sizes_does_not_get_a_model_over_the_budget_admitted(
        hub, tmp_path, repos):
    files = next(iter(hub.repos["org/tiny-gpt2"].commits.values()))
    weights = len(files["model.safetensors"])
    hub.faults.listed_size_factor = 0.01
    budget = weights / 2 / GB                       # the listing says 1% of it: it "fits"
    result, out = run_experiment(hub, tmp_path, [{"model_id": "org/tiny-gpt2"}],
                                 "--disk_budget", f"{budget:.9f}")
    assert result.returncode == 1, said(result)
    record = failures(out)["org/tiny-gpt2"]
    assert (record["reason"], record["attempts"]) == ("disk_budget_exceeded", 1), record
    assert not hub.requests("cdn", "GET")            # nothing was downloaded
    assert "the tree listing said" in said(result)


def test_adapters_naming_themselves_or_each_other_as_base_are_sized_in_few_requests(
        hub, tmp_path, built):
    for name, base in (("org/self", "org/self"), ("org/ping", "org/pong"), ("org/pong", "org/ping")):
        adapter = save_adapter("gpt2", built["base"], tmp_path / "built" / name.replace("/", "--"),
                               base_id=base,
                               target_modules=["c_attn"], fan_in_fan_out=True)
        hub.add_repo(name, adapter)
    rows = [{"model_id": "org/self"}, {"model_id": "org/ping"}, {"model_id": "org/pong"}]
    result, out = run_experiment(hub, tmp_path, rows, "--disk_budget", "0.01",
                                 "--max_retries", "0")
    assert result.returncode == 1, said(result)
    recorded = failures(out)
    assert {recorded[k]["reason"] for k in ("org/self", "org/ping", "org/pong")} == \
        {"adapter_unsupported"}, recorded
    assert len(hub.resolve_calls("org/self")) > 0          # hub ids, not directories
    # sizing: per adapter its listing, its adapter_config and its base's listing, plus a HEAD
    # per file; the workers as many again. Following base after base, thousands.
    assert len(hub.requests("hub")) < 120, len(hub.requests("hub"))


DAMAGED = {"a list": "[]", "an entry without fields": '{"revisions": {"org/tiny@1": {}}}',
           "nested too deeply": "[" * 100_000 + "]" * 100_000}


@pytest.mark.parametrize("damage", sorted(DAMAGED))
def test_a_damaged_ledger_stops_a_budgeted_run_with_what_to_do_and_deletes_nothing(
        hub, tmp_path, repos, online, damage):
    home = tmp_path / "hf_home"
    users_download(hub, home, "org/tiny")
    before = cache_state(home / "hub", "org/tiny")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".hub_downloads.json").write_text(DAMAGED[damage])
    hub.log.clear()
    result, _ = run_experiment(hub, tmp_path, [{"model_id": "org/tiny"}], "--disk_budget", "0.01",
                               hf_home=home, out=out)
    assert result.returncode == 2, said(result)
    assert "Traceback" not in said(result)
    last = result.stderr.strip().splitlines()[-1]
    assert ".hub_downloads.json is damaged" in last and "Move it aside" in last, last
    assert (out / ".hub_downloads.json").read_text() == DAMAGED[damage]
    assert cache_state(home / "hub", "org/tiny") == before
    assert not hub.requests("cdn")


def test_a_missing_id_fails_at_planning_and_an_unsized_model_says_it_waits_to_run_alone(
        hub, tmp_path, repos):
    rows = [{"model_id": "org/tiny-gpt2"}, {"model_id": "org/missing"},
            {"model_id": "org/lora", "source_model": "org/nobase"}]   # its base cannot be sized
    result, out = run_experiment(hub, tmp_path, rows, "--disk_budget", "0.01")
    assert result.returncode == 1, said(result)
    record = failures(out)["org/missing"]
    assert record["stage"] == "resolve" and not record["retryable"] and record["attempts"] == 1
    assert record["reason"] in ("repo_not_found", "unauthorized"), record
    assert not (out / "logs" / "workers" / "org--missing.log").exists()   # no worker ran for it
    assert (out / "org--tiny-gpt2.csv").is_file()
    assert "org/lora waits to run alone: the size of its base org/nobase is unknown" \
        in said(result), said(result)
    assert "wait for space" not in said(result)
    assert failures(out)["org/lora"]["reason"] == "adapter_base_unresolved"   # said by its worker


def test_a_full_hub_cache_is_named_as_the_disk_to_free_in_the_last_line(hub, tmp_path, repos,
                                                                         small_disk):
    result, out = run_experiment(hub, tmp_path, [{"model_id": "org/tiny-gpt2"}],
                                 "--max_retries", "0", hf_home=small_disk)
    assert result.returncode == 1, said(result)
    assert failures(out)["org/tiny-gpt2"]["reason"] == "disk_full"
    last = said(result).strip().splitlines()[-1]
    assert "disk full" in last and f"mounted at {small_disk}" in last, last
    assert "--output_dir" not in last and "HF_HOME" in last, last
