"""Devices without a GPU: training, validation and scoring with the network on a device other
than the one the data starts on (PyTorch's ``meta`` device; a CUDA GPU as well where one is
present), the torchrun environment simulated on CPU and on mocked GPU ranks, precision and
random streams (issue 39, items 3 and 5).

A probe network records the device of what it is given and stops the run there: the test
asserts the batch was moved to the network's device before the network saw it.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from anomaly_localizer.errors import InputError
from anomaly_localizer.tooling.training import loop

from phantoms import TINY_DAE_ARCH, image_from, phantom_array

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["meta", pytest.param("cuda", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="no CUDA GPU on this machine: the device tests ran on the meta device only"))]


class Reached(Exception):
    """The probe network was called: the run stops here."""


class Probe(torch.nn.Module):
    """A network on ``device`` that records the device of its input and stops the run."""

    def __init__(self, device: str):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1, device=device))
        self.seen: list[torch.device] = []

    def forward(self, x, *rest):
        self.seen.append(x.device)
        raise Reached

    encode = forward
    encode_continuous = forward


def _healthy_folder(root, n=6):
    (root / "t1").mkdir(parents=True)
    (root / "brainmask").mkdir()
    for i in range(n):
        arr = phantom_array((24, 40, 34), seed=i) * (1 + 0.1 * i)
        sitk.WriteImage(image_from(arr), str(root / "t1" / f"S{i:02d}_T1.nii.gz"))
        sitk.WriteImage(image_from((arr != 0).astype(np.uint8)), str(root / "brainmask" / f"S{i:02d}_brainmask.nii.gz"))
    return root


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    return _healthy_folder(tmp_path_factory.mktemp("healthy"))


def _on(device: str, monkeypatch):
    """``--device`` chooses ``device`` (the meta device is no user choice: the test forces it)."""
    monkeypatch.setattr(loop, "select_device", lambda name="auto": torch.device(device))


def _expected(device: str) -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device(device)


# ------------------------------------------------------------------------------- training

@pytest.mark.parametrize("device", DEVICES)
def test_a_vae_training_step_runs_its_batch_on_the_networks_device(healthy, tmp_path, monkeypatch, device):
    import anomaly_localizer.tooling.training.train as train_mod
    _on(device, monkeypatch)
    probe = Probe(device)
    monkeypatch.setattr(train_mod, "build_network", lambda arch: probe)
    cfg = train_mod.TrainConfig.from_json(None, slice_size=32, spacing_mm=6.0, batch_size=4, max_epochs=1,
                                          val_fraction=0.2, calibration_fraction=0.2, test_fraction=0.2)
    with pytest.raises(Reached):
        train_mod.train(healthy, tmp_path / "vae", cfg, device="cpu", progress=False, calibrate=False)
    assert probe.seen == [_expected(device)]


@pytest.mark.parametrize("device", DEVICES)
def test_a_dae_training_step_runs_its_batch_on_the_networks_device(healthy, tmp_path, monkeypatch, device):
    import anomaly_localizer.core.package as package_mod
    from anomaly_localizer.tooling.training.train_dae import DAETrainConfig, train_dae
    _on(device, monkeypatch)
    probe = Probe(device)
    monkeypatch.setattr(package_mod, "build_network", lambda arch: probe)
    cfg = DAETrainConfig.from_json(None, steps=2, batch_size=2, validate_every=1, spacing_mm=6.0, noise_res=4,
                                   val_fraction=0.2, calibration_fraction=0.2, test_fraction=0.2, bf16=False)
    cfg.architecture = {k: v for k, v in TINY_DAE_ARCH.items() if k != "type"}
    with pytest.raises(Reached):
        train_dae(healthy, tmp_path / "dae", cfg, calibrate=False)
    assert probe.seen == [_expected(device)]


# ----------------------------------------------------------------------------- validation

class _Set:
    def __init__(self, **kw):
        self.__dict__.update(kw)

    def __len__(self):
        return len(self.x)


@pytest.mark.parametrize("device", DEVICES)
def test_the_vae_validation_runs_on_the_networks_device(device):
    from anomaly_localizer.tooling.training.train import evaluate_loss
    probe = Probe(device)
    with pytest.raises(Reached):
        evaluate_loss(probe, _Set(x=torch.rand(4, 1, 32, 32)))
    assert probe.seen == [_expected(device)]


@pytest.mark.parametrize("device", DEVICES)
def test_the_dae_validation_runs_on_the_networks_device(device):
    from anomaly_localizer.tooling.training.train_dae import DAETrainConfig, validation_loss
    probe = Probe(device)
    x = torch.rand(4, 3, 32, 32)
    with pytest.raises(Reached):
        validation_loss(probe, _Set(x=x, mask=x[:, 1:2] > 0.1), DAETrainConfig(noise_res=4))
    assert probe.seen == [_expected(device)]


@pytest.mark.parametrize("device", DEVICES)
def test_the_ssl_validation_runs_on_the_networks_device(device):
    from anomaly_localizer.tooling.training.train_ssl import validation_figures
    probe = Probe(device)
    x = torch.rand(4, 3, 32, 32)
    sets = {"held_out": (x, torch.zeros(4, 1, 32, 32), torch.ones(4, 1, 32, 32)),
            "train_tasks": (x, torch.zeros(4, 1, 32, 32), torch.ones(4, 1, 32, 32))}
    with pytest.raises(Reached):
        validation_figures(probe, sets, flip=False)
    assert probe.seen == [_expected(device)]


@pytest.mark.parametrize("device", DEVICES)
def test_the_tissue_validation_runs_on_the_networks_device(device):
    from anomaly_localizer.tooling.training.train_tissue import TissueSet, mean_dice
    probe = Probe(device)
    with pytest.raises(Reached):
        mean_dice(probe, TissueSet(torch.rand(4, 3, 32, 32), torch.zeros(4, 32, 32, dtype=torch.long)), 5)
    assert probe.seen == [_expected(device)]


# -------------------------------------------------------------------------------- scoring

@pytest.mark.parametrize("device", DEVICES)
def test_a_scoring_step_runs_its_batch_on_the_networks_device(device):
    from anomaly_localizer.core.detectors.base import ScoringContext, run_in_batches
    probe = Probe(device)
    with pytest.raises(Reached):
        run_in_batches(probe, torch.rand(4, 3, 32, 32), ScoringContext(device=_expected(device)), 2, "restored")
    assert probe.seen == [_expected(device)]


def test_lsr_resampling_draws_on_the_cpu_in_float64_whatever_the_device(monkeypatch):
    """The codes are drawn from a CPU generator in float64 computed on the CPU: a GPU run draws
    what a CPU run draws, and MPS (no float64) is never asked for float64."""
    from anomaly_localizer.core import lsr
    seen = []
    real = torch.multinomial

    def multinomial(probs, n, generator=None):
        seen.append((probs.device.type, probs.dtype, generator.device.type))
        return real(probs, n, generator=generator)

    monkeypatch.setattr(lsr.torch, "multinomial", multinomial)
    prior = lambda grids, pos: torch.zeros(grids.shape[0], 5, 2, 2)  # noqa: E731
    grids = torch.zeros(3, 2, 2, dtype=torch.long)
    flags = torch.ones(3, 2, 2, dtype=torch.bool)
    lsr.resample(prior, grids, torch.zeros(3), flags, torch.Generator().manual_seed(0))
    assert seen and all(s == ("cpu", torch.float64, "cpu") for s in seen)
    import inspect
    assert "Generator(device" not in inspect.getsource(lsr.lsr_scores)


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU on this machine: CPU and GPU LSR draws not compared")
def test_lsr_scores_on_the_gpu_equal_those_on_the_cpu(tiny_lsr_package):
    from anomaly_localizer.core.lsr import lsr_scores
    params = {**tiny_lsr_package.settings("lsr")}
    from anomaly_localizer.core.lsr import DEFAULT_LSR_SCORING
    params = {**DEFAULT_LSR_SCORING, **params}
    size = tiny_lsr_package.contract.slice_size
    x = torch.rand(4, 1, size, size)
    mask, pos = torch.ones_like(x, dtype=torch.bool), torch.linspace(0.2, 0.8, 4)
    cpu = lsr_scores(tiny_lsr_package.load_model("cpu"), x, mask, pos, params)
    gpu = lsr_scores(tiny_lsr_package.load_model("cuda"), x.cuda(), mask.cuda(), pos.cuda(), params)
    assert torch.allclose(cpu.slice, gpu.slice.cpu(), rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------- torchrun

@pytest.fixture()
def dist_calls(monkeypatch):
    """torch.distributed and DistributedDataParallel recorded instead of run."""
    calls = {"init": [], "ddp": [], "set_device": []}
    import torch.distributed as dist
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls["init"].append(backend))
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda module, device_ids=None, output_device=None: calls["ddp"].append(device_ids) or module)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: calls["set_device"].append(torch.device(dev)))
    return calls


def _rank(monkeypatch, rank: int, world: int = 2):
    for k, v in {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": world}.items():
        monkeypatch.setenv(k, str(v))


@pytest.mark.parametrize("rank", [0, 1])
def test_torchrun_cpu_ranks_use_gloo_and_no_device_ids(monkeypatch, dist_calls, rank):
    _rank(monkeypatch, rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    where = loop.place("auto", distributed=True)
    assert where.device == torch.device("cpu") and (where.rank, where.world) == (rank, 2)
    where.wrap(torch.nn.Linear(2, 2))
    assert dist_calls == {"init": ["gloo"], "ddp": [None], "set_device": []}


@pytest.mark.parametrize("rank", [0, 1])
def test_torchrun_gpu_ranks_each_use_their_local_rank_gpu(monkeypatch, dist_calls, rank):
    _rank(monkeypatch, rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    where = loop.place("cuda", bf16=None, distributed=True)
    assert where.device == torch.device("cuda", rank)
    assert where.bf16 and where.autocast().device == "cuda"  # autocast on the device's own type
    where.wrap(torch.nn.Linear(2, 2))
    assert dist_calls == {"init": ["nccl"], "ddp": [[rank]], "set_device": [torch.device("cuda", rank)]}


def test_torchrun_with_more_processes_than_gpus_is_refused(monkeypatch, dist_calls):
    _rank(monkeypatch, 2, world=3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(InputError, match="LOCAL_RANK 2"):
        loop.place("cuda", distributed=True)


def test_a_one_process_training_under_torchrun_is_refused(monkeypatch, dist_calls):
    _rank(monkeypatch, 0)
    with pytest.raises(InputError, match="one process"):
        loop.place("cpu", what="train-dae")
    assert dist_calls["init"] == []


def test_alone_there_is_no_process_group_and_no_ddp(monkeypatch, dist_calls):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    where = loop.place("cpu", distributed=True)
    module = torch.nn.Linear(2, 2)
    assert where.wrap(module) is module and dist_calls["init"] == [] and where.world == 1


# ------------------------------------------------------------------------ precision, streams

def test_bf16_only_where_the_device_has_it(monkeypatch):
    from anomaly_localizer.core import device as device_mod
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: False)
    assert not loop.use_bf16(torch.device("cpu")) and loop.use_bf16(torch.device("cpu"), True)
    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: True)
    assert loop.use_bf16(torch.device("cpu")) and not loop.use_bf16(torch.device("cpu"), False)
    assert not loop.use_bf16(torch.device("mps")) and not loop.use_bf16(torch.device("mps"), True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert not loop.use_bf16(torch.device("cuda", 0), True)  # asked, but this GPU has none: float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert loop.use_bf16(torch.device("cuda", 0)) and not loop.use_bf16(torch.device("cuda", 0), False)
    assert not device_mod.float64_ok(torch.device("mps")) and device_mod.float64_ok(torch.device("cpu"))


@pytest.mark.parametrize("device", DEVICES)
def test_training_noise_is_drawn_on_the_cpu_and_moved(device):
    """The VAE's sampling noise comes from the CPU's stream (restored by a resume), so a GPU
    run draws the numbers a CPU run draws."""
    torch.manual_seed(5)
    expected = torch.randn(2, 3)
    torch.manual_seed(5)
    noise = loop.normal_like(torch.zeros(2, 3, device=device))
    assert noise.device == _expected(device)
    if device != "meta":
        assert torch.equal(noise.cpu(), expected)
    assert torch.equal(torch.randn(1), (torch.manual_seed(5), torch.randn(2, 3), torch.randn(1))[2])
