"""Where and how this process runs: its rank in a torchrun job, device, precision, data loading.

Training, evaluation and prediction share it:

    rt = Runtime.setup(device="auto", amp="auto", workers=2, prefetch=4)
    for batch in rt.loader(dataset, EpisodeKeys(range(rt.rank, n, rt.world))): ...
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist
from torch.utils.data import DataLoader, Dataset, Sampler

AMP_MODES = ("auto", "bf16", "fp16", "off")
PRECISIONS = ("auto", "fp32", "bf16")  # of the extraction models (tracker, backbone)


def bf16_units(device: torch.device | str) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: a CUDA GPU with bf16, or a CPU
    with AMX or AVX512-BF16 units (checked at run time). Other CPUs emulate bf16, slower than
    fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = [getattr(torch.cpu, name, None)
              for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]  # fmt: skip
    if any(check is not None for check in checks):
        return any(check() for check in checks if check is not None)
    try:  # torch before 2.3: the kernel's CPU flags
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def extraction_precision(precision: str, device: torch.device | str) -> str:
    """The arithmetic an extraction model runs in: `auto` is bf16 where the device has bf16
    units (`bf16_units`), fp32 elsewhere; `fp32` and `bf16` as named."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bf16" if bf16_units(device) else "fp32"
    return precision


def fp32_only(model: str, precision: str) -> str:
    """The precision of a model that computes in fp32 only (the lk tracker, the official
    adapter, the pixels backbone): `precision` must be auto or fp32."""
    if precision not in ("auto", "fp32"):
        raise ValueError(f"{model} computes in fp32 only, not {precision!r}")
    return "fp32"


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of an amp mode on a device (None: full precision)."""
    if amp == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else None
    if amp == "fp16" and device.type != "cuda":
        raise ValueError("amp fp16 needs a CUDA device; use bf16 or off")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def amp_modes(amp: str, device: str, fixes: tuple[str, ...]) -> tuple[str, str]:
    """The amp modes of training and of evaluation on `device`. `auto` is bf16 on CUDA where
    supported, in both; without the fix "bf16" (tats/fixes.py), `auto` is the releases':
    fp16 autocast (with a GradScaler) in training and fp32 in evaluation, on CUDA."""
    if amp != "auto" or "bf16" in fixes:
        return amp, amp
    return ("fp16" if resolve_device(device).type == "cuda" else "off"), "off"


def resolve_device(device: str) -> torch.device:
    """`auto` (CUDA where there is one), `cpu`, `cuda` or `cuda:N`; ValueError naming the
    problem for anything else."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this machine has no CUDA device; use cpu")
    return dev


def pick_device(requested: str, cpu_only: bool = False) -> torch.device:
    """The device a stage runs on: `requested` (auto: CUDA where there is one), except that a
    stage that runs on the CPU only (the lk tracker) takes the CPU under auto."""
    if requested == "auto" and cpu_only:
        return torch.device("cpu")
    return resolve_device(requested)


def device_line(requested: str, device: torch.device, precision: str) -> str:
    """Where a stage runs, as its one line says: "cuda:0 (NVIDIA H100 80GB HBM3), bf16", and
    why it runs on the CPU where auto found no CUDA device."""
    where = str(device)
    if device.type == "cuda":
        where += f" ({torch.cuda.get_device_name(device)})"
    note = ""
    if requested == "auto" and device.type == "cpu":
        note = " (--device auto: no CUDA device found)" if not torch.cuda.is_available() else (
            " (it runs on the CPU only)"
        )
    return f"{where}, {precision}{note}"


def announce(line: str) -> None:
    """Print one line about what a stage picked (device, precision) as it starts."""
    print(line, flush=True)


def inference_amp(config: dict, device: str) -> str:
    """The amp mode a checkpoint runs inference with on `device`, from its training `config`:
    that of its evaluation (`amp_modes`: the releases' fp32 without the fix "bf16"), and fp32
    where that is fp16 autocast, which exists only on CUDA."""
    from tats.fixes import FIX_NAMES

    amp = amp_modes(config["amp"], device, tuple(config.get("fixes", FIX_NAMES)))[1]
    return "off" if amp == "fp16" and resolve_device(device).type != "cuda" else amp


@dataclass
class Runtime:
    """This process's rank in a torchrun job (0 of 1 without one), device, precision and data
    loading."""

    rank: int
    world: int
    device: torch.device
    amp_dtype: torch.dtype | None
    workers: int
    prefetch: int

    @classmethod
    def setup(cls, device: str, amp: str, workers: int, prefetch: int) -> Runtime:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        dev = resolve_device(device)
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
            torch.cuda.set_device(dev)
        if world > 1 and not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        return cls(rank, world, dev, autocast_dtype(amp, dev), workers, prefetch)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def precision(self) -> str:
        """"bf16 autocast", "fp16 autocast" or "fp32"."""
        if self.amp_dtype is None:
            return "fp32"
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype] + " autocast"

    def log(self, message: str) -> None:
        if self.main:
            print(message, flush=True)

    def autocast(self):
        if self.amp_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def loader(
        self, dataset: Dataset, sampler: Sampler | None = None, batch_size: int | None = None
    ) -> DataLoader:
        """Items in `sampler`'s order (whole episodes, batch_size None), or `batch_size` items
        of `dataset` at a time in index order (clips)."""
        batches = len(sampler) if sampler is not None else -(-len(dataset) // (batch_size or 1))
        workers = min(self.workers, batches)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            prefetch_factor=self.prefetch if workers > 0 else None,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),  # leaves the global torch random state alone
        )

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def gather(self, value) -> list:
        """Every rank's `value`, in rank order."""
        if self.world == 1:
            return [value]
        values = [None] * self.world
        torch_dist.all_gather_object(values, value)
        return values

    def mean(self, values: list[float]) -> list[float]:
        """The mean over the ranks of each value."""
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch_dist.all_reduce(tensor)
        return (tensor / self.world).tolist()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise sum of `tensor` over the ranks, in place (a tensor on the device)."""
        if self.world > 1:
            torch_dist.all_reduce(tensor)
        return tensor

    def barrier(self) -> None:
        if self.world > 1:
            torch_dist.barrier()
