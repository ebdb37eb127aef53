"""``anomaly-localizer benchmark``: speed and memory of scoring, against the reference way.

Cases: a real 2 mm scan (the first IXI subject of a data folder, with its brain mask) and
the same scan resampled to a 1 mm 256x256x180 axial grid. For each, all five pixel
methods are timed end to end in memory (preparation, scoring, mapping back; reading and
writing files are timed separately), and the same model is run the way the reference code
does: each method on its own, in batches of 64 slices, every axial slice of the volume.
The reference way does not smooth its maps, so the speed-up is given twice: against our
full pipeline (with the package's 3D smoothing) and like for like (ours unsmoothed).
This is a command that prints figures, not a test.
"""

from __future__ import annotations

import json
import platform
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ...core.device import configure_threads, select_device, usable_cores
from ...core.imageio import read_image, write_image
from ...core.installed import resolve_package_for
from ...core.pipeline import score_volume
from ...core.scores import PIXEL_METHODS, kl_divergence, minmax_in_mask, rec_nll, smooth
from ...core.volume import brain_mask, prepare_volume
from ...errors import InputError


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def reference_way(image: sitk.Image, mask: np.ndarray, package, model, device, batch: int = 64) -> float:
    """Seconds to score all five methods as the reference code does (for comparison only)."""
    t0 = time.perf_counter()
    prepared = prepare_volume(image, mask, package.contract)
    n_ax = prepared.layout.shape[0]
    # The reference scores every axial slice, with or without brain.
    all_idx = np.arange(n_ax)
    from ...core.volume import resample_to_model
    canon = prepared.layout.to_canonical(
        np.where(mask, sitk.GetArrayViewFromImage(image), 0).astype(np.float32))
    lo, hi = np.percentile(canon[prepared.layout.to_canonical(mask)], [1, 99])
    x_all = resample_to_model((canon - lo) / (hi - lo), prepared.layout, prepared.centre, prepared.slice_size,
                              prepared.model_spacing, all_idx)

    def loss_terms(x):
        mu, logvar = model.encode(x)
        pix, rec = rec_nll(x, model.decode(mu), model)
        return pix, rec, kl_divergence(mu, logvar)

    def input_grad(x, which):
        x = x.detach().requires_grad_(True)
        _, rec, kl = loss_terms(x)
        loss = {"elbo": rec + kl, "kl": kl, "rec": rec}[which].mean()
        loss.backward()
        model.zero_grad()
        return x.grad.abs()[:, 0]

    maps = {}
    for method in PIXEL_METHODS:
        out = []
        for s in range(0, n_ax, batch):
            x = x_all[s:s + batch].to(device)
            if method == "rec":
                with torch.no_grad():
                    out.append(loss_terms(x)[0])
            elif method in ("rec_grad", "kl_grad", "elbo_grad"):
                out.append(smooth(input_grad(x, {"rec_grad": "rec", "kl_grad": "kl", "elbo_grad": "elbo"}[method])))
            else:
                with torch.no_grad():
                    rec = loss_terms(x)[0]
                g = input_grad(x, "kl")
                ones = torch.ones_like(g, dtype=torch.bool)
                out.append(smooth(minmax_in_mask(g, ones)) * rec)  # normalised per batch
        maps[method] = torch.cat(out)
    prepared.slice_index = all_idx  # the maps cover every axial slice, so map all of them back
    for v in maps.values():
        prepared.to_input_grid(v)
    return time.perf_counter() - t0


def one_mm_grid(img: sitk.Image) -> sitk.Image:
    """A 1 mm axial 256x256x180 grid around the same head (LPS-aligned, as many scanners write)."""
    ref = sitk.Image(256, 256, 180, sitk.sitkFloat32)
    ref.SetSpacing((1.0, 1.0, 1.0))
    centre = img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in img.GetSize()])
    ref.SetOrigin(tuple(c - (n - 1) / 2.0 for c, n in zip(centre, (256, 256, 180))))
    return ref


def _cases(data: Path) -> list[tuple[str, sitk.Image, sitk.Image]]:
    t1s = sorted((data / "t1").glob("*.nii.gz"))
    if not t1s:
        raise InputError(f"no t1/*.nii.gz under {data}; pass --data pointing at ../shared/data/ixi_t1_2mm")
    t1 = t1s[0]
    mask_path = data / "brainmask" / t1.name.replace("_T1", "_brainmask")
    img = read_image(t1)
    msk = read_image(mask_path, "MASK")
    ref = one_mm_grid(img)
    img1 = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    msk1 = sitk.Resample(msk, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, msk.GetPixelID())
    return [(f"2 mm {t1.name.split('_')[0]} {'x'.join(map(str, img.GetSize()))}", img, msk),
            ("1 mm 256x256x180 (same scan resampled)", img1, msk1)]


