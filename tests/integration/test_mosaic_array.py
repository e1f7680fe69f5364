"""Mosaics as ONE Slurm array on the real local cluster, each task waiting only for the
neighbours still being reduced; and the same mosaic on the local default.

The reduced fields are synthetic final images (hpcddf.mosaic.survey_sim) written where a reduction
leaves them; the fields "being reduced" are real scaled-pipeline chains on the same cluster.
"""

from __future__ import annotations

import json
import subprocess
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from hpcddf.engine.state import read_state as read_dir_state
from hpcddf.mosaic.combine import PRODUCTS
from hpcddf.mosaic.pointings import neighbourhood
from hpcddf.mosaic.survey_sim import FieldSpec, SkySource, hex_grid, write_field

from .conftest import CONTAINER_SECTION, hpcddf, read_state, require_science_image, wait_for

SPEC = FieldSpec(cell_arcsec=1.5, resolution_arcsec=6.0, npix=576, pb_fwhm_deg=0.15, noise=1e-3)
SPACING = 0.1
FULL = PRODUCTS["full"]


def write_survey(work: Path, pts, skip=()) -> list[SkySource]:
    """Final images of every pointing but ``skip`` in its field directory, one source at each centre."""
    sources = [SkySource(p.ra, p.dec, 0.5) for p in pts]
    for i, p in enumerate(pts):
        if p.id not in skip:
            write_field(work / p.id, p, SPEC, sources, FULL.int_image, FULL.app_image, seed=i)
    return sources


def pointings_csv(path: Path, pts) -> Path:
    path.write_text("id,ra,dec\n" + "".join(f"{p.id},{p.ra!r},{p.dec!r}\n" for p in pts))
    return path


def mosaic_state(work: Path, centre: str) -> dict:
    st = read_dir_state(work / "mosaics" / centre) or {"stages": {}}
    return st["stages"].get("full", {})


