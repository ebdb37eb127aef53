"""``train`` (VAE, ceVAE), ``train-lsr`` (VQ-VAE and prior), ``train-dae``, ``train-ssl``, ``train-tissue``
and ``train-brainmask``."""

from __future__ import annotations

import argparse

from ..core.contrast import CONTRASTS
from .common import EXIT_OK, add_device, add_quiet, say

DATA_HELP = "folder of healthy scans (t1/ + brainmask/, or images with *_brainmask beside)"


def register(sub) -> None:
    t = sub.add_parser("train", help="train a VAE or ceVAE on a folder of healthy scans")
    t.add_argument("data", help=DATA_HELP)
    t.add_argument("--out", required=True, help="model package folder to create")
    t.add_argument("--config", help="JSON training configuration (keys of TrainConfig), or a package's model.json")
    t.add_argument("--type", choices=["vae", "cevae"])
    t.add_argument("--slice-size", type=int)
    t.add_argument("--spacing", type=float, help="model pixel spacing in mm")
    t.add_argument("--latent-size", type=int)
    t.add_argument("--c", type=float, help="standard deviation of the Gaussian likelihood")
    t.add_argument("--epochs", type=int, help="maximum epochs")
    t.add_argument("--batch-size", type=int)
    t.add_argument("--seed", type=int)
    add_device(t, "cpu")
    _add_run_options(t)
    t.set_defaults(func=run_train)

    lsr = sub.add_parser("train-lsr", help="train the VQ-VAE and its prior for latent space restoration (method lsr)")
    lsr.add_argument("data", help=DATA_HELP)
    lsr.add_argument("--out", required=True, help="model package folder to create")
    lsr.add_argument("--config", help="JSON training configuration (keys of LSRTrainConfig), or a package's model.json")
    lsr.add_argument("--vqvae-epochs", type=int, help="maximum VQ-VAE epochs")
    lsr.add_argument("--prior-epochs", type=int, help="maximum prior epochs")
    lsr.add_argument("--seed", type=int)
    add_device(lsr, "cpu")
    _add_run_options(lsr)
    lsr.set_defaults(func=run_train_lsr)

    d = sub.add_parser("train-dae", help="train the coarse-noise denoising autoencoder (method dae)")
    _add_step_options(d, "DAETrainConfig")
    d.add_argument("--noise-std", type=float, help="coarse noise standard deviation (normalised intensity; "
                   "the brain's inter-quartile range is 0.25)")
    d.add_argument("--noise-res", type=int, help="side of the coarse noise grid")
    d.set_defaults(func=run_train_dae)

    ssl = sub.add_parser("train-ssl", help="train the self-supervised anomaly segmentation U-Net (method ssl)")
    _add_step_options(ssl, "SSLTrainConfig")
    ssl.add_argument("--tasks", type=lambda v: v.split(","), metavar="T1,T2",
                     help="training tasks (default foreign,intensity,blur,sink,bend)")
    ssl.add_argument("--held-out", type=lambda v: v.split(","), metavar="T1,T2",
                     help="tasks held out of training that choose the checkpoint (default poisson,source)")
    ssl.set_defaults(func=run_train_ssl)

    tt = sub.add_parser("train-tissue", help="train the contrast-agnostic tissue segmenter of the anatomy-conditioned "
                                             "score (method anatomy) on parcellated T1 scans and their renderings")
    tt.add_argument("data", help="folder of healthy T1 scans with a dlmuse/ folder of parcellations (IXI layout)")
    tt.add_argument("--renders", help="a folder made by `render` from DATA: its renderings train beside the T1s")
    tt.add_argument("--out", required=True, help="model package folder to create")
    tt.add_argument("--config", help="JSON training configuration (keys of TissueTrainConfig), or a package's "
                                     "model.json")
    tt.add_argument("--steps", type=int, help="training steps (batches)")
    tt.add_argument("--batch-size", type=int)
    tt.add_argument("--seed", type=int)
    tt.add_argument("--stop-after", type=int, metavar="STEPS",
                    help="stop after this many steps of this run, at a checkpoint (continue later with --resume)")
    add_device(tt, "cpu")
    _add_run_options(tt)
    tt.set_defaults(func=run_train_tissue)

    r = sub.add_parser("render", help="render healthy T1 scans with parcellations in other contrasts (FLAIR, T2, "
                                      "T1c, PD), a folder to train, calibrate and evaluate models of those contrasts")
    r.add_argument("data", help="folder of healthy T1 scans with a dlmuse/ folder of parcellations (IXI layout)")
    r.add_argument("--out", required=True, help="folder to create")
    r.add_argument("--contrast", action="append", required=True, metavar="C[:N]",
                   help="a contrast to render and how many renderings per subject (default 1), repeatable: "
                        "--contrast flair:2 --contrast t2")
    r.add_argument("--subjects", type=lambda v: v.split(","), metavar="ID,ID", help="only these subjects")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    add_quiet(r)
    r.set_defaults(func=run_render)

    b = sub.add_parser("train-brainmask", help="train the brain extraction U-Net on scans with reference masks")
    b.add_argument("data", help="folder of scans with brain masks (IXI layout or *_brainmask beside)")
    b.add_argument("--out", required=True)
    b.add_argument("--epochs", type=int, default=12)
    b.add_argument("--slice-size", type=int)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--force", action="store_true")
    add_quiet(b)
    b.set_defaults(func=run_train_brainmask)


