"""`skain check-gpu`: what will run where - device, CUDA, mixed precision and a timed matmul."""
from __future__ import annotations

import time

import torch

from skain.engine import (
    amp_dtype,
    autocast,
    cpu_features,
    cpu_supports_bf16,
    resolve_device,
)


def _timed_matmul(device: torch.device, dtype: torch.dtype | None, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    with autocast(device, dtype):
        (a @ b).sum().item()  # warm-up
        start = time.perf_counter()
        for _ in range(reps):
            c = a @ b
        c.sum().item()
    seconds = (time.perf_counter() - start) / reps
    return 2 * n**3 / seconds / 1e12


def report() -> list[str]:
    device = resolve_device()
    dtype = amp_dtype(device)
    lines = [f"PyTorch {torch.__version__}", f"device: {device}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        lines += [f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {props.name}, "
                  f"{props.total_memory / 2**30:.1f} GiB", f"bf16 supported: {torch.cuda.is_bf16_supported()}"]
    else:
        lines += ["CUDA: not available (training and prediction run on the CPU)",
                  f"CPU threads: {torch.get_num_threads()}, bf16 kernels: {'yes' if cpu_supports_bf16() else 'no'}, "
                  f"AMX: {'yes' if cpu_features().get('amx_bf16') else 'no'} (bf16 autocast only with AMX: "
                  "without it, it trained at 0.56x fp32's speed; --amp bf16 forces it)"]
    lines.append(f"mixed precision used for training: {str(dtype).replace('torch.', '') if dtype else 'off (fp32)'}")
    lines.append(f"matmul 2048x2048 fp32: {_timed_matmul(device, None):.2f} TFLOP/s")
    if dtype is not None:
        lines.append(f"matmul 2048x2048 {str(dtype).replace('torch.', '')} autocast: "
                     f"{_timed_matmul(device, dtype):.2f} TFLOP/s")
    return lines
