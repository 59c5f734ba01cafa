"""A fake of the ``pynvml`` module (nvidia-ml-py) for machines without a GPU.

It fakes the *library's* API -- same function names, constants and exception classes as
nvidia-ml-py 13.x -- so code under test runs unchanged: put this directory first on
``sys.path`` / ``PYTHONPATH`` and ``import pynvml`` picks it up.

What the GPUs look like is scripted by a JSON file named by ``$FAKE_NVML_SCRIPT``, re-read on
every call (tests may rewrite it mid-run; replace it atomically). Without the variable the
fake behaves like a machine without NVML (``nvmlInit`` raises ``NVMLError_LibraryNotFound``).

    {
      "t0": 1700000000.0,          # epoch origin of the timelines (default: the file's mtime)
      "no_library": false,         # true: nvmlInit raises NVMLError_LibraryNotFound
      "init_error": null,          # or an NVML_ERROR_* suffix, e.g. "DRIVER_NOT_LOADED"
      "driver_version": "550.54.15",
      "gpus": [
        {"name": "NVIDIA A100-SXM4-80GB", "total_mb": 81920, "uuid": "GPU-...",
         "used_mb": [[0, 0], [5.0, 30000], [8.0, "raise"], [9.0, "raise:GPU_IS_LOST"], [12.0, 0]]},
        {"used_mb": 4000}
      ]
    }

``used_mb`` is a constant or a timeline of ``[t_from_s, value]`` steps (seconds since t0):
the last step whose ``t_from_s`` has passed applies (before the first step: 0 MB). A value
``"raise"`` makes memory reads fail with NVML_ERROR_UNKNOWN, ``"raise:NAME"`` with
NVML_ERROR_NAME -- an NVML error mid-run. Every field of a GPU is optional.
"""
import json
import os
import string
import sys
import threading
import time

# ---------------------------------------------------------------- constants (as nvidia-ml-py)
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_INSUFFICIENT_POWER = 8
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_IRQ_ISSUE = 11
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_CORRUPTED_INFOROM = 14
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_OPERATING_SYSTEM = 17
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_IN_USE = 19
NVML_ERROR_MEMORY = 20
NVML_ERROR_NO_DATA = 21
NVML_ERROR_VGPU_ECC_NOT_SUPPORTED = 22
NVML_ERROR_INSUFFICIENT_RESOURCES = 23
NVML_ERROR_FREQ_NOT_SUPPORTED = 24
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
NVML_ERROR_DEPRECATED = 26
NVML_ERROR_NOT_READY = 27
NVML_ERROR_GPU_NOT_FOUND = 28
NVML_ERROR_INVALID_STATE = 29
NVML_ERROR_RESET_TYPE_NOT_SUPPORTED = 30
NVML_ERROR_UNKNOWN = 999

nvmlMemory_v2 = 0x02000028
FAKE_NVML_SCRIPT_ENV = "FAKE_NVML_SCRIPT"
_BYTES_PER_MB = 1024 * 1024


# --------------------------------------------------- errors (same class scheme as nvidia-ml-py)
class NVMLError(Exception):
    """``NVMLError(code)`` returns the matching subclass, e.g. ``NVMLError_GpuIsLost``."""

    _valClassMapping = dict()

    def __new__(typ, value):
        if typ == NVMLError:
            typ = NVMLError._valClassMapping.get(value, typ)
        obj = Exception.__new__(typ)
        obj.value = value
        return obj

    def __str__(self):
        return nvmlErrorString(self.value)

    def __eq__(self, other):
        return isinstance(other, NVMLError) and self.value == other.value

    def __hash__(self):
        return hash(self.value)


def _error_names():
    return sorted(n for n in globals() if n.startswith("NVML_ERROR_"))


def _make_error_classes():
    module = globals()
    for err_name in _error_names():
        class_name = "NVMLError_" + string.capwords(err_name.replace("NVML_ERROR_", ""), "_").replace("_", "")
        value = module[err_name]

        def gen_new(val):
            def new(typ, *args):
                return NVMLError.__new__(typ, val)
            return new

        cls = type(class_name, (NVMLError,), {"__new__": gen_new(value)})
        cls.__module__ = __name__
        module[class_name] = cls
        NVMLError._valClassMapping[value] = cls


_make_error_classes()


def nvmlExceptionClass(nvmlErrorCode):
    if nvmlErrorCode not in NVMLError._valClassMapping:
        raise ValueError("nvmlErrorCode %s is not valid" % nvmlErrorCode)
    return NVMLError._valClassMapping[nvmlErrorCode]


