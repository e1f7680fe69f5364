"""Planning mosaics from field states on the local site (the Slurm array is tested for real in
tests/integration/test_mosaic_array.py)."""

from __future__ import annotations

import json

import pytest

from hpcddf.engine.sites import load_site
from hpcddf.mosaic.combine import PRODUCTS
from hpcddf.mosaic.jobs import MosaicPlanError, parse_assignments, plan_mosaics
from hpcddf.mosaic.survey_sim import hex_grid

FULL = PRODUCTS["full"]


@pytest.fixture
def survey(tmp_path):
    pts = hex_grid(100.0, 40.0, 1.0, 1, prefix="L")
    work = tmp_path / "work"
    return pts, work, load_site("local", None)


def reduce(work, *ids, product=FULL):
    """Mark fields reduced: their final images exist (planning looks at nothing else)."""
    for fid in ids:
        (work / fid).mkdir(parents=True, exist_ok=True)
        (work / fid / product.int_image).write_bytes(b"")
        (work / fid / product.app_image).write_bytes(b"")


def test_all_neighbours_reduced_gives_one_task_with_their_images(survey):
    pts, work, site = survey
    reduce(work, *[p.id for p in pts])
    plan = plan_mosaics(site, pts, pts[:1], ["full"], work)
    (task,) = plan.tasks
    assert task.name == "L000-full" and sorted(task.input_names()) == [p.id for p in pts]
    assert task.inputs[0].int_path == str(work / "L000" / FULL.int_image)
    assert task.outdir == str(work / "mosaics" / "L000") and not task.depends


def test_unreduced_neighbours_block_unless_allowed_or_excluded(survey):
    pts, work, site = survey
    reduce(work, *[p.id for p in pts if p.id != "L003"])
    plan = plan_mosaics(site, pts, pts[:1], ["full"], work)
    assert not plan.tasks and plan.blocked == {"L000-full": ["L003"]}
    allowed = plan_mosaics(site, pts, pts[:1], ["full"], work, allow_missing=True).tasks[0]
    assert "L003" not in allowed.input_names() and allowed.dropped == ("L003",)
    excluded = plan_mosaics(site, pts, pts[:1], ["full"], work, exclude=["L003"]).tasks[0]
    assert "L003" not in excluded.input_names() and excluded.dropped == ()
    # a centre that is not reduced itself is never mosaicked, even with --allow-missing
    assert plan_mosaics(site, pts, [pts[3]], ["full"], work, allow_missing=True).blocked


def test_a_done_mosaic_is_skipped_until_its_inputs_change(survey):
    pts, work, site = survey
    reduce(work, *[p.id for p in pts if p.id != "L003"])
    task = plan_mosaics(site, pts, pts[:1], ["full"], work, allow_missing=True).tasks[0]
    task.path("mosaic").parent.mkdir(parents=True)
    task.path("mosaic").write_bytes(b"")
    task.marker().parent.mkdir(parents=True)
    task.marker().write_text(json.dumps({"inputs": task.input_names(), "recipe": task.recipe()}))
    assert plan_mosaics(site, pts, pts[:1], ["full"], work, allow_missing=True).done == ["L000-full"]
    # another flux factor is another mosaic
    assert plan_mosaics(site, pts, pts[:1], ["full"], work, allow_missing=True, scales={"L001": 1.1}).tasks
    assert plan_mosaics(site, pts, pts[:1], ["full"], work, allow_missing=True, force=True).tasks
    reduce(work, "L003")  # the missing neighbour is reduced now: the mosaic is made again with it
    again = plan_mosaics(site, pts, pts[:1], ["full"], work)
    assert again.tasks and "L003" in again.tasks[0].input_names()


def test_scales_noises_and_products_are_checked(survey):
    pts, work, site = survey
    reduce(work, *[p.id for p in pts])
    assert parse_assignments(["L001=1.05", "L002=0.9"], "--scale") == {"L001": 1.05, "L002": 0.9}
    for bad in ("L001", "L001=x", "L001=-1", "=2"):
        with pytest.raises(MosaicPlanError, match="FIELD=POSITIVE_NUMBER"):
            parse_assignments([bad], "--scale")
    with pytest.raises(MosaicPlanError, match="L999, which is not in the pointings table"):
        plan_mosaics(site, pts, pts[:1], ["full"], work, scales={"L999": 1.1})
    with pytest.raises(MosaicPlanError, match="product 'mid' is unknown"):
        plan_mosaics(site, pts, pts[:1], ["mid"], work)
    task = plan_mosaics(site, pts, pts[:1], ["full"], work, scales={"L001": 1.2}, noises={"L002": 2e-4}).tasks[0]
    by = {i.name: i for i in task.inputs}
    assert by["L001"].scale == 1.2 and by["L002"].noise == 2e-4 and by["L003"].scale == 1.0


def test_unsafe_ids_are_refused(survey):
    pts, work, site = survey
    from hpcddf.mosaic.pointings import Pointing
    bad = [*pts, Pointing("../etc", 100.5, 40.5)]
    with pytest.raises(MosaicPlanError, match="cannot name a directory"):
        plan_mosaics(site, bad, pts[:1], ["full"], work)


def test_a_changed_shift_or_quality_factor_remakes_the_mosaic(survey):
    """The done-marker records the corrections read from the fields' products: a new
    facet-offset.txt or quality result makes the mosaic again; missing products stop the plan."""
    from hpcddf.mosaic.corrections import CorrectionError, CorrectionOptions
    from hpcddf.mosaic.survey_sim import FieldSpec, write_field
    pts, work, site = survey
    spec = FieldSpec(cell_arcsec=60.0, resolution_arcsec=240.0, npix=64, pb_fwhm_deg=1.5, facets=2)
    for i, p in enumerate(pts):
        write_field(work / p.id, p, spec, [], FULL.int_image, FULL.app_image, seed=i)
    opts = CorrectionOptions(apply_shifts=True, scale_from_quality="NVSS")
    with pytest.raises(CorrectionError, match="L000 has no quality.json"):
        plan_mosaics(site, pts, pts[:1], ["full"], work, corrections=opts)
    for i, p in enumerate(pts):
        (work / p.id / "quality").mkdir()
        (work / p.id / "quality" / "quality.json").write_text(json.dumps(
            {"catalogues": {"NVSS": {"used": True, "flux_ratio": {"value": 1.0 + 0.1 * i}}}}))
    task = plan_mosaics(site, pts, pts[:1], ["full"], work, corrections=opts).tasks[0]
    by = {i.name: i for i in task.resolved_inputs()}
    assert by["L002"].scale == pytest.approx(1 / 1.2) and by["L002"].scale_from == "quality NVSS"
    task.path("mosaic").parent.mkdir(parents=True)
    task.path("mosaic").write_bytes(b"")
    task.marker().parent.mkdir(parents=True)
    task.marker().write_text(json.dumps({"inputs": task.input_names(), "recipe": task.recipe()}))
    assert plan_mosaics(site, pts, pts[:1], ["full"], work, corrections=opts).done == ["L000-full"]
    shifts = work / "L003" / "facet-offset.txt"
    shifts.write_text(shifts.read_text().replace(" 0.000000 -0.000000", " 0.100000 0.000000", 1))
    again = plan_mosaics(site, pts, pts[:1], ["full"], work, corrections=opts)
    assert again.tasks and not again.done
    assert {i.name: i.corrections.shifted for i in again.tasks[0].resolved_inputs()}["L003"]
    shifts.unlink()
    with pytest.raises(CorrectionError, match="L003 has no facet-offset.txt"):
        plan_mosaics(site, pts, pts[:1], ["full"], work, corrections=opts)
