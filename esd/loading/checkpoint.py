"""Weight files on disk: reading their tensors one at a time, and checking them.

Owns: reading tensors as float32 CPU copies without loading a file whole (`FileCheckpoint`
for safetensors and PyTorch .bin/.pt), the safetensors header check (as the safetensors
library checks it). Which files hold the weights, which reader a format gets, and the
checks of a checkpoint's files (quantized, incomplete index) are `formats.py`.

The tensor-source interface (`TensorSource`) is what layer planning and the LoRA merge read
from; a new weight format or transport (e.g. safetensors over HTTP range requests,
`stream.py`) is one more subclass, registered in `formats.FORMATS`:

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
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from esd.failures import ESDFailure

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
    """The tensors of a set of weight files (safetensors, PyTorch .bin/.pt), read one at a time.

    Keys are normalised (`module.` / `_orig_mod.` from DDP / torch.compile stripped, a raw
    `{"model": state_dict}` checkpoint unwrapped); `shapes` is known without reading data.
    A safetensors header is parsed once per file, here; a tensor is then read with plain
    file reads straight into its float32 output, in row chunks. Nothing is memory-mapped: the
    pages a mapped tensor touched count in the process's resident memory while mapped, so a
    map held across tensors would grow to the whole file (measured: 0.9 GB after 60 tensors
    of a 1.3 GB file). PyTorch `.bin` files are unpickled once (mapped); at most
    `OPEN_FILES` of them stay open.
    """
    OPEN_FILES = 2

    def __init__(self, files: tuple[Path, ...]):
        self._open: OrderedDict[Path, dict] = OrderedDict()  # unpickled .bin state dicts
        self._headers: dict[Path, SafetensorsHeader] = {}
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

    def _index(self, path: Path) -> None:
        if path.suffix == ".safetensors":
            header = self._headers[path] = read_safetensors_header(path)
            entries = [(k, e.shape, e.floating) for k, e in header.tensors.items()]
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
                header = self._headers[path]
                entry = header.tensors[raw]
                with open(path, "rb") as f:
                    f.seek(header.data_start + entry.begin)
                    return float32_tensor(entry, f.readinto)
            t = self._file(path)[raw]                  # a view of the memory map
            return t.to(torch.float32, copy=True).contiguous()
        except ESDFailure:
            raise
        except Exception as exc:  # noqa: BLE001
            raise ESDFailure("load", "corrupt_file", f"{path.name}: cannot read {raw!r} "
                             f"({type(exc).__name__}: {exc})") from None


# --------------------------------------------------------------------------- safetensors

# safetensors dtype names → torch dtypes (https://github.com/huggingface/safetensors).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ITEMSIZE = {name: torch.empty((), dtype=dtype).element_size()
             for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000     # the limit of the safetensors library itself
CONVERT_CHUNK_ELEMENTS = 8 * 1024 * 1024


@dataclass(frozen=True)
class SafetensorEntry:
    dtype: str                     # "F32", "BF16", "I8", "BOOL", …
    shape: tuple[int, ...]
    begin: int                     # byte offsets in the data section (after the header)
    end: int

    @property
    def floating(self) -> bool:
        return self.dtype.startswith("F") or self.dtype == "BF16"


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, SafetensorEntry]
    data_start: int                # byte offset of the data section in the file


def read_safetensors_header(path: Path) -> SafetensorsHeader:
    """The parsed and checked header of a safetensors file (read once, never mapped)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {length} does not fit a {size}-byte file")
            header = f.read(length)
    except OSError as exc:
        raise ESDFailure("load", "corrupt_file", f"{path.name}: unreadable safetensors "
                         f"({type(exc).__name__}: {exc})") from None
    except ValueError as exc:
        raise ESDFailure("load", "corrupt_file", f"{path.name}: unreadable safetensors "
                         f"header ({exc})") from None
    return parse_safetensors_header(header, size - 8 - length, path.name)


