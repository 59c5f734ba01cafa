"""Adapters: the streaming LoRA merge equals peft's merge_and_unload, layer by layer."""
from __future__ import annotations

import json

import pytest
import torch

from esd.failures import ESDFailure
from loader_models import (assert_same_layers, offline_hub, peft_merged, save_adapter,  # noqa: F401
                           save_model, streamed)
from model_loader import iter_layers, resolve_model

LORA_CASES = {
    # GPT-2 (Conv1D, fan_in_fan_out), LoRA on the embedding, per-module rank/alpha patterns,
    # modules_to_save on the tied lm_head (peft unties it).
    "gpt2_fan_in_fan_out_patterns": ("gpt2", dict(
        r=4, lora_alpha=8, fan_in_fan_out=True, target_modules=["c_attn", "c_proj", "c_fc", "wte"],
        rank_pattern={"h.1.attn.c_attn": 2, "^transformer.h.0.mlp.c_fc": 6},
        alpha_pattern={"c_proj": 3, "transformer.h.1.mlp.c_fc": 32}, modules_to_save=["lm_head"])),
    "gpt2_rslora": ("gpt2", dict(r=8, lora_alpha=16, use_rslora=True, fan_in_fan_out=True,
                                 target_modules=["c_attn", "c_fc"])),
    "llama_patterns_modules_to_save": ("llama", dict(
        r=2, lora_alpha=5, target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "embed_tokens"],
        rank_pattern={"model.layers.1.self_attn.q_proj": 6, "gate_proj": 3},
        alpha_pattern={"o_proj": 11}, modules_to_save=["lm_head"])),
    "llama_rslora_regex_targets": ("llama", dict(
        r=4, lora_alpha=8, use_rslora=True, target_modules=r".*\.(k|q|down)_proj")),
    "bert_modules_to_save": ("bert", dict(
        r=3, lora_alpha=7, target_modules=["query", "value", "dense"],
        rank_pattern={"attention.output.dense": 5}, modules_to_save=["pooler.dense"])),
}


@pytest.mark.parametrize("case", sorted(LORA_CASES))
def test_streamed_lora_merge_equals_peft_merge_and_unload(tmp_path, case):
    kind, lora = LORA_CASES[case]
    base = save_model(kind, tmp_path / "base")
    adapter = save_adapter(kind, base, tmp_path / "adapter", **lora)
    resolved = resolve_model(str(adapter))
    assert resolved.is_adapter and resolved.base.local_dir == base
    assert resolved.source_model == str(base)
    got = streamed(resolved)
    want = peft_merged(kind, base, adapter)
    assert_same_layers(got, want, atol=1e-6)
    # the merge changed the targeted layers (the adapter is not a no-op)
    unmerged = streamed(resolve_model(str(base)))
    assert any(not torch.allclose(got[n], unmerged[n]) for n in unmerged if n in got)


def test_dora_adapter_is_merged_by_peft_and_equals_merge_and_unload(tmp_path):
    base = save_model("llama", tmp_path / "base")
    adapter = save_adapter("llama", base, tmp_path / "dora", r=4, lora_alpha=8, use_dora=True,
                           target_modules=["q_proj", "v_proj", "up_proj"])
    warnings = []
    got = streamed(resolve_model(str(adapter), warn=warnings.append))
    assert any("use_dora" in w and "peft" in w for w in warnings)
    assert_same_layers(got, peft_merged("llama", base, adapter), atol=1e-6)


