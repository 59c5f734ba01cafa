"""Weight files on disk, and reading their tensors one at a time.

Owns: which files of a directory hold a model's weights (`find_weights`, by the transformers
preference order, looking one or two folders down for training checkpoints), refusing
quantized checkpoints, and reading tensors as float32 CPU copies without loading a file whole.

The tensor-source interface (`TensorSource`) is what layer planning and the LoRA merge read
from; a new weight format or transport (e.g. safetensors over HTTP range requests) is one more
subclass:

- `shapes: dict[str, tuple[int, ...]]` — every tensor's (normalised) key and shape, known
  without reading tensor data; `keys()` is `shapes.keys()`.
- `floating: dict[str, bool]` — False for integer / bool tensors (quantized weights).
- `tensor(key) -> torch.Tensor` — a float32, contiguous CPU copy the caller owns; any read
  problem is an `ESDFailure("load", "corrupt_file", …)`.
- `close()` — release open files / maps (also on `with … as source:` exit). Reading after
  `close()` reopens what it needs.

Keys are normalised (`module.` / `_orig_mod.` from DDP / torch.compile stripped) so that the
layer planner sees one spelling whatever wrote the file.

Must not: decide which tensors are layers (`layers.py`), merge adapters (`lora.py`), or
talk to the hub (`hub.py`).
"""
from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from pathlib import Path

import torch

from esd.failures import ESDFailure
from esd.loading.resolved import (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHT_FILES, BIN_INDEX,
                                  SAFETENSORS_INDEX)

# Files in training-checkpoint directories that are not model weights.
NOT_WEIGHTS = re.compile(r"(optimizer|scheduler|rng_state|training_args|scaler|trainer_state)",
                         re.IGNORECASE)
UNSUPPORTED_WEIGHT_SUFFIXES = (".gguf", ".ggml", ".onnx", ".h5", ".msgpack", ".ckpt", ".pb",
                               ".tflite", ".mlmodel", ".nemo")


# --------------------------------------------------------------------------- finding files

def read_json(path: Path, stage: str = "load") -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ESDFailure(stage, "corrupt_file", f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ESDFailure(stage, "corrupt_file", f"{path}: expected a JSON object")
    return data


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG_FILE).is_file() and any(
        (path / name).is_file() for name in ADAPTER_WEIGHT_FILES)


def weight_files_in(path: Path) -> list[Path]:
    """The model weight files directly in `path`, by the transformers preference order:
    safetensors index → model.safetensors → other *.safetensors → .bin index →
    pytorch_model.bin → other *.bin → *.pt/*.pth (raw state dicts). [] if none."""
    def from_index(index: Path) -> list[Path]:
        data = read_json(index)
        names = sorted(set((data.get("weight_map") or {}).values()))
        if not names:
            raise ESDFailure("load", "corrupt_file", f"{index}: empty weight_map")
        missing = [n for n in names if not (path / n).is_file()]
        if missing:
            raise ESDFailure("load", "corrupt_file", f"{index} lists missing shards: "
                             f"{', '.join(missing[:3])}")
        return [path / n for n in names]

    if (path / SAFETENSORS_INDEX).is_file():
        return from_index(path / SAFETENSORS_INDEX)
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    found = sorted(p for p in path.glob("*.safetensors")
                   if not p.name.startswith("adapter_model") and not NOT_WEIGHTS.search(p.name))
    if found:
        return found
    if (path / BIN_INDEX).is_file():
        return from_index(path / BIN_INDEX)
    if (path / "pytorch_model.bin").is_file():
        return [path / "pytorch_model.bin"]
    for pattern in ("*.bin", "*.pt", "*.pth"):
        found = sorted(p for p in path.glob(pattern)
                       if not p.name.startswith("adapter_model") and not NOT_WEIGHTS.search(p.name))
        if found:
            return found
    return []


