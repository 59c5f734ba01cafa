"""Fine-tunes and adapters analysed as differences: `iter_layers(mode="delta_from_base")`
(W_ft − W_base) and `iter_layers(mode="adapter_update")` ((α/r)·B·A alone)."""
from __future__ import annotations

import pytest
import torch

from esd.failures import ESDFailure
from loader_models import (analysable_weights, load_model, offline_hub, peft_merged,  # noqa: F401
                           save_adapter, save_model, streamed)
from model_loader import iter_layers, resolve_model
from tiny_models import save_fine_tune


def test_delta_from_base_streams_the_fine_tunes_difference_under_its_own_layer_names(tmp_path):
    base = save_model("llama", tmp_path / "base")
    tuned = save_fine_tune(base, tmp_path / "tuned", seed=3, scale=0.01,
                           changed=["model.layers.0.self_attn.q_proj.weight"])
    got = streamed(resolve_model(str(tuned), source_model=str(base)), mode="delta_from_base")
    weights_tuned = streamed(resolve_model(str(tuned)))
    weights_base = streamed(resolve_model(str(base)))
    assert set(got) == {f"{name}.delta_from_base" for name in weights_tuned}
    for name in weights_tuned:
        assert torch.equal(got[f"{name}.delta_from_base"], weights_tuned[name] - weights_base[name])
    q = got["model.layers.0.self_attn.q_proj.delta_from_base"]
    assert q.abs().max() > 0 and got["model.layers.1.mlp.up_proj.delta_from_base"].abs().max() == 0


def test_delta_from_base_with_a_base_of_other_shapes_fails_before_any_layer(tmp_path):
    tuned = save_model("llama", tmp_path / "tuned")
    other = save_model("llama", tmp_path / "other", config={"intermediate_size": 96})
    layers = iter_layers(resolve_model(str(tuned), source_model=str(other)),
                         mode="delta_from_base")
    with pytest.raises(ESDFailure) as info:
        next(layers)
    assert (info.value.stage, info.value.reason) == ("merge", "base_mismatch")
    assert "model.layers.0.mlp.up_proj: [128, 64] vs base [96, 64]" in info.value.message


def test_delta_from_base_without_a_source_model_is_a_typed_failure(tmp_path):
    tuned = save_model("llama", tmp_path / "tuned")
    with pytest.raises(ESDFailure) as info:
        list(iter_layers(resolve_model(str(tuned)), mode="delta_from_base"))
    assert info.value.reason == "base_unresolved" and "source_model" in info.value.message


def test_adapter_update_streams_the_scaled_lora_update_alone(tmp_path):
    base = save_model("llama", tmp_path / "base")
    adapter = save_adapter("llama", base, tmp_path / "ad", r=4, lora_alpha=8,
                           target_modules=["q_proj", "v_proj"])
    got = streamed(resolve_model(str(adapter)), mode="adapter_update")
    merged = peft_merged("llama", base, adapter)
    original = analysable_weights(load_model("llama", base))
    targeted = [n for n in original if n.endswith(("q_proj", "v_proj"))]
    assert set(got) == {f"{name}.adapter_update" for name in targeted}
    for name in targeted:
        want = merged[name] - original[name]
        assert (got[f"{name}.adapter_update"] - want).abs().max() <= 1e-6
        assert want.abs().max() > 0


def test_adapter_update_of_a_gpt2_conv1d_lora_has_the_stored_orientation(tmp_path):
    base = save_model("gpt2", tmp_path / "base")
    adapter = save_adapter("gpt2", base, tmp_path / "ad", target_modules=["c_attn"],
                           fan_in_fan_out=True)
    got = streamed(resolve_model(str(adapter)), mode="adapter_update")
    merged = peft_merged("gpt2", base, adapter)
    original = analysable_weights(load_model("gpt2", base))
    name = "transformer.h.0.attn.c_attn"
    assert got[f"{name}.adapter_update"].shape == original[name].shape == (64, 192)
    assert (got[f"{name}.adapter_update"] - (merged[name] - original[name])).abs().max() <= 1e-6


def test_adapter_update_of_a_dora_adapter_or_of_a_full_model_is_a_typed_failure(tmp_path):
    base = save_model("llama", tmp_path / "base")
    dora = save_adapter("llama", base, tmp_path / "dora", use_dora=True,
                        target_modules=["q_proj"])
    with pytest.raises(ESDFailure) as info:
        list(iter_layers(resolve_model(str(dora)), mode="adapter_update"))
    assert (info.value.stage, info.value.reason) == ("merge", "adapter_unsupported")
    assert "use_dora" in info.value.message
    with pytest.raises(ESDFailure) as info:
        list(iter_layers(resolve_model(str(base)), mode="adapter_update"))
    assert info.value.reason == "not_an_adapter"


def test_an_unknown_mode_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match="delta_from_base"):
        iter_layers(None, mode="deltas")
