"""--delta_from_base and --adapter_update on hub ids through the stand-in Hub: with --stream
the fine-tune, its base and the adapter's base are all read by HTTP ranges (no weights on
disk) and the rows equal those of the same models read locally; under --disk_budget a
fine-tune's size counts its base."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from hub_server import hub  # noqa: F401  (fixture)
from test_hub_online import run_experiment
from tiny_models import save_fine_tune, save_llama, save_lora_adapter

GB = 1000 ** 3



@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("hubmodes")
    base = save_llama(root / "base", seed=5)
    return {"base": base, "tuned": save_fine_tune(base, root / "tuned", seed=11),
            "lora": save_lora_adapter(base, root / "lora", base_id="org/base", r=4, lora_alpha=12,
                                      target_modules=["q_proj", "v_proj"])}


@pytest.fixture
def repos(hub, built):
    return {name: hub.add_repo(f"org/{name}", built[name]) for name in built}


def extra_rows(out: Path, stem: str) -> pd.DataFrame:
    rows = pd.read_csv(out / f"{stem}.csv")
    rows = rows[rows["longname"].str.contains(r"\.(?:delta_from_base|adapter_update)$")]
    return rows.drop(columns=["model_id", "source_model"]).reset_index(drop=True)


def test_streamed_hub_deltas_and_updates_equal_the_local_ones_with_no_weights_on_disk(
        hub, tmp_path, built, repos):
    rows = [{"model_id": "org/tuned", "source_model": "org/base"},
            {"model_id": "org/lora", "source_model": "org/base"}]
    result, out = run_experiment(hub, tmp_path, rows, "--stream", "--delta_from_base",
                                 "--adapter_update", out=tmp_path / "hub")
    assert result.returncode == 0, result.stdout + result.stderr
    weights_on_disk = [p for p in (tmp_path / "hf_home").rglob("*.safetensors") if p.is_file()
                       and "adapter" not in p.name]
    assert weights_on_disk == []
    local = [{"model_id": str(built["tuned"]), "source_model": str(built["base"])},
             {"model_id": str(built["lora"]), "source_model": str(built["base"])}]
    result, local_out = run_experiment(hub, tmp_path, local, "--delta_from_base", "--adapter_update",
                                       out=tmp_path / "local")
    assert result.returncode == 0, result.stdout + result.stderr
    from esd.model_list import make_entry
    for hub_id, folder in (("org/tuned", built["tuned"]), ("org/lora", built["lora"])):
        got = extra_rows(out, make_entry(hub_id).paths(out).result_csv.stem)
        want = extra_rows(local_out, make_entry(str(folder)).paths(local_out).result_csv.stem)
        assert len(got) > 0
        pd.testing.assert_frame_equal(got, want)


def test_under_a_disk_budget_a_fine_tunes_size_counts_its_base(hub, tmp_path, repos, monkeypatch):
    import huggingface_hub.constants as constants
    from esd.disk_budget import download_parts
    from esd.model_list import make_entry
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    cache = tmp_path / "cache"
    tuned = make_entry("org/tuned", source_model="org/base")
    alone = download_parts(tuned, stream=False, trust_remote_code=False, cache=cache)
    with_base = download_parts(tuned, stream=False, trust_remote_code=False, cache=cache,
                               with_base=True)
    assert list(alone) == [f"org/tuned@{repos['tuned']}"]
    assert with_base == {**alone, f"org/base@{repos['base']}": with_base[f"org/base@{repos['base']}"]}
    assert with_base[f"org/base@{repos['base']}"] > 100_000       # its weights, not only its config
