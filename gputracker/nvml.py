"""The one NVML wrapper of gputracker: every ``pynvml`` call goes through here.

Owns: initialising NVML, reading each GPU's used memory (in MB) and turning NVML errors
into "not available" -- a failed read marks that GPU unavailable for that poll instead of
crashing the polling loop (the nvitop habit). A missing library, driver or GPU is reported
once, with the reason, and the caller falls back to CPU mode.

Must not: schedule, lock or launch anything. Indices here are NVML indices (PCI bus order);
children get ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that CUDA numbers the GPUs the same way.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

BYTES_PER_MB = 1024 * 1024


@dataclass(frozen=True)
class GpuInfo:
    """Static facts about one GPU, read once at start-up."""

    index: int  # NVML index (PCI bus order)
    name: str
    uuid: str
    memory_total_mb: float


class Nvml:
    """A small NVML session: ``open()`` once, ``memory_used_mb(i)`` per poll, ``close()``.

    ``available`` is False when NVML could not be initialised; ``unavailable_reason`` then
    says why (no ``pynvml``, no ``libnvidia-ml.so``, driver not loaded, ...).
    """

    def __init__(self, logger: logging.Logger | None = None):
        self._logger = logger or logging.getLogger("gputracker")
        self._pynvml = None
        self.available = False
        self.unavailable_reason = ""
        self._failing: set[int] = set()  # GPUs whose last read failed (to log changes only)
        self.read_errors: dict[int, str] = {}  # GPU index -> why its last read failed

    def open(self) -> bool:
        """Initialise NVML; return whether it is usable. Never raises for a missing NVML."""
        try:
            import pynvml  # imported lazily: a machine without it still runs jobs on CPU
        except ImportError as exc:
            return self._mark_unavailable(f"the pynvml module is not installed ({exc})")
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            return self._mark_unavailable(f"NVML could not be initialised: {exc}")
        except OSError as exc:  # some pynvml versions leak the dlopen error
            return self._mark_unavailable(f"NVML library could not be loaded: {exc}")
        self._pynvml = pynvml
        self.available = True
        return True

    def _mark_unavailable(self, reason: str) -> bool:
        self.available = False
        self.unavailable_reason = reason
        return False

    def close(self) -> None:
        if self._pynvml is not None and self.available:
            try:
                self._pynvml.nvmlShutdown()
            except self._pynvml.NVMLError:
                pass
        self.available = False

    def driver_version(self) -> str | None:
        """The NVIDIA driver's version, None when NVML cannot tell."""
        if not self.available:
            return None
        try:
            return _as_str(self._pynvml.nvmlSystemGetDriverVersion())
        except self._pynvml.NVMLError:
            return None

    def device_count(self) -> int:
        """Number of GPUs NVML sees; 0 when NVML is unavailable or the call fails."""
        if not self.available:
            return 0
        try:
            return int(self._pynvml.nvmlDeviceGetCount())
        except self._pynvml.NVMLError as exc:
            self._logger.warning("NVML: could not count GPUs: %s", exc)
            return 0

    def gpu_info(self, index: int) -> GpuInfo | None:
        """Name, UUID and total memory of GPU ``index``; None if NVML cannot tell."""
        if not self.available:
            return None
        nvml = self._pynvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = _as_str(nvml.nvmlDeviceGetName(handle))
            uuid = _as_str(nvml.nvmlDeviceGetUUID(handle))
            memory_total_mb = nvml.nvmlDeviceGetMemoryInfo(handle).total / BYTES_PER_MB
        except nvml.NVMLError as exc:
            self.read_errors[index] = str(exc)
            self._logger.warning("NVML: GPU %d: could not read its description: %s", index, exc)
            return None
        return GpuInfo(index=index, name=name, uuid=uuid, memory_total_mb=memory_total_mb)

    def memory_used_mb(self, index: int) -> float | None:
        """Used memory of GPU ``index`` in MB, or None when NVML cannot read it this time.

        The first failure and the recovery of a GPU are logged; repeated failures are not,
        so a GPU that is lost for hours does not flood the log.
        """
        if not self.available:
            return None
        nvml = self._pynvml
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory_used_mb = nvml.nvmlDeviceGetMemoryInfo(handle).used / BYTES_PER_MB
        except nvml.NVMLError as exc:
            self.read_errors[index] = str(exc)
            if index not in self._failing:
                self._failing.add(index)
                self._logger.warning("NVML: GPU %d not readable (%s); treated as busy until it is", index, exc)
            return None
        self.read_errors.pop(index, None)
        if index in self._failing:
            self._failing.discard(index)
            self._logger.info("NVML: GPU %d readable again", index)
        return memory_used_mb


def _as_str(value) -> str:
    # pynvml < 11.5 returns bytes for names and UUIDs, newer versions return str
    return value.decode() if isinstance(value, bytes) else str(value)