def parse_safetensors_header(header: bytes, data_bytes: int | None,
                             name: str) -> SafetensorsHeader:
    """Check a safetensors header (the JSON after the 8-byte length) as the safetensors
    library does: each tensor's size is its shape × its dtype's size, and the tensors, in
    offset order, cover the data section from 0 to its end (`data_bytes`; None when the size
    of a remote file is not known) with no gap and no overlap. Any inconsistency is a
    `corrupt_file` naming the file: a lying header would hand out another tensor's bytes."""
    try:
        raw = json.loads(header)
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        tensors = {key: _safetensor_entry(key, value, data_bytes)
                   for key, value in raw.items() if key != "__metadata__"}
        _check_layout(tensors, data_bytes)
    except (ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise ESDFailure("load", "corrupt_file", f"{name}: unreadable safetensors header "
                         f"({type(exc).__name__}: {str(exc)[:200]})") from None
    return SafetensorsHeader(tensors, 8 + len(header))


def _check_layout(tensors: dict[str, SafetensorEntry], data_bytes: int | None) -> None:
    end = 0
    for key, e in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if e.begin != end:
            how = "overlaps the tensor before it" if e.begin < end else \
                f"leaves {e.begin - end} bytes unused before it"
            raise ValueError(f"{key}: data_offsets [{e.begin}, {e.end}] {how}")
        end = e.end
    if data_bytes is not None and end != data_bytes:
        raise ValueError(f"the tensors cover {end} bytes of the {data_bytes}-byte data section")


def _safetensor_entry(key: str, value, data_bytes: int | None) -> SafetensorEntry:
    if not isinstance(value, dict):
        raise ValueError(f"{key}: not a tensor entry")
    dtype, shape = value.get("dtype"), value.get("shape")
    begin, end = value.get("data_offsets") or (None, None)
    if dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"{key}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise ValueError(f"{key}: bad shape {shape!r}")
    limit = data_bytes if data_bytes is not None else float("inf")
    if not (type(begin) is int and type(end) is int and 0 <= begin <= end <= limit):
        raise ValueError(f"{key}: data_offsets {value.get('data_offsets')!r} outside the "
                         f"{data_bytes}-byte data section")
    if end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
        raise ValueError(f"{key}: {end - begin} bytes for shape {shape} of {dtype}")
    return SafetensorEntry(dtype, tuple(shape), begin, end)


def float32_tensor(entry: SafetensorEntry, read_into) -> torch.Tensor:
    """A float32 copy of one stored tensor whose bytes `read_into(buffer)` delivers in order
    (a file's `readinto`, or anything filling a writable buffer and returning the count).
    Converted in row chunks: a bf16/fp16 tensor never sits in memory twice in full."""
    out = torch.empty(entry.shape, dtype=torch.float32)
    if out.numel() == 0:
        return out
    stored = SAFETENSORS_DTYPES[entry.dtype]
    flat = out.view(-1)
    if stored == torch.float32:    # straight into the output
        _fill(read_into, memoryview(flat.numpy()).cast("B"))
        return out
    row = max(1, math.prod(entry.shape[1:])) if len(entry.shape) >= 2 else flat.numel()
    step = max(1, CONVERT_CHUNK_ELEMENTS // row) * row    # whole rows per chunk
    itemsize = _ITEMSIZE[entry.dtype]
    chunk = bytearray(min(step, flat.numel()) * itemsize)
    for start in range(0, flat.numel(), step):
        count = min(step, flat.numel() - start)
        view = memoryview(chunk)[: count * itemsize]
        _fill(read_into, view)
        flat[start:start + count] = torch.frombuffer(view, dtype=stored)  # stored → float32
    return out


def _fill(read_into, buffer: memoryview) -> None:
    done = 0
    while done < len(buffer):
        got = read_into(buffer[done:])
        if not got:
            raise ValueError(f"data ends after {done} of {len(buffer)} bytes")
        done += got


def normalise_key(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    return key.replace("._orig_mod.", ".")
