"""model_loader on local directories: formats, layer discovery, streaming, failures."""
from __future__ import annotations

import json
import weakref

import pytest
import torch
from safetensors.torch import save_file

from esd.failures import ESDFailure
from loader_models import (analysable_weights, assert_same_layers, build, load_model,
                           offline_hub, save_model, streamed)  # noqa: F401 (autouse fixture)
from model_loader import iter_layers, resolve_model


@pytest.mark.parametrize("kind", ["gpt2", "llama", "bert"])
def test_streamed_layers_are_the_models_analysable_modules_with_equal_weights(tmp_path, kind):
    path = save_model(kind, tmp_path / kind)
    got = streamed(resolve_model(str(path)))
    assert_same_layers(got, analysable_weights(load_model(kind, path)), atol=0)


def test_gpt2_layer_types_and_tied_lm_head_yielded_once_under_the_embedding(tmp_path):
    path = save_model("gpt2", tmp_path / "gpt2")
    layers = [(name, kind) for name, kind, _ in iter_layers(resolve_model(str(path)))]
    names = [name for name, _ in layers]
    assert "lm_head" not in names and names.count("transformer.wte") == 1
    kinds = dict(layers)
    assert kinds["transformer.wte"] == "embedding" and kinds["transformer.wpe"] == "embedding"
    assert kinds["transformer.h.0.attn.c_attn"] == "linear"       # transformers Conv1D
    assert len(layers) == 2 + 2 * 4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_yield_float32_equal_to_the_stored_values(tmp_path, dtype):
    path = save_model("llama", tmp_path / "half", dtype=dtype)
    stored = {k: v.float() for k, v in analysable_weights(load_model("llama", path)).items()}
    from safetensors import safe_open
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight").dtype == dtype
        reference = f.get_tensor("model.layers.0.mlp.up_proj.weight").float()
    got = streamed(resolve_model(str(path)))
    assert torch.equal(got["model.layers.0.mlp.up_proj"], reference)
    assert_same_layers(got, stored, atol=0)


def test_sharded_safetensors_stream_like_a_single_file(tmp_path):
    single = save_model("llama", tmp_path / "single")
    sharded = save_model("llama", tmp_path / "sharded", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert_same_layers(streamed(resolve_model(str(sharded))),
                       streamed(resolve_model(str(single))), atol=0)


def test_pytorch_bin_checkpoints_are_read_with_mmap(tmp_path):
    reference = save_model("gpt2", tmp_path / "st")
    path = tmp_path / "bin"
    path.mkdir()
    (path / "config.json").write_text((reference / "config.json").read_text())
    state = load_model("gpt2", reference).state_dict()
    torch.save({k: v.clone() for k, v in state.items()}, path / "pytorch_model.bin")
    resolved = resolve_model(str(path))
    assert [p.name for p in resolved.weight_files] == ["pytorch_model.bin"]
    assert_same_layers(streamed(resolved), streamed(resolve_model(str(reference))), atol=0)


def test_sharded_pytorch_bin_via_its_index(tmp_path):
    reference = save_model("llama", tmp_path / "st")
    state = load_model("llama", reference).state_dict()
    path = tmp_path / "bin"
    path.mkdir()
    (path / "config.json").write_text((reference / "config.json").read_text())
    keys = sorted(state)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2],
              "pytorch_model-00002-of-00002.bin": keys[1::2]}
    weight_map = {}
    for shard, shard_keys in shards.items():
        torch.save({k: state[k].clone() for k in shard_keys}, path / shard)
        weight_map.update({k: shard for k in shard_keys})
    (path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert_same_layers(streamed(resolve_model(str(path))),
                       streamed(resolve_model(str(reference))), atol=0)


def test_training_checkpoint_directory_saved_with_save_pretrained(tmp_path):
    ckpt = tmp_path / "saved_models" / "run_7" / "checkpoint_500"
    save_model("gpt2", ckpt)
    for junk in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        torch.save({"step": torch.tensor(500)}, ckpt / junk)
    (ckpt / "trainer_state.json").write_text("{}")
    assert_same_layers(streamed(resolve_model(str(ckpt))),
                       analysable_weights(load_model("gpt2", ckpt)), atol=0)


def test_training_checkpoint_with_weights_in_a_subfolder_and_config_at_the_top(tmp_path):
    ckpt = tmp_path / "saved_models" / "run_7" / "checkpoint_100"
    save_model("llama", ckpt / "model")
    (ckpt / "config.json").write_text((ckpt / "model" / "config.json").read_text())
    (ckpt / "model" / "config.json").unlink()
    resolved = resolve_model(str(ckpt))
    assert resolved.weights_dir == ckpt / "model"
    model = build("llama")
    assert_same_layers(streamed(resolved), analysable_weights(model), atol=0)


def test_training_checkpoint_with_a_raw_state_dict_and_config(tmp_path):
    model = build("bert", seed=3)
    ckpt = tmp_path / "checkpoint_9"
    ckpt.mkdir()
    model.config.save_pretrained(ckpt)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()},
              str(ckpt / "model.safetensors"))
    assert_same_layers(streamed(resolve_model(str(ckpt))), analysable_weights(model), atol=0)


