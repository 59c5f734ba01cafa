"""The layer-plan cache: a worker whose architecture was planned before plans without
transformers, with the same layers, the same warnings and the same results."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from esd.loading import plans
from model_loader import iter_layers, resolve_model
from tiny_models import offline_env, save_gpt2, save_model

ROOT = Path(__file__).resolve().parents[1]

# runs the worker in this process and then says whether transformers was ever imported
WORKER_THEN_REPORT = """
import runpy, sys
sys.argv = ["esd_worker.py"] + sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as stop:
    assert not stop.code, stop.code
print("TRANSFORMERS_IMPORTED", "transformers" in sys.modules)
"""


def _worker(model: Path, out: Path, env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", WORKER_THEN_REPORT, f"--model_id={model}",
                           "--output_dir", str(out), "--device", "cpu", "--overwrite"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _missing_blocks_model(path: Path) -> Path:
    """A GPT-2 checkpoint of 2 blocks under a config of 3: planning warns of the missing block."""
    save_model("gpt2", path)
    config = json.loads((path / "config.json").read_text())
    config["n_layer"] = 3
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_the_second_worker_of_an_architecture_plans_without_transformers_and_says_the_same(tmp_path):
    model = _missing_blocks_model(tmp_path / "gpt2")
    env, out = offline_env(tmp_path), tmp_path / "out"
    first = _worker(model, out, env)
    csv = next(out.glob("*.csv"))
    first_rows = pd.read_csv(csv)
    second = _worker(model, out, env)
    assert "TRANSFORMERS_IMPORTED True" in first.stdout
    assert "TRANSFORMERS_IMPORTED False" in second.stdout
    for run in (first, second):
        assert "4 module(s) not in the checkpoint" in run.stdout + run.stderr
    assert len(list((out / ".cache" / "plans").glob("*.json"))) == 1
    pd.testing.assert_frame_equal(first_rows, pd.read_csv(csv))
    assert list(first_rows["longname"]) == [name for name, _, _ in iter_layers(resolve_model(str(model)))]


@pytest.fixture
def plan_cache(tmp_path):
    plans.use_plan_cache(tmp_path / "plans")
    yield tmp_path / "plans"
    plans.use_plan_cache(None)


def _planned(path: Path, warnings: list | None = None) -> list:
    resolved = resolve_model(str(path), warn=lambda m: None)
    return [(name, kind) for name, kind, _ in
            iter_layers(resolved, warn=(warnings.append if warnings is not None else lambda m: None))]


def test_a_cached_plan_serves_only_the_same_config_and_tensors(tmp_path, plan_cache, monkeypatch):
    from esd.loading import layers
    skeletons = []
    build = layers._skeleton
    monkeypatch.setattr(layers, "_skeleton", lambda resolved: skeletons.append(resolved) or build(resolved))
    first = save_gpt2(tmp_path / "a")
    fine_tune = save_gpt2(tmp_path / "b", seed=3)              # other values, same architecture
    config = json.loads((fine_tune / "config.json").read_text())
    config["_name_or_path"] = "someone/else"                   # names the checkpoint only
    (fine_tune / "config.json").write_text(json.dumps(config))
    wider = save_gpt2(tmp_path / "c", n_embd=32)               # other shapes
    untied = save_gpt2(tmp_path / "d")                          # same tensors, other config
    config = json.loads((untied / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (untied / "config.json").write_text(json.dumps(config))

    names = _planned(first)
    assert len(list(plan_cache.glob("*.json"))) == 1 and len(skeletons) == 1
    assert _planned(fine_tune) == names
    assert len(list(plan_cache.glob("*.json"))) == 1 and len(skeletons) == 1  # served from the cache
    _planned(wider)
    _planned(untied)
    assert len(list(plan_cache.glob("*.json"))) == 3 and len(skeletons) == 3


def test_a_broken_or_foreign_cache_entry_is_planned_afresh(tmp_path, plan_cache):
    model = save_gpt2(tmp_path / "a")
    names = _planned(model)
    (entry,) = plan_cache.glob("*.json")
    entry.write_text("{not json")
    assert _planned(model) == names
    saved = json.loads(entry.read_text())                      # rewritten, whole
    saved["keys"] = {name: "no.such.tensor" for name in saved["keys"]}
    entry.write_text(json.dumps(saved))
    assert _planned(model) == names


def test_without_a_cache_nothing_is_written_and_remote_code_is_never_cached(tmp_path, plan_cache):
    model = save_gpt2(tmp_path / "a")
    resolved = resolve_model(str(model), trust_remote_code=True, warn=lambda m: None)
    config = json.loads(resolved.config_path.read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.Custom"}
    resolved.config_path.write_text(json.dumps(config))
    assert plans.plan_key(resolved, {"w": (2, 2)}, {}) is None
    plans.use_plan_cache(None)
    _planned(save_gpt2(tmp_path / "b"))
    assert not plan_cache.exists()
