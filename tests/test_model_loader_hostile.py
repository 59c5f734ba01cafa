"""model_loader against a hostile world: FIFOs, huge configs, escaping shard paths, adapter
cycles, unreadable folders, over-long names. Each is a typed failure (or ignored with a
warning), never a hang or a traceback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import save_file

from esd.failures import ESDFailure
from loader_models import (analysable_weights, load_model, offline_hub, save_adapter,  # noqa: F401
                           save_model, streamed)
from model_loader import iter_layers, resolve_model


_UNBLOCKER = """
import os, sys, time
time.sleep(float(sys.argv[1]))
while True:
    for fifo in sys.argv[2:]:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            print(fifo, flush=True)
        except OSError:          # no reader waiting: nothing to unblock
            pass
    time.sleep(0.2)
"""


@contextmanager
def no_hang(*fifos, seconds: float = 20):
    """Fail the test instead of blocking forever in open() of a FIFO: after `seconds`, another
    process keeps opening each FIFO for writing, which unblocks a reader (who then sees an
    empty file). A process, since a reader blocked in a C extension may hold the GIL."""
    helper = subprocess.Popen([sys.executable, "-c", _UNBLOCKER, str(seconds), *map(str, fifos)],
                              stdout=subprocess.PIPE, text=True)
    try:
        yield
    finally:
        helper.kill()
        unblocked = helper.communicate()[0].split()
    assert not unblocked, f"blocked reading {sorted(set(unblocked))}"


# --------------------------------------------------------------------------- only regular files

@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin", "weights.bin"])
def test_a_fifo_named_like_the_only_weight_file_is_not_opened(tmp_path, name):
    path = tmp_path / "fifo_model"
    path.mkdir()
    os.mkfifo(path / name)
    warnings = []
    with no_hang(path / name), pytest.raises(ESDFailure) as info:
        list(iter_layers(resolve_model(str(path), warn=warnings.append)))
    assert (info.value.stage, info.value.reason) == ("load", "no_weights")
    assert any(name in w and "not a regular file" in w for w in warnings)


@pytest.mark.parametrize("fifo", ["zz-extra.safetensors", "extra.bin"])
def test_a_fifo_beside_real_weight_files_is_ignored_with_a_warning(tmp_path, fifo):
    path = save_model("gpt2", tmp_path / "gpt2")
    suffix = ".safetensors" if fifo.endswith(".safetensors") else ".bin"
    if suffix == ".bin":
        torch.save(load_model("gpt2", path).state_dict(), path / "weights.bin")
        (path / "model.safetensors").unlink()
    else:
        (path / "model.safetensors").rename(path / "model-a.safetensors")
    os.mkfifo(path / fifo)
    warnings = []
    with no_hang(path / fifo):
        got = streamed(resolve_model(str(path), warn=warnings.append))
    assert set(got) == set(analysable_weights(load_model("gpt2", save_model(
        "gpt2", tmp_path / "ref"))))
    assert any(fifo in w and "not a regular file" in w for w in warnings)


# --------------------------------------------------------------------------- planning is linear

def _count_calls(monkeypatch, cls, method: str) -> list:
    calls = []
    real = getattr(cls, method)

    def counting(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)
    monkeypatch.setattr(cls, method, counting)
    return calls


def _planning_walks(tmp_path, monkeypatch, n_layer: int) -> int:
    """How often planning a 2-layer GPT-2 checkpoint under a config of `n_layer` blocks walks
    the skeleton's parameters; checks the missing blocks are skipped with one warning."""
    path = save_model("gpt2", tmp_path / f"gpt2_{n_layer}")
    config = json.loads((path / "config.json").read_text())
    config["n_layer"] = n_layer
    (path / "config.json").write_text(json.dumps(config))
    resolved = resolve_model(str(path), warn=lambda m: None)
    warnings = []
    with monkeypatch.context() as patch:
        calls = _count_calls(patch, torch.nn.Module, "named_parameters")
        names = [name for name, _, _ in iter_layers(resolved, warn=warnings.append)]
    assert len(names) == 2 + 2 * 4
    assert any(f"{(n_layer - 2) * 4} module(s) not in the checkpoint" in w for w in warnings)
    return len(calls)


def test_a_config_with_far_more_layers_than_the_checkpoint_plans_in_linear_work(tmp_path,
                                                                               monkeypatch):
    """The parameters are walked a fixed number of times, not once per missing module
    (which made planning quadratic: 86 s at 800 layers)."""
    assert _planning_walks(tmp_path, monkeypatch, 60) == _planning_walks(tmp_path, monkeypatch, 10)


class _MetaSource:
    """A TensorSource with shapes only (the 70B model's checkpoint without its 140 GB)."""

    def __init__(self, state_dict):
        self.shapes = {k: tuple(v.shape) for k, v in state_dict.items()}
        self.floating = {k: True for k in self.shapes}

    def keys(self):
        return self.shapes.keys()

    def tensor(self, key):
        raise AssertionError("planning must not read tensor data")

    def close(self):
        pass