def test_nanogpt_style_checkpoint_without_config_uses_the_name_shape_rule(tmp_path):
    model = build("gpt2")
    state = {f"_orig_mod.{k}": v.clone() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    ckpt = tmp_path / "out"
    ckpt.mkdir()
    torch.save({"model": state, "iter_num": 10, "optimizer": {}}, ckpt / "ckpt.pt")
    warnings = []
    got = {n: (k, t) for n, k, t in iter_layers(resolve_model(str(ckpt), warn=warnings.append))}
    assert any("no config.json" in w for w in warnings)
    assert got["transformer.wte"][0] == "embedding" and got["transformer.wpe"][0] == "embedding"
    assert got["transformer.h.1.mlp.c_fc"][0] == "linear"
    assert not any("ln_" in n for n in got)             # 1-D weights are not layers
    assert torch.equal(got["transformer.h.0.attn.c_attn"][1],
                       model.transformer.h[0].attn.c_attn.weight)


def test_name_shape_rule_types_conv_weights_by_their_dimensions(tmp_path):
    path = tmp_path / "convnet"
    path.mkdir()
    save_file({"stem.conv.weight": torch.randn(8, 3, 3, 3), "tcn.conv.weight": torch.randn(8, 8, 5),
               "head.fc.weight": torch.randn(10, 8), "head.fc.bias": torch.randn(10),
               "token_embedding.weight": torch.randn(50, 8)}, str(path / "model.safetensors"))
    kinds = {n: k for n, k, _ in iter_layers(resolve_model(str(path), warn=lambda m: None))}
    assert kinds == {"stem.conv": "conv2d", "tcn.conv": "conv1d", "head.fc": "linear",
                     "token_embedding": "embedding"}


def test_unknown_architecture_falls_back_to_the_rule_with_a_warning(tmp_path):
    path = save_model("llama", tmp_path / "custom")
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="my_secret_arch", architectures=["MySecretForCausalLM"],
                  auto_map={"AutoModelForCausalLM": "modeling_secret.MySecretForCausalLM"})
    (path / "config.json").write_text(json.dumps(config))
    warnings = []
    got = streamed(resolve_model(str(path), warn=warnings.append))
    assert warnings and "name/shape rule" in warnings[-1]
    reference = analysable_weights(load_model("llama", save_model("llama", tmp_path / "ref")))
    assert set(got) == set(reference)


def test_truncated_safetensors_fails_as_corrupt_file(tmp_path):
    path = save_model("gpt2", tmp_path / "broken")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ESDFailure) as info:
        list(iter_layers(resolve_model(str(path))))
    assert (info.value.stage, info.value.reason, info.value.retryable) == \
        ("load", "corrupt_file", False)


def test_truncated_pytorch_bin_fails_as_corrupt_file(tmp_path):
    path = tmp_path / "broken_bin"
    path.mkdir()
    torch.save(build("gpt2").state_dict(), path / "pytorch_model.bin")
    data = (path / "pytorch_model.bin").read_bytes()
    (path / "pytorch_model.bin").write_bytes(data[: len(data) // 3])
    with pytest.raises(ESDFailure) as info:
        list(iter_layers(resolve_model(str(path))))
    assert (info.value.stage, info.value.reason) == ("load", "corrupt_file")


def test_garbage_header_fails_as_corrupt_file(tmp_path):
    path = tmp_path / "garbage"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ESDFailure) as info:
        list(iter_layers(resolve_model(str(path))))
    assert info.value.reason == "corrupt_file"


def test_quantized_config_fails_as_quantized_unsupported(tmp_path):
    path = save_model("llama", tmp_path / "gptq")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ESDFailure) as info:
        resolve_model(str(path))
    assert info.value.reason == "quantized_unsupported" and "gptq" in info.value.message


def test_directory_without_weights_fails_as_no_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(ESDFailure) as info:
        resolve_model(str(tmp_path / "empty"))
    assert (info.value.stage, info.value.reason) == ("load", "no_weights")


def test_gguf_only_directory_fails_as_unsupported_format(tmp_path):
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "model-q4.gguf").write_bytes(b"GGUF")
    with pytest.raises(ESDFailure) as info:
        resolve_model(str(tmp_path / "gguf"))
    assert info.value.reason == "unsupported_format"