def _add_step_options(p: argparse.ArgumentParser, config_class: str) -> None:
    """The options of the 2.5D step trainings (train-dae, train-ssl)."""
    p.add_argument("data", help=DATA_HELP)
    p.add_argument("--out", required=True, help="model package folder to create")
    p.add_argument("--config", help=f"JSON training configuration (keys of {config_class}), or a package's model.json")
    p.add_argument("--steps", type=int, help="training steps (batches)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop-after", type=int, metavar="STEPS",
                   help="stop after this many steps of this run, at a checkpoint (continue later with --resume)")
    p.add_argument("--bf16", dest="bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="bf16 autocast (default: where the CPU has bf16 matrix instructions, else float32)")
    p.add_argument("--contrast", action="append", metavar="C", choices=CONTRASTS,
                   help="the contrast the model reads, repeatable for several inputs (default t1, or the first "
                        "contrast of a folder made by `render`)")
    p.add_argument("--init", metavar="MODEL",
                   help="start from the weights of this installed model or package folder (same architecture)")
    add_device(p, "cpu")
    _add_run_options(p)


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", help="folder for prepared slices (default OUT/.cache)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    p.add_argument("--force", action="store_true", help="start over in an existing OUT")
    p.add_argument("--no-calibration", action="store_true")
    add_quiet(p)


def run_train(args: argparse.Namespace) -> int:
    from ..tooling.training.train import TrainConfig, train

    cfg = TrainConfig.from_json(args.config, type=args.type, slice_size=args.slice_size, latent_size=args.latent_size,
                                likelihood_std=args.c, max_epochs=args.epochs, seed=args.seed,
                                batch_size=args.batch_size, spacing_mm=args.spacing)
    train(args.data, args.out, cfg, resume=args.resume, force=args.force, device=args.device,
          cache_dir=args.cache, progress=not args.quiet, calibrate=not args.no_calibration)
    return EXIT_OK


def run_train_lsr(args: argparse.Namespace) -> int:
    from ..tooling.training.train_lsr import LSRTrainConfig, train_lsr

    cfg = LSRTrainConfig.from_json(args.config, vqvae_epochs=args.vqvae_epochs, prior_epochs=args.prior_epochs,
                                   seed=args.seed)
    train_lsr(args.data, args.out, cfg, resume=args.resume, force=args.force, device=args.device,
              cache_dir=args.cache, progress=say(args.quiet), calibrate=not args.no_calibration)
    return EXIT_OK


def run_train_dae(args: argparse.Namespace) -> int:
    from ..tooling.training.train_dae import DAETrainConfig, train_dae
    return _run_steps_training(args, DAETrainConfig, train_dae, noise_std=args.noise_std, noise_res=args.noise_res)


def run_train_ssl(args: argparse.Namespace) -> int:
    from ..tooling.training.train_ssl import SSLTrainConfig, train_ssl
    return _run_steps_training(args, SSLTrainConfig, train_ssl, tasks=args.tasks, held_out=args.held_out)


def _run_steps_training(args: argparse.Namespace, config_class, train_fn, **family_options) -> int:
    from ..tooling.rendering import rendered_contrasts

    contrasts = args.contrast or (rendered_contrasts(args.data) or [])[:1] or None
    cfg = config_class.from_json(args.config, steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                                 bf16=args.bf16, contrasts=contrasts, init_from=args.init, **family_options)
    train_fn(args.data, args.out, cfg, resume=args.resume, force=args.force, device=args.device,
             cache_dir=args.cache, progress=say(args.quiet), calibrate=not args.no_calibration,
             stop_after=args.stop_after)
    return EXIT_OK


def run_train_tissue(args: argparse.Namespace) -> int:
    from ..tooling.training.train_tissue import TissueTrainConfig, train_tissue
    cfg = TissueTrainConfig.from_json(args.config, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    out = train_tissue(args.data, args.out, cfg, renders=args.renders, resume=args.resume, force=args.force,
                       device=args.device, cache_dir=args.cache, progress=say(args.quiet), stop_after=args.stop_after)
    print(f"wrote {out}")
    return EXIT_OK


def run_train_brainmask(args: argparse.Namespace) -> int:
    from ..tooling.training.brainmask import train_brainmask

    train_brainmask(args.data, args.out, epochs=args.epochs, seed=args.seed, force=args.force,
                    arch={"slice_size": args.slice_size} if args.slice_size else None, progress=say(args.quiet))
    print(f"wrote {args.out}")
    return EXIT_OK


def run_render(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..tooling.rendering import render_folder

    counts: dict[str, int] = {}
    for item in args.contrast:
        name, _, n = item.partition(":")
        if name not in CONTRASTS or (n and not (n.isdigit() and 1 <= int(n) <= 50)):
            raise InputError(f"--contrast {item}: give a contrast ({', '.join(CONTRASTS)}) and optionally :N "
                             "renderings per subject (1-50), e.g. flair:2")
        counts[name] = int(n or 1)
    out = render_folder(args.data, args.out, counts, seed=args.seed, subjects=args.subjects, force=args.force,
                        progress=say(args.quiet))
    print(f"wrote {out}")
    return EXIT_OK
