"""hpcddf's own small node tools, run as commands of a step (``python -m hpcddf.lofar.tools ...``).

They do the glue ddf-pipeline does in Python between DDF.py and kMS.py calls (prepare the MS
columns, make and merge masks, small-field clustering, link smoothed solutions, the summary,
cache clean-up). As separate commands they get a log, a timeout and a place in the step's
done-marker like any science command, and they run inside the container with the rest.
Every output is written to a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Sequence

import numpy as np

CLUSTER_DTYPE = [("Name", "S200"), ("ra", "f8"), ("dec", "f8"), ("SumI", "f8"), ("Cluster", "i8")]


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _write_text(path: Path, text: str) -> None:
    tmp = _tmp(path)
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _write_fits(path: Path, data: np.ndarray, header: object) -> None:
    from astropy.io import fits
    tmp = _tmp(path)
    fits.PrimaryHDU(data=data, header=header).writeto(tmp, overwrite=True)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ MS preparation

def prepare_ms(mss: Sequence[str], colname: str) -> None:
    """Check the input column exists and add IMAGING_WEIGHT (killMS and ClipCal write it)."""
    from casacore import tables
    for ms in mss:
        with tables.table(ms, ack=False) as t:
            cols = t.colnames()
        if colname not in cols:
            raise SystemExit(f"error: {ms} has no column {colname}: set [data] colname to one of "
                             f"{', '.join(c for c in cols if c.endswith('DATA'))}")
        if "IMAGING_WEIGHT" not in cols:
            tables.addImagingColumns(ms, ack=False)
            print(f"{ms}: added IMAGING_WEIGHT")


def clear_cache(cache_dir: str, names: Sequence[str]) -> None:
    """Remove DDFacet caches of these MS lists and MSs (in the cache dir and the field dir)."""
    root = Path(cache_dir)
    root.mkdir(parents=True, exist_ok=True)  # DDF 0.9.1 does not create --Cache-Dir
    for base in (root, Path(".")):
        for name in names:
            for p in base.glob(f"{Path(name).name}*.ddfcache"):
                shutil.rmtree(p, ignore_errors=True)
                print(f"removed {p}")


# ------------------------------------------------------------------------------ masks

@dataclass(frozen=True)
class TgssMask:
    """How TGSS sources are masked: discs of ``radius`` pixels around sources brighter than
    ``min_flux`` mJy; with ``extended``, a source larger than ``pointlike`` arcsec gets an
    ellipse of its own shape grown by the radius (ddf-pipeline's modify_mask)."""

    catalogue: str
    radius: float = 8.0
    min_flux: float = 300.0
    extended: bool = False
    pointlike: float = 30.0


def external_mask(template: str, out: str, record: str, fits_mask: str | None, tgss: TgssMask | None,
                  region: str | None = None) -> None:
    """A mask on the template's grid from a given FITS mask, bright TGSS sources and a ds9 region.

    DDFacet refuses an empty external mask, so the FITS file is written only when something is
    masked (and removed otherwise); ``record`` always says how many pixels were masked.
    """
    from astropy.io import fits
    with fits.open(template) as hdul:
        header = hdul[0].header.copy()
        mask = np.zeros_like(hdul[0].data, dtype=np.float32)
    if fits_mask:
        with fits.open(fits_mask) as hdul:
            other = hdul[0].data
        if other.shape != mask.shape:
            raise SystemExit(f"error: {fits_mask} has shape {other.shape}, the image {mask.shape}: "
                             "regrid the external mask to the image")
        mask[other > 0] = 1
    if tgss:
        _tgss_mask(mask, header, tgss)
    if region:
        _region_mask(mask, header, region)
    npix = int(mask.sum())
    if npix:
        _write_fits(Path(out), mask, header)
    else:
        Path(out).unlink(missing_ok=True)
    _write_text(Path(record), json.dumps({"mask": out if npix else None, "masked_pixels": npix}) + "\n")
    print(f"{out}: {npix} masked pixels" + ("" if npix else " (not written: nothing to mask)"))


def _tgss_mask(mask: np.ndarray, header: object, t: TgssMask) -> None:
    from astropy.table import Table
    from astropy.wcs import WCS
    cat = Table.read(t.catalogue)
    cat = cat[cat["Peak_flux"] > t.min_flux]
    wcs = WCS(header).celestial
    ny, nx = mask.shape[-2:]
    x, y = wcs.all_world2pix(np.asarray(cat["RA"]), np.asarray(cat["DEC"]), 0)
    cell = abs(float(wcs.wcs.cdelt[1])) * 3600.0  # arcsec per pixel
    yy, xx = np.mgrid[0:ny, 0:nx]
    for i, (xi, yi) in enumerate(zip(x, y)):
        if t.extended and float(cat["Maj"][i]) > t.pointlike:
            a = float(cat["Maj"][i]) / cell + 2 * t.radius
            b = float(cat["Min"][i]) / cell + 2 * t.radius
            inside = _ellipse(xx - xi, yy - yi, a, b, float(cat["PA"][i]))
        else:
            inside = (xx - xi) ** 2 + (yy - yi) ** 2 < t.radius ** 2
        mask[..., inside] = 1


def _ellipse(dx: np.ndarray, dy: np.ndarray, a: float, b: float, pa_deg: float) -> np.ndarray:
    """Pixels inside an ellipse of semi-axes a, b (pixels) whose major axis points PA degrees
    from north through east (north is +y; east is -x on an image with RA growing leftwards)."""
    pa = np.deg2rad(pa_deg)
    along = dy * np.cos(pa) - dx * np.sin(pa)   # along the major axis
    across = dy * np.sin(pa) + dx * np.cos(pa)
    return (along / a) ** 2 + (across / b) ** 2 < 1.0


def _region_mask(mask: np.ndarray, header: object, path: str) -> None:
    """OR a ds9 region file (sky or image coordinates) into the mask, as ddf-pipeline does."""
    from astropy.wcs import WCS
    from regions import PixelRegion, Regions
    wcs = WCS(header).celestial
    ny, nx = mask.shape[-2:]
    for reg in Regions.read(path, format="ds9"):
        pix = reg if isinstance(reg, PixelRegion) else reg.to_pixel(wcs)
        inside = pix.to_mask(mode="center").to_image((ny, nx))
        if inside is not None:
            mask[..., inside > 0] = 1


def merge_masks(out: str, inputs: Sequence[str], optional: Sequence[str]) -> None:
    """The union of masks on one grid (ddf-pipeline's ``merge_mask``: int(a) | int(b))."""
    from astropy.io import fits
    paths = list(inputs) + [p for p in optional if Path(p).exists()]
    merged, header = None, None
    for p in paths:
        with fits.open(p) as hdul:
            data = hdul[0].data > 0
            if merged is None:
                merged, header = data, hdul[0].header.copy()
            elif data.shape != merged.shape:
                raise SystemExit(f"error: mask {p} has shape {data.shape}, expected {merged.shape}")
            else:
                merged |= data
    assert merged is not None
    _write_fits(Path(out), merged.astype(np.float32), header)
    print(f"{out}: {int(merged.sum())} masked pixels from {len(paths)} mask(s)")


# ------------------------------------------------------------------------------ clustering

def _tangent(ra: np.ndarray, dec: np.ndarray, ra0: float, dec0: float) -> np.ndarray:
    """Direction cosines (l, m) about (ra0, dec0); all angles in radians."""
    l = np.cos(dec) * np.sin(ra - ra0)
    m = np.sin(dec) * np.cos(dec0) - np.cos(dec) * np.sin(dec0) * np.cos(ra - ra0)
    return np.stack([l, m], axis=1)


def cluster_catalogue(catalogue: str, ndir: int, out: str, seed: int = 0) -> np.ndarray:
    """Group the brightest sources into ``ndir`` flux-weighted directions (k-means).

    ClusterCat.py cannot make fewer than ~6 clusters from a small catalogue (its tessellation
    of a flat simplex fails), so small fields use this. Seeds are the brightest source, then
    repeatedly the source farthest from the seeds weighted by flux, which keeps the nodes from
    being collinear whenever the sources are not.
    """
    from astropy.table import Table
    from scipy.cluster.vq import kmeans2
    cat = Table.read(catalogue)
    ra, dec = np.radians(np.asarray(cat["RA"], float)), np.radians(np.asarray(cat["DEC"], float))
    flux = np.asarray(cat["Total_flux"], float)
    if len(flux) < ndir:
        raise SystemExit(f"error: {catalogue} has {len(flux)} sources, fewer than ndir={ndir}: "
                         "lower [solutions] ndir")
    ra0, dec0 = float(np.average(ra, weights=flux)), float(np.average(dec, weights=flux))
    xy = _tangent(ra, dec, ra0, dec0)
    seeds = [int(np.argmax(flux))]
    while len(seeds) < ndir:
        d = np.min(np.linalg.norm(xy[:, None, :] - xy[seeds][None, :, :], axis=2), axis=1)
        seeds.append(int(np.argmax(d * np.sqrt(flux))))
    _, label = kmeans2(xy, xy[seeds], minit="matrix", iter=20, seed=seed)
    nodes = np.zeros(ndir, dtype=CLUSTER_DTYPE)
    for k in range(ndir):
        sel = label == k
        w = flux[sel] if sel.any() else np.ones(1)
        nodes[k] = (f"dir{k}".encode(), np.average(ra[sel], weights=w) if sel.any() else ra[seeds[k]],
                    np.average(dec[sel], weights=w) if sel.any() else dec[seeds[k]], w.sum(), k)
    _save_npy(Path(out), nodes)
    for n in nodes:
        print(f"direction {n['Cluster']}: ra {np.degrees(n['ra']):.4f} dec {np.degrees(n['dec']):.4f} "
              f"flux {n['SumI']:.3f} Jy")
    return nodes


def _save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = _tmp(path).with_suffix(".npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def copy_clusterfile(src: str, out: str) -> None:
    nodes = np.load(src)
    if nodes.dtype.names is None or not {"ra", "dec", "Cluster"} <= set(nodes.dtype.names):
        raise SystemExit(f"error: {src} is not a ClusterCat file (needs ra, dec, Cluster fields)")
    _save_npy(Path(out), nodes)


# ------------------------------------------------------------------------------ solutions

def link_sols(solsdir: str, sols: str, target: str, mss: Sequence[str]) -> None:
    """Per-MS ``killMS.<sols>.sols.npz`` links to one merged/smoothed file, as DDF expects."""
    for ms in mss:
        d = Path(solsdir) / Path(ms).name
        d.mkdir(parents=True, exist_ok=True)
        link = d / f"killMS.{sols}.sols.npz"
        tmp = _tmp(link)
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(os.path.relpath(Path(solsdir) / target, d))
        os.replace(tmp, link)


# ------------------------------------------------------------------------------ summary

def versions() -> dict[str, str]:
    out = {}
    for pkg in ("hpcddf", "DDFacet", "killMS", "bdsf", "python-casacore", "numpy", "astropy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_summary(config: str, out: str) -> None:
    """ddf-pipeline's summary.txt: software versions, then every option in effect."""
    from hpcddf.lofar.config import load_config
    cfg = load_config([config])
    lines = ["# hpcddf run summary", "[versions]"]
    lines += [f"{k} = {v}" for k, v in versions().items()]
    lines += ["", "# options in effect", cfg.to_cfg_text()]
    _write_text(Path(out), "\n".join(lines) + "\n")


# ------------------------------------------------------------------------------ command line

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcddf.lofar.tools", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare-ms")
    p.add_argument("--colname", required=True)
    p.add_argument("ms", nargs="+")
    p = sub.add_parser("clear-cache")
    p.add_argument("--cache-dir", required=True)
    p.add_argument("names", nargs="*")
    p = sub.add_parser("external-mask")
    p.add_argument("--template", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--record", required=True)
    p.add_argument("--fits")
    p.add_argument("--tgss")
    p.add_argument("--tgss-radius", type=float, default=8.0)
    p.add_argument("--tgss-flux", type=float, default=300.0)
    p.add_argument("--tgss-extended", action="store_true", help="ellipses for sources larger than --tgss-pointlike")
    p.add_argument("--tgss-pointlike", type=float, default=30.0, help="arcsec")
    p.add_argument("--region", help="ds9 region file OR'd into the mask")
    p = sub.add_parser("merge-masks")
    p.add_argument("--out", required=True)
    p.add_argument("--optional", action="append", default=[])
    p.add_argument("masks", nargs="+")
    p = sub.add_parser("cluster")
    p.add_argument("--out", required=True)
    p.add_argument("--catalogue")
    p.add_argument("--ndir", type=int)
    p.add_argument("--copy")
    p = sub.add_parser("link-sols")
    p.add_argument("--solsdir", required=True)
    p.add_argument("--sols", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("ms", nargs="+")
    p = sub.add_parser("summary")
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("write-list", help="an MS list file (one name per line)")
    p.add_argument("--out", required=True)
    p.add_argument("ms", nargs="+")
    p = sub.add_parser("bootstrap-fit", help="catalogue a bootstrap cube and fit the flux-scale factors")
    p.add_argument("--cube", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True)
    p = sub.add_parser("bootstrap-apply", help="write SCALED_DATA (and the DI-corrected scaled column)")
    p.add_argument("--factors", required=True)
    p.add_argument("--colname", required=True)
    p.add_argument("--di-col")
    p.add_argument("ms", nargs="+")
    p = sub.add_parser("mean-image")
    p.add_argument("--out", required=True)
    p.add_argument("images", nargs="+")
    p = sub.add_parser("offsets", help="astrometric offsets of the final image per direction")
    p.add_argument("--root", required=True)
    p.add_argument("--config", required=True)
    p = sub.add_parser("quality", help="the quality report of the final image (in the field directory)")
    p.add_argument("--catalogue", action="append", default=[])
    a = ap.parse_args(argv)
    if a.cmd == "quality":
        from hpcddf.lofar.quality import (
            check_comparisons,
            parse_comparison,
            run_quality,
        )
        comps = [parse_comparison(c) for c in a.catalogue]
        check_comparisons(comps)
        doc = run_quality(Path.cwd(), comps)
        print(json.dumps({k: doc[k] for k in ("n_sources", "rms_jy")}))
        return 0
    if a.cmd == "offsets":
        from hpcddf.lofar.offsets import run_offsets
        run_offsets(a.root, a.config)
        return 0
    if a.cmd.startswith("bootstrap") or a.cmd == "mean-image":
        return _bootstrap_tools(a)
    if a.cmd == "prepare-ms":
        prepare_ms(a.ms, a.colname)
    elif a.cmd == "clear-cache":
        clear_cache(a.cache_dir, a.names)
    elif a.cmd == "external-mask":
        tgss = TgssMask(a.tgss, a.tgss_radius, a.tgss_flux, a.tgss_extended, a.tgss_pointlike) if a.tgss else None
        external_mask(a.template, a.out, a.record, a.fits, tgss, a.region)
    elif a.cmd == "merge-masks":
        merge_masks(a.out, a.masks, a.optional)
    elif a.cmd == "cluster":
        if a.copy:
            copy_clusterfile(a.copy, a.out)
        else:
            cluster_catalogue(a.catalogue, a.ndir, a.out)
    elif a.cmd == "link-sols":
        link_sols(a.solsdir, a.sols, a.target, a.ms)
    elif a.cmd == "summary":
        write_summary(a.config, a.out)
    elif a.cmd == "write-list":
        _write_text(Path(a.out), "".join(f"{ms}\n" for ms in a.ms))
    return 0


def _bootstrap_tools(a: argparse.Namespace) -> int:
    from hpcddf.errors import HpcddfError
    from hpcddf.lofar import bootstrap
    try:
        if a.cmd == "bootstrap-fit":
            bootstrap.fit_cube(a.cube, a.config, a.out)
        elif a.cmd == "bootstrap-apply":
            bootstrap.apply_factors(a.factors, a.ms, a.colname, a.di_col)
        else:
            bootstrap.mean_image(a.images, a.out)
    except HpcddfError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
