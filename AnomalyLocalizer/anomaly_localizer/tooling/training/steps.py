"""The one training loop: every family (``train``, ``train-lsr``'s two stages, ``train-dae``,
``train-ssl``, ``train-tissue``, ``train-brainmask``) trains through :func:`run_steps`.

Steps, validated every ``validate_every`` steps (an epoch's batches for the families that
count epochs): the figure that validation returns picks the best weights
(``best.safetensors``), a checkpoint (safetensors + JSON, no pickle) follows every
validation, and ``--resume`` continues from it. The learning rate is set per step (warm-up
and cosine, :func:`lr_at`) or divided by 10 on a validation plateau (the VAE's and LSR's
schedule); a family may stop early after validations without improvement. Where it runs
(device, rank, bf16, random streams) is :mod:`.loop`'s. The random draws of a step depend
only on the seed and the step (the trainer makes its batch from the generator it is handed,
or from its own epoch's generator), so a resumed run makes the same draws as an
uninterrupted one.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ...errors import InputError
from .loop import Placement, load_checkpoint, place, save_checkpoint

# (step, generator) -> the loss of one batch, or (loss, {name: figure}) to record beside it
BatchLoss = Callable[[int, torch.Generator], Any]
Validate = Callable[[], tuple[float, dict[str, float]]]  # -> (figure that picks the best, other figures)


@dataclass
class StepRun:
    """A training in ``out``: the network, its optimiser, its schedule and the loop's state."""

    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    sched: Any
    state: dict[str, Any]
    ckpt_dir: Path

    @property
    def first_step(self) -> int:
        return int(self.state.get("_first_step", 0))


@dataclass
class LoopPlan:
    """How :func:`run_steps` trains: ``steps`` in all, a validation every ``validate_every``;
    the rate per step from ``learning_rate`` (None: the optimiser's, divided by 10 after
    ``plateau_patience`` validations without improvement); a stop after ``early_stop``
    validations without improvement (None: never); ``epoch_steps`` counts epochs in the
    history and the messages."""

    steps: int
    validate_every: int
    seed: int
    learning_rate: Callable[[int], float] | None = None
    plateau_patience: int | None = None
    early_stop: int | None = None
    epoch_steps: int | None = None

    @classmethod
    def of(cls, cfg: Any) -> "LoopPlan":
        """The plan of a step training's config (steps, validate_every, seed, learning_rate)."""
        return cls(cfg.steps, cfg.validate_every, cfg.seed, lambda step: lr_at(step, cfg))

    @classmethod
    def epochs(cls, epochs: int, batches: int, seed: int, plateau_patience: int | None = None,
               early_stop: int | None = None, learning_rate: Callable[[int], float] | None = None) -> "LoopPlan":
        """``epochs`` of ``batches`` steps, validated after each."""
        batches = max(int(batches), 1)
        return cls(epochs * batches, batches, seed, learning_rate, plateau_patience, early_stop, batches)

    def unit(self, step: int) -> str:
        return f"epoch {step // self.epoch_steps}" if self.epoch_steps else f"step {step}/{self.steps}"


def start_run(net: torch.nn.Module, cfg: Any, out: Path, resume: bool, say: Callable[[str], None],
              optimizer: torch.optim.Optimizer | None = None, sched: Any = None, ckpt_dir: Path | None = None,
              free: tuple[str, ...] = ("steps",)) -> StepRun:
    """AdamW for ``net`` (cfg.learning_rate, cfg.weight_decay; or ``optimizer`` and ``sched``
    given) and a fresh state, or the checkpoint's in ``ckpt_dir`` (``out/checkpoint``) when
    resuming, refused when the configuration differs but for the ``free`` keys."""
    ckpt_dir = ckpt_dir or out / "checkpoint"
    if optimizer is None:
        optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if sched is None:
        sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # the rate is set per step
    now = json.loads(json.dumps(asdict(cfg)))
    state: dict[str, Any] = {"step": 0, "best_val": None, "best_step": 0, "history": [], "config": now}
    if resume:
        state = load_checkpoint(ckpt_dir, net, optimizer, sched)
        if "step" not in state:  # an epoch loop's checkpoint, before the loops were one
            raise InputError(f"the checkpoint in {ckpt_dir} was written by an older version of the training loop and "
                             "cannot be continued; start over with --force")
        unset = dict.fromkeys(free)
        if {**state.get("config", now), **unset} != {**now, **unset}:
            raise InputError(f"the configuration differs from the one {out} was trained with; "
                             "resume with the same options or start over with --force")
        state["config"] = now
        say(f"resuming after step {state['step']}")
    state["_first_step"] = state["step"]
    return StepRun(net, optimizer, sched, state, ckpt_dir)


