"""The polarisation-cube node tool on real FITS files and real simulated MSs: stacking by
frequency with Stokes I dropped, split cubes whose WCS says frequency on axis 3, a missing
subband refused, fpack-equivalent compression verified before the original goes, the band
images' frequencies, and the MS lists."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from hpcddf.lofar import cubes
from hpcddf.lofar.cubes import MsFreq, main, stokes_groups

ROOT = "image_full_low"
NX = 12
DF = 97656.25


def ddf_cube(path: Path, f0: float, nchan: int, stokes=(1, 2, 3)) -> np.ndarray:
    """A cube laid out as DDFacet writes one: RA, DEC, STOKES (I,Q,U), FREQ; pixel values say
    which channel and Stokes plane they are (channel frequency in MHz * 10 + Stokes)."""
    freqs = f0 + DF * np.arange(nchan)
    data = (np.round(freqs / 1e5)[:, None, None, None] + np.array(stokes)[None, :, None, None] / 10
            + np.zeros((1, 1, NX, NX))).astype(np.float32)
    h = fits.Header()
    for i, (ct, cv, cd, cp) in enumerate([("RA---SIN", 180.0, -0.01, NX / 2), ("DEC--SIN", 60.0, 0.01, NX / 2),
                                          ("STOKES", float(stokes[0]), 1.0, 1.0), ("FREQ", f0, DF, 1.0)], 1):
        h[f"CTYPE{i}"], h[f"CRVAL{i}"], h[f"CDELT{i}"], h[f"CRPIX{i}"] = ct, cv, cd, cp
    h["CUNIT4"], h["RESTFRQ"] = "Hz", f0
    fits.PrimaryHDU(data, h).writeto(path)
    return data


def _subbands(d: Path, f0s: list[float], nchan: int = 2) -> None:
    for i, f0 in enumerate(f0s):
        for kind in cubes.KINDS:
            ddf_cube(d / f"{ROOT}_IQU_Cube{i}.cube.{kind}.fits", f0, nchan)


def test_assemble_orders_by_frequency_and_drops_stokes_i(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    f0s = [120e6 + 2 * DF, 120e6, 120e6 + 4 * DF]  # cube indices not in frequency order
    _subbands(tmp_path, f0s)
    assert main(["assemble", "--root", ROOT, "--count", "3"]) == 0
    for kind in cubes.KINDS:
        with fits.open(f"{ROOT}_QU.cube.{kind}.fits") as h:
            data, w = h[0].data, WCS(h[0].header)
        assert data.shape == (6, 2, NX, NX) and data.dtype.kind == "f" and data.dtype.itemsize == 4
        freqs = w.sub([4]).pixel_to_world_values(np.arange(6))
        np.testing.assert_allclose(freqs, 120e6 + DF * np.arange(6))
        np.testing.assert_allclose(w.sub([3]).pixel_to_world_values([0, 1]), [2, 3])  # Q, U
        np.testing.assert_allclose(data[:, :, 0, 0], np.round(freqs / 1e5)[:, None] + [0.2, 0.3], rtol=1e-6)
    assert not list(tmp_path.glob(".*tmp*"))


def test_split_cubes_have_frequency_on_axis_3_and_stokes_on_axis_4(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _subbands(tmp_path, [150e6, 150e6 + 3 * DF], nchan=3)
    assert main(["assemble", "--root", ROOT, "--count", "2", "--split"]) == 0
    for stokes, value in (("Q", 2), ("U", 3)):
        with fits.open(f"{ROOT}_Stokes{stokes}.cube.dirty.corr.fits") as h:
            data, w = h[0].data, WCS(h[0].header)
        assert data.shape == (1, 6, NX, NX)
        assert list(w.wcs.ctype)[2:] == ["FREQ", "STOKES"] and str(w.wcs.cunit[2]) == "Hz"
        freqs = w.sub([3]).pixel_to_world_values(np.arange(6))
        np.testing.assert_allclose(freqs, 150e6 + DF * np.arange(6))
        assert w.sub([4]).pixel_to_world_values([0]) == [value]
        np.testing.assert_allclose(data[0, :, 3, 3], np.round(freqs / 1e5) + value / 10, rtol=1e-6)


def test_a_missing_or_absent_subband_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _subbands(tmp_path, [120e6, 120e6 + 2 * DF])
    assert main(["assemble", "--root", ROOT, "--count", "3"]) == 1
    assert "image_full_low_IQU_Cube2.cube.dirty.fits" in capsys.readouterr().err
    for p in tmp_path.glob(f"{ROOT}_IQU_Cube*"):
        p.unlink()
    _subbands(tmp_path, [120e6, 120e6 + 4 * DF])  # a subband's worth of channels missing between
    assert main(["assemble", "--root", ROOT, "--count", "2"]) == 1
    assert "a subband is missing" in capsys.readouterr().err
    assert not list(tmp_path.glob(f"{ROOT}_QU*")) and not list(tmp_path.glob(".*"))


def _noise_cube(path: Path, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.normal(0, 1e-3, (3, 2, 24, 256)).astype(np.float32)
    data[0, 0, 12, 20] = 5.0  # a bright source
    data[1, 1, 0, :5] = np.nan  # a blanked corner
    fits.PrimaryHDU(data).writeto(path)
    return data


def test_compress_writes_a_readable_fz_within_the_quantisation_error(tmp_path):
    cube = tmp_path / "c.fits"
    data = _noise_cube(cube)
    assert main(["compress", "--q", "4", str(cube)]) == 0
    with fits.open(tmp_path / "c.fits.fz") as h:
        got = h[1].data
    assert cube.exists() and got.shape == data.shape
    assert np.array_equal(np.isnan(got), np.isnan(data))
    with fits.open(tmp_path / "c.fits.fz", disable_image_compression=True) as h:
        step = h[1].data["ZSCALE"].reshape(data.shape[:-1])  # one tile (row) each, as fpack
    # -q 4: each row's step is about a quarter of its noise (1e-3), estimated from the row's
    # pixels; an error is at most half a step
    assert np.all((step > 1e-3 / 8) & (step < 1e-3 / 2)) and 1e-3 / 6 < np.median(step) < 1e-3 / 3
    err = np.nan_to_num(np.abs(got - data))
    assert 0 < err.max() and np.all(err <= step[..., None] / 2 * (1 + 1e-6))
    assert cube.stat().st_size > 2 * (tmp_path / "c.fits.fz").stat().st_size


def test_delete_removes_the_original_only_after_its_fz_verified(tmp_path, capsys):
    good, bad = tmp_path / "good.fits", tmp_path / "bad.fits"
    _noise_cube(good)
    data = _noise_cube(bad)
    other = tmp_path / "other.fits"
    _noise_cube(other, seed=2)
    cubes.compress_astropy(other, 4, cubes.fpack_tmp(bad))  # as if fpack had read another file
    assert main(["compress", "--fpack-adopt", "--delete", str(bad)]) == 1
    assert "more than its quantisation allows" in capsys.readouterr().err
    assert np.array_equal(fits.getdata(bad), data, equal_nan=True) and not (tmp_path / "bad.fits.fz").exists()
    assert main(["compress", "--q", "4", "--delete", str(good)]) == 0
    assert not good.exists() and (tmp_path / "good.fits.fz").is_file()
    assert main(["compress", "--q", "4", "--delete", str(good)]) == 0  # a rerun: already done
    assert [p.name for p in tmp_path.glob(".*")] == [".bad.fits.fz.fpack"]  # fpack-clean removes it


def test_fpack_commands_are_cleaned_up_after_and_their_outputs_adopted(tmp_path):
    """fpack refuses to overwrite: a half output of a killed fpack is removed first; what fpack
    writes (here: the same format written by astropy) is verified, renamed, the original deleted."""
    cube = tmp_path / "c.fits"
    _noise_cube(cube)
    cubes.fpack_tmp(cube).write_text("half a file from a killed fpack")
    assert main(["compress", "--fpack-clean", str(cube)]) == 0
    assert not cubes.fpack_tmp(cube).exists()
    cubes.compress_astropy(cube, 4, cubes.fpack_tmp(cube))
    assert main(["compress", "--fpack-adopt", "--delete", str(cube)]) == 0
    assert not cube.exists() and fits.getdata(tmp_path / "c.fits.fz").shape == (3, 2, 24, 256)
    assert not cubes.fpack_tmp(cube).exists()


def test_bands_sets_the_frequency_axis_and_restfrq_of_every_band_image(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ddf_cube(tmp_path / "img.NS_Band0.app.restored.fits", 125e6, 1)
    ddf_cube(tmp_path / "img.NS_Band0_shift.app.facetRestored.fits", 125e6, 1)
    h = fits.Header({"CTYPE1": "RA---SIN", "CTYPE2": "DEC--SIN", "CTYPE3": "FREQ", "CRVAL3": 1.6e8})
    fits.PrimaryHDU(np.zeros((1, 4, 4), np.float32), h).writeto(tmp_path / "img.NS_Band2.int.restored.fits")
    ddf_cube(tmp_path / "img.NS_Band10.app.restored.fits", 125e6, 1)  # not band 1
    assert main(["bands", "--root", "img.NS", "--band=0=128.0", "--band=2=160.2"]) == 0
    for name, axis, mhz in (("img.NS_Band0.app.restored.fits", 4, 128.0),
                            ("img.NS_Band0_shift.app.facetRestored.fits", 4, 128.0),
                            ("img.NS_Band2.int.restored.fits", 3, 160.2)):
        hdr = fits.getheader(tmp_path / name)
        assert hdr[f"CRVAL{axis}"] == hdr["RESTFRQ"] == mhz * 1e6, name
    assert fits.getheader(tmp_path / "img.NS_Band10.app.restored.fits")["CRVAL4"] == 125e6
    assert main(["bands", "--root", "img.NS", "--band=1=143.7"]) == 1
    assert "img.NS_Band1" in capsys.readouterr().err


def test_more_than_25_frequencies_keep_those_most_mss_carry():
    common = [MsFreq(f"L{o}_SB{k:03d}.ms", 120e6 + k * 195312.5, 2) for o in (1, 2) for k in range(20)]
    single = [MsFreq(f"L1_SB{k:03d}.ms", 120e6 + k * 195312.5, 2) for k in range(20, 30)]
    groups = stokes_groups(common + single)
    assert len(groups) == 20 and all(len(g.mss) == 2 for g in groups)
    assert [g.freq_hz for g in groups] == sorted(g.freq_hz for g in groups)
    assert len(stokes_groups(single)) == 10
    too_many = [MsFreq(f"L1_SB{k:03d}.ms", 120e6 + k * 195312.5, 2) for k in range(26)]
    with pytest.raises(cubes.CubeError, match="too many frequencies"):
        stokes_groups(too_many)


@pytest.fixture(scope="module")
def field(tmp_path_factory) -> Path:
    """Three simulated subbands of observation SIM, and a second observation L2 (a renamed copy
    of the first subband, so two MSs share its frequency)."""
    from hpcddf.lofar.simulate import SimSpec, simulate_field
    d = tmp_path_factory.mktemp("field")
    simulate_field(d, SimSpec(n_ms=3, nant=5, ntime=3, nchan=2, chan_width_hz=1e6, freq0_hz=127e6))
    shutil.copytree(d / "SIM_SB000.ms", d / "L2_SB000.ms")
    return d


def test_lists_on_real_mss(field, monkeypatch):
    monkeypatch.chdir(field)
    mss = ["SIM_SB000.ms", "SIM_SB001.ms", "SIM_SB002.ms", "L2_SB000.ms"]
    before = (field / "SIM_SB000.ms" / "SPECTRAL_WINDOW" / "table.f0").read_bytes()
    assert main(["lists", "--stokes", "--obsids", "--bands", "128.0,143.7,160.2", *mss]) == 0
    assert (field / "stokes-mslist-0.txt").read_text() == "SIM_SB000.ms\nL2_SB000.ms\n"
    assert (field / "stokes-mslist-1.txt").read_text() == "SIM_SB001.ms\n"
    assert (field / "stokes-mslist-2.txt").read_text() == "SIM_SB002.ms\n"
    assert not (field / "stokes-mslist-3.txt").exists()
    assert (field / "mslist-SIM.txt").read_text() == "SIM_SB000.ms\nSIM_SB001.ms\nSIM_SB002.ms\n"
    assert (field / "mslist-L2.txt").read_text() == "L2_SB000.ms\n"
    # means 127.5, 129.5, 131.5 MHz: all nearest to 128.0; the empty bands get no list
    assert (field / "mslist_iBand_0.txt").read_text().splitlines() == mss
    assert not (field / "mslist_iBand_1.txt").exists()
    assert (field / "SIM_SB000.ms" / "SPECTRAL_WINDOW" / "table.f0").read_bytes() == before
    infos = cubes.read_ms_freqs(mss, field)
    assert [(i.freq_hz, i.nchan) for i in infos[:3]] == [(127.5e6, 2), (129.5e6, 2), (131.5e6, 2)]