def find_weights(root: Path) -> tuple[Path, list[Path]]:
    """(directory holding the weights, weight files): `root` itself, else the one subfolder
    (up to two levels down) that holds weights, e.g. `checkpoint_500/model/`."""
    files = weight_files_in(root)
    if files:
        return root, files
    candidates = []
    for sub in sorted(p for p in root.glob("*/") if p.is_dir()) + \
            sorted(p for p in root.glob("*/*/") if p.is_dir()):
        if sub.name.startswith(".") or is_adapter_dir(sub):
            continue
        sub_files = weight_files_in(sub)
        if sub_files:
            candidates.append((sub, sub_files))
    if len(candidates) == 1:
        return candidates[0]
    if len(candidates) > 1:
        names = ", ".join(str(c[0].relative_to(root)) for c in candidates[:5])
        raise ESDFailure("load", "unsupported_format",
                         f"{root}: several subfolders hold weights ({names}); give one of them")
    other = sorted(p.name for p in root.rglob("*") if p.suffix in UNSUPPORTED_WEIGHT_SUFFIXES)
    if other:
        raise ESDFailure("load", "unsupported_format",
                         f"{root}: only unsupported weight formats ({', '.join(other[:3])}); "
                         "need safetensors or PyTorch .bin/.pt")
    raise ESDFailure("load", "no_weights", f"{root}: no weight files (looked for *.safetensors, "
                     "pytorch_model.bin, *.pt and their sharded indexes)")


def check_not_quantized(config_path: Path | None) -> None:
    if config_path is None:
        return
    qc = read_json(config_path).get("quantization_config")
    if qc:
        method = qc.get("quant_method", "unknown") if isinstance(qc, dict) else "unknown"
        raise ESDFailure("load", "quantized_unsupported",
                         f"{config_path}: quantized checkpoint ({method}); the spectra of "
                         "quantized weights are not comparable — analyse the unquantized model")

def check_index_complete(files: tuple[Path, ...], ckpt: "TensorSource") -> None:
    """A sharded checkpoint's shards must hold every tensor its index names: a stale or
    wrong shard would otherwise drop layers with only a warning."""
    if not files:
        return
    index = files[0].parent / (SAFETENSORS_INDEX if files[0].suffix == ".safetensors"
                               else BIN_INDEX)
    if not index.is_file():
        return
    absent = sorted(k for k in (read_json(index).get("weight_map") or {})
                    if normalise_key(k) not in ckpt.shapes)
    if absent:
        raise ESDFailure("load", "corrupt_file", f"{index}: {len(absent)} tensor(s) it names are "
                         f"in none of its shards: {', '.join(absent[:3])}")



# --------------------------------------------------------------------------- reading tensors