def test_missing_local_path_and_invalid_ids_fail_typed(tmp_path):
    with pytest.raises(ESDFailure) as info:
        resolve_model(str(tmp_path / "saved_models" / "nope" / "checkpoint_1"))
    assert info.value.reason == "repo_not_found"
    for bad in ("org/na me", "org//name", "", "org/name/../x"):
        with pytest.raises(ESDFailure) as info:
            resolve_model(bad)
        assert info.value.reason in ("invalid_id", "repo_not_found"), bad
    with pytest.raises(ESDFailure) as info:
        resolve_model("org/na me")
    assert info.value.reason == "invalid_id"
    with pytest.raises(ESDFailure) as info:
        resolve_model("org/name@v1", revision="v2")
    assert info.value.reason == "invalid_id"


def test_relation_hint_that_disagrees_with_the_files_is_a_warning(tmp_path):
    path = save_model("gpt2", tmp_path / "full")
    warnings = []
    resolved = resolve_model(str(path), base_model_relation="adapter", warn=warnings.append)
    assert not resolved.is_adapter and any("no adapter_config.json" in w for w in warnings)


def test_streaming_keeps_at_most_two_layers_alive(tmp_path):
    """A model of 1024×4096 layers: the loader must hold no earlier layer while the next
    one is read (counted by weakrefs on every yielded tensor)."""
    path = tmp_path / "big"
    path.mkdir()
    save_file({f"blocks.{i}.proj.weight": torch.zeros(1024, 4096, dtype=torch.bfloat16)
               for i in range(5)}, str(path / "model.safetensors"))
    alive = set()
    peak = 0
    count = 0
    for index, (_, _, tensor) in enumerate(iter_layers(resolve_model(str(path), warn=print))):
        alive.add(index)
        weakref.finalize(tensor, alive.discard, index)
        peak = max(peak, len(alive))
        assert tensor.shape == (1024, 4096) and tensor.dtype == torch.float32
        count += 1
        del tensor
    assert count == 5
    assert peak <= 2, f"{peak} layers alive at once"
    assert not alive


def test_streaming_a_merged_adapter_keeps_at_most_two_layers_alive(tmp_path):
    from peft import LoraConfig
    from loader_models import save_adapter
    base = save_model("llama", tmp_path / "base")
    adapter = save_adapter("llama", base, tmp_path / "ad", peft_config=LoraConfig(
        r=2, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    alive, peak = set(), 0
    for index, (_, _, tensor) in enumerate(iter_layers(resolve_model(str(adapter)))):
        alive.add(index)
        weakref.finalize(tensor, alive.discard, index)
        peak = max(peak, len(alive))
        del tensor
    assert peak <= 2


def _remote_code_config(path):
    config = json.loads((path / "config.json").read_text())
    config.update(model_type="my_secret_arch", architectures=["MySecretForCausalLM"],
                  auto_map={"AutoConfig": "configuration_secret.SecretConfig",
                            "AutoModelForCausalLM": "modeling_secret.MySecretForCausalLM"})
    (path / "config.json").write_text(json.dumps(config))


def test_remote_code_architecture_without_the_flag_uses_the_rule_and_says_why(tmp_path):
    path = save_model("gpt2", tmp_path / "remote")
    _remote_code_config(path)
    warnings = []
    got = streamed(resolve_model(str(path), warn=warnings.append))
    assert any("trust_remote_code" in w for w in warnings)
    assert "transformer.h.0.attn.c_attn" in got


def test_remote_code_architecture_the_rule_cannot_read_fails_as_trust_remote_code_required(tmp_path):
    path = tmp_path / "remote"
    path.mkdir()
    save_file({"blocks.0.scale": torch.ones(8), "blocks.0.mix": torch.ones(8, 8)},
              str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "my_secret_arch"}))
    _remote_code_config(path)
    with pytest.raises(ESDFailure) as info:
        list(iter_layers(resolve_model(str(path), warn=lambda m: None)))
    assert (info.value.stage, info.value.reason) == ("load", "trust_remote_code_required")


def _no_config_checkpoint(path):
    path.mkdir()
    save_file({"head.fc.weight": torch.randn(10, 8)}, str(path / "model.safetensors"))
    return path


def test_loader_warnings_go_to_the_model_loader_logger_without_a_callback(tmp_path, caplog):
    path = _no_config_checkpoint(tmp_path / "noconfig")
    with caplog.at_level("WARNING", logger="model_loader"):
        streamed(resolve_model(str(path)))
    assert any(r.name == "model_loader" and "no config.json" in r.getMessage()
               for r in caplog.records)


def test_a_warn_callback_takes_the_warnings_instead_of_the_logger(tmp_path, caplog):
    path = _no_config_checkpoint(tmp_path / "noconfig")
    warnings = []
    with caplog.at_level("WARNING", logger="model_loader"):
        streamed(resolve_model(str(path), warn=warnings.append))
        streamed(resolve_model(str(path)), warn=warnings.append)
    assert sum("no config.json" in w for w in warnings) == 2
    assert not [r for r in caplog.records if r.name == "model_loader"]
