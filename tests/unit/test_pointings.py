"""Pointings tables and neighbour selection, against hand-computed cases."""

from __future__ import annotations

import math

import pytest
from astropy.table import Table

from hpcddf.mosaic.pointings import (
    Pointing,
    PointingsError,
    neighbourhood,
    parse_region,
    read_pointings,
    select_centres,
)
from hpcddf.mosaic.survey_sim import hex_grid


def on_equator(seps: dict[str, float]) -> list[Pointing]:
    """Pointings on the equator: their separations from C (at RA 0) are their RAs."""
    return [Pointing("C", 0.0, 0.0)] + [Pointing(k, v, 0.0) for k, v in seps.items()]


def test_centre_plus_six_nearest_on_a_hexagonal_survey():
    pts = hex_grid(200.0, 55.0, 2.58, 2)
    nb = neighbourhood(pts[0], pts)
    assert nb.ids[0] == "P000" and sorted(nb.ids) == [f"P{i:03d}" for i in range(7)]
    assert nb.max_separation == pytest.approx(2.58, rel=0.01)


def test_a_corner_of_the_survey_takes_everything_within_1p1_of_its_6th_nearest():
    """Worked by hand on a flat hexagon (1 deg spacing at the equator, where the sky is flat to
    1e-4): the corner at (2, 0) has 3 pointings at 1, 2 at sqrt(3) and 3 at 2 (the 6th nearest);
    1.1 x 2 takes all 3 at 2 and nothing at sqrt(7)."""
    pts = hex_grid(0.0, 0.0, 1.0, 2)
    corner = next(p for p in pts if abs(p.ra - 2.0) < 1e-9 and abs(p.dec) < 1e-9)
    nb = neighbourhood(corner, pts)
    got = sorted((round(p.ra if p.ra < 180 else p.ra - 360, 3), round(p.dec, 3)) for p in nb.members)
    h = round(math.sqrt(3) / 2, 3)
    assert got == sorted([(2.0, 0.0), (1.0, 0.0), (1.5, -h), (1.5, h), (0.5, -h), (0.5, h),
                          (0.0, 0.0), (1.0, -2 * h), (1.0, 2 * h)])


def test_the_1p1_rule_is_inclusive_and_extends_past_six():
    pts = on_equator({"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0, "e": 1.0, "f": 2.0,
                      "g": 2.2, "h": 2.2000001, "i": 3.0})
    nb = neighbourhood(pts[0], pts)
    # 6th nearest at 2.0: everything up to 2.2 is in (ddf-pipeline's strict < dropped g)
    assert sorted(nb.ids) == ["C", "a", "b", "c", "d", "e", "f", "g"]


def test_excluded_pointings_drop_out_and_are_not_replaced():
    pts = on_equator({"a": 1.0, "b": 1.1, "c": 1.2, "d": 1.3, "e": 1.4, "f": 1.5, "g": 5.0})
    nb = neighbourhood(pts[0], pts, exclude={"b", "f"})
    assert nb.ids == ["C", "a", "c", "d", "e"]
    assert nb.max_separation == pytest.approx(1.4)


def test_fewer_than_seven_pointings_are_all_neighbours():
    pts = on_equator({"a": 1.0, "b": 4.0})
    assert neighbourhood(pts[0], pts).ids == ["C", "a", "b"]


def test_separations_are_great_circle():
    # two pointings near the pole: 180 deg apart in RA, 2 deg apart on the sky
    pts = [Pointing("N1", 0.0, 89.0), Pointing("N2", 180.0, 89.0)]
    nb = neighbourhood(pts[0], pts)
    assert nb.separations[1] == pytest.approx(2.0, abs=1e-9)


def test_read_csv_and_fits_with_common_column_names(tmp_path):
    csv = tmp_path / "p.csv"
    csv.write_text("Field_ID,RA_deg,Dec_deg\nP1,10.5,40\nP2,359.9,-10\n")
    assert read_pointings(csv) == [Pointing("P1", 10.5, 40.0), Pointing("P2", 359.9, -10.0)]
    fits_path = tmp_path / "p.fits"
    Table({"id": ["A", "B"], "ra": [1.0, 2.0], "dec": [3.0, 4.0]}).write(fits_path)
    assert [p.id for p in read_pointings(fits_path)] == ["A", "B"]


@pytest.mark.parametrize("text, match", [
    ("name,x,dec\nP1,1,2\n", "no RA column"),
    ("id,ra,dec\nP1,1,2\nP1,3,4\n", "appears twice"),
    ("id,ra,dec\nP1,1,95\n", "out of range"),
    ("id,ra,dec\nP1,abc,2\n", "not numbers"),
])
def test_bad_tables_are_clear_errors(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(PointingsError, match=match):
        read_pointings(path)


def test_missing_table_names_the_fix(tmp_path):
    with pytest.raises(PointingsError, match="does not exist") as err:
        read_pointings(tmp_path / "none.csv")
    assert "--pointings" in str(err.value)


def test_centres_by_id_region_or_all():
    pts = hex_grid(100.0, 30.0, 2.0, 2)
    assert [p.id for p in select_centres(pts, ids=["P003"])] == ["P003"]
    near = select_centres(pts, region=(100.0, 30.0, 2.1))
    assert sorted(p.id for p in near) == [f"P{i:03d}" for i in range(7)]
    assert len(select_centres(pts, all_=True)) == len(pts) == 19
    with pytest.raises(PointingsError, match="not in the pointings table"):
        select_centres(pts, ids=["X"])
    with pytest.raises(PointingsError, match="say which mosaics"):
        select_centres(pts)
    with pytest.raises(PointingsError, match="no pointing within"):
        select_centres(pts, region=(10.0, -30.0, 1.0))


def test_region_parsing():
    assert parse_region("361,45,3") == (1.0, 45.0, 3.0)
    for bad in ("1,2", "a,b,c", "1,95,2", "1,2,0"):
        with pytest.raises(PointingsError):
            parse_region(bad)
    assert math.isclose(parse_region("-10,0,1")[0], 350.0)