def test_local_mosaic_makes_products_and_is_skipped_when_done(tmp_path):
    pts = hex_grid(210.0, 54.0, SPACING, 1, prefix="F")
    work = tmp_path / "work"
    write_survey(work, pts)
    table = pointings_csv(tmp_path / "pointings.csv", pts)
    out = hpcddf("mosaic", "F000", "--local", "--pointings", str(table), "--work-root", str(work),
                 "--cpus", "2", "--catalogue", timeout=300)
    assert "F000-full" in out.stdout
    d = work / "mosaics" / "F000"
    with fits.open(d / "F000-full-mosaic.fits") as h:
        data = h[0].data
        assert h[0].header["BMAJ"] == pytest.approx(6 / 3600) and h[0].header["OBJECT"] == "F000-full"
    n = data.shape[0]
    assert abs(data[n // 2 - 3:n // 2 + 4, n // 2 - 3:n // 2 + 4].max() - 0.5) < 0.03  # the centre source
    assert (d / "F000-full-mosaic-weights.fits").is_file() and (d / "F000-full-mosaic.png").is_file()
    assert mosaic_state(work, "F000")["state"] == "done"
    from astropy.table import Table
    cat = Table.read(d / "F000-full-mosaic.srl.fits")
    central = [r for r in cat if abs(r["RA"] - pts[0].ra) < 0.002 and abs(r["DEC"] - pts[0].dec) < 0.002]
    assert len(central) == 1 and central[0]["Total_flux"] == pytest.approx(0.5, rel=0.05)
    again = hpcddf("mosaic", "F000", "--local", "--pointings", str(table), "--work-root", str(work), "--json")
    assert json.loads(again.stdout)["done"] == ["F000-full"]
    status = json.loads(hpcddf("status", "--work-root", str(work), "--json").stdout)
    assert [s["field"] for s in status if s.get("kind") == "mosaic"] == ["F000"]


def test_missing_neighbours_block_a_mosaic_with_the_fix(tmp_path):
    pts = hex_grid(210.0, 54.0, SPACING, 1, prefix="F")
    work = tmp_path / "work"
    write_survey(work, pts, skip={"F004"})
    table = pointings_csv(tmp_path / "pointings.csv", pts)
    out = hpcddf("mosaic", "F000", "--local", "--pointings", str(table), "--work-root", str(work))
    assert "not queued, needs F004" in out.stdout and not (work / "mosaics" / "F000").exists()
    out = hpcddf("mosaic", "F000", "--local", "--pointings", str(table), "--work-root", str(work),
                 "--allow-missing", "--json", "--dry-run")
    planned = json.loads(out.stdout)["to_submit"][0]
    assert planned["dropped"] == ["F004"] and "F004" not in planned["inputs"]
    bad = hpcddf("mosaic", "F999", "--local", "--pointings", str(table), check=False)
    assert bad.returncode != 0 and "F999 is not in the pointings table" in bad.stderr


def _pick_centres(pts, x: str, y: str) -> tuple[str, str, str]:
    """A centre needing x but not y, one needing y but not x, one needing neither."""
    hoods = {p.id: set(neighbourhood(p, pts).ids) for p in pts}
    a = next(c for c, ids in hoods.items() if x in ids and y not in ids and c not in (x, y))
    c = next(c for c, ids in hoods.items() if y in ids and x not in ids and c not in (x, y))
    b = next(c for c, ids in hoods.items() if not ids & {x, y})
    return a, c, b


@pytest.mark.slurm
def test_one_array_each_task_waits_only_for_its_own_neighbours(slurm_site, tmp_path):
    site = slurm_site(walltime="10")
    work = tmp_path / "work"
    pts = hex_grid(210.0, 54.0, SPACING, 2, prefix="F")
    x, y = pts[1].id, pts[4].id          # opposite sides of the centre
    a, c, b = _pick_centres(pts, x, y)
    write_survey(work, pts, skip={x, y})
    table = pointings_csv(tmp_path / "pointings.csv", pts)
    # x is being reduced (and will succeed), y too (and will fail)
    sub_x = hpcddf("submit", x, "--site-file", str(site), "--pipeline", "scaled", "--pipeline-opt", "seconds=3",
                   "--control-exitafter=dirin", "--json")
    x_jobs = json.loads(sub_x.stdout)["fields"][x]["jobs"]
    hpcddf("submit", y, "--site-file", str(site), "--pipeline", "scaled", "--pipeline-opt", "seconds=3",
           "--pipeline-opt", "fail=cluster", "--control-exitafter=dirin")
    out = hpcddf("mosaic", a, b, c, "--site-file", str(site), "--pointings", str(table), "--cpus", "1",
                 "--mem-gb", "1", "--walltime", "5", "--no-preview", "--json")
    doc = json.loads(out.stdout)
    jobs = doc["jobs"]
    assert set(jobs) == {f"{a}-full", f"{b}-full", f"{c}-full"}
    assert len({j.split("_")[0] for j in jobs.values()}) == 1, "the mosaics must be ONE array"
    waits = {m["mosaic"]: m["waits_for"] for m in doc["to_submit"]}
    assert waits[f"{a}-full"] == {x: x_jobs["dirin"]} and waits[f"{b}-full"] == {}
    deps = subprocess.run(["squeue", "-h", "-r", "-j", jobs[f"{a}-full"], "-o", "%E"],
                          capture_output=True, text=True).stdout
    assert x_jobs["dirin"] in deps

    # b needs nobody: it is made while x is still being reduced and a still waits
    wait_for(lambda: mosaic_state(work, b).get("state") == "done", 180, f"mosaic {b}")
    assert read_state(work, x)["stages"]["dirin"]["state"] != "done"
    assert mosaic_state(work, a).get("state") == "queued"
    # x's final images appear as its reduction ends; a runs only after that
    write_field(work / x, next(p for p in pts if p.id == x), SPEC, [], FULL.int_image, FULL.app_image, seed=99)
    wait_for(lambda: mosaic_state(work, a).get("state") == "done", 300, f"mosaic {a} after {x}")
    x_done = read_state(work, x)["stages"]["dirin"]
    assert x_done["state"] == "done"
    assert mosaic_state(work, a)["started"] >= x_done["ended"]
    # y failed: the mosaic that needs it is cancelled by Slurm, not left pending for ever
    wait_for(lambda: read_state(work, y)["stages"]["dirin"]["state"] == "failed", 180, f"{y} to fail")
    shown = wait_for(lambda: [s for s in json.loads(hpcddf("status", "--site-file", str(site), "--mosaics",
                                                           "--json").stdout)
                              if s["field"] == c and s["stages"]["full"]["state"] == "cancelled"],
                     120, f"mosaic {c} to be cancelled")
    assert shown[0]["kind"] == "mosaic"
    a_img = fits.getdata(work / "mosaics" / a / f"{a}-full-mosaic.fits")
    assert np.isfinite(a_img).any()
    # submitting again skips what is done and what Slurm cancelled is resubmittable
    again = json.loads(hpcddf("mosaic", a, b, "--site-file", str(site), "--pointings", str(table),
                              "--json", "--dry-run").stdout)
    assert sorted(again["done"]) == sorted([f"{a}-full", f"{b}-full"])


def test_a_mosaic_made_in_the_science_image_is_the_one_made_without(slurm_site, tmp_path):
    """On a site with an image the mosaic job runs hpcddf's mosaic code inside it (probed first,
    like a stage), with the fields and the mosaic bound; the products equal the local run's."""
    image = require_science_image()
    site = slurm_site(walltime="10")
    site.write_text(site.read_text() + CONTAINER_SECTION.format(image=image))
    pts = hex_grid(210.0, 54.0, SPACING, 1, prefix="F")
    work, local = tmp_path / "work", tmp_path / "local"
    write_survey(work, pts)
    write_survey(local, pts)  # the same synthetic fields (same seeds)
    table = pointings_csv(tmp_path / "pointings.csv", pts)
    hpcddf("mosaic", "F000", "--site-file", str(site), "--pointings", str(table), "--cpus", "1",
           "--mem-gb", "1", "--walltime", "5", "--no-preview", "--json")
    wait_for(lambda: mosaic_state(work, "F000").get("state") in ("done", "failed"), 300, "the mosaic job")
    assert mosaic_state(work, "F000")["state"] == "done", mosaic_state(work, "F000")
    hidden = work / "mosaics" / "F000" / ".hpcddf"
    first = (hidden / "logs" / "mosaic-full.log").read_text().splitlines()[0]
    argv = json.loads(first.split(": ", 1)[1])
    assert argv[0] == "ch-run" and "--unset-env=*" in argv and argv[argv.index("--") - 1] == str(image)
    assert argv[argv.index("--") + 1:argv.index("--") + 4] == ["python3", "-m", "hpcddf.mosaic.make"]
    assert f"{work}:{work}" in argv  # the fields and the mosaic, under the work root
    probe = json.loads((hidden / "logs" / "image-probe.log").read_text().splitlines()[-1])
    assert probe["version"] == version("hpcddf") and probe["commands"]["python3"]
    assert not list(hidden.glob("scratch-*"))
    hpcddf("mosaic", "F000", "--local", "--pointings", str(table), "--work-root", str(local), "--cpus", "1",
           "--no-preview", timeout=300)
    for kind in ("mosaic", "mosaic-weights"):
        ours = fits.getdata(work / "mosaics" / "F000" / f"F000-full-{kind}.fits")
        theirs = fits.getdata(local / "mosaics" / "F000" / f"F000-full-{kind}.fits")
        assert np.allclose(ours, theirs, rtol=1e-6, atol=0, equal_nan=True), kind
