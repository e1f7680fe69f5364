"""Re-imaging a Dysco archive: DDFacet's image of ``<ms>.archive`` (its DATA) is the image of
the original MS's archived column within 1 % (issue 22 item 4).

The demo's simulated field (one MS) is archived by the compress_ms tool and imaged twice with
the DDF.py command builder the reduction uses, as a dirty image: the dirty image is linear in
the visibilities, so the difference is what compression does to an image, with nothing of the
deconvolution's choices mixed in (~25 s on 2 cores).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.science.conftest import BIN

pytestmark = pytest.mark.timeout(600)


def _image(wd: Path, name: str, mslist: str, column: str) -> np.ndarray:
    from astropy.io import fits

    from hpcddf.engine.runner import RunContext, run_command
    from hpcddf.lofar.config import load_config
    from hpcddf.lofar.ddfcommands import Image, Machine, ddf_image, dirty_of
    from hpcddf.lofar.recipes import cf_wmax_m
    cfg = load_config([str(wd / "hpcddf.cfg")])
    (wd / "cache").mkdir(exist_ok=True)
    m = Machine(ncpu_ddf=2, ncpu_kms=2, cache_dir=str(wd / "cache"), timeout_s=500.0, python=sys.executable,
                cf_wmax_m=cf_wmax_m([wd / "SIM_SB000.ms"]))
    img = dirty_of(Image(name=name, mslist=mslist, colname=column, robust=-0.5, psf_arcsec=60.0))
    ctx = RunContext(workdir=wd, log_dir=wd, marker_dir=wd / ".hpcddf" / "done",
                     env={"PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"})
    run_command(ctx, name, ddf_image(cfg, m, img))
    return fits.getdata(wd / f"{name}.dirty.fits")


def test_the_image_of_the_archive_is_the_image_of_the_ms_within_one_percent(tmp_path: Path):
    from hpcddf.lofar.compress import archive_ms
    from hpcddf.lofar.simulate import SimSpec, simulate_field
    wd = tmp_path / "SIMC"
    simulate_field(wd, SimSpec(n_ms=1))
    out = archive_ms(wd / "SIM_SB000.ms", wd, "CORRECTED_DATA")  # the simulated field's column
    assert out.action == "written" and out.archive_bytes < out.ms_bytes / 2
    (wd / "archive.txt").write_text(f"{out.archive.name}\n")
    ms_image = _image(wd, "from_ms", "mslist.txt", "CORRECTED_DATA")
    archive_image = _image(wd, "from_archive", "archive.txt", "DATA")
    peak = float(ms_image.max())
    assert peak > 1.0  # the 5 Jy source, seen through the uv coverage
    assert float(np.abs(archive_image - ms_image).max()) < 0.01 * peak
    # measured: 8e-5 of the peak at most, 0.03 % rms
    rms = np.sqrt(np.mean((archive_image - ms_image) ** 2) / np.mean(ms_image ** 2))
    assert rms < 0.01, rms
