"""Synthetic anomaly tasks that train the self-supervised detector (``train-ssl``).

For training only: nothing here evaluates a model. The evaluation's generator
(:mod:`.hard_cases`, 3D ellipsoids of the MOOD kinds) is separate code with its own seeds,
and shares nothing with this module, so a model that learned these tasks' look rather than
"not healthy" shows it on the evaluation.

Every task changes a random shape of a healthy 2.5D slice stack (C channels: the slice and
its neighbours, so an anomaly spans slices as a 3D one would). Shapes are complex, as the MOOD
2022 winner's (Naval Marimont & Tarroni, arXiv 2308.01412): the union of 1-3 rotated, sheared
ellipsoids and boxes (semi-axes log-uniform 1.5-10 pixels, i.e. 3-20 mm at 2 mm, some only
one or two slices deep), the ellipsoids with a rough outline, then smoothed by a Gaussian of
0-5 pixels so that the network cannot key on a sharp border.
The tasks, in families as Baugh et al. ("Many tasks make light work", MICCAI 2023):

- ``foreign``: a patch of another healthy subject's slice at the same height, itself
  augmented (mirrored or rotated, intensity scaled and shifted, noise), interpolated in with a
  factor in [0.3, 1] (foreign patch interpolation, Tan et al., MOOD 2020);
- ``poisson``: the same patch blended in the gradient domain (Poisson image interpolation):
  the patch's structure with the host's intensities at its border;
- ``intensity``: an additive or multiplicative change with a low-frequency texture;
- ``tissue``: an intensity bias confined to one tissue class (darkest, middle or brightest
  third of the brain's intensities), as DISYRE's generator (snavalm/disyre);
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

TRAIN_TASKS = ("foreign", "intensity", "tissue", "blur", "sink", "bend")
HELD_OUT_TASKS = ("poisson", "source")
ALL_TASKS = TRAIN_TASKS + HELD_OUT_TASKS
SEMI_AXIS_PX = (1.5, 10.0)  # at 2 mm pixels: 3-20 mm (anomalies of 6-40 mm across)
DEPTH_PX = (0.6, 10.0)  # semi-axis across slices: some shapes lie in one or two slices only
EDGE_SIGMA_PX = (0.0, 5.0)  # the random smoothing of a shape's edge
MAX_PARTS = 3  # a shape is the union of up to this many primitives
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
    (``brain``: (C,S,S) bool), 0 outside each slice's brain; None when there is no brain.
    The union of 1-:data:`MAX_PARTS` primitives (rotated, sheared ellipsoids with a rough
    outline, or boxes) near one centre, its edge smoothed by a random Gaussian."""
    c, s, _ = brain.shape
    mid = c // 2
    inner = -F.max_pool2d(-brain[mid:mid + 1].float()[None], 5, stride=1, padding=2)[0, 0] > 0.5
    pts = torch.nonzero(inner if inner.any() else brain[mid])
    if len(pts) == 0:
        return None
    cy, cx = (float(v) for v in pts[int(torch.randint(len(pts), (1,), generator=gen))])
    ar = torch.arange(s, dtype=torch.float32)
    hard = torch.zeros(c, s, s)
    n_parts = 1 + int(torch.randint(MAX_PARTS, (1,), generator=gen))
    reach = 0.0
    for part in range(n_parts):
        ry, rx = (_log_u(gen, *SEMI_AXIS_PX) for _ in range(2))
        rz = _log_u(gen, *DEPTH_PX)
        oy, ox = (_u(gen, -reach, reach) for _ in range(2)) if part else (0.0, 0.0)  # parts overlap the first
        reach = reach or 0.7 * min(ry, rx)
        angle, shear = _u(gen, 0, math.pi), _u(gen, -0.6, 0.6)
        yy, xx = torch.meshgrid(ar - cy - oy, ar - cx - ox, indexing="ij")
        u = yy * math.cos(angle) + xx * math.sin(angle)
        v = -yy * math.sin(angle) + xx * math.cos(angle) + shear * u
        box = _u(gen) < 0.3
        rough = 1.0 if box else (1 + _u(gen, 0, 0.35) * _low_freq(gen, s, 6)[0]).clamp_min(0.3)
        for k in range(c):
            dz = abs(k - mid) / rz
            if box:
                inside = torch.maximum((u / ry).abs(), (v / rx).abs()).clamp_min(dz) <= 1
            else:
                inside = torch.sqrt((u / ry) ** 2 + (v / rx) ** 2 + dz ** 2) * rough <= 1
            hard[k] = torch.maximum(hard[k], inside.float())
    if not hard[mid].any():
        hard[mid, int(cy), int(cx)] = 1.0
    sigma = _u(gen, *EDGE_SIGMA_PX)
    soft = _gaussian_blur(hard, sigma) if sigma >= 0.3 else hard
    soft = (soft / soft[mid].max().clamp_min(1e-6)).clamp(0, 1)  # a small shape keeps its full strength
    return soft * brain


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


def augment_donor(donor: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The foreign patch's source, changed so that "another subject" is not all it is:
    mirrored or turned by a right angle, intensity scaled and shifted, noise added (the
    MOOD 2022 winner augments its foreign patches); background stays 0."""
    d = donor
    if _u(gen) < 0.5:
        d = d.flip(-1)
    turns = int(torch.randint(4, (1,), generator=gen))
    if turns:
        d = torch.rot90(d, turns, (-2, -1))
    inside = d != 0
    d = d * math.exp(_u(gen, -0.3, 0.3)) + _u(gen, -0.1, 0.1)
    d = d + _u(gen, 0, 0.04) * torch.randn(d.shape, generator=gen)
    return torch.where(inside, d, torch.zeros_like(d))


def tissue_membership(x: torch.Tensor, cls: int) -> torch.Tensor:
    """(C,S,S) soft membership in [0,1] of tissue class ``cls`` (0 darkest, 1 middle, 2
    brightest third of the middle slice's brain intensities): DISYRE confines an intensity
    change to one tissue, as a lesion of one tissue would."""
    mid = x.shape[0] // 2
    inside = x[mid][x[mid] != 0]
    if inside.numel() < 3:
        return torch.ones_like(x)
    lo, hi = (float(v) for v in torch.quantile(inside, torch.tensor([1 / 3, 2 / 3])))
    soft = 0.02  # about a tenth of the brain IQR after normalisation: a soft class edge
    above_lo, above_hi = torch.sigmoid((x - lo) / soft), torch.sigmoid((x - hi) / soft)
    return (1 - above_lo, above_lo * (1 - above_hi), above_hi)[cls]


def apply_task(task: str, x: torch.Tensor, weight: torch.Tensor, donor: torch.Tensor,
               gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """(changed stack, strength in [MIN_STRENGTH, 1]) of one task on ``x`` (C,S,S) within
    ``weight`` (C,S,S). ``donor``: another subject's stack at the same height."""
    s = x.shape[-1]
    if task == "foreign":
        alpha = _u(gen, 0.3, 1.0)
        donor = augment_donor(donor, gen)
        w = weight * (donor != 0)
        return x + alpha * w * (donor - x), alpha
    if task == "tissue":
        member = tissue_membership(x, int(torch.randint(3, (1,), generator=gen)))
        delta = _log_u(gen, 0.05, 0.5) * (1 if _u(gen) < 0.5 else -1)
        return x + weight * member * delta, min(1.0, abs(delta) / 0.2)
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
