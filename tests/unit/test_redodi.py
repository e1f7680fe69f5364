"""redo_DI through the dp3 wheel's Python bindings: known per-station phase errors put into a
simulated MS (DATA = true sky x phase errors + noise) are removed in CORRECTED_DATA to within the
noise; sky models in hpcddf's and in makesourcedb (GSM/TGSS) text; the marker; one-line refusals."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from tests._require import need

np = need("numpy", "science")
ct = need("casacore.tables", "science")

from hpcddf.lofar.redodi import (  # noqa: E402
    MARKER,
    RedoDIError,
    check_makesourcedb,
    format_fields,
    hpcddf_to_makesourcedb,
)
from hpcddf.lofar.simulate import SimSpec, read_skymodel, simulate_field, skymodel_text  # noqa: E402

NOISE_JY = 0.05  # per real and imaginary part, as the simulator's default
TOOL = [sys.executable, "-m", "hpcddf.lofar.redodi"]


# ------------------------------------------------------------------ sky models (no DP3 needed)

def tgss_text(sky: Path, patches: bool = True) -> str:
    """The simulated sky as a TGSS/GSM cgi answers: makesourcedb text, sexagesimal positions,
    a reference frequency and spectral index, every source in a patch of its own."""
    from astropy.coordinates import Angle
    lines = ["# (Name, Type, Patch, Ra, Dec, I, Q, U, V, MajorAxis, MinorAxis, Orientation, "
             "ReferenceFrequency='147610000.0', SpectralIndex='[]') = format", ""]
    for s in read_skymodel(sky):
        ra = Angle(s.ra_deg, "deg").to_string(unit="hourangle", sep=":", precision=3)
        dec = Angle(s.dec_deg, "deg").to_string(unit="deg", sep=".", precision=2, alwayssign=True)
        patch = f"p_{s.name}" if patches else ""
        lines += [f", , {patch}, {ra}, {dec}",
                  f"{s.name}, POINT, {patch}, {ra}, {dec}, {s.flux_jy}, 0, 0, 0, 0, 0, 0, , [0.0]"]
    return "\n".join(lines) + "\n"


def test_hpcddf_sky_model_becomes_makesourcedb_text(tmp_path: Path) -> None:
    field = simulate_field(tmp_path, SimSpec(n_ms=1, ntime=2))
    text = hpcddf_to_makesourcedb(field.skymodel)
    assert format_fields(text.splitlines()[0]) == ["name", "type", "ra", "dec", "i"]
    assert check_makesourcedb(text, "x") == len(SimSpec().sources)
    assert "S1, POINT, 180.615deg, 60.799deg, 5.0" in text


def test_gsm_and_tgss_answers_are_checked_and_error_pages_refused(tmp_path: Path) -> None:
    field = simulate_field(tmp_path, SimSpec(n_ms=1, ntime=2))
    assert check_makesourcedb(tgss_text(field.skymodel), "tgss") == 6  # patch lines are not sources
    gsm = "FORMAT = Name, Type, Ra, Dec, I, ReferenceFrequency='60e6', SpectralIndex='[]'\n\n" \
          "a, POINT, 12:00:00.0, +60.00.00.0, 2.0, 60e6, [-0.8]\n"
    assert check_makesourcedb(gsm, "gsm") == 1
    with pytest.raises(RedoDIError, match="no format line"):
        check_makesourcedb("<html><body>502 Bad Gateway</body></html>\n", "gsm")
    with pytest.raises(RedoDIError, match="holds no source"):
        check_makesourcedb(gsm.split("\n\n")[0] + "\n", "gsm")
    with pytest.raises(RedoDIError, match="no ra, dec field"):
        check_makesourcedb("format = Name, Type, I\nx, POINT, 1\n", "gsm")


def test_an_error_page_as_sky_model_is_one_line_and_touches_no_ms(tmp_path: Path) -> None:
    (tmp_path / "gsm.txt").write_text("<html>Service unavailable</html>\n")
    run = subprocess.run([*TOOL, "--skymodel", "gsm.txt", "--source-format", "gsm", "nothing.ms"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "not a makesourcedb sky model" in run.stderr, run.stderr


# ------------------------------------------------------------------ calibration (DP3 needed)

@pytest.fixture(scope="module")
def corrupted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A noise-free simulated MS whose DATA becomes the true sky with a phase error per station
    (random offsets, plus 20 deg rms jitter per integration) and noise; the true visibilities
    are returned. CORRECTED_DATA is zeroed, so only a rewrite can make it right."""
    field = simulate_field(tmp_path_factory.mktemp("redodi"), SimSpec(n_ms=1, noise_jy=0.0))
    ms = field.ms[0]
    rng = np.random.default_rng(11)
    with ct.table(str(ms), readonly=False, ack=False) as t:
        model = t.getcol("DATA")
        a1, a2 = t.getcol("ANTENNA1"), t.getcol("ANTENNA2")
        slot = np.unique(t.getcol("TIME"), return_inverse=True)[1]
        nant = int(max(a1.max(), a2.max())) + 1
        phi = rng.uniform(-np.pi, np.pi, nant) + np.radians(20) * rng.standard_normal((slot.max() + 1, nant))
        gain = np.exp(1j * (phi[slot, a1] - phi[slot, a2]))[:, None, None]
        noise = NOISE_JY * (rng.standard_normal(model.shape) + 1j * rng.standard_normal(model.shape))
        t.putcol("DATA", (model * gain + noise).astype(np.complex64))
        t.putcol("CORRECTED_DATA", np.zeros_like(model))
    return ms, model


