"""Synthetic anomaly tasks that train the self-supervised detector (``train-ssl``).

For training only: nothing here evaluates a model. The evaluation's generator
(:mod:`.hard_cases`, 3D ellipsoids of the MOOD kinds) is separate code with its own seeds,
and shares nothing with this module, so a model that learned these tasks' look rather than
"not healthy" shows it on the evaluation.

Every task changes a random shape of a healthy 2.5D slice stack (C channels: the slice and
its neighbours, so an anomaly spans slices as a 3D one would). Shapes are ellipses with
random semi-axes (log-uniform, 4-28 mm at 2 mm pixels), rotation, extent across slices, a
rough outline (low-frequency noise on the radius) and an edge that fades over 5-60 % of the
radius, so the network cannot key on a sharp border (Naval Marimont & Tarroni, MOOD 2022).
The tasks, in families as Baugh et al. ("Many tasks make light work", MICCAI 2023):

- ``foreign``: a patch of another healthy subject's slice at the same height, interpolated
  in with a random factor (foreign patch interpolation, Tan et al., MOOD 2020);
- ``poisson``: the same patch blended in the gradient domain (Poisson image interpolation):
  the patch's structure with the host's intensities at its border;
- ``intensity``: an additive or multiplicative change with a low-frequency texture;
- ``blur``: the tissue smoothed (lost texture);
- ``sink``, ``source``: tissue pulled towards or pushed away from a centre;
- ``bend``: a smooth random displacement field.

The label is how strongly each pixel of the middle slice was changed: the shape's weight
times the task's strength (0.25-1), only where the image changed at all (softly labelled
where blending is partial). :data:`HELD_OUT_TASKS` are never trained on; they choose the
checkpoint (the detector is kept that best finds tasks it never saw).

The strengths start where a change is visible (e.g. intensity shifts from 0.2 brain IQR):
with a few thousand steps on a CPU, a network shown mostly invisible changes did not learn
to find the visible ones (a first run reached held-out pixel AP 0.06 after 750 steps and
segmented neither a large patch nor a strong shift); the evaluation keeps the subtle ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TRAIN_TASKS = ("foreign", "intensity", "blur", "sink", "bend")
HELD_OUT_TASKS = ("poisson", "source")
ALL_TASKS = TRAIN_TASKS + HELD_OUT_TASKS
SEMI_AXIS_PX = (2.0, 14.0)  # at 2 mm pixels: 4-28 mm
CHANGED = 0.0025  # a pixel changed by less (1 % of the brain IQR of 0.25) is not labelled
MIN_STRENGTH = 0.25


@dataclass
class TaskSample:
    """One training example: the changed stack (C,S,S) and its label (1,S,S) in [0, 1]."""

    x: torch.Tensor
    label: torch.Tensor


def _u(gen: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _log_u(gen: torch.Generator, lo: float, hi: float) -> float:
    return math.exp(_u(gen, math.log(lo), math.log(hi)))


def _low_freq(gen: torch.Generator, size: int, res: int, channels: int = 1) -> torch.Tensor:
    """(channels,S,S) smooth noise of unit scale, drawn at res x res and upsampled."""
    coarse = torch.randn(1, channels, res, res, generator=gen)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]


def random_shape(brain: torch.Tensor, gen: torch.Generator) -> torch.Tensor | None:
    """(C,S,S) weights in [0,1] of one random shape centred in the middle slice's brain
    (``brain``: (C,S,S) bool), 0 outside each slice's brain; None when there is no brain."""
    c, s, _ = brain.shape
    mid = c // 2
    inner = -F.max_pool2d(-brain[mid:mid + 1].float()[None], 5, stride=1, padding=2)[0, 0] > 0.5
    pts = torch.nonzero(inner if inner.any() else brain[mid])
    if len(pts) == 0:
        return None
    cy, cx = (float(v) for v in pts[int(torch.randint(len(pts), (1,), generator=gen))])
    ry, rx, rz = (_log_u(gen, *SEMI_AXIS_PX) for _ in range(3))
    angle = _u(gen, 0, math.pi)
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32) - cy, torch.arange(s, dtype=torch.float32) - cx,
                            indexing="ij")
    u = yy * math.cos(angle) + xx * math.sin(angle)
    v = -yy * math.sin(angle) + xx * math.cos(angle)
    d2 = (u / ry) ** 2 + (v / rx) ** 2
    rough = 1 + _u(gen, 0, 0.35) * _low_freq(gen, s, 6)[0]
    edge = _log_u(gen, 0.05, 0.6)
    weights = []
    for k in range(c):
        d = torch.sqrt(d2 + ((k - mid) / rz) ** 2) * rough.clamp_min(0.3)
        t = ((1 - d) / edge).clamp(0, 1)
        weights.append(t * t * (3 - 2 * t))  # smoothstep: no sharp border unless the edge is thin
    return torch.stack(weights) * brain


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32) ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    y = F.conv2d(x[:, None], k.view(1, 1, 1, -1), padding=(0, r))
    return F.conv2d(y, k.view(1, 1, -1, 1), padding=(r, 0))[:, 0]


