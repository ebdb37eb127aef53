"""Where every training runs: device, rank, precision, distribution, random streams and
checkpoints, in one place for every family (``train``, ``train-lsr``, and the step
trainings ``train-dae``, ``train-ssl``, ``train-tissue``).

- Device: ``--device`` as :func:`core.device.select_device` chooses it; under ``torchrun``
  (``LOCAL_RANK``, ``RANK``, ``WORLD_SIZE`` in the environment) a CUDA run puts each rank on
  its own ``cuda:LOCAL_RANK`` (``torch.cuda.set_device``) and DistributedDataParallel gets
  that ``device_ids``; CPU ranks use gloo, GPU ranks NCCL.
- Batches: drawn and augmented on the CPU, then moved to the network's device
  (:func:`to_device`, :func:`module_device`), validation included.
- Precision: bf16 autocast on the device's own type (:func:`use_bf16`): on CUDA where the GPU
  supports it, on the CPU only where it has bf16 matrix instructions (elsewhere emulated and
  about ten times slower), never on MPS; float32 otherwise.
- Random streams: CPU generators (seeded per step or epoch) and the CPU's global generator
  (restored by a resume), the numbers moved to the device after drawing, so a CPU and a GPU
  run draw the same numbers (:func:`normal_like`).
- Checkpoints: safetensors + JSON, no pickle (:func:`save_checkpoint`, :func:`load_checkpoint`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ...core.device import cpu_has_bf16, select_device
from ...errors import InputError


@dataclass(frozen=True)
class Ranks:
    """This process's place in a ``torchrun`` job (0, 1, 0 when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0


def ranks_from_env(env: Any = None) -> Ranks:
    env = os.environ if env is None else env
    return Ranks(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def use_bf16(dev: torch.device, asked: bool | None = None) -> bool:
    """bf16 autocast on ``dev``: ``asked`` (None: where it is fast) and where the device has it."""
    if dev.type == "cuda":
        return bool(torch.cuda.is_bf16_supported()) and asked is not False
    if dev.type == "cpu":
        return cpu_has_bf16() if asked is None else bool(asked)
    return False  # MPS and others: float32


@dataclass
class Placement:
    """Where a training runs (see the module docstring)."""

    device: torch.device
    ranks: Ranks
    bf16: bool = False

    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def world(self) -> int:
        return self.ranks.world

    @property
    def memory(self) -> torch.memory_format:
        return torch.channels_last if self.bf16 else torch.contiguous_format  # channels-last helps bf16 only

    def autocast(self):
        """bf16 autocast on the device's own type, or nothing (float32)."""
        if not self.bf16:
            import contextlib
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def to(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        return x.contiguous(memory_format=self.memory) if x.dim() == 4 else x

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` under DistributedDataParallel when several processes train (with this
        rank's GPU as ``device_ids`` on CUDA), else ``module`` itself."""
        if self.world <= 1:
            return module
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=ids, output_device=ids[0] if ids else None)

    def finish(self) -> None:
        if self.world > 1:
            import torch.distributed as dist
            if dist.is_initialized():
                dist.barrier()
                dist.destroy_process_group()


def place(device: str = "cpu", bf16: bool | None = False, distributed: bool = False, what: str = "this training"
          ) -> Placement:
    """The placement of a training asked to run on ``device`` (cpu, cuda, mps, auto), with
    ``bf16`` as the config says it (None: where fast; False: float32). Under torchrun,
    ``distributed`` families start the process group; the others refuse to run N copies."""
    ranks = ranks_from_env()
    if ranks.world > 1 and not distributed:
        raise InputError(f"{what} runs in one process; run it without torchrun (torchrun is for `train`)")
    dev = select_device(device)
    if dev.type == "cuda" and ("LOCAL_RANK" in os.environ or ranks.world > 1):
        if ranks.local_rank >= torch.cuda.device_count():
            raise InputError(f"LOCAL_RANK {ranks.local_rank} but only {torch.cuda.device_count()} GPUs on this "
                             "machine; start fewer processes per node")
        dev = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(dev)
    if ranks.world > 1:
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Placement(dev, ranks, use_bf16(dev, bf16))


def module_device(module: torch.nn.Module) -> torch.device:
    """The device of a network's weights (the CPU for one without any)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def to_device(module: torch.nn.Module, *tensors: torch.Tensor) -> Any:
    """``tensors`` on ``module``'s device (one tensor, or a tuple of them)."""
    dev = module_device(module)
    moved = tuple(t.to(dev) for t in tensors)
    return moved[0] if len(moved) == 1 else moved


def normal_like(t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal noise shaped like ``t`` on its device, drawn on the CPU (``generator``
    or the global CPU stream): the same numbers on every device."""
    return torch.randn(t.shape, generator=generator, dtype=torch.float32).to(device=t.device, dtype=t.dtype)


# ---------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, model, optimizer, sched, state: dict[str, Any]) -> None:
    """Weights, optimiser state and the CPU random state (safetensors), the rest (JSON)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    for pid, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"optim.{pid}.{k}"] = torch.as_tensor(v).detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    tmp = path / "checkpoint.safetensors.tmp"
    save_file(tensors, str(tmp))
    meta = {**state, "param_groups": opt["param_groups"], "scheduler": sched.state_dict()}
    (path / "checkpoint.json.tmp").write_text(json.dumps(meta, default=float))
    tmp.replace(path / "checkpoint.safetensors")
    (path / "checkpoint.json.tmp").replace(path / "checkpoint.json")


def load_checkpoint(path: Path, model, optimizer, sched) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote (tensors onto the model's device)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "checkpoint.safetensors"))
    meta = json.loads((path / "checkpoint.json").read_text())
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            opt_state.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta.pop("param_groups")})  # moved to the params
    sched.load_state_dict(meta.pop("scheduler"))
    torch.set_rng_state(tensors["rng.torch"])
    return meta