@pytest.fixture
def ms(corrupted: tuple[Path, object], tmp_path: Path) -> Path:
    need("dp3", "science")
    copy = tmp_path / corrupted[0].name
    shutil.copytree(corrupted[0], copy)
    shutil.copy(corrupted[0].parent / "skymodel.txt", tmp_path / "skymodel.txt")
    return copy


def redodi(ms: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*TOOL, *args, "--beam", "none", "--threads", "2", ms.name], cwd=ms.parent,
                          capture_output=True, text=True, timeout=120)


def residual_rms(ms: Path, column: str, model: object) -> float:
    """rms of column - truth over XX and YY (the simulated sky is unpolarised)."""
    with ct.table(str(ms), ack=False) as t:
        diff = t.getcol(column)[..., [0, 3]] - model[..., [0, 3]]  # type: ignore[index]
    return float(np.sqrt(np.mean(np.abs(diff) ** 2)))


def marker(ms: Path) -> str | None:
    with ct.table(str(ms), ack=False) as t:
        return t.getcolkeywords("CORRECTED_DATA").get(MARKER)


@pytest.mark.parametrize("source_format", ["hpcddf", "tgss"])
def test_phase_errors_are_removed_to_within_the_noise(ms: Path, corrupted, source_format: str) -> None:
    sky = "skymodel.txt"
    if source_format == "tgss":
        sky = "tgss.skymodel"
        (ms.parent / sky).write_text(tgss_text(ms.parent / "skymodel.txt"))
    with ct.table(str(ms), ack=False) as t:
        data_before = t.getcol("DATA")
    run = redodi(ms, "--skymodel", sky, "--source-format", source_format)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr
    assert "Converged: 60, stalled: 0, non converged: 0, failed: 0" in run.stdout
    noise = NOISE_JY * np.sqrt(2)  # complex rms per visibility
    assert residual_rms(ms, "DATA", corrupted[1]) > 50 * noise  # the errors were there
    assert residual_rms(ms, "CORRECTED_DATA", corrupted[1]) < 1.05 * noise
    with ct.table(str(ms), ack=False) as t:
        assert np.array_equal(t.getcol("DATA"), data_before)
        assert not t.getcol("FLAG").any()
    assert (ms / "instrument_new.h5").is_file() and not list(ms.glob(".*.tmp.h5"))
    assert marker(ms) is not None


def test_a_done_ms_is_left_alone_and_a_lost_marker_or_new_sky_model_redoes_it(ms: Path, corrupted) -> None:
    args = ("--skymodel", "skymodel.txt", "--source-format", "hpcddf")
    assert redodi(ms, *args).returncode == 0
    done = marker(ms)
    again = redodi(ms, *args)
    assert again.returncode == 0 and "done before" in again.stdout and "gaincal" not in again.stdout
    with ct.table(str(ms), readonly=False, ack=False) as t:  # a kill mid-applycal: marker gone first
        t.removecolkeyword("CORRECTED_DATA", MARKER)
        t.putcol("CORRECTED_DATA", t.getcol("CORRECTED_DATA") * 0 + 7)
    assert redodi(ms, *args).returncode == 0
    assert residual_rms(ms, "CORRECTED_DATA", corrupted[1]) < 1.05 * NOISE_JY * np.sqrt(2)
    assert marker(ms) == done
    sky = ms.parent / "skymodel.txt"
    first, *rest = read_skymodel(sky)
    sky.write_text(skymodel_text([replace(first, flux_jy=1.1 * first.flux_jy), *rest]))
    redone = redodi(ms, *args)
    assert redone.returncode == 0 and "done before" not in redone.stdout and marker(ms) != done


def test_the_beam_on_an_ms_without_lofar_station_tables_is_one_line(ms: Path, tmp_path: Path) -> None:
    beamdir = tmp_path / "everybeam"
    beamdir.mkdir()
    (beamdir / "HamakerHBACoeff.h5").write_bytes(b"")  # found; the MS check comes first
    run = subprocess.run([*TOOL, "--skymodel", "skymodel.txt", "--source-format", "hpcddf", ms.name],
                         cwd=ms.parent, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "EVERYBEAM_DATADIR": str(beamdir)})
    assert run.returncode == 1
    assert run.stderr.count("\n") == 1 and "LOFAR_ANTENNA_FIELD" in run.stderr, run.stderr
    assert marker(ms) is None
