"""redofrom archiving (once, nothing lost) and hpcddf's node tools (masks, clustering, summary)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hpcddf.lofar.config import load_config
from hpcddf.lofar.redo import apply_redofrom, apply_restart_policy
from hpcddf.lofar.tools import (
    CLUSTER_DTYPE,
    cluster_catalogue,
    merge_masks,
    write_summary,
)
from tests._require import need

fits = need("astropy.io.fits", "science")  # the node tools run in the science environment


def _field(tmp_path: Path) -> Path:
    wd = tmp_path / "L1"
    (wd / "L1_SB000.ms").mkdir(parents=True)
    for name in ("mslist.txt", "big-mslist.txt", "tier1.cfg", "image_dirin_SSD_init.dirty.fits",
                 "image_dirin_SSD_m.app.restored.fits", "image_phase1.app.restored.fits",
                 "MaskDiffuse.fits", "external_mask.json"):
        (wd / name).write_text(name)
    (wd / "SOLSDIR" / "L1_SB000.ms").mkdir(parents=True)
    done = wd / ".hpcddf" / "done"
    done.mkdir(parents=True)
    for step in ("image_dirin_SSD_init", "image_dirin_SSD_m", "cluster", "image_phase1"):
        (done / f"{step}.done.json").write_text("{}")
    return wd


def test_redofrom_dirin_keeps_the_initial_images_and_archives_the_rest(tmp_path):
    wd = _field(tmp_path)
    cfg = load_config([], ["--data-mslist=mslist.txt", "--control-redofrom=dirin"])
    moved = apply_redofrom(wd, cfg, "dirin")
    # no full_mslist in this config, so big-mslist.txt is just another file
    assert moved == ["SOLSDIR", "big-mslist.txt", "image_phase1.app.restored.fits"]
    assert (wd / "old" / "image_phase1.app.restored.fits").read_text() == "image_phase1.app.restored.fits"
    for kept in ("L1_SB000.ms", "mslist.txt", "tier1.cfg", "image_dirin_SSD_m.app.restored.fits",
                 "MaskDiffuse.fits", "external_mask.json"):
        assert (wd / kept).exists(), kept
    assert sorted(p.name for p in (wd / ".hpcddf" / "done").iterdir()) == [
        "image_dirin_SSD_init.done.json", "image_dirin_SSD_m.done.json"]
    assert json.loads((wd / ".hpcddf" / "redo.log").read_text())["redofrom"] == "dirin"


def test_redofrom_twice_never_overwrites_the_archive(tmp_path):
    wd = _field(tmp_path)
    cfg = load_config([], ["--data-mslist=mslist.txt", "--data-full_mslist=big-mslist.txt"])
    apply_redofrom(wd, cfg, "start")
    (wd / "image_phase1.app.restored.fits").write_text("second run")
    apply_redofrom(wd, cfg, "start")
    assert (wd / "old" / "image_phase1.app.restored.fits").read_text() == "image_phase1.app.restored.fits"
    assert (wd / "old" / "redo-2" / "image_phase1.app.restored.fits").read_text() == "second run"
    assert not list((wd / ".hpcddf" / "done").iterdir())


def test_redofrom_drops_the_bootstrap_columns_so_it_is_redone(tmp_path):
    """The bootstrap never overwrites an existing scaled column (so a requeue cannot scale
    twice); a redone field must therefore lose them, or it would keep the old factors."""
    from casacore.tables import table

    from hpcddf.lofar.bootstrap import apply_scaling
    from hpcddf.lofar.simulate import SimSpec, simulate_field
    sim = simulate_field(tmp_path / "L1", SimSpec(n_ms=1, nant=6, ntime=5))
    ms = str(sim.ms[0])
    assert apply_scaling(ms, 1.2, "DATA") and apply_scaling(ms, 1.2, "DATA", "DATA_DI_CORRECTED_SCALED")
    apply_redofrom(sim.outdir, load_config([], ["--data-mslist=mslist.txt"]), "start")
    with table(ms, ack=False) as t:
        cols = t.colnames()
        assert "SCALED_DATA" not in cols and "DATA_DI_CORRECTED_SCALED" not in cols and "DATA" in cols
    record = json.loads((sim.outdir / ".hpcddf" / "redo.log").read_text())
    assert record["dropped_columns"] == {Path(ms).name: ["SCALED_DATA", "DATA_DI_CORRECTED_SCALED"]}
    assert apply_scaling(ms, 0.9, "DATA")  # the redone bootstrap writes its own factor


def test_restart_false_forgets_every_step_but_moves_nothing(tmp_path):
    wd = _field(tmp_path)
    note = apply_restart_policy(wd, load_config([], ["--control-restart=False"]))
    assert note and "restart=False" in note
    assert not list((wd / ".hpcddf" / "done").iterdir())
    assert (wd / "image_phase1.app.restored.fits").exists()
    assert apply_restart_policy(wd, load_config([])) is None


def _fits(path: Path, data: np.ndarray) -> str:
    hdr = fits.Header()
    hdr["CTYPE1"], hdr["CTYPE2"] = "RA---SIN", "DEC--SIN"
    hdr["CRVAL1"], hdr["CRVAL2"], hdr["CDELT1"], hdr["CDELT2"] = 180.0, 60.0, -0.01, 0.01
    hdr["CRPIX1"], hdr["CRPIX2"] = 8.0, 8.0
    fits.PrimaryHDU(data=data.astype(np.float32), header=hdr).writeto(path)
    return str(path)


def test_merge_masks_is_the_union_and_skips_missing_optional_masks(tmp_path):
    a, b = np.zeros((1, 1, 16, 16)), np.zeros((1, 1, 16, 16))
    a[0, 0, 2, 3] = 1
    b[0, 0, 10, 11] = 5
    out = tmp_path / "m.fits"
    merge_masks(str(out), [_fits(tmp_path / "a.fits", a), _fits(tmp_path / "b.fits", b)],
                [str(tmp_path / "absent.fits")])
    m = fits.getdata(out)
    assert m.sum() == 2 and m[0, 0, 2, 3] == 1 and m[0, 0, 10, 11] == 1
    assert not list(tmp_path.glob(".*tmp*"))


def test_external_mask_is_not_written_when_empty(tmp_path):
    tpl = _fits(tmp_path / "t.fits", np.ones((1, 1, 16, 16)))
    proc = subprocess.run([sys.executable, "-m", "hpcddf.lofar.tools", "external-mask", "--template", tpl,
                           "--out", "ext.fits", "--record", "ext.json"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "ext.fits").exists()  # DDFacet refuses an empty external mask
    assert json.loads((tmp_path / "ext.json").read_text()) == {"mask": None, "masked_pixels": 0}


def test_small_field_clustering_makes_non_collinear_flux_weighted_nodes(tmp_path):
    from astropy.table import Table
    ra = [180.6, 180.7, 178.2, 178.6, 181.4, 181.8]
    dec = [60.8, 60.9, 59.8, 59.5, 59.2, 59.5]
    Table({"RA": ra, "DEC": dec, "Total_flux": [5.0, 1.5, 3.0, 1.2, 2.5, 2.0]}).write(tmp_path / "c.fits")
    nodes = cluster_catalogue(str(tmp_path / "c.fits"), 3, str(tmp_path / "n.npy"))
    loaded = np.load(tmp_path / "n.npy")
    assert loaded.dtype == np.dtype(CLUSTER_DTYPE) and list(loaded["Cluster"]) == [0, 1, 2]
    assert sorted(np.round(nodes["SumI"], 3)) == [4.2, 4.5, 6.5]
    x, y = np.degrees(loaded["ra"]), np.degrees(loaded["dec"])
    area = abs((x[1] - x[0]) * (y[2] - y[0]) - (x[2] - x[0]) * (y[1] - y[0])) / 2
    assert area > 0.5  # square degrees: far from collinear


def test_clustering_refuses_fewer_sources_than_directions(tmp_path):
    from astropy.table import Table
    Table({"RA": [180.0], "DEC": [60.0], "Total_flux": [1.0]}).write(tmp_path / "c.fits")
    with pytest.raises(SystemExit, match="lower \\[solutions\\] ndir"):
        cluster_catalogue(str(tmp_path / "c.fits"), 3, str(tmp_path / "n.npy"))


def test_summary_lists_versions_and_every_option(tmp_path):
    cfg = tmp_path / "p.cfg"
    cfg.write_text("[data]\nmslist=mslist.txt\n[control]\nbootstrap=False\n")
    write_summary(str(cfg), str(tmp_path / "summary.txt"))
    text = (tmp_path / "summary.txt").read_text()
    assert "hpcddf = " in text and "DDFacet = " in text and "killMS = " in text
    assert "mslist = mslist.txt" in text and "[masking]" in text


def _mask_of(tmp_path: Path, *args: str) -> np.ndarray:
    tpl = tmp_path / "tpl.fits"  # 36" pixels, the reference pixel at 7 (0-based)
    if not tpl.exists():
        _fits(tpl, np.zeros((1, 1, 64, 64)))
    proc = subprocess.run([sys.executable, "-m", "hpcddf.lofar.tools", "external-mask", "--template", str(tpl),
                           "--out", "ext.fits", "--record", "ext.json", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return fits.getdata(tmp_path / "ext.fits")[0, 0]


def test_tgss_extended_sources_get_their_own_elliptical_shape(tmp_path):
    from astropy.table import Table
    # a bright point source at the reference pixel and a 720"x180" source at PA 0 (north-south)
    # 20 px north of it; 36" pixels, so its ellipse has semi-axes 20 + 2x2 and 5 + 2x2 px
    Table({"RA": [180.0, 180.0], "DEC": [60.0, 60.2], "Peak_flux": [500.0, 500.0],
           "Maj": [10.0, 720.0], "Min": [10.0, 180.0], "PA": [0.0, 0.0]}).write(tmp_path / "tgss.fits")
    base = ["--tgss", "tgss.fits", "--tgss-radius", "2", "--tgss-flux", "300"]
    discs = _mask_of(tmp_path, *base)
    (tmp_path / "ext.fits").unlink()
    shaped = _mask_of(tmp_path, *base, "--tgss-extended", "--tgss-pointlike", "30")
    assert 16 <= discs.sum() <= 26  # two discs of radius 2 px
    ys = np.flatnonzero(shaped[:, 7])
    assert ys.max() - ys.min() >= 2 * 22  # long along north-south
    across = np.flatnonzero(shaped[27])
    assert 15 <= across.size <= 19 and abs(across.mean() - 7) < 1  # narrow east-west, centred
    assert shaped[7, 7] == 1 and discs[7, 7] == 1  # the point source keeps its disc


def test_a_ds9_region_is_ored_into_the_external_mask(tmp_path):
    (tmp_path / "my.reg").write_text('# Region file format: DS9\nfk5\ncircle(180.0,60.1,108")\n'
                                     "image\nbox(50,50,5,3,0)\n")
    mask = _mask_of(tmp_path, "--region", "my.reg")
    assert 20 < mask[12:24, 0:16].sum() <= 3.2 * 9 + 8  # a 3-pixel-radius circle ~10 px north of centre
    assert mask[47:52, 47:53].sum() == 15  # the 5x3 image-coordinate box (1-based centre 50,50)
