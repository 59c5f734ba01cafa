"""--delta_from_base and --adapter_update from the user's side: the real orchestrator and
workers over tiny real models (a base, a fine-tune of it listed with its source_model, a real
peft LoRA adapter of it), each extra row checked against the ESD of a matrix this test builds
itself from the safetensors files, and the summary, the analysis and the settings record
checked to keep the extra rows apart from the weight rows."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from net_esd import ESDSettings, analyze_layers
from tiny_models import offline_env, save_fine_tune, save_llama, save_lora_adapter, write_model_list

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "run_esd_experiment.py")]
WORKER = [sys.executable, str(ROOT / "esd_worker.py")]
FAST = ["--gpus", "none", "--cpu_workers", "2", "--poll_interval", "0.05", "--max_check", "1",
        "--retry_backoff", "0.2"]
MODES = ["--delta_from_base", "--adapter_update"]
NUMBERS = ["M", "N", "num_evals", "alpha", "alpha_weighted", "D", "xmin", "xmax", "num_pl_spikes",
           "spectral_norm", "norm", "stable_rank", "matrix_rank", "entropy"]
LORA_R, LORA_ALPHA = 4, 16          # scaling α/r = 4 (not 1: an unscaled update would not match)



def run(args, env, cwd, timeout=600):
    return subprocess.run(RUN + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def result_of(out: Path, model_id: str) -> pd.DataFrame:
    frames = [pd.read_csv(p) for p in out.glob("*.csv") if not p.name.startswith(("summary", "runs"))]
    rows = pd.concat(frames)
    return rows[rows["model_id"] == model_id].reset_index(drop=True)


def worker_log(out: Path, model_dir: Path) -> str:
    from esd.model_list import make_entry
    return make_entry(str(model_dir), None, None).paths(out).worker_log.read_text()


def assert_same_esd(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert list(got["longname"]) == list(expected["longname"])
    for column in NUMBERS:
        np.testing.assert_allclose(pd.to_numeric(got[column]).to_numpy(dtype=float),
                                   pd.to_numeric(expected[column]).to_numpy(dtype=float),
                                   rtol=1e-7, atol=0, equal_nan=True, err_msg=column)
    assert list(got["fit_status"]) == list(expected["fit_status"])


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """One run with both flags and one without, over the same three models."""
    root = tmp_path_factory.mktemp("modes")
    base = save_llama(root / "base", seed=0)
    tuned = save_fine_tune(base, root / "tuned", seed=7)
    adapter = save_lora_adapter(base, root / "adapter", r=LORA_R, lora_alpha=LORA_ALPHA,
                                target_modules=["q_proj", "v_proj", "down_proj"])
    model_list = write_model_list(root / "models.csv", [
        {"model_id": str(base)},
        {"model_id": str(tuned), "source_model": str(base), "base_model_relation": "finetune"},
        {"model_id": str(adapter), "source_model": str(base), "base_model_relation": "adapter"},
    ])
    env = offline_env(root)
    with_modes, without = root / "with_modes", root / "without"
    first = run(["--model_list", str(model_list), "--output_dir", str(with_modes), *FAST, *MODES], env, root)
    assert first.returncode == 0, first.stdout + first.stderr
    plain = run(["--model_list", str(model_list), "--output_dir", str(without), *FAST], env, root)
    assert plain.returncode == 0, plain.stdout + plain.stderr
    return {"root": root, "base": base, "tuned": tuned, "adapter": adapter, "list": model_list,
            "env": env, "with": with_modes, "without": without}


def test_delta_rows_are_the_esd_of_the_fine_tune_minus_its_base(experiment):
    rows = result_of(experiment["with"], str(experiment["tuned"]))
    weights = rows[~rows["longname"].str.endswith(".delta_from_base")]
    deltas = rows[rows["longname"].str.endswith(".delta_from_base")].reset_index(drop=True)
    assert list(deltas["longname"]) == [f"{name}.delta_from_base" for name in weights["longname"]]
    tuned = load_file(str(experiment["tuned"] / "model.safetensors"))
    base = load_file(str(experiment["base"] / "model.safetensors"))
    matrices = [(f"{name}.delta_from_base", kind, tuned[f"{name}.weight"] - base[f"{name}.weight"])
                for name, kind in zip(weights["longname"], weights["layer_type"])]
    assert_same_esd(deltas, analyze_layers(matrices, ESDSettings()))
    assert (deltas["source_model"] == str(experiment["base"])).all()


def test_adapter_update_rows_are_the_esd_of_the_scaled_lora_update_alone(experiment):
    rows = result_of(experiment["with"], str(experiment["adapter"]))
    updates = rows[rows["longname"].str.endswith(".adapter_update")].reset_index(drop=True)
    lora = load_file(str(experiment["adapter"] / "adapter_model.safetensors"))
    config = json.loads((experiment["adapter"] / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    assert scaling == LORA_ALPHA / LORA_R
    expected = {}
    for key in sorted(lora):
        if key.endswith(".lora_A.weight"):
            module = key[len("base_model.model."):-len(".lora_A.weight")]
            b = lora[key.replace(".lora_A.", ".lora_B.")]
            expected[f"{module}.adapter_update"] = scaling * (b @ lora[key])   # (out, r) @ (r, in)
    assert set(updates["longname"]) == set(expected) and len(expected) == 6   # 2 layers x 3 modules
    matrices = [(name, "linear", expected[name]) for name in updates["longname"]]
    assert_same_esd(updates, analyze_layers(matrices, ESDSettings()))
    assert updates["is_adapter"].all()


def test_weight_rows_and_summary_are_the_same_with_and_without_the_flags(experiment):
    with_modes, without = experiment["with"], experiment["without"]
    for model in ("base", "tuned", "adapter"):
        rows = result_of(with_modes, str(experiment[model]))
        plain = result_of(without, str(experiment[model]))
        weights = rows[~rows["longname"].str.contains(r"\.(?:delta_from_base|adapter_update)$")]
        pd.testing.assert_frame_equal(weights.reset_index(drop=True), plain, check_dtype=False)
    pd.testing.assert_frame_equal(pd.read_csv(with_modes / "summary.csv"),
                                  pd.read_csv(without / "summary.csv"))
    assert not (without / "summary_delta_from_base.csv").exists()


def test_extra_rows_get_their_own_summary_files(experiment):
    out = experiment["with"]
    deltas = pd.read_csv(out / "summary_delta_from_base.csv")
    updates = pd.read_csv(out / "summary_adapter_update.csv")
    assert list(deltas["model_id"]) == [str(experiment["tuned"])]
    assert list(updates["model_id"]) == [str(experiment["adapter"])]
    rows = result_of(out, str(experiment["tuned"]))
    delta_alpha = rows.loc[rows["longname"].str.endswith(".delta_from_base"), "alpha"].dropna()
    assert deltas.loc[0, "num_layers"] == (rows["longname"].str.endswith(".delta_from_base")).sum()
    assert deltas.loc[0, "alpha_mean"] == pytest.approx(delta_alpha.mean(), rel=1e-12)
    assert updates.loc[0, "num_layers"] == 6


def test_worker_log_counts_layers_of_every_mode_and_notes_flags_that_add_nothing(experiment):
    out = experiment["with"]
    for model, extra in (("tuned", None), ("adapter", 6), ("base", 0)):
        text = worker_log(out, experiment[model])
        weights = len(result_of(experiment["without"], str(experiment[model])))
        total = 2 * weights if extra is None else weights + extra
        counts = re.findall(r"layer\s+(\d+)/(\d+)", text)
        assert [int(i) for i, _ in counts] == list(range(1, total + 1)), text
        assert {int(n) for _, n in counts} == {total}, text
    base_log = worker_log(out, experiment["base"])
    assert base_log.count("--delta_from_base adds nothing: no source_model") == 1
    assert base_log.count("--adapter_update adds nothing: not an adapter") == 1
    adapter_log = worker_log(out, experiment["adapter"])
    assert adapter_log.count("--delta_from_base adds nothing") == 1
    assert "FAILED" not in base_log + adapter_log


def test_a_rerun_with_other_modes_is_refused_and_the_same_modes_are_already_done(experiment):
    args = ["--model_list", str(experiment["list"]), "--output_dir", str(experiment["with"]), *FAST]
    refused = run(args + ["--delta_from_base"], experiment["env"], experiment["root"])
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "adapter_update: True there, False asked" in refused.stderr
    assert (experiment["with"] / "esd_settings.json").exists()
    assert json.loads((experiment["with"] / "esd_settings.json").read_text())["adapter_update"] is True
    again = run(args + MODES, experiment["env"], experiment["root"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "3 already done" in again.stdout and "0 to run" in again.stdout


def test_analyze_results_keeps_modes_apart_and_layer_mode_selects_one(experiment, capsys):
    import analyze_results
    out = experiment["with"]
    before = pd.read_csv(out / "summary.csv")
    assert analyze_results.main(["--results_dir", str(out), "--layer_mode", "delta_from_base",
                                 "--show", "model_id", "num_layers", "--plots"]) == 0
    printed = capsys.readouterr().out
    assert str(experiment["tuned"]) in printed and str(experiment["adapter"]) not in printed
    assert (out / "plots" / "delta_from_base" / "alpha_by_depth.png").is_file()
    pd.testing.assert_frame_equal(pd.read_csv(out / "summary.csv"), before)
    per_layer = analyze_results.load_per_layer(out)
    weights = analyze_results.select_layers(per_layer)
    assert not weights["longname"].str.contains(r"\.(?:delta_from_base|adapter_update)$").any()
    assert set(per_layer["layer_mode"]) == {"weights", "delta_from_base", "adapter_update"}
    deltas = per_layer[per_layer["layer_mode"] == "delta_from_base"]
    assert list(deltas["layer_index"]) == list(range(len(deltas)))   # depth within its own mode
    page = analyze_results.write_report(out).read_text()
    assert "Fine-tune deltas and adapter updates" in page


def test_analyze_results_layer_mode_without_such_rows_says_how_to_get_them(experiment, capsys):
    import analyze_results
    assert analyze_results.main(["--results_dir", str(experiment["without"]),
                                 "--layer_mode", "adapter_update"]) == 2
    assert "run with --adapter_update" in capsys.readouterr().err


def _delta_worker(experiment, base: Path, out: Path) -> subprocess.CompletedProcess:
    """The worker on the fine-tune with `base` as its source_model, --delta_from_base."""
    return subprocess.run(WORKER + ["--model_id", str(experiment["tuned"]), "--source_model", str(base),
                                    "--output_dir", str(out), "--device", "cpu", "--delta_from_base"],
                          env=experiment["env"], capture_output=True, text=True, timeout=300)


def test_a_base_of_other_shapes_is_a_typed_failure_naming_the_layer(experiment, tmp_path):
    other = save_llama(tmp_path / "other", intermediate=96)
    out = tmp_path / "out"
    result = _delta_worker(experiment, other, out)
    assert result.returncode == 1, result.stdout + result.stderr
    record = json.loads((out / "failures.jsonl").read_text().splitlines()[-1])
    assert (record["stage"], record["reason"]) == ("merge", "base_mismatch")
    assert "model.layers.0.mlp.up_proj: [128, 64] vs base [96, 64]" in record["message"]
    assert not list(out.glob("*.csv"))     # no half result: the weight rows are not written alone
    assert not re.search(r"layer\s+\d", result.stdout)   # failed before any layer was computed


def test_a_missing_base_is_a_typed_failure_naming_the_base(experiment, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "no_such_base"
    result = _delta_worker(experiment, missing, out)
    assert result.returncode == 1, result.stdout + result.stderr
    record = json.loads((out / "failures.jsonl").read_text().splitlines()[-1])
    assert record["stage"] == "resolve" and f"base {missing} of {experiment['tuned']}" in record["message"]
    assert not re.search(r"layer\s+\d", result.stdout)


def test_a_directory_from_before_the_flags_existed_is_accepted_by_the_worker(experiment, tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    older = {k: v for k, v in asdict(ESDSettings()).items() if k not in ("delta_from_base", "adapter_update")}
    (out / "esd_settings.json").write_text(json.dumps(older))
    result = subprocess.run(WORKER + ["--model_id", str(experiment["base"]), "--output_dir", str(out),
                                      "--device", "cpu"],
                            env=experiment["env"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (out / "failures.jsonl").exists() or not (out / "failures.jsonl").read_text().strip()


def test_worker_argv_carries_the_modes_to_every_backend(tmp_path):
    import esd_worker
    from esd.model_list import make_entry
    entry = make_entry("org/name", None, "org/base")
    argv = esd_worker.worker_argv(entry, tmp_path, ESDSettings(delta_from_base=True))
    config = esd_worker.parse_config(argv)
    assert config.esd.delta_from_base and not config.esd.adapter_update
    assert "--delta_from_base" in argv and "--no_adapter_update" in argv


def test_api_analyze_model_adds_delta_rows_and_get_summary_stays_the_weights_one(experiment):
    import esd_api
    tuned, base = str(experiment["tuned"]), str(experiment["base"])
    with_deltas = esd_api.analyze_model(tuned, source_model=base, device="cpu", delta_from_base=True)
    plain = esd_api.analyze_model(tuned, source_model=base, device="cpu")
    assert len(with_deltas) == 2 * len(plain)
    assert with_deltas["longname"].str.endswith(".delta_from_base").sum() == len(plain)
    assert esd_api.get_summary(with_deltas) == pytest.approx(esd_api.get_summary(plain), nan_ok=True)
    with pytest.raises(ValueError, match="not an in-memory module"):
        esd_api.analyze_model(torch.nn.Linear(8, 8), delta_from_base=True)


PLAN_CASES = {
    # modules_to_save on GPT-2's tied lm_head (peft unties it: one layer more than the base)
    "gpt2_lora_modules_to_save": ("gpt2", dict(r=4, lora_alpha=8, fan_in_fan_out=True,
                                               target_modules=["c_attn", "wte"], modules_to_save=["lm_head"])),
    "bert_lora_modules_to_save": ("bert", dict(r=3, lora_alpha=7, target_modules=["query", "value"],
                                               modules_to_save=["pooler.dense"])),
    "llama_dora_merged_by_peft": ("llama", dict(r=4, lora_alpha=8, use_dora=True,
                                                target_modules=["q_proj", "v_proj"])),
}


@pytest.mark.parametrize("case", sorted(PLAN_CASES))
def test_the_loaders_announced_counts_are_the_layers_it_yields(tmp_path, case):
    """`layer i/n` is only right if n is: each mode's announced count against what it yields."""
    from loader_models import save_adapter, save_model
    from model_loader import iter_layers, resolve_model
    kind, lora = PLAN_CASES[case]
    base = save_model(kind, tmp_path / "base")
    adapter = resolve_model(str(save_adapter(kind, base, tmp_path / "adapter", **lora)), warn=lambda m: None)
    for resolved, modes in ((adapter, ["weights"] + ["adapter_update"] * ("dora" not in case)),
                            (resolve_model(str(base)), ["weights"])):
        announced = {}
        weights = list(iter_layers(resolved, on_plan=announced.update))
        assert announced["weights"] == len(weights)
        if "adapter_update" in modes:
            updates = list(iter_layers(resolved, mode="adapter_update"))
            assert announced["adapter_update"] == len(updates) > 0
    tuned = resolve_model(str(base), source_model=str(base))   # a fine-tune identical to its base
    announced = {}
    deltas = list(iter_layers(tuned, mode="delta_from_base", on_plan=announced.update))
    assert announced == {"delta_from_base": len(deltas), "weights": len(weights)}
    assert len(deltas) == len(weights)


