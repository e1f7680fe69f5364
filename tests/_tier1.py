"""The survey's own reduction, run once per test session: a simulated field reduced with
``-c tests/data/tier1-sep2024.cfg`` unchanged, shared by every science test that only reads
its products (issue 22): the bootstrap, the final and low-resolution images, the QU cubes,
Stokes V, the dynamic spectra, the Dysco archives, offsets and quality.

The field (``TIER1_SPEC``) holds what each product needs to be checked against the truth:
four subbands with flux-scale errors (the bootstrap), the demo's six sources (two moved south,
see MOVED_SOUTH), a linearly polarised source with a rotation measure, a circularly polarised
one and a flaring one. Its ``hpcddf.cfg`` (``FIELD_CFG``) scales geometry and thresholds to a
420-pixel field of a 16-station array, and switches off one step only, the very slow
solutions, which killMS 3.3.0 cannot solve (see FIELD_CFG). The catalogues the config names
with ``$$`` (VLSS, WENSS, TGSS, the dynamic spectra's targets) are the true sky, in the site's
catalogue directory, as a site would hold them.

The modules that read it are one work unit in tests/conftest.py, so it runs once, on one worker.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

FIELD = "SIMT"
TIER1_CFG = Path(__file__).parent / "data" / "tier1-sep2024.cfg"
FLUX_SCALE = (0.85, 1.0, 1.12, 0.93)  # injected per subband: the sky in MS k is multiplied by it
NTIME, DT_S = 30, 8.0  # 4 minutes: killMS's time is the data's (4 minutes halve the reduction's)
FLARE_T_S, FLARE_SIGMA_S = 120.0, 30.0

# Only geometry and thresholds, scaled from LoTSS's 1.5" cells and 6" beam to 20" cells and
# the ~55" x 85" PSF of 16 stations within 5 km; one step is switched off (the last lines).
# - 420 pixels of 20" (2.3 deg) hold every source with 0.27 deg to spare; DDFacet's deconvolution
#   time goes with the pixels its PSF box holds (the chain alone: 1095 s here, 1210-1290 s with 600).
# - The low-resolution beam cannot be wider than the final one here as in LoTSS (20" against
#   6"): the bootstrap measures its fluxes with PyBDSF on the low-resolution cube, and a
#   restoring beam much wider than this array's PSF weights the residuals by their area ratio
#   (fluxes off by 5-10 %, measured with 110"); at 60" they are right within 5 %.
# - The extended mask's minimum island (2000 pixels of 1.5", ~28 beams) is 400 pixels of 20":
#   as in LoTSS, no point source's island is "extended".
# - low_threshold 3 made the low-resolution island clean of this noise-like field run for
#   more than 20 minutes; 8 sigma keeps the sources' islands.
FIELD_CFG = """\
# tier1-sep2024.cfg scaled to the simulated field: geometry and thresholds only
[image]
imsize = 420
cellsize = 20
psf_arcsec = 70
final_psf_arcsec = 70
low_imsize = 420
low_cell = 20
low_psf_arcsec = 60
# the very-low-resolution QU cubes (50" cells) over the same 2.3 deg: at 250 pixels (3.5 deg)
# DDFacet cut them into 16 facets instead of 5 and each cube took twice the time
vlow_imsize = 170
# the simulated MSs have no LOFAR station tables, and DDFacet 0.9.1 cannot evaluate the LOFAR
# beam with what installs from PyPI (README): the one option that is not a scale
beam_model = None
[masking]
thresholds = [15,10,6,6]
low_threshold = 8
extended_size = 400
[bootstrap]
radii = [40,40]
[solutions]
ndir = 3
# Automatic NChanSols and dt_di give per-channel, per-integration full-Jones DI solutions on
# this bright field; with 16 stations that is 7 visibilities per unknown (LoTSS's ~60 stations
# have ~30), and the solve took ~20 % of the unmodelled Q, U and V with it. One solution per
# subband and minute, as the simulated field's own config has.
NChanSols = 1
dt_di = 1
# killMS 3.3.0 hangs in the very slow solve here: with --PreApplySols (the fast solutions
# applied to the model, as ddf-pipeline passes them) a solver worker dies on NaNs in its JHJ
# ("NameError: name 'stop' is not defined", killMS's debugging halt) and kMS.py waits for it
# forever, whatever --dt or --NCPU; the same solve without --PreApplySols runs in 17 s. The
# one step switched off, for that reason alone (README, "Known limits").
do_very_slow = False
"""


# DDFacet 0.9.1's auto-mask always holds every other pixel of an image's last row: its noise
# map (ClassImageNoiseMachine.giveMinStatNoiseMap, box step 2 on its always-odd image sizes)
# leaves them at the floor noise. SSD groups an island with those within 50 pixels of it
# (SSDClean-MinMaxGroupDistance) when the PSF's sidelobes link them, and deconvolves the
# convex hull of a group over 1000 pixels with its slow large-island GA. The demo's S1 and S5
# lie 56 and 39 low-resolution pixels below that row: with them there, each of the three
# low-resolution images spent 50-80 s on one such hull (CI, 2026-12-07). Here they sit
# 0.1 and 0.27 deg further south, 76 and 90 pixels from it.
MOVED_SOUTH = {"S1": 60.700, "S5": 60.620}


def tier1_sources() -> tuple:
    from hpcddf.lofar.simulate import DEFAULT_SOURCES, Source
    demo = tuple(replace(s, dec_deg=MOVED_SOUTH.get(s.name, s.dec_deg)) for s in DEFAULT_SOURCES)
    return demo + (
        Source("P1", 179.000, 60.450, 1.0, pol_frac=0.3, rm_rad_m2=20.0, chi0_deg=30.0),
        Source("V1", 180.950, 59.700, 1.0, circ_frac=0.2),
        # faint, as a flaring star is beside the calibrators: amplitude self-calibration against
        # a constant model absorbs a flare in proportion to its share of its direction's flux
        # (a 1-Jy source flaring to 4 Jy came out at its quiescent flux)
        Source("F1", 179.300, 59.150, 0.1, flare_amp=4.0, flare_t_s=FLARE_T_S, flare_sigma_s=FLARE_SIGMA_S),
    )


def seen_sources() -> list:
    """The sky as an 8-minute image (and a catalogue of another epoch) sees it: the flaring
    source at its mean flux over the observation."""
    import numpy as np

    from hpcddf.lofar.simulate import light_curve
    t = np.arange(NTIME) * DT_S
    return [replace(s, flux_jy=s.flux_jy * float(light_curve(s, t).mean()), flare_amp=0.0)
            for s in tier1_sources()]


def tier1_spec():
    from hpcddf.lofar.simulate import SimSpec
    return SimSpec(n_ms=4, ntime=NTIME, dt_s=DT_S, flux_scale=FLUX_SCALE, sources=tier1_sources())


def write_catalogues(cats: Path, sources) -> None:
    """The catalogues tier1-sep2024.cfg names under ``$$``: the true sky."""
    from astropy.table import Table

    from hpcddf.lofar.simulate import write_catalogue, write_tgss_catalogue
    cats.mkdir(parents=True, exist_ok=True)
    write_catalogue(cats / "VLSS.fits", sources)
    write_catalogue(cats / "wenss.fits", sources)
    write_tgss_catalogue(cats / "TGSSADR1_7sigma_catalog.fits", sources)
    n = len(sources)
    Table({"DESIGNATION": [s.name for s in sources], "ra": [s.ra_deg for s in sources],
           "dec": [s.dec_deg for s in sources], "pmra": [0.0] * n, "pmdec": [0.0] * n,
           "ref_epoch": [2000.0] * n, "parallax": [0.0] * n, "Type": ["sim"] * n}
          ).write(cats / "dyn_spec_catalogue_addedexo_addvlotss.fits", overwrite=True)


def site_file(home: Path, cats: Path) -> Path:
    """The embedded local site with a catalogue directory."""
    from importlib.resources import files
    text = files("site_configs").joinpath("local.toml").read_text()
    text = text.replace("[paths]\n", f"[paths]\ncatalog_dir = \"{cats}\"\n")
    path = home / "local-cats.toml"
    path.write_text(text)
    return path


def prepare(home: Path) -> dict:
    """The simulated field, its catalogues and site, ready to submit."""
    from hpcddf.lofar.simulate import simulate_field
    wd = home / "work" / FIELD
    sim = simulate_field(wd, tier1_spec())
    (wd / "mslist.txt").write_text("".join(f"{p.name}\n" for p in sim.ms))  # the bootstrap needs >= 4 subbands
    (wd / "hpcddf.cfg").write_text(FIELD_CFG)
    cats = home / "cats"
    write_catalogues(cats, seen_sources())
    return {"home": home, "workdir": wd, "sim": sim, "cats": cats, "site": site_file(home, cats)}


def submit_args(f: dict) -> list[str]:
    return ["submit", FIELD, "--site-file", str(f["site"]), "--work-root", str(f["home"] / "work"),
            "-c", str(TIER1_CFG)]


@pytest.fixture(scope="session")
def tier1(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The reduced field: the process, its home, the field directory and the simulation."""
    from tests._require import missing
    from tests.science.conftest import hpcddf, science_stack_missing
    why = science_stack_missing()
    if why:
        missing("HPCDDF_REQUIRE_SCIENCE", f"science stack not installed ({why}); pip install -e '.[science]'")
    f = prepare(tmp_path_factory.mktemp("tier1"))
    f["proc"] = hpcddf(*submit_args(f), home=f["home"], timeout=6600)
    return f
