"""Moving layers to the arithmetic: a reader thread that prefetches layers from an iterator
while the previous one is computed, and one worker thread per device (CUDA: with a side
stream copying the next layer host→device while the current one is computed). On a CPU
with two cores or more, two worker threads compute two layers at once, each with half of
torch's threads (`_CpuThreadShares`): a layer's multi-threaded eigensolver synchronises its
threads thousands of times, and stalls at each whenever another thread (the reader, the
fit, another process) holds one of its cores; two layers side by side, each on its own
cores, do not wait for each other.

Owns: threads, bounded look-ahead (at most `slots` layers alive), order of results and of
progress, device selection, how torch's CPU threads are shared between layers, and
host→device copies. It must not know what is computed: the caller passes
`compute(item, device) -> result`, which must not raise (net_esd turns a layer's failure into
a row). Errors raised by the layer iterator itself reach the caller unchanged.
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import torch

_END = object()


class _Failure:
    """An exception raised by the layer iterator, carried to the consuming thread."""
    def __init__(self, error: BaseException):
        self.error = error


class LayerPrefetcher:
    """Reads layers from an iterator in a background thread, so the next layer's disk I/O
    overlaps the current layer's compute. At most `slots` layers are alive at a time: the
    reader takes a slot before each next(), the consumer gives it back with release()."""

    def __init__(self, layers: Iterator, slots: int):
        self._layers = layers
        self._slots = threading.Semaphore(slots)
        self._ready: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read_all, name="esd-prefetch", daemon=True)
        self._thread.start()

    def _read_all(self) -> None:
        try:
            while True:
                while not self._slots.acquire(timeout=0.1):
                    if self._stop.is_set():
                        return
                if self._stop.is_set():
                    return
                try:
                    item = next(self._layers)
                except StopIteration:
                    self._ready.put(_END)
                    return
                self._ready.put(item)
        except BaseException as error:  # the iterator's own errors go to the consumer
            self._ready.put(_Failure(error))

    def get(self):
        """The next (longname, layer_type, tensor), or None at the end; re-raises iterator errors."""
        item = self._ready.get()
        if item is _END or isinstance(item, _Failure):
            self._ready.put(item)  # other consumers see the end / the error too
        if item is _END:
            return None
        if isinstance(item, _Failure):
            raise item.error
        return item

    def release(self) -> None:
        """A layer is finished: the reader may fetch another."""
        self._slots.release()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def resolve_devices(device_ids, device) -> list[torch.device]:
    """The devices layers are computed on: the listed CUDA devices when CUDA is available,
    else `device`, else CPU."""
    if device_ids and torch.cuda.is_available():
        return [torch.device("cuda", int(i)) for i in device_ids]
    if device is not None and not (torch.device(device).type == "cuda" and not torch.cuda.is_available()):
        return [torch.device(device)]
    return [torch.device("cpu")]


def _start_copy_to_device(item: tuple, device: torch.device, copy_stream):
    """(item on device, ready event). On CUDA the host→device copy is issued asynchronously
    from pinned memory on a side stream, so it overlaps the compute of the previous layer."""
    longname, layer_type, weight = item
    if device.type != "cuda":
        return item, None
    with torch.cuda.stream(copy_stream):
        on_device = weight.pin_memory().to(device, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record(copy_stream)
    return (longname, layer_type, on_device), ready


def _device_worker(prefetcher: LayerPrefetcher, device: torch.device, compute: Callable,
                   counter: Iterator[int], results: dict, lock: threading.Lock,
                   on_layer_done: Callable) -> None:
    """Compute layers on one device until the prefetcher runs dry; keeps one layer copying
    ahead on CUDA. Results go to results[order] = compute(item, device)."""
    copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def fetch():
        with lock:
            item = prefetcher.get()
            order = next(counter) if item is not None else None
        if item is None:
            return None
        return (order,) + _start_copy_to_device(item, device, copy_stream)

    pending = fetch()
    while pending is not None:
        order, item, ready = pending
        pending = fetch() if device.type == "cuda" else None  # copy of the next layer starts now
        if ready is not None:  # CUDA: compute waits for the copy; the allocator must not
            torch.cuda.current_stream(device).wait_event(ready)  # reuse its memory early
            item[2].record_stream(torch.cuda.current_stream(device))
        longname = item[0]
        results[order] = compute(item, device)
        del item  # drop the layer before the reader may fetch another
        prefetcher.release()
        on_layer_done(order, longname)
        if device.type != "cuda":
            pending = fetch()


class _InOrder:
    """Calls on_layer_done(longname) in iterator order, though layers computed side by side
    may finish out of order: a layer is announced once every layer before it is done."""

    def __init__(self, on_layer_done: Callable[[str], None]):
        self.on_layer_done, self.finished, self.next, self.lock = on_layer_done, {}, 0, threading.Lock()

    def __call__(self, order: int, longname: str) -> None:
        with self.lock:
            self.finished[order] = longname
            while self.next in self.finished:
                self.on_layer_done(self.finished.pop(self.next))
                self.next += 1


# layers computed at once on one CPU (with ≥ 2 torch threads); two keep the bound of two
# layers alive that a single CPU thread with its read-ahead had
CPU_LAYERS_AT_ONCE = 2


class _CpuThreadShares:
    """Torch's CPU threads (and through them BLAS's: net_esd follows torch's count) split
    evenly between the layer threads still computing: cores // computing. Torch's count is
    per thread, so each compute thread takes its share itself (`follow_cpu_share`, called
    by net_esd before each Gram chunk and each eigensolve): when one thread runs out of
    layers, the other takes all the cores for the rest of its layer. Restores torch's
    thread count at the end."""

    def __init__(self, layer_threads: int):
        self.cores = torch.get_num_threads()
        self.computing = layer_threads
        self.lock = threading.Lock()

    def share(self) -> int:
        return max(1, self.cores // max(1, self.computing))

    def thread_done(self) -> None:
        with self.lock:
            self.computing -= 1

    def restore(self) -> None:
        torch.set_num_threads(self.cores)


_this_thread = threading.local()   # .shares: the _CpuThreadShares of a compute thread


def follow_cpu_share() -> None:
    """In a CPU compute thread of `run_on_devices`: set torch's thread count (this thread's
    own) to its current share of the cores. Anywhere else: nothing."""
    shares = getattr(_this_thread, "shares", None)
    if shares is not None and torch.get_num_threads() != shares.share():
        torch.set_num_threads(shares.share())


def cpu_layer_threads(devices: list[torch.device]) -> list[torch.device]:
    """The devices as worker threads: one CPU device becomes CPU_LAYERS_AT_ONCE threads when
    torch has that many threads or more; anything else as given."""
    if len(devices) == 1 and devices[0].type == "cpu" and torch.get_num_threads() >= 2:
        return devices * CPU_LAYERS_AT_ONCE
    return devices


def run_on_devices(layers: Iterator, devices: list[torch.device], compute: Callable,
                   on_layer_done: Callable[[str], None] = lambda name: None) -> list:
    """compute(item, device) for every (longname, layer_type, tensor) of `layers`, in iterator
    order, on all devices in parallel (one thread per device; a CPU with ≥ 2 threads: two
    layers at once, `cpu_layer_threads`), reading ahead in a thread. At most two layers are
    alive on CPU, two per device plus one on CUDA."""
    devices = cpu_layer_threads(devices)
    on_cpu = devices[0].type == "cpu"
    slots = max(2, len(devices)) if on_cpu else len(devices) * 2 + 1
    prefetcher = LayerPrefetcher(layers, slots=slots)
    counter, results, lock = iter(range(1 << 62)), {}, threading.Lock()
    on_layer_done = _InOrder(on_layer_done)
    shares = _CpuThreadShares(len(devices)) if on_cpu and len(devices) > 1 else None
    try:
        if len(devices) == 1:
            _device_worker(prefetcher, devices[0], compute, counter, results, lock, on_layer_done)
        else:
            errors: list[BaseException] = []

            def work(device):
                _this_thread.shares = shares
                try:
                    follow_cpu_share()
                    _device_worker(prefetcher, device, compute, counter, results, lock, on_layer_done)
                except BaseException as error:
                    errors.append(error)
                finally:
                    if shares is not None:
                        shares.thread_done()

            threads = [threading.Thread(target=work, args=(d,), name=f"esd-{d}") for d in devices]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if errors:
                raise errors[0]
    finally:
        prefetcher.close()
        if shares is not None:
            shares.restore()
    return [results[order] for order in sorted(results)]