def test_adapter_update_on_an_ia3_adapter_adds_nothing_and_says_why(tmp_path):
    from peft import IA3Config
    from loader_models import save_adapter, save_model
    base = save_model("llama", tmp_path / "base")
    adapter = save_adapter("llama", base, tmp_path / "ia3", peft_config=IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    out = tmp_path / "out"
    result = subprocess.run(WORKER + ["--model_id", str(adapter), "--output_dir", str(out), "--device", "cpu",
                                      "--adapter_update"],
                            env=offline_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("--adapter_update adds nothing: the adapter has no plain LoRA update") == 1
    assert "peft_type IA3" in result.stdout
    rows = pd.concat(pd.read_csv(p) for p in out.glob("*.csv"))
    assert len(rows) and not rows["longname"].str.endswith(".adapter_update").any()


def test_api_run_experiment_takes_the_modes_as_keywords(experiment, tmp_path, monkeypatch):
    import esd_api
    for name, value in experiment["env"].items():
        monkeypatch.setenv(name, value)
    models = pd.DataFrame({"model_id": [str(experiment["tuned"])], "source_model": [str(experiment["base"])]})
    out = tmp_path / "api"
    assert esd_api.run_experiment(models, out, gpus="none", delta_from_base=True, adapter_update=False) == 0
    per_layer, summary = esd_api.load_results(out)
    assert set(per_layer["layer_mode"]) == {"weights", "delta_from_base"}
    assert json.loads((out / "esd_settings.json").read_text())["delta_from_base"] is True
    plain = pd.read_csv(experiment["without"] / "summary.csv")
    pd.testing.assert_frame_equal(summary.reset_index(drop=True),
                                  plain[plain["model_id"] == str(experiment["tuned"])].reset_index(drop=True),
                                  check_dtype=False)


def test_saved_eigenvalues_hold_the_extra_rows_under_their_own_names(experiment, tmp_path, capsys):
    out = tmp_path / "eigs_run"
    result = subprocess.run(WORKER + ["--model_id", str(experiment["tuned"]), "--source_model",
                                      str(experiment["base"]), "--output_dir", str(out), "--device", "cpu",
                                      "--delta_from_base", "--save_eigs"],
                            env=experiment["env"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = pd.concat(pd.read_csv(p) for p in out.glob("*.csv"))
    (eigs_file,) = (out / "eigs").glob("*.npz")
    with np.load(eigs_file) as eigs:
        assert set(eigs.files) == set(rows["longname"])
        name = "model.layers.0.self_attn.q_proj"
        assert not np.array_equal(eigs[name], eigs[f"{name}.delta_from_base"])
        row = rows[rows["longname"] == f"{name}.delta_from_base"].iloc[0]
        assert eigs[f"{name}.delta_from_base"].max() == pytest.approx(row["spectral_norm"], rel=1e-6)  # λ_max
    import analyze_results
    assert analyze_results.main(["--results_dir", str(out), "--layer_mode", "delta_from_base", "--plots",
                                 "--esd_layer", f"{name}.delta_from_base"]) == 0
    assert list((out / "plots" / "delta_from_base" / "esd").glob("*.png"))


def test_the_training_warning_is_left_empty_on_delta_rows(experiment, tmp_path):
    """`under-trained` / `over-trained` read a weight matrix's alpha; a difference's alpha says
    nothing of the training. Heavy-tailed (Cauchy) differences get alphas < 2 under DKS, which
    on a weight row would read `over-trained`."""
    from esd.baselines import training_warning
    base = experiment["base"]
    tuned = tmp_path / "cauchy"
    tuned.mkdir()
    state = load_file(str(base / "model.safetensors"))
    torch.manual_seed(0)
    for key in state:
        state[key] = state[key] + 0.01 * torch.distributions.StudentT(1.0).sample(state[key].shape)
    save_file(state, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    (tuned / "config.json").write_text((base / "config.json").read_text())
    out = tmp_path / "dks"
    result = subprocess.run(WORKER + ["--model_id", str(tuned), "--source_model", str(base),
                                      "--output_dir", str(out), "--device", "cpu",
                                      "--delta_from_base", "--fix_fingers", "DKS"],
                            env=experiment["env"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = pd.concat(pd.read_csv(p, dtype={"warning": str}) for p in out.glob("*.csv"))
    deltas = rows[rows["longname"].str.endswith(".delta_from_base")]
    assert deltas["warning"].fillna("").eq("").all()
    assert any(training_warning(alpha) for alpha in deltas["alpha"])   # as weight rows: warned