def lr_at(step: int, cfg: Any) -> float:
    """Linear warm-up over 100 steps, then cosine decay to 0 at cfg.steps."""
    warm = min(1.0, (step + 1) / 100)
    return cfg.learning_rate * warm * 0.5 * (1 + math.cos(math.pi * min(step, cfg.steps) / cfg.steps))


def run_steps(run: StepRun, cfg: Any, batch_loss: BatchLoss, validate: Validate, say: Callable[[str], None],
              stop_after: int | None = None, higher_is_better: bool = False, figure_name: str = "validation",
              after_step: Callable[[int], None] | None = None, writes: bool = True) -> bool:
    """Train until the plan's last step or an early stop (True), or until ``stop_after`` steps
    of this run (False, at a checkpoint). ``cfg``: a :class:`LoopPlan` or a step training's
    config. ``after_step(step)`` runs after each optimiser step (the VQ-VAE counts its codes
    there). ``writes``: this process writes the checkpoints (rank 0 of a distributed run).
    ``best.safetensors`` in the checkpoint folder holds the best weights."""
    from safetensors.torch import save_file

    plan = cfg if isinstance(cfg, LoopPlan) else LoopPlan.of(cfg)
    state, net, optimizer = run.state, run.net, run.optimizer
    t_window, window, extras = time.perf_counter(), [], {}
    net.train()
    if state.get("stopped_early") and state["step"] < plan.steps:  # a resume cannot extend it
        say(f"this run stopped early at {plan.unit(state['step'])} (no improvement for {plan.early_stop} "
            "validations) and stays stopped: nothing more to train; start a new run to train longer")
    while state["step"] < plan.steps and not state.get("stopped_early"):
        if stop_after is not None and state["step"] - run.first_step >= stop_after:
            if writes:
                _save(run)
            say(f"stopped after step {state['step']} as asked; continue with --resume")
            return False
        step = state["step"]
        gen = torch.Generator().manual_seed(plan.seed * 1000003 + step)
        if plan.learning_rate is not None:
            for group in optimizer.param_groups:
                group["lr"] = plan.learning_rate(step)
        loss = batch_loss(step, gen)
        loss, figures = loss if isinstance(loss, tuple) else (loss, {})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step(step)
        window.append(float(loss.detach()))
        for k, v in figures.items():
            extras[k] = extras.get(k, 0.0) + float(v)
        state["step"] = step + 1
        if state["step"] % plan.validate_every == 0 or state["step"] == plan.steps:
            net.eval()
            with torch.no_grad():
                figure, extra = validate()
            net.train()
            best = state["best_val"]
            improved = best is None or (figure > best if higher_is_better else figure < best)
            if improved:
                state["best_val"], state["best_step"] = figure, state["step"]
                if writes:
                    run.ckpt_dir.mkdir(parents=True, exist_ok=True)
                    save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
                              str(run.ckpt_dir / "best.safetensors"))
            if plan.learning_rate is None and plan.plateau_patience is not None:
                run.sched.step(-figure if higher_is_better else figure)
            seconds = time.perf_counter() - t_window
            entry = {"step": state["step"], "train_loss": sum(window) / len(window),
                     **{f"train_{k}": v / len(window) for k, v in extras.items()},
                     "val_loss" if not higher_is_better else "val_figure": figure, **extra,
                     "lr": optimizer.param_groups[0]["lr"], "seconds": seconds}
            if plan.epoch_steps:
                entry = {"epoch": state["step"] // plan.epoch_steps, **entry}
            state["history"].append(entry)
            waited = (state["step"] - state["best_step"]) // plan.validate_every
            if plan.early_stop is not None and waited >= plan.early_stop:
                state["stopped_early"] = True
            if writes:
                _save(run)
            per_step = seconds / len(window)
            others = "".join(f", {k} {v:.4f}" for k, v in extra.items())
            say(f"{plan.unit(state['step'])}: train {entry['train_loss']:.5f}, {figure_name} "
                f"{figure:.5f}{' (best)' if improved else ''}{others}, lr {entry['lr']:.1e}, {per_step:.2f} s/step, "
                f"{per_step * (plan.steps - state['step']) / 60:.0f} min left")
            if state.get("stopped_early"):
                say(f"stopping: no improvement for {plan.early_stop} validations")
            t_window, window, extras = time.perf_counter(), [], {}
    return True


def training_record(run: StepRun, plan: LoopPlan | None = None) -> dict[str, Any]:
    """What a package records of its run: the best and last step (epoch for epoch trainings),
    the best validation figure and the history."""
    state = run.state
    if plan is not None and plan.epoch_steps:
        return {"best_epoch": state["best_step"] // plan.epoch_steps, "best_val_loss": state["best_val"],
                "epochs_run": state["step"] // plan.epoch_steps, "history": state["history"]}
    return {"best_step": state["best_step"], "steps_run": state["step"], "history": state["history"]}


def _save(run: StepRun) -> None:
    state = {k: v for k, v in run.state.items() if not k.startswith("_")}
    save_checkpoint(run.ckpt_dir, run.net, run.optimizer, run.sched, state)


def load_best(run: StepRun) -> torch.nn.Module:
    """The best weights into the network, contiguous and in eval mode."""
    from safetensors.torch import load_file
    run.net.load_state_dict(load_file(str(run.ckpt_dir / "best.safetensors")))
    return run.net.to(memory_format=torch.contiguous_format).eval()


@dataclass
class SliceContract:
    """What the 2.5D U-Net training configs (DAE, SSL) share: the input contract (with the
    subclass's ``architecture``: ``slice_size`` and ``in_channels``), the subject split,
    precision and the intensity augmentation."""

    spacing_mm: float = 2.0  # the data's native resolution: a 6 mm anomaly is three pixels
    modality: str = "T1w"
    init_from: str | None = None  # a package whose weights the network starts from
    contrasts: list[str] | None = None  # the input contract's; None: t1, or a rendering folder's first contrast
    seed: int = 0  # also the subject split: the same seed splits as the other models do
    batch_size: int = 16
    weight_decay: float = 1e-4
    bf16: bool | None = None  # None: where fast (CUDA with bf16, a CPU with bf16 matrix instructions; .loop.use_bf16)
    flip_lr: bool = True
    contrast: float = 0.15  # gain 1 +- this
    gamma: float = 0.2  # exponent exp(+- this)
    bias_field: float = 0.15  # smooth multiplicative field 1 +- this
    val_fraction: float = 0.1
    calibration_fraction: float = 0.15
    test_fraction: float = 0.15

    @property
    def contract(self) -> dict[str, Any]:
        from ...core.volume import NORMALISATION
        arch = self.architecture  # type: ignore[attr-defined]
        return {"modality": self.modality, "contrasts": list(self.contrasts or ["t1"]),
                "orientation": "axial",  # type: ignore[attr-defined]
                "slice_size": int(arch["slice_size"]), "spacing_mm": float(self.spacing_mm),  # type: ignore[attr-defined]
                "normalisation": NORMALISATION, "context_slices": int(arch["in_channels"])}


def write_trained_package(run: StepRun, cfg: Any, out: Path, data: str | Path, arch_type: str, method: str,
                          summary: str, split: dict[str, list[str]], by_id: dict[str, Any], dev: torch.device,
                          use_bf16: bool, t_start: float, best_key: str, calibrate: bool,
                          say: Callable[[str], None], training_extra: dict[str, Any] | None = None) -> Path:
    """The best weights of a finished step run as a package of ``arch_type`` offering
    ``method`` (its scoring block is ``cfg.scoring`` under the method's name), calibrated on
    the split's calibration subjects unless ``calibrate`` is False."""
    from ... import __version__
    from ...core.package import save_package

    state = run.state
    net = load_best(run)
    meta = {
        "name": out.name,
        "summary": summary,
        "architecture": {"type": arch_type, **cfg.architecture},
        "input_contract": cfg.contract,
        method: dict(cfg.scoring),
        "recommended_method": method,
        "calibration": {},
        "provenance": {"engine_version": __version__, "data": str(Path(data)), "subjects": split,
                       "trained": time.strftime("%Y-%m-%d"), "torch": torch.__version__},
        "training": {"config": asdict(cfg), "best_step": state["best_step"], best_key: state["best_val"],
                     **(training_extra or {}), "steps_run": state["step"], "history": state["history"],
                     "threads_per_process": torch.get_num_threads(), "bf16": use_bf16,
                     "seconds_this_run": time.perf_counter() - t_start},
    }
    package = save_package(net, meta, out)
    say(f"wrote {out} (best step {state['best_step']}, {best_key.replace('_', ' ')} {state['best_val']:.5f})")
    if calibrate and split["calibration"]:
        from ..release.calibrate import calibrate_package
        calibrate_package(package, [by_id[i] for i in split["calibration"]], device=dev.type, progress=say)
    return out


def read_config_values(path: str | Path | None, known: set[str]) -> dict[str, Any]:
    """Keys of a JSON training configuration, or of a package's model.json (its recorded
    config, to retrain from it); unknown keys are refused."""
    values: dict[str, Any] = {}
    if path:
        try:
            values = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read the training config {path} ({exc}); give a JSON file") from exc
    if isinstance(values.get("training"), dict) and "config" in values["training"]:
        values = values["training"]["config"]  # a package's model.json: retrain from its record
    unknown = set(values) - known
    if unknown:
        raise InputError(f"unknown training config keys {sorted(unknown)} in {path}")
    return values


ARCHITECTURE_OPTIONS = ("slice_size", "in_channels", "feature_maps")  # overrides that go into "architecture"


def load_config(cls: Any, path: str | Path | None, architecture: Any, default_scoring: dict[str, Any],
                **overrides: Any) -> Any:
    """A 2.5D training config of dataclass ``cls`` from a JSON file (or a package's model.json)
    and command-line ``overrides`` (None: not given): the architecture block validated by the
    family's schema ``architecture``, the scoring block completed with ``default_scoring``."""
    values = read_config_values(path, set(cls.__dataclass_fields__))
    cfg = cls(**{k: v for k, v in values.items() if k != "architecture"})
    cfg.architecture = architecture.model_validate({**cfg.architecture, **values.get("architecture", {})}) \
        .model_dump(exclude={"type", "folds"})  # a training makes one network; folds are joined later
    for k, v in overrides.items():
        if v is not None:
            if k in ARCHITECTURE_OPTIONS:
                cfg.architecture[k] = v
            else:
                setattr(cfg, k, v)
    cfg.scoring = {**default_scoring, **cfg.scoring}
    return cfg


@dataclass
class Setup:
    """What a 2.5D step training works with: where it runs, split and slices, the run."""

    where: Placement
    split: dict[str, list[str]]
    by_id: dict[str, Any]
    train_set: Any
    val_set: Any
    run: StepRun

    @property
    def dev(self) -> torch.device:
        return self.where.device

    @property
    def use_bf16(self) -> bool:
        return self.where.bf16

    @property
    def memory(self) -> torch.memory_format:
        return self.where.memory

    @property
    def autocast(self) -> Any:
        return self.where.autocast()


def set_up(data: str | Path, out: Path, cfg: Any, arch_type: str, resume: bool, force: bool, device: str,
           cache_dir: str | Path | None, say: Callable[[str], None], describe: str) -> Setup:
    """Refuse a used ``out`` (unless resuming or forced), split the subjects, load their
    slices, build the ``arch_type`` network and the run (resumed from its checkpoint), and
    place it (:func:`.loop.place`: the device, and bf16 autocast with channels-last tensors
    where the device has fast bf16; emulated bf16 is about ten times slower than float32)."""
    from ...core.device import keep_freed_memory
    from ...core.package import build_network
    from ..data import check_run_folder, split_slices

    check_run_folder(out, resume, force, out / "checkpoint" / "checkpoint.json")
    where = place(device, cfg.bf16, what=f"train-{arch_type.split('-')[-1]}")
    if where.device.type == "cpu":
        keep_freed_memory()
    split, by_id, train_set, val_set = split_slices(data, cfg, Path(cache_dir) if cache_dir else out / ".cache")
    say(f"{len(split['train'])} training subjects ({len(train_set)} slices), {len(split['val'])} validation "
        f"({len(val_set)} slices); {cfg.steps} steps of {cfg.batch_size}; {describe}")
    torch.manual_seed(cfg.seed)
    net = build_network({"type": arch_type, **cfg.architecture})
    if cfg.init_from and not resume:
        net.load_state_dict(initial_weights(cfg.init_from, arch_type, cfg.architecture).state_dict())
        say(f"starting from the weights of {cfg.init_from}")
    net = net.to(where.device).to(memory_format=where.memory)
    run = start_run(net, cfg, out, resume, say)
    return Setup(where, split, by_id, train_set, val_set, run)


def initial_weights(model: str, arch_type: str, architecture: dict[str, Any]) -> torch.nn.Module:
    """The network of installed model or package ``model``, refused unless it is ``arch_type``
    with the same architecture (a fine-tuning starts from it)."""
    from ...core.package import resolve_package
    package = resolve_package(model)
    theirs = {k: v for k, v in package.architecture.items() if k != "type"}
    if package.arch_type != arch_type or theirs != {k: v for k, v in architecture.items() if k in theirs}:
        raise InputError(f"--init {model}: its architecture ({package.arch_type} {theirs}) is not the one trained "
                         f"here ({arch_type} {architecture}); start from a model of the same architecture")
    return package.load_model("cpu")
