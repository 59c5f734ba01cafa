"""Edge cases a researcher's model directory can hold: each yields correct layers or a typed
ESDFailure naming what is wrong (real files in temp dirs, offline hub)."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import net_esd
from esd.failures import ESDFailure
from loader_models import offline_hub, save_adapter, save_model, streamed  # noqa: F401
from model_loader import iter_layers, resolve_model


def _rows(path: str, **kwargs):
    return net_esd.net_esd_estimator(iter_layers(resolve_model(path, **kwargs))).set_index("longname")


def test_cnn_state_dict_without_config_yields_conv2d_conv1d_and_linear_with_svd_eigenvalues(tmp_path):
    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2, self.fc = nn.Conv2d(3, 16, 3), nn.Conv1d(16, 32, 5), nn.Linear(32, 12)

    torch.manual_seed(0)
    model = CNN()
    (tmp_path / "cnn").mkdir()
    torch.save(model.state_dict(), tmp_path / "cnn" / "pytorch_model.bin")
    eigs: dict = {}
    frame = net_esd.net_esd_estimator(iter_layers(resolve_model(str(tmp_path / "cnn"))),
                                      eigs_out=eigs).set_index("longname")
    assert dict(frame.layer_type) == {"c1": "conv2d", "c2": "conv1d", "fc": "linear"}
    assert (frame.loc["c1", "M"], frame.loc["c1", "num_evals"]) == (3, 27)
    for name, module in (("c1", model.c1), ("c2", model.c2)):
        w = module.weight.detach().double().numpy()
        slices = w.reshape(w.shape[0], w.shape[1], -1)
        want = np.sort(np.concatenate([np.linalg.svd(slices[:, :, p] * math.sqrt(0.5),
                                                     compute_uv=False) ** 2
                                       for p in range(slices.shape[2])]))
        np.testing.assert_allclose(eigs[name], want, rtol=1e-10)
    assert (frame.fit_status == "ok").all()


@pytest.mark.parametrize("r, alpha", [(None, 8), ("four", 8), (0, 8), (4, None)])
def test_adapter_config_with_unusable_r_or_lora_alpha_fails_as_corrupt_file(tmp_path, r, alpha):
    base = save_model("gpt2", tmp_path / "base")
    adapter = save_adapter("gpt2", base, tmp_path / "adapter", target_modules=["c_attn"],
                           fan_in_fan_out=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(r=r, lora_alpha=alpha)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ESDFailure) as info:
        list(iter_layers(resolve_model(str(adapter))))
    assert (info.value.stage, info.value.reason) == ("merge", "corrupt_file")
    assert ("lora_alpha" if alpha is None else "r must be") in info.value.message


def test_adapter_config_without_r_fails_as_mismatch_naming_the_default(tmp_path):
    base = save_model("gpt2", tmp_path / "base")
    adapter = save_adapter("gpt2", base, tmp_path / "adapter", target_modules=["c_attn"],
                           fan_in_fan_out=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["r"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ESDFailure) as info:
        list(iter_layers(resolve_model(str(adapter))))
    assert info.value.reason == "adapter_mismatch" and "has no r" in info.value.message


def test_tied_embedding_saved_twice_with_equal_values_is_analysed_once(tmp_path):
    base = save_model("gpt2", tmp_path / "base")
    state = load_file(base / "model.safetensors")
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    path = tmp_path / "tied"
    path.mkdir()
    shutil.copy(base / "config.json", path)
    save_file(state, path / "model.safetensors")
    assert "lm_head" not in streamed(resolve_model(str(path)))


def test_tied_lm_head_saved_with_different_values_is_analysed_as_its_own_layer(tmp_path):
    base = save_model("gpt2", tmp_path / "base")
    state = load_file(base / "model.safetensors")
    state["lm_head.weight"] = torch.randn_like(state["transformer.wte.weight"])
    path = tmp_path / "untied"
    path.mkdir()
    shutil.copy(base / "config.json", path)
    save_file(state, path / "model.safetensors")
    warnings: list[str] = []
    got = streamed(resolve_model(str(path), warn=warnings.append))
    assert torch.equal(got["lm_head"], state["lm_head.weight"])
    assert torch.equal(got["transformer.wte"], state["transformer.wte.weight"])
    assert any("lm_head" in w and "different" in w for w in warnings)


def test_integer_layer_weights_fail_as_quantized_unsupported(tmp_path):
    (tmp_path / "int8").mkdir()
    save_file({"fc.weight": torch.randint(-5, 5, (20, 30), dtype=torch.int8),
               "out.weight": torch.randn(30, 20)}, tmp_path / "int8" / "model.safetensors")
    with pytest.raises(ESDFailure) as info:
        list(iter_layers(resolve_model(str(tmp_path / "int8"))))
    assert info.value.reason == "quantized_unsupported" and "fc.weight" in info.value.message


def test_shard_missing_a_tensor_its_index_names_fails_as_corrupt_file(tmp_path):
    path = save_model("llama", tmp_path / "sharded", max_shard_size="40KB")
    shard = sorted(path.glob("model-*.safetensors"))[3]
    state = load_file(shard)
    dropped = sorted(state)[0]
    del state[dropped]
    state["unrelated.bias"] = torch.zeros(1)
    save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises(ESDFailure) as info:
        list(iter_layers(resolve_model(str(path))))
    assert info.value.reason == "corrupt_file" and dropped in info.value.message


def test_special_layers_give_rows_with_their_status_not_errors(tmp_path):
    gen = torch.Generator().manual_seed(0)
    weights = {"ok.weight": torch.randn(20, 30, generator=gen),
               "nan.weight": torch.randn(20, 30, generator=gen),
               "zero.weight": torch.zeros(20, 30), "row.weight": torch.randn(1, 50, generator=gen),
               "col.weight": torch.randn(50, 1, generator=gen), "empty.weight": torch.zeros(0, 30)}
    weights["nan.weight"][3, 4] = math.nan
    (tmp_path / "m").mkdir()
    save_file(weights, tmp_path / "m" / "model.safetensors")
    rows = _rows(str(tmp_path / "m"))
    assert dict(rows.fit_status) == {
        "col": "too_few_eigenvalues", "empty": "no_eigenvalue_above_threshold",
        "nan": "non_finite_weights", "ok": "ok", "row": "too_few_eigenvalues",
        "zero": "no_eigenvalue_above_threshold"}
    assert rows.loc["row", "spectral_norm"] == pytest.approx(
        float((weights["row.weight"].double() ** 2).sum()), rel=1e-12)


def test_fp16_weights_whose_squares_overflow_fp16_are_exact(tmp_path):
    w = (torch.randn(40, 60, generator=torch.Generator().manual_seed(0)) * 300).half()
    assert torch.isinf((w * w).sum())  # in fp16 the squares overflow
    (tmp_path / "m").mkdir()
    save_file({"big.weight": w}, tmp_path / "m" / "model.safetensors")
    eigs: dict = {}
    net_esd.net_esd_estimator(iter_layers(resolve_model(str(tmp_path / "m"))), eigs_out=eigs)
    want = np.sort(np.linalg.svd(w.double().numpy(), compute_uv=False) ** 2)
    np.testing.assert_allclose(eigs["big"], want, rtol=1e-10)


@pytest.mark.parametrize("method", ["DKS", "xmin_mid", "xmin_peak", "clip_xmax"])
def test_spectrum_of_equal_eigenvalues_has_no_candidate_with_every_method(method):
    fit = net_esd.fit_power_law(np.full(20, 3.0), method)
    assert fit.status == "no_candidate" and math.isnan(fit.alpha)


def test_tied_top_eigenvalues_are_no_candidate_but_the_tail_below_them_fits():
    x = np.concatenate([np.linspace(1, 2, 20), np.full(4, 3.0)])
    alphas = net_esd._candidate_alphas(torch.log(torch.tensor(x)))
    assert torch.isnan(alphas[20:]).all() and torch.isfinite(alphas[:20]).all()


def test_exactly_min_evals_eigenvalues_are_fitted_and_one_fewer_are_not():
    w = torch.randn(10, 40, generator=torch.Generator().manual_seed(0))
    assert net_esd.matrix_esd_metrics(w, "linear", min_evals=10)["fit_status"] == "ok"
    assert net_esd.matrix_esd_metrics(w[:9], "linear", min_evals=10)["fit_status"] == \
        "too_few_eigenvalues"