def _bf16_row(img, msk, package, methods, device, net, repeats: int, fp32) -> dict:
    """Seconds under bf16 autocast and each map's largest difference from float32's, in
    units of that map's float32 0.999 brain quantile (so 0.01 is 1 % of a high value)."""
    score_volume(img, package, methods, mask=msk, device=str(device), model=net, bf16=True)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        res = score_volume(img, package, methods, mask=msk, device=str(device), model=net, bf16=True)
        times.append(time.perf_counter() - t0)
    brain = fp32.brain_mask
    diff = {m: float(np.abs(res.maps[m] - fp32.maps[m])[brain].max()
                     / max(float(np.quantile(fp32.maps[m][brain], 0.999)), 1e-12)) for m in fp32.maps}
    return {"bf16_seconds_per_volume": statistics.median(times), "bf16_max_map_difference": diff}


def run_benchmark(data: str | Path, model: str | None = None, methods: list[str] | None = None, repeats: int = 3,
                  device: str = "cpu", no_reference: bool = False, restoration: str = "package",
                  json_path: str | None = None, bf16: bool = False) -> list[dict]:
    """Time scoring on the cases of :func:`_cases`; print a line per case; return the rows.
    With ``bf16``, each row also times the same scoring under bf16 autocast (dae, ssl) and
    says how far its maps are from float32's."""
    configure_threads()
    methods = list(methods or PIXEL_METHODS)
    package = resolve_package_for(methods, model)
    if restoration == "reference":
        from ...core.restoration import REFERENCE_RESTORATION
        package.meta["restoration"] = {**package.meta.get("restoration", {}), **REFERENCE_RESTORATION}
    compare = not no_reference and sorted(methods) == sorted(PIXEL_METHODS)
    device = select_device(device)
    net = package.load_model(device)
    cases = _cases(Path(data))
    results = []
    print(f"model {package.name}, methods {', '.join(methods)}; device {device}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{platform.processor() or platform.machine()}, {usable_cores()} cores")
    for name, img, msk in cases:
        score_volume(img, package, methods, mask=msk, device=str(device), model=net)  # warm-up
        times, slices = [], 0
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = score_volume(img, package, methods, mask=msk, device=str(device), model=net)
            times.append(time.perf_counter() - t0)
            slices = res.info["scored_slices"]
        sec = statistics.median(times)
        row = {"case": name, "seconds_per_volume": sec, "scored_slices": slices,
               "slices_per_second": slices / sec, "peak_rss_mb": _peak_rss_mb()}
        # File I/O on its own: writing the heatmaps the way the command line does.
        tmp = Path(f"/tmp/anomaly-localizer-bench-{int(time.time() * 1000)}.nii.gz")
        t0 = time.perf_counter()
        for arr in res.maps.values():
            write_image(sitk.GetImageFromArray(arr), tmp)
        row["write_maps_s"] = time.perf_counter() - t0
        tmp.unlink(missing_ok=True)
        row["smoothing_seconds"] = res.timings.get("smoothing_s", 0.0)
        if bf16:
            row.update(_bf16_row(img, msk, package, methods, device, net, repeats, res))
        if compare:
            mask_arr = brain_mask(img, msk)
            ref_times = [reference_way(img, mask_arr, package, net, device) for _ in range(max(1, repeats // 2))]
            row["reference_seconds"] = statistics.median(ref_times)
            row["speedup_vs_reference"] = row["reference_seconds"] / sec
            # Like for like: the reference way does not smooth its maps, so also time ours without
            # the 3D smoothing (the same maps the reference computes, the same work).
            unsmoothed = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                score_volume(img, package, methods, mask=msk, device=str(device), model=net, smoothing=False)
                unsmoothed.append(time.perf_counter() - t0)
            row["seconds_per_volume_unsmoothed"] = statistics.median(unsmoothed)
            row["speedup_vs_reference_like_for_like"] = row["reference_seconds"] / row["seconds_per_volume_unsmoothed"]
        results.append(row)
        if bf16:
            print(f"{name}: bf16 autocast {row['bf16_seconds_per_volume']:.2f} s/volume; largest map difference from "
                  "float32 (of the map's 0.999 quantile): "
                  + ", ".join(f"{m} {v:.3g}" for m, v in row["bf16_max_map_difference"].items()))
        print(f"{name}: {sec:.2f} s/volume (median of {repeats}; 3D smoothing {row['smoothing_seconds']:.2f} s of it), "
              f"{row['slices_per_second']:.0f} slices/s, "
              f"peak RSS so far {row['peak_rss_mb']:.0f} MB, writing {len(res.maps)} maps {row['write_maps_s']:.2f} s"
              + (f"; reference way {row['reference_seconds']:.2f} s -> {row['speedup_vs_reference']:.1f}x faster; "
                 f"like for like (both unsmoothed, ours {row['seconds_per_volume_unsmoothed']:.2f} s) "
                 f"{row['speedup_vs_reference_like_for_like']:.1f}x"
                 if "reference_seconds" in row else ""))
    if json_path:
        Path(json_path).write_text(json.dumps({"model": package.name, "methods": methods,
                                               "restoration_optimiser": restoration if "restoration" in methods
                                               else None, "device": str(device),
                                               "machine": f"{platform.machine()} {usable_cores()} cores",
                                               "results": results}, indent=2) + "\n")
    return results