def _warp(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Sample (C,S,S) at positions displaced by (dy, dx) pixels (each (C,S,S))."""
    c, s, _ = x.shape
    base = torch.linspace(-1, 1, s)
    gy, gx = torch.meshgrid(base, base, indexing="ij")
    scale = 2 / max(s - 1, 1)
    grid = torch.stack([gx + dx * scale, gy + dy * scale], -1)  # (C,S,S,2)
    return F.grid_sample(x[:, None], grid, mode="bilinear", padding_mode="border", align_corners=True)[:, 0]


def poisson_blend(host: torch.Tensor, patch: torch.Tensor, region: torch.Tensor, iterations: int = 300) -> torch.Tensor:
    """Gradient-domain blend per channel: inside ``region`` (bool (C,S,S)) the result has the
    patch's Laplacian and meets the host at the region's border (Jacobi iterations)."""
    kernel = torch.tensor([[0.0, 0.25, 0.0], [0.25, 0.0, 0.25], [0.0, 0.25, 0.0]]).view(1, 1, 3, 3)

    def avg4(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(t[:, None], (1, 1, 1, 1), mode="replicate"), kernel)[:, 0]

    guide = patch - avg4(patch)  # -Laplacian / 4 of the patch
    f = host.clone()
    for _ in range(iterations):
        f = torch.where(region, avg4(f) + guide, host)
    return f


def apply_task(task: str, x: torch.Tensor, weight: torch.Tensor, donor: torch.Tensor,
               gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """(changed stack, strength in [MIN_STRENGTH, 1]) of one task on ``x`` (C,S,S) within
    ``weight`` (C,S,S). ``donor``: another subject's stack at the same height."""
    s = x.shape[-1]
    if task == "foreign":
        alpha = _u(gen, 0.3, 1.0)
        w = weight * (donor != 0)
        return x + alpha * w * (donor - x), alpha
    if task == "poisson":
        region = weight > 0.2
        blended = poisson_blend(x, donor, region)
        alpha = _u(gen, 0.5, 1.0)
        return x + alpha * weight.clamp(0, 1) ** 0.5 * (blended - x), 0.6 * alpha
    if task == "intensity":
        texture = 1 + _u(gen, 0, 0.5) * _low_freq(gen, s, 8)[0]
        if _u(gen) < 0.5:
            delta = _log_u(gen, 0.05, 0.8) * (1 if _u(gen) < 0.5 else -1)
            return x + weight * delta * texture, min(1.0, abs(delta) / 0.25)
        gain = _log_u(gen, 0.08, 0.6) * (1 if _u(gen) < 0.5 else -1)
        return x * (1 + weight * gain * texture), min(1.0, abs(gain) / 0.3)
    if task == "blur":
        sigma = _u(gen, 1.0, 3.0)
        return x + weight * (_gaussian_blur(x, sigma) - x), 0.5
    mid = x.shape[0] // 2
    cy, cx = (v.float().mean() for v in torch.nonzero(weight[mid] >= weight[mid].max() * 0.99, as_tuple=True))
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32) - cy, torch.arange(s, dtype=torch.float32) - cx,
                            indexing="ij")
    if task in ("sink", "source"):
        # Sample further out (sink: tissue contracts towards the centre) or nearer (source: it swells).
        k = _u(gen, 0.3, 0.8) * (1 if task == "sink" else -0.8)
        scale = k * weight
        return _warp(x, yy * scale, xx * scale), min(1.0, abs(k) / 0.5)
    if task == "bend":
        amp = _u(gen, 2.0, 5.0)
        field = _low_freq(gen, s, 4, channels=2)
        field = field / field.flatten(1).abs().amax(1).clamp_min(1e-6)[:, None, None]
        return _warp(x, amp * weight * field[0], amp * weight * field[1]), min(1.0, amp / 3)
    raise ValueError(f"unknown task {task!r}; known: {', '.join(ALL_TASKS)}")


def make_sample(x: torch.Tensor, donors: list[torch.Tensor], tasks: tuple[str, ...], gen: torch.Generator,
                n_anomalies: int) -> TaskSample:
    """``x`` (C,S,S) with ``n_anomalies`` tasks drawn from ``tasks`` (0: a healthy example)."""
    brain = x != 0
    out = x.clone()
    label = torch.zeros(x.shape[-2:])
    mid = x.shape[0] // 2
    for i in range(n_anomalies):
        weight = random_shape(brain, gen)
        if weight is None:
            break
        task = tasks[int(torch.randint(len(tasks), (1,), generator=gen))]
        before = out
        changed, strength = apply_task(task, out, weight, donors[i % len(donors)], gen)
        out = torch.where(brain, changed, x)
        moved = F.max_pool2d((out[mid] - before[mid]).abs()[None, None], 3, stride=1, padding=1)[0, 0] > CHANGED
        strength = max(MIN_STRENGTH, min(1.0, strength))
        label = torch.maximum(label, weight[mid] * strength * moved)
    return TaskSample(out, label[None])


def make_batch(x: torch.Tensor, donors: torch.Tensor, tasks: tuple[str, ...], gen: torch.Generator,
               healthy_share: float = 0.2, max_anomalies: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(changed stacks (N,C,S,S), labels (N,1,S,S)) for healthy stacks ``x`` and donor stacks
    (N,C,S,S) from other subjects at the same heights; ``healthy_share`` stay unchanged."""
    xs, labels = [], []
    for i in range(x.shape[0]):
        n = 0 if _u(gen) < healthy_share else int(torch.randint(1, max_anomalies + 1, (1,), generator=gen))
        sample = make_sample(x[i], [donors[i]], tasks, gen, n)
        xs.append(sample.x)
        labels.append(sample.label)
    return torch.stack(xs), torch.stack(labels)