def test_a_real_70b_config_plans_its_562_layers_from_723_tensors(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from esd.loading.layers import plan_layers
    from esd.loading.resolved import ResolvedModel
    from esd.model_list import ModelEntry
    config = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                         num_attention_heads=64, num_key_value_heads=8, vocab_size=32000,
                         max_position_embeddings=4096, architectures=["LlamaForCausalLM"])
    config.save_pretrained(tmp_path)
    with torch.device("meta"):
        source = _MetaSource(LlamaForCausalLM(config).state_dict())
    assert len(source.shapes) == 723
    resolved = ResolvedModel(ModelEntry("llama-70b"), tmp_path, config_path=tmp_path / "config.json")
    modules, keys = plan_layers(resolved, source)
    assert len(modules) == 80 * 7 + 2
    assert keys["model.layers.79.mlp.down_proj"] == "model.layers.79.mlp.down_proj.weight"
    assert source.shapes[keys["lm_head"]] == (32000, 8192)


# --------------------------------------------------------------------------- safetensors header

def test_the_safetensors_header_is_parsed_once_per_file(tmp_path):
    """After indexing, the header bytes are never read again: wiping them in place does not
    change what the tensors read."""
    from esd.loading.checkpoint import FileCheckpoint
    tensors = {f"layer{i}.weight": torch.randn(4, 3) for i in range(50)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    ckpt = FileCheckpoint((path,))
    header_length = int.from_bytes(path.read_bytes()[:8], "little")
    with open(path, "r+b") as f:
        f.seek(8)
        f.write(b" " * header_length)
    for key, want in tensors.items():
        assert torch.equal(ckpt.tensor(key), want)
    ckpt.close()


# --------------------------------------------------------------------------- shard paths

@pytest.mark.parametrize("escape", ["absolute", "dotdot"])
def test_an_index_naming_a_shard_outside_the_checkpoint_is_refused(tmp_path, escape):
    other = save_model("llama", tmp_path / "other", seed=5, max_shard_size="40KB")
    path = save_model("llama", tmp_path / "sharded", max_shard_size="40KB")
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key, shard = next(iter(index["weight_map"].items()))
    index["weight_map"][key] = str(other / shard) if escape == "absolute" else f"../other/{shard}"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ESDFailure) as info:
        list(iter_layers(resolve_model(str(path))))
    assert (info.value.stage, info.value.reason) == ("load", "corrupt_file")
    assert "outside" in info.value.message


# --------------------------------------------------------------------------- adapter bases

def test_a_relative_adapter_base_path_resolves_against_the_adapter_directory(tmp_path,
                                                                              monkeypatch):
    base = save_model("llama", tmp_path / "models" / "base")
    adapter = save_adapter("llama", base, tmp_path / "models" / "adapters" / "ad",
                           target_modules=["q_proj"])
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "../../base"
    config_path.write_text(json.dumps(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resolved = resolve_model(str(adapter))
    assert resolved.base.local_dir.resolve() == base.resolve()
    assert set(streamed(resolved)) == set(streamed(resolve_model(str(base))))


def _point_base(adapter, base_id: str) -> None:
    config_path = adapter / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base_id
    config_path.write_text(json.dumps(config))


@pytest.mark.parametrize("shape", ["self", "self_relative", "cycle"])
def test_an_adapter_whose_base_is_itself_or_a_cycle_is_a_typed_failure(tmp_path, shape):
    base = save_model("llama", tmp_path / "base")
    a = save_adapter("llama", base, tmp_path / "a", target_modules=["q_proj"])
    if shape == "self":
        _point_base(a, str(a))
    elif shape == "self_relative":
        _point_base(a, ".")
    else:
        b = tmp_path / "b"
        shutil.copytree(a, b)
        _point_base(a, str(b))
        _point_base(b, str(a))
    with pytest.raises(ESDFailure) as info:
        resolve_model(str(a))
    assert (info.value.stage, info.value.reason) == ("resolve", "adapter_unsupported")
    assert ("itself" in info.value.message) == shape.startswith("self")


# --------------------------------------------------------------------------- hostile files and ids

@pytest.mark.parametrize("file", ["config.json", "adapter_config.json",
                                  "model.safetensors.index.json"])
def test_a_json_file_of_100000_nested_brackets_is_a_corrupt_file(tmp_path, file):
    base = save_model("llama", tmp_path / "base", max_shard_size="40KB")
    path = base
    if file == "adapter_config.json":
        path = save_adapter("llama", base, tmp_path / "ad", target_modules=["q_proj"])
    (path / file).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ESDFailure) as info:
        list(iter_layers(resolve_model(str(path))))
    assert info.value.reason == "corrupt_file" and file in info.value.message


def test_proc_as_a_model_id_is_a_typed_failure_not_a_permission_traceback():
    with pytest.raises(ESDFailure) as info:
        list(iter_layers(resolve_model("/proc")))
    assert info.value.stage in ("resolve", "load")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode")
def test_an_unreadable_sibling_folder_is_a_typed_failure(tmp_path):
    path = tmp_path / "ckpt"
    path.mkdir()
    (path / "locked").mkdir()
    (path / "locked" / "x").write_text("x")
    os.chmod(path / "locked", 0)
    try:
        with pytest.raises(ESDFailure) as info:
            resolve_model(str(path))
        assert info.value.stage == "load"
    finally:
        os.chmod(path / "locked", 0o700)


@pytest.mark.parametrize("model_id", ["a" * 300, "org/" + "b" * 300, "/tmp/" + "c" * 300,
                                      "/tmp/" + "d" * 300 + "/sub"])
def test_an_id_component_over_255_bytes_is_a_typed_failure(model_id):
    with pytest.raises(ESDFailure) as info:
        resolve_model(model_id)
    assert info.value.stage == "resolve"
    assert info.value.reason in ("invalid_id", "repo_not_found")
