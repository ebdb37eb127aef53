"""The sample-wise experiment of Zimmerer et al. 2019 (Fig. 1) on FashionMNIST.

A fully connected VAE (encoder 784-400-400, 20 latents, decoder 20-400-400-784, Gaussian
likelihood of standard deviation c) is trained on nine FashionMNIST classes; the held-out
class is the anomaly. Reported: AUROC of the reconstruction term, the KL term and the ELBO
for telling held-out test images from the others. Settings: class 0 held out with c = 1,
and the paper's fine-tuned setting, class 5 held out with log c = 1.4.

Data: Debian's ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``, MIT licence).
Run: ``anomaly-localizer paper-fmnist``. A command that prints figures, not a test.
"""

from __future__ import annotations

import gzip
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...errors import InputError
from ..metrics import auroc

DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"
SETTINGS = [{"held_out": 0, "log_c": 0.0}, {"held_out": 5, "log_c": 1.4}]
PAPER = {(5, 1.4): {"kl": 0.82}}  # the figure the paper states in the text for the fine-tuned setting


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST format, optionally gzipped) as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(root: str | Path) -> dict[str, np.ndarray]:
    root = Path(root)
    names = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
             "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}
    out = {}
    for key, stem in names.items():
        candidates = [root / f"{stem}.gz", root / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise InputError(f"FashionMNIST not found in {root}; install Debian's dataset-fashion-mnist "
                             "(apt-get install dataset-fashion-mnist) or pass --data")
        out[key] = read_idx(path)
    return out


class FCVAE(nn.Module):
    def __init__(self, hidden: int = 400, latent: int = 20, pixels: int = 784):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(pixels, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 2 * latent))
        self.dec = nn.Sequential(nn.Linear(latent, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, pixels))

    def terms(self, x: torch.Tensor, log_c: float, sample: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Per image: Gaussian negative log-likelihood (std exp(log_c)) and KL."""
        mu, logvar = self.enc(x).chunk(2, dim=1)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu
        c2 = math.exp(2 * log_c)
        rec = ((x - self.dec(z)) ** 2 / (2 * c2)).sum(1) + x.shape[1] * (log_c + 0.5 * math.log(2 * math.pi))
        kl = 0.5 * (mu ** 2 + logvar.exp() - logvar - 1).sum(1)
        return rec, kl


def run_setting(data: dict[str, np.ndarray], held_out: int, log_c: float, epochs: int, seed: int = 0,
                progress=None) -> dict:
    torch.manual_seed(seed)
    x_train = torch.from_numpy(data["x_train"].reshape(len(data["x_train"]), -1).astype(np.float32) / 255.0)
    keep = torch.from_numpy(data["y_train"] != held_out)
    x_train = x_train[keep]
    model = FCVAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = torch.randperm(len(x_train), generator=gen)
        total = 0.0
        for b in range(0, len(order), 128):
            x = x_train[order[b:b + 128]]
            rec, kl = model.terms(x, log_c, sample=True)
            loss = (rec + kl).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(x)
        if progress:
            progress(f"held-out {held_out}, log c {log_c:g}: epoch {epoch + 1}/{epochs}, "
                     f"loss {total / len(x_train):.1f}, {time.perf_counter() - t0:.1f} s")
    model.eval()
    x_test = torch.from_numpy(data["x_test"].reshape(len(data["x_test"]), -1).astype(np.float32) / 255.0)
    with torch.no_grad():
        rec, kl = model.terms(x_test, log_c, sample=False)
    labels = data["y_test"] == held_out
    scores = {"rec": rec.numpy(), "kl": kl.numpy(), "elbo": (rec + kl).numpy()}
    return {"held_out": held_out, "log_c": log_c, "epochs": epochs,
            "auroc": {k: auroc(v, labels) for k, v in scores.items()},
            "paper": PAPER.get((held_out, log_c), {})}
