"""CUDA IPC through the driver API (libcuda, loaded on first use): one device buffer that
another process on the same GPU opens once; its handle is 64 bytes of data.

The source allocates the buffer with cuMemAlloc, outside torch's caching allocator, so the
handle covers exactly this buffer whatever the allocator's settings (expandable segments
cannot be exported); the buffer is freed with the last tensor over it. A replica opens the
handle once (cuIpcOpenMemHandle) and closes it with the last tensor over it. Tensors are
made over the raw memory through `__cuda_array_interface__`, without a copy. torch's own
sharing (`UntypedStorage._share_cuda_`) is not used: it travels as pickled reductions and
keeps reference counts in files.
"""

from __future__ import annotations

import ctypes
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

HANDLE_BYTES = 64
_LAZY_ENABLE_PEER_ACCESS = 1


class Unavailable(Exception):
    """CUDA IPC cannot be used here; the message says why (a fallback's reason)."""


class _Handle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * HANDLE_BYTES)]


_LIB: Any = None


def _driver() -> Any:
    """libcuda with the signatures used here, initialized."""
    global _LIB
    if _LIB is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as e:
            raise Unavailable(f"cannot load the CUDA driver (libcuda.so.1): {e}") from e
        ptr, u64 = ctypes.POINTER, ctypes.c_uint64
        signatures: dict[str, list[Any]] = {
            "cuInit": [ctypes.c_uint],
            "cuDeviceGet": [ptr(ctypes.c_int), ctypes.c_int],
            "cuDevicePrimaryCtxRetain": [ptr(ctypes.c_void_p), ctypes.c_int],
            "cuDevicePrimaryCtxRelease_v2": [ctypes.c_int],
            "cuCtxPushCurrent_v2": [ctypes.c_void_p],
            "cuCtxPopCurrent_v2": [ptr(ctypes.c_void_p)],
            "cuMemAlloc_v2": [ptr(u64), ctypes.c_size_t],
            "cuMemFree_v2": [u64],
            "cuIpcGetMemHandle": [ptr(_Handle), u64],
            "cuIpcOpenMemHandle_v2": [ptr(u64), _Handle, ctypes.c_uint],
            "cuIpcCloseMemHandle": [u64],
            "cuGetErrorName": [ctypes.c_int, ptr(ctypes.c_char_p)],
        }
        for name, argtypes in signatures.items():
            function = getattr(lib, name, None) or getattr(lib, name.removesuffix("_v2"), None)
            if function is None:
                raise Unavailable(f"the CUDA driver (libcuda.so.1) lacks {name}")
            function.argtypes, function.restype = argtypes, ctypes.c_int
            setattr(lib, name, function)
        _check(lib, lib.cuInit(0), "cuInit")
        _LIB = lib
    return _LIB


def _check(lib: Any, code: int, what: str) -> None:
    if code != 0:
        name = ctypes.c_char_p()
        lib.cuGetErrorName(code, ctypes.byref(name))
        label = name.value.decode() if name.value else "unknown error"
        raise Unavailable(f"{what} failed: {label} ({code})")


@contextmanager
def _context(index: int) -> Iterator[Any]:
    """The device's primary context (the one torch's runtime uses) current on this thread,
    restoring the thread's previous one after."""
    lib = _driver()
    device, context = ctypes.c_int(), ctypes.c_void_p()
    _check(lib, lib.cuDeviceGet(ctypes.byref(device), index), "cuDeviceGet")
    _check(lib, lib.cuDevicePrimaryCtxRetain(ctypes.byref(context), device), "retaining a context")
    try:
        _check(lib, lib.cuCtxPushCurrent_v2(context), "cuCtxPushCurrent")
        try:
            yield lib
        finally:
            lib.cuCtxPopCurrent_v2(ctypes.byref(ctypes.c_void_p()))
    finally:
        lib.cuDevicePrimaryCtxRelease_v2(device)


class _Memory:
    """Raw device memory that torch reads through `__cuda_array_interface__`; released
    (freed, or its IPC mapping closed) once no tensor refers to it."""

    def __init__(self, ptr: int, nbytes: int, index: int, opened: bool) -> None:
        self.ptr, self.nbytes = ptr, nbytes
        finalizer = weakref.finalize(self, _release, index, ptr, opened)
        finalizer.atexit = False  # at exit the process's memory goes anyway

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False), "version": 2}


def _release(index: int, ptr: int, opened: bool) -> None:
    try:
        with _context(index) as lib:
            (lib.cuIpcCloseMemHandle if opened else lib.cuMemFree_v2)(ctypes.c_uint64(ptr))
    except Exception:  # noqa: BLE001 - a finalizer must not raise; the process frees it at exit
        pass


def _tensor(memory: _Memory, device: torch.device) -> torch.Tensor:
    """A uint8 tensor over `memory`, without a copy (checked)."""
    tensor = torch.as_tensor(memory, device=device)
    if tensor.data_ptr() != memory.ptr or tensor.device.index != _index(device):
        raise Unavailable("torch copied the shared memory instead of viewing it")
    return tensor


def allocate(nbytes: int, device: torch.device) -> tuple[torch.Tensor, bytes]:
    """The source's side: `nbytes` on `device` and the IPC handle of exactly that memory."""
    index = _index(device)
    with _context(index) as lib:
        ptr = ctypes.c_uint64()
        _check(lib, lib.cuMemAlloc_v2(ctypes.byref(ptr), nbytes), f"allocating {nbytes} bytes")
        memory = _Memory(ptr.value, nbytes, index, opened=False)
        handle = _Handle()
        _check(lib, lib.cuIpcGetMemHandle(ctypes.byref(handle), ptr), "cuIpcGetMemHandle")
    return _tensor(memory, device), bytes(handle.reserved)


def open_handle(handle: bytes, nbytes: int, device: torch.device) -> torch.Tensor:
    """A replica's side: the source's memory, mapped once into this process."""
    if len(handle) != HANDLE_BYTES:
        raise Unavailable(f"a CUDA IPC handle has {HANDLE_BYTES} bytes, not {len(handle)}")
    index = _index(device)
    with _context(index) as lib:
        ptr = ctypes.c_uint64()
        code = lib.cuIpcOpenMemHandle_v2(
            ctypes.byref(ptr), _Handle.from_buffer_copy(handle), _LAZY_ENABLE_PEER_ACCESS
        )
        _check(lib, code, "cuIpcOpenMemHandle")
    return _tensor(_Memory(ptr.value, nbytes, index, opened=True), device)


def device_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(_index(device)).uuid)


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()
