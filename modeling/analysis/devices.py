"""Which device and dtype a command runs on: ``--device auto`` (the default of every command) and
``--dtype`` left out.

``auto`` picks CUDA when this torch has it and a GPU is visible, then Apple's MPS, then the CPU.
With no ``--dtype``, CUDA gets bfloat16 (what an 8B checkpoint needs to fit and run fast) and other
devices keep the command's own default (the checkpoint's dtype, or float32 for training).
A device this machine cannot run (``--device cuda`` on a CPU-only torch, ``cuda:3`` with one
GPU, a name torch does not know) is refused with one line, before anything loads.
"""
from typing import Optional

AUTO = "auto"
CUDA_DTYPE = "bfloat16"


class DeviceError(ValueError):
    """A ``--device`` this machine cannot run; the message is one line naming the flag and the fix."""


def _mps_available(torch) -> bool:
    backend = getattr(getattr(torch, "backends", None), "mps", None)
    return bool(backend is not None and backend.is_available())


def pick_device(device: Optional[str] = AUTO, flag: str = "--device") -> str:
    """The device to run on, as a string torch accepts: ``device`` checked, or ``auto``/None resolved.

    Raises :class:`DeviceError` (one line) when ``device`` is not a torch device or not usable here."""
    import torch

    if device is None or str(device).strip().lower() == AUTO:
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available(torch) else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"{flag} {device}: not a torch device; expected auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = (f"this torch ({torch.__version__}) was built without CUDA" if torch.version.cuda is None
                   else "no CUDA GPU is visible")
            raise DeviceError(f"{flag} {device}: {why}; use {flag} cpu (or auto), or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"{flag} {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not _mps_available(torch):
        raise DeviceError(f"{flag} {device}: MPS is not available on this machine; use {flag} cpu (or auto)")
    return str(dev)


def pick_dtype(device: str, dtype: Optional[str], fallback: Optional[str] = None) -> Optional[str]:
    """``dtype`` when given; else bfloat16 on CUDA and ``fallback`` elsewhere (the command's own default)."""
    if dtype is not None:
        return dtype
    return CUDA_DTYPE if str(device).startswith("cuda") else fallback


def pick(device: Optional[str] = AUTO, dtype: Optional[str] = None, fallback_dtype: Optional[str] = None,
         flag: str = "--device"):
    """``(device, dtype)`` for a command: :func:`pick_device` then :func:`pick_dtype`."""
    dev = pick_device(device, flag)
    return dev, pick_dtype(dev, dtype, fallback_dtype)


__all__ = ["AUTO", "CUDA_DTYPE", "DeviceError", "pick", "pick_device", "pick_dtype"]
