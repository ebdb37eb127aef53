"""The one training loop (tooling/training/steps.py): every family's steps go through it, its
schedules and stops do what they say, and a stopped run stays stopped when resumed."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import torch

from anomaly_localizer.tooling.training import steps
from anomaly_localizer.tooling.training.steps import LoopPlan, lr_at, run_steps, start_run, training_record

TRAINING = Path(steps.__file__).parent


def test_only_the_loop_steps_an_optimiser():
    """No trainer has its own loop: backward() and optimizer.step() are called in steps.py only."""
    found = []
    for path in sorted(TRAINING.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "backward":
                found.append(path.name)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "step" \
                    and "optim" in ast.unparse(node.func.value).rpartition(".")[2]:  # opt.step(), run.optimizer.step()
                found.append(path.name)
    assert set(found) == {"steps.py"}, found


@dataclass
class _Cfg:
    seed: int = 0
    learning_rate: float = 0.1
    weight_decay: float = 0.0
    steps: int = 40
    validate_every: int = 4


def _run(tmp_path, resume=False, **kw):
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=1)
    return net, start_run(net, _Cfg(), tmp_path, resume, lambda m: None, opt, sched)


def _loss(net):
    return lambda step, gen: (net(torch.randn(4, 2, generator=gen)) ** 2).mean()


def test_a_plateau_divides_the_rate_and_an_early_stop_sticks_on_resume(tmp_path):
    net, run = _run(tmp_path)
    plan = LoopPlan.epochs(10, 4, seed=0, plateau_patience=1, early_stop=3)
    said = []
    assert run_steps(run, plan, _loss(net), lambda: (1.0, {}), said.append)  # validation never improves
    assert run.state["stopped_early"] and run.state["step"] == 16 and run.state["best_step"] == 4
    assert [h["epoch"] for h in run.state["history"]] == [1, 2, 3, 4]
    assert run.optimizer.param_groups[0]["lr"] < 0.1 / 5  # divided after the plateau
    assert any("no improvement for 3 validations" in m for m in said)
    record = training_record(run, plan)
    assert (record["best_epoch"], record["epochs_run"]) == (1, 4)
    net2, resumed = _run(tmp_path, resume=True)
    said.clear()
    assert run_steps(resumed, plan, _loss(net2), lambda: (1.0, {}), said.append)
    assert resumed.state["step"] == 16  # a stopped run does not train on, and says so
    assert any("stopped early at epoch 4" in m and "stays stopped" in m for m in said), said


def test_a_step_plan_sets_the_rate_of_every_step_and_keeps_the_best(tmp_path):
    net, run = _run(tmp_path)
    cfg = _Cfg(steps=12, validate_every=4)
    seen = []

    def loss(step, gen):
        seen.append(run.optimizer.param_groups[0]["lr"])
        return _loss(net)(step, gen)

    figures = iter([3.0, 1.0, 2.0])
    assert run_steps(run, cfg, loss, lambda: (next(figures), {}), lambda m: None)
    assert seen == [lr_at(s, cfg) for s in range(12)]
    assert run.state["best_step"] == 8 and (tmp_path / "checkpoint" / "best.safetensors").is_file()
    assert training_record(run)["steps_run"] == 12


def test_a_stop_after_leaves_a_checkpoint_that_resumes_to_the_same_weights(tmp_path):
    cfg = _Cfg(steps=12, validate_every=4)
    net, run = _run(tmp_path / "a")
    run_steps(run, cfg, _loss(net), lambda: (1.0, {}), lambda m: None)
    net_b, run_b = _run(tmp_path / "b")
    assert not run_steps(run_b, cfg, _loss(net_b), lambda: (1.0, {}), lambda m: None, stop_after=6)
    net_c, run_c = _run(tmp_path / "b", resume=True)
    assert run_steps(run_c, cfg, _loss(net_c), lambda: (1.0, {}), lambda m: None)
    assert torch.equal(net.weight, net_c.weight) and torch.equal(net.bias, net_c.bias)