def test_ia3_adapter_is_merged_by_peft(tmp_path):
    from peft import IA3Config
    base = save_model("llama", tmp_path / "base")
    adapter = save_adapter("llama", base, tmp_path / "ia3", peft_config=IA3Config(
        target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    got = streamed(resolve_model(str(adapter), warn=lambda m: None))
    assert_same_layers(got, peft_merged("llama", base, adapter), atol=1e-6)


def test_source_model_argument_wins_over_the_adapter_config_with_a_warning(tmp_path):
    base = save_model("gpt2", tmp_path / "base")
    adapter = save_adapter("gpt2", base, tmp_path / "ad", base_id="someone/elsewhere",
                           target_modules=["c_attn"], fan_in_fan_out=True)
    warnings = []
    resolved = resolve_model(str(adapter), source_model=str(base), base_model_relation="base",
                             warn=warnings.append)
    assert resolved.is_adapter and resolved.source_model == str(base)
    assert any("differs" in w for w in warnings)
    assert any("files are an adapter" in w for w in warnings)


def test_adapter_that_does_not_fit_its_base_fails_before_any_layer_is_merged(tmp_path):
    trained_on = save_model("gpt2", tmp_path / "wide")
    adapter = save_adapter("gpt2", trained_on, tmp_path / "ad", target_modules=["c_attn"],
                           fan_in_fan_out=True)
    from loader_models import build
    torch.manual_seed(0)
    narrow = build("gpt2", n_embd=32)
    narrow.save_pretrained(tmp_path / "narrow")
    layers = iter_layers(resolve_model(str(adapter), source_model=str(tmp_path / "narrow")))
    with pytest.raises(ESDFailure) as info:
        next(layers)
    failure = info.value
    assert (failure.stage, failure.reason, failure.retryable) == ("merge", "adapter_mismatch", False)
    assert "transformer.h.0.attn.c_attn" in failure.message and "[32, 96]" in failure.message


def test_adapter_for_modules_the_base_lacks_fails_as_mismatch(tmp_path):
    llama = save_model("llama", tmp_path / "llama")
    adapter = save_adapter("llama", llama, tmp_path / "ad", target_modules=["q_proj"])
    gpt2 = save_model("gpt2", tmp_path / "gpt2")
    with pytest.raises(ESDFailure) as info:
        list(iter_layers(resolve_model(str(adapter), source_model=str(gpt2))))
    assert info.value.reason == "adapter_mismatch" and "q_proj" in info.value.message


def test_adapter_whose_base_is_missing_fails_as_adapter_base_unresolved(tmp_path):
    base = save_model("gpt2", tmp_path / "base")
    adapter = save_adapter("gpt2", base, tmp_path / "ad", base_id=str(tmp_path / "gone"),
                           target_modules=["c_attn"], fan_in_fan_out=True)
    with pytest.raises(ESDFailure) as info:
        resolve_model(str(adapter))
    assert (info.value.stage, info.value.reason) == ("resolve", "adapter_base_unresolved")
    assert "gone" in info.value.message


def test_adapter_without_any_base_fails_as_adapter_base_unresolved(tmp_path):
    base = save_model("gpt2", tmp_path / "base")
    adapter = save_adapter("gpt2", base, tmp_path / "ad", target_modules=["c_attn"],
                           fan_in_fan_out=True)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ESDFailure) as info:
        resolve_model(str(adapter))
    assert info.value.reason == "adapter_base_unresolved"


def test_adapter_rank_that_contradicts_its_config_fails_as_mismatch(tmp_path):
    base = save_model("llama", tmp_path / "base")
    adapter = save_adapter("llama", base, tmp_path / "ad", r=4, target_modules=["q_proj"])
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = 8   # the scaling would silently be halved
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ESDFailure) as info:
        list(iter_layers(resolve_model(str(adapter))))
    assert info.value.reason == "adapter_mismatch" and "rank" in info.value.message


def _base_with_a_hole(base, how: str) -> None:
    """Break a saved llama base so its checkpoint no longer fits its own config.json."""
    from safetensors.torch import load_file, save_file
    if how == "shape":     # config says a bigger vocabulary than the checkpoint holds
        config = json.loads((base / "config.json").read_text())
        config["vocab_size"] += 8
        (base / "config.json").write_text(json.dumps(config))
    else:                  # a tensor the architecture needs is not in the checkpoint
        state = load_file(str(base / "model.safetensors"))
        del state["model.layers.1.mlp.up_proj.weight"]
        save_file(state, str(base / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("how", ["shape", "name"])
@pytest.mark.parametrize("adapter_type", ["ia3", "dora"])
def test_peft_merge_refuses_a_base_whose_checkpoint_does_not_fit_instead_of_random_weights(
        tmp_path, how, adapter_type):
    from peft import IA3Config, LoraConfig
    base = save_model("llama", tmp_path / "base")
    peft_config = IA3Config(target_modules=["k_proj", "down_proj"],
                            feedforward_modules=["down_proj"]) if adapter_type == "ia3" else \
        LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False,
                   target_modules=["q_proj", "v_proj"])
    adapter = save_adapter("llama", base, tmp_path / adapter_type, peft_config=peft_config)
    _base_with_a_hole(base, how)
    with pytest.raises(ESDFailure) as info:
        streamed(resolve_model(str(adapter), warn=lambda m: None))
    failure = info.value
    assert (failure.stage, failure.reason, failure.retryable) == ("merge", "adapter_mismatch", False)
    named = "model.embed_tokens" if how == "shape" else "model.layers.1.mlp.up_proj"
    assert named in failure.message