class TensorSource:
    """The tensors of one model, read one at a time (see the module docstring)."""
    shapes: dict[str, tuple[int, ...]]
    floating: dict[str, bool]

    def keys(self):
        return self.shapes.keys()

    def tensor(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FileCheckpoint(TensorSource):
    """The tensors of a set of weight files, read one at a time from memory maps.

    Keys are normalised (`module.` / `_orig_mod.` from DDP / torch.compile stripped, a raw
    `{"model": state_dict}` checkpoint unwrapped); `shapes` is known without reading data.
    A safetensors file is mapped afresh for each tensor and unmapped right after the copy:
    the pages a tensor touched count in the process's resident memory while mapped, so a
    map held across tensors would grow to the whole file (measured: 0.9 GB after 60 tensors
    of a 1.3 GB file, against 4 MB with a map per tensor). PyTorch `.bin` files are
    unpickled once (mapped); at most `OPEN_FILES` of them stay open.
    """
    OPEN_FILES = 2

    def __init__(self, files: tuple[Path, ...]):
        self._open: OrderedDict[Path, dict] = OrderedDict()  # unpickled .bin state dicts
        self.key_file: dict[str, Path] = {}
        self.raw_key: dict[str, str] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.floating: dict[str, bool] = {}   # False for integer / bool tensors
        for path in files:
            self._index(path)
        self.close()

    def close(self) -> None:
        self._open.clear()

    def _file(self, path: Path):
        if path in self._open:
            self._open.move_to_end(path)
            return self._open[path]
        opened = self._torch_load(path)
        self._open[path] = opened
        while len(self._open) > self.OPEN_FILES:
            self._open.popitem(last=False)
        return opened

    @staticmethod
    def _safe_open(path: Path):
        from safetensors import safe_open
        try:
            return safe_open(str(path), framework="pt")
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError, …
            raise ESDFailure("load", "corrupt_file", f"{path.name}: unreadable safetensors "
                             f"({type(exc).__name__}: {exc})") from None

    def _index(self, path: Path) -> None:
        if path.suffix == ".safetensors":
            with self._safe_open(path) as opened:
                try:
                    entries = []
                    for k in opened.keys():
                        view = opened.get_slice(k)
                        dtype = view.get_dtype()            # "F32", "BF16", "I8", "BOOL", …
                        entries.append((k, tuple(view.get_shape()),
                                        dtype.startswith("F") or dtype == "BF16"))
                except Exception as exc:  # noqa: BLE001
                    raise ESDFailure("load", "corrupt_file", f"{path.name}: unreadable safetensors "
                                     f"header ({type(exc).__name__}: {exc})") from None
        else:
            entries = [(k, tuple(v.shape), v.is_floating_point())
                       for k, v in self._file(path).items()]
        for key, shape, floating in entries:
            name = normalise_key(key)
            self.key_file[name] = path
            self.raw_key[name] = key
            self.shapes[name] = shape
            self.floating[name] = floating

    @staticmethod
    def _torch_load(path: Path) -> dict:
        def load(mmap: bool):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        try:
            try:
                state = load(mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc).lower() and "zip" not in str(exc).lower():
                    raise
                state = load(mmap=False)  # legacy (pre-zip) format: read fully
        except Exception as exc:  # noqa: BLE001 - truncated zip, pickle errors, …
            raise ESDFailure("load", "corrupt_file", f"{path.name}: unreadable PyTorch file "
                             f"({type(exc).__name__}: {exc})") from None
        for wrapper in ("model", "state_dict", "model_state_dict", "module"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
        if not isinstance(state, dict):
            raise ESDFailure("load", "unsupported_format", f"{path.name}: not a state dict")
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def tensor(self, key: str) -> torch.Tensor:
        """A float32 CPU copy of one tensor, owned by the caller."""
        path = self.key_file[key]
        raw = self.raw_key[key]
        try:
            if path.suffix == ".safetensors":
                with self._safe_open(path) as opened:  # mapped for this tensor only
                    return float32_copy(opened.get_slice(raw))
            t = self._file(path)[raw]                  # a view of the memory map
            return t.to(torch.float32, copy=True).contiguous()
        except ESDFailure:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ESDFailure("load", "corrupt_file", f"{path.name}: cannot read {raw!r} "
                             f"({type(exc).__name__}: {exc})") from None


CONVERT_CHUNK_ELEMENTS = 8 * 1024 * 1024


def float32_copy(view) -> torch.Tensor:
    """A float32 copy of a safetensors slice, converted in row chunks: a bf16/fp16 tensor
    never sits in memory twice (stored dtype + float32) in full."""
    shape = tuple(view.get_shape())
    if view.get_dtype() == "F32" or len(shape) < 2:
        return view[:].to(torch.float32)
    out = torch.empty(shape, dtype=torch.float32)
    rows = max(1, CONVERT_CHUNK_ELEMENTS // max(1, math.prod(shape[1:])))
    for start in range(0, shape[0], rows):
        out[start:start + rows] = view[start:start + rows]  # (rows, …) stored dtype → float32
    return out


def normalise_key(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key.replace("._orig_mod.", ".")