_ERROR_STRINGS = {  # the texts nvidia-ml-py shows
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_ALREADY_INITIALIZED: "Already Initialized",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_INSUFFICIENT_SIZE: "Insufficient Size",
    NVML_ERROR_INSUFFICIENT_POWER: "Insufficient External Power",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_TIMEOUT: "Timeout",
    NVML_ERROR_IRQ_ISSUE: "Interrupt Request Issue",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_CORRUPTED_INFOROM: "Corrupted infoROM",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_RESET_REQUIRED: "GPU requires restart",
    NVML_ERROR_OPERATING_SYSTEM: "The operating system has blocked the request.",
    NVML_ERROR_LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch.",
    NVML_ERROR_MEMORY: "Insufficient Memory",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


def nvmlErrorString(result):
    return _ERROR_STRINGS.get(result, "NVML Error with code %d" % result)


# ------------------------------------------------------------------------- the script
def _script():
    path = os.environ.get(FAKE_NVML_SCRIPT_ENV)
    if not path:
        return {"no_library": True}
    for _ in range(20):  # a writer replacing the file atomically never shows a torn file, but be lenient
        try:
            with open(path) as f:
                data = json.load(f)
            data.setdefault("t0", os.path.getmtime(path))
            return data
        except json.JSONDecodeError:
            time.sleep(0.005)
    raise NVMLError(NVML_ERROR_UNKNOWN)


def _code(name):
    value = globals().get("NVML_ERROR_" + name.upper())
    return NVML_ERROR_UNKNOWN if value is None else value


_lock = threading.Lock()
_init_count = 0


def _check_init():
    if _init_count <= 0:
        raise NVMLError(NVML_ERROR_UNINITIALIZED)


def _gpus():
    return _script().get("gpus", [])


class _Handle:
    def __init__(self, index):
        self.index = index

    def __repr__(self):
        return "<fake nvmlDevice %d>" % self.index


def _gpu(handle):
    _check_init()
    gpus = _gpus()
    if not isinstance(handle, _Handle) or not 0 <= handle.index < len(gpus):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return gpus[handle.index]


def _used_mb_now(gpu, t0):
    spec = gpu.get("used_mb", 0)
    if not isinstance(spec, list):
        return spec
    elapsed_s = time.time() - t0
    value = 0
    for t_from_s, step_value in spec:
        if elapsed_s >= t_from_s:
            value = step_value
    return value


# ---------------------------------------------------------------------- the API
def nvmlInitWithFlags(flags):
    global _init_count
    script = _script()
    if script.get("no_library"):
        raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
    if script.get("init_error"):
        raise NVMLError(_code(script["init_error"]))
    with _lock:
        _init_count += 1


def nvmlInit():
    nvmlInitWithFlags(0)


def nvmlShutdown():
    global _init_count
    _check_init()
    with _lock:
        _init_count -= 1


def nvmlSystemGetDriverVersion():
    _check_init()
    return _script().get("driver_version", "550.54.15")


def nvmlSystemGetNVMLVersion():
    _check_init()
    return "12.550.54.15"


def nvmlDeviceGetCount():
    _check_init()
    return len(_gpus())


def nvmlDeviceGetHandleByIndex(index):
    _check_init()
    if not 0 <= int(index) < len(_gpus()):
        raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
    return _Handle(int(index))


def nvmlDeviceGetIndex(handle):
    _gpu(handle)
    return handle.index


def nvmlDeviceGetName(handle):
    return _gpu(handle).get("name", "Fake NVIDIA GPU")


def nvmlDeviceGetUUID(handle):
    return _gpu(handle).get("uuid", "GPU-fake0000-0000-0000-0000-%012d" % handle.index)


class c_nvmlMemory_t:
    """Memory info in bytes, like the ctypes structure of nvidia-ml-py."""

    def __init__(self, total, used, version=None):
        self.total = int(total)
        self.used = int(used)
        self.free = max(0, self.total - self.used)
        if version is not None:
            self.version = version
            self.reserved = 0

    def __repr__(self):
        return "c_nvmlMemory_t(total: %d B, free: %d B, used: %d B)" % (self.total, self.free, self.used)


def nvmlDeviceGetMemoryInfo(handle, version=None):
    script = _script()
    gpu = _gpu(handle)
    used_mb = _used_mb_now(gpu, script["t0"])
    if isinstance(used_mb, str):
        if used_mb.startswith("raise"):
            _, _, name = used_mb.partition(":")
            raise NVMLError(_code(name) if name else NVML_ERROR_UNKNOWN)
        raise ValueError("fake NVML script: unknown used_mb value %r" % used_mb)
    total_mb = gpu.get("total_mb", 24576)
    return c_nvmlMemory_t(total_mb * _BYTES_PER_MB, used_mb * _BYTES_PER_MB, version)


class c_nvmlUtilization_t:
    def __init__(self, gpu, memory):
        self.gpu = gpu
        self.memory = memory


def nvmlDeviceGetUtilizationRates(handle):
    gpu = _gpu(handle)
    return c_nvmlUtilization_t(gpu.get("utilization_gpu", 0), gpu.get("utilization_memory", 0))


def nvmlDeviceGetComputeRunningProcesses(handle):
    _gpu(handle)
    return []
