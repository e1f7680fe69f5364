"""hpcddf's WSCMS model masker (DDFacet 0.9.1's MaskDicoModel.py masks SSD/HMP models only): a
component stays if the mask is set at its pixel, as DDFacet's model machines index a mask."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

pytest.importorskip("casacore.images")  # the science extra; on the node it is there

from hpcddf.lofar.wscmsmodel import main  # noqa: E402


def _model(keys_by_scale: dict[int, list[tuple[int, int]]]) -> dict:
    comp = {s: {"NumComps": np.array([len(keys)], np.int16),
                **{k: {"SolsArray": np.ones(4, np.float32)} for k in keys}} for s, keys in keys_by_scale.items()}
    return {"Type": "WSCMS", "RefFreq": 1.4e8, "Comp": comp, "GD": None, "ModelShape": (2, 1, 40, 40)}


def test_components_outside_the_mask_are_dropped_and_counted(tmp_path):
    from astropy.io import fits
    data = np.zeros((1, 1, 40, 40), np.float32)
    data[0, 0, :, :20] = 1  # the left half of the FITS image (low RA pixel numbers)
    fits.PrimaryHDU(data).writeto(tmp_path / "m.fits")
    keep = data[0, 0].T[::-1] != 0  # [x, y] as DDFacet's SSD model machine reads a mask
    rng = np.random.default_rng(1)
    keys = {s: [(int(x), int(y)) for x, y in rng.integers(0, 40, (12, 2))] for s in (0, 1)}
    keys = {s: sorted(set(k)) for s, k in keys.items()}
    (tmp_path / "in.DicoModel").write_bytes(pickle.dumps(_model(keys)))
    assert main(["--mask", str(tmp_path / "m.fits"), "--in", str(tmp_path / "in.DicoModel"),
                 "--out", str(tmp_path / "out.DicoModel")]) == 0
    out = pickle.loads((tmp_path / "out.DicoModel").read_bytes())
    for s, ks in keys.items():
        want = {k for k in ks if keep[k]}
        assert 0 < len(want) < len(ks)
        assert set(out["Comp"][s]) - {"NumComps"} == want and int(out["Comp"][s]["NumComps"][0]) == len(want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.DicoModel", "m.fits", "out.DicoModel"]


def test_an_ssd_model_is_refused_in_one_line(tmp_path):
    from astropy.io import fits
    fits.PrimaryHDU(np.ones((1, 1, 4, 4), np.float32)).writeto(tmp_path / "m.fits")
    (tmp_path / "in.DicoModel").write_bytes(pickle.dumps({"Type": "SSD", "Comp": {}}))
    with pytest.raises(SystemExit, match="is a SSD model, not WSCMS"):
        main(["--mask", str(tmp_path / "m.fits"), "--in", str(tmp_path / "in.DicoModel"), "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
