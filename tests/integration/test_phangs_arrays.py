"""PHANGS stages as job arrays on the real local Slurm (and the same tasks on the local site).

A tiny project: one galaxy, a line product, three interferometric configs a, b, c, with the
derived key linking a's broad mask to b's strict masks (``a co21 mask_configs ['b']``). The
postprocessed K cubes (``*_pbcorr_trimmed_k.fits``, named with ``cube_filename``) are written by
the test: the same source in every config, and in b a second source only b sees. So a's broad
mask contains that second source only if it really joined b's strict masks. No CASA: the
derived stage is pure Python, and where a CASA stage must fail the test points the run at a
fake CASA environment whose casatools cannot be imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from hpcddf.phangs.project import cube_filename
from tests._require import need

from .conftest import hpcddf, wait_for

need("spectral_cube", "phangs")  # the derived stage runs in hpcddf's own environment

NZ, NY, NX = 24, 32, 32
MAIN, ONLY_B = (12, 10, 10), (8, 22, 22)   # (channel, y, x) of the two sources
KEYS = {
    "master_key.txt": "imaging_root ../work/imaging\npostprocess_root ../work/postprocess\n"
                      "derived_root ../work/derived\nms_root ../ms\nms_key ms_file_key.txt\n"
                      "target_key target_definitions.txt\nconfig_key config_definitions.txt\n"
                      "derived_key derived_key.txt\nmoment_key moment_key.txt\n",
    "ms_file_key.txt": "gal1  p1  all  12m  1  gal1_12m_1.ms\n",
    "target_definitions.txt": "gal1  10h00m00s  +02d00m00s  0.0  60.0\n",
    "config_definitions.txt": "".join(f"interf_config {c} {{'array_tags':['12m']}}\n"
                                      for c in "abc")
                              + "line_product co21 {'line_tag':'co21','channel_kms':2.0}\n",
    "derived_key.txt": "all co21 ang_res {'4as':4.0}\n"
                       "all co21 noise_kw {'iterations':2}\n"
                       "all co21 strictmask_kw {'hi_thresh':4.0,'hi_nchan':2,'lo_thresh':2.0,"
                       "'lo_nchan':2}\n"
                       "a co21 mask_configs ['b']\n"
                       "all co21 moments ['strictmom0','broadmom0']\n",
    "moment_key.txt": "".join(f"{m}mom0 algorithm mom0\n{m}mom0 mask {m}mask\n"
                              f"{m}mom0 ext _{m}_mom0\n{m}mom0 ext_error _{m}_emom0\n"
                              for m in ("strict", "broad")),
}


def cube_header() -> fits.Header:
    h = fits.Header()
    h["NAXIS"], h["NAXIS1"], h["NAXIS2"], h["NAXIS3"] = 3, NX, NY, NZ
    h["CTYPE1"], h["CTYPE2"], h["CTYPE3"] = "RA---SIN", "DEC--SIN", "VRAD"
    h["CUNIT1"], h["CUNIT2"], h["CUNIT3"] = "deg", "deg", "m/s"
    h["CRPIX1"], h["CRPIX2"], h["CRPIX3"] = NX / 2 + 0.5, NY / 2 + 0.5, NZ / 2 + 0.5
    h["CRVAL1"], h["CRVAL2"], h["CRVAL3"] = 150.0, 2.0, 0.0
    h["CDELT1"], h["CDELT2"], h["CDELT3"] = -1 / 3600, 1 / 3600, 2000.0
    h["RESTFRQ"], h["SPECSYS"], h["BUNIT"] = 230.538e9, "LSRK", "K"
    h["BMAJ"] = h["BMIN"] = 3 / 3600
    h["BPA"] = 0.0
    return h


def source(z0: int, y0: int, x0: int) -> np.ndarray:
    z, y, x = np.mgrid[:NZ, :NY, :NX]
    return 1.5 * np.exp(-0.5 * (((z - z0) / 2.5) ** 2 + ((y - y0) / 2.0) ** 2
                                + ((x - x0) / 2.0) ** 2))


def write_postprocessed(root: Path, config: str, seed: int) -> None:
    """The three files postprocess makes, so the postprocess task counts as done."""
    rng = np.random.default_rng(seed)
    data = source(*MAIN) + rng.normal(size=(NZ, NY, NX)) * 0.1
    if config == "b":
        data += source(*ONLY_B)
    post = root / "work" / "postprocess" / "gal1"
    post.mkdir(parents=True, exist_ok=True)
    for ext in ("pbcorr_trimmed_k", "flat_trimmed_k", "pb_trimmed"):
        fits.PrimaryHDU(data.astype(np.float32), cube_header()).writeto(
            post / cube_filename("gal1", config, "co21", ext), overwrite=True)


def write_project(root: Path, configs: str = "abc") -> Path:
    keys = root / "keys"
    keys.mkdir(parents=True)
    for name, text in KEYS.items():
        (keys / name).write_text(text)
    for i, config in enumerate(configs):
        write_postprocessed(root, config, seed=i)
    return keys


def fake_imaging_of(root: Path, config: str) -> None:
    """What postprocess reads from imaging, as empty stand-ins: the plan accepts them."""
    base = root / "work" / "imaging" / "gal1" / f"gal1_{config}_co21"
    for ext in (".image", ".pb", "_singlescale.image"):
        Path(f"{base}{ext}").mkdir(parents=True)


def fake_casa_env(root: Path) -> Path:
    """Passes find_casa_env's checks; every CASA stage then fails importing casatasks."""
    env = root / "casa-env"
    (env / "bin").mkdir(parents=True)
    os.symlink(sys.executable, env / "bin" / "python")
    (env / "casasiteconfig.py").write_text("")
    tools = env / "lib" / "python3.11" / "site-packages" / "casatools"
    tools.mkdir(parents=True)
    (tools / "__init__.py").write_text("raise ImportError('not a real CASA')\n")
    return env


def derived(root: Path, config: str, ext: str | None) -> Path:
    return root / "work" / "derived" / "gal1" / cube_filename("gal1", config, "co21", ext)


def status(keys: Path) -> dict[str, dict]:
    return {r["task"]: r for r in json.loads(hpcddf("phangs", "status", str(keys), "--json").stdout)}


def assert_linked_broad_mask(root: Path) -> None:
    """a's broad mask holds the source only b detects; a's own strict mask does not; c's (no
    link) holds neither b's source nor anything of b."""
    z, y, x = ONLY_B
    broad_a = fits.getdata(derived(root, "a", "broadmask"))
    assert fits.getdata(derived(root, "a", "strictmask"))[:, y, x].sum() == 0
    assert fits.getdata(derived(root, "b", "strictmask"))[z, y, x] == 1
    assert broad_a[z, y, x] == 1
    assert broad_a[MAIN] == 1
    assert fits.getdata(derived(root, "c", "broadmask"))[:, y, x].sum() == 0
    # moments through the broad masks: the sources' K km/s (2 km/s channels), noise elsewhere
    true = source(*MAIN)[:, MAIN[1], MAIN[2]].sum() * 2.0
    mom0_a = fits.getdata(derived(root, "a", "broad_mom0"))
    assert mom0_a[MAIN[1:]] == pytest.approx(true, rel=0.2)
    assert abs(mom0_a[y, x]) < 0.2 * true               # a has no emission there
    assert fits.getdata(derived(root, "b", "broad_mom0"))[y, x] == pytest.approx(true, rel=0.2)


@pytest.fixture
def cancel_after() -> list[str]:
    """Job ids to scancel when the test ends, whatever happened."""
    ids: list[str] = []
    yield ids
    arrays = sorted({j.split("_")[0] for j in ids})
    if arrays:
        subprocess.run(["scancel", *arrays], check=False)


def test_local_site_runs_in_dependency_order_and_resumes(tmp_path: Path) -> None:
    keys = write_project(tmp_path, configs="ac")       # b's postprocess has not been made
    fake_imaging_of(tmp_path, "b")
    env = fake_casa_env(tmp_path)
    run = hpcddf("phangs", "submit", str(keys), "--site", "local", "--stages",
                 "postprocess,derived", "--casa-env", str(env), check=False, timeout=300)
    assert run.returncode == 3, run.stderr
    assert "PHANGS task(s) failed or were not run" in run.stderr.strip().splitlines()[-1]
    st = status(keys)
    assert st["postprocess/gal1/co21/b"]["state"] == "failed"
    assert "casatasks" in st["postprocess/gal1/co21/b"]["error"]["message"] or \
        "casa postprocess failed" in st["postprocess/gal1/co21/b"]["error"]["message"]
    assert st["postprocess/gal1/co21/a"]["note"] == "products already present: skipped"
    # a waits for b's postprocess too (its broad mask needs b's strict masks): not run
    assert st["derived/gal1/co21/a"]["state"] == "cancelled"
    assert st["derived/gal1/co21/a"]["note"] == "not run: postprocess/gal1/co21/b failed"
    assert st["derived/gal1/co21/c"]["state"] == "done"
    assert derived(tmp_path, "c", "4as_strict_mom0").is_file()
    assert not derived(tmp_path, "a", "broadmask").exists()

    write_postprocessed(tmp_path, "b", seed=1)          # b's cube arrives
    again = json.loads(hpcddf("phangs", "submit", str(keys), "--site", "local", "--stages",
                              "postprocess,derived", "--json", timeout=300).stdout)
    assert "derived/gal1/co21/c" in again["done"]       # not run twice
    assert set(again["jobs"]) == {"postprocess/gal1/co21/b", "derived/gal1/co21/a",
                                  "derived/gal1/co21/b"}
    st = status(keys)
    assert {t: r["state"] for t, r in st.items()} == dict.fromkeys(st, "done")
    assert st["derived/gal1/co21/a"]["attempts"] == 1
    assert_linked_broad_mask(tmp_path)


@pytest.mark.slurm
def test_derived_stage_is_one_array_and_broad_masks_follow_linked_strict_masks(
        slurm_site, tmp_path: Path, cancel_after: list[str]) -> None:
    site = slurm_site(walltime="10")
    keys = write_project(tmp_path)
    doc = json.loads(hpcddf("phangs", "submit", str(keys), "--site-file", str(site),
                            "--stages", "derived", "--json").stdout)
    cancel_after += doc["jobs"].values()
    assert [(s["name"], s["array_size"]) for s in doc["stages"]] == [("derived", 3)]
    assert len({j.split("_")[0] for j in doc["jobs"].values()}) == 1, "ONE array per stage"
    assert all("_" in j for j in doc["jobs"].values())
    wait_for(lambda: all(r["state"] == "done" for r in status(keys).values())
             and len(status(keys)) == 3, 240, "the three derived tasks")
    st = status(keys)
    assert {r["job_id"] for r in st.values()} == set(doc["jobs"].values())
    assert all(r["attempts"] == 1 for r in st.values())
    for config in "abc":
        for ext in ("strictmask", "4as_strictmask", "broadmask", "broad_mom0", "4as_broad_emom0"):
            assert derived(tmp_path, config, ext).is_file(), (config, ext)
    assert_linked_broad_mask(tmp_path)
    # the broad mask of a was made from b's strict masks: they existed before it
    broad_a = derived(tmp_path, "a", "broadmask").stat().st_mtime
    for ext in ("strictmask", "4as_strictmask"):
        assert derived(tmp_path, "b", ext).stat().st_mtime <= broad_a
    # submitting again queues nothing: every task is done
    again = json.loads(hpcddf("phangs", "submit", str(keys), "--site-file", str(site),
                              "--stages", "derived", "--json").stdout)
    assert again["jobs"] == {} and sorted(again["done"]) == sorted(doc["jobs"])


@pytest.mark.slurm
def test_each_task_waits_on_exactly_the_tasks_it_needs(slurm_site, tmp_path: Path,
                                                       cancel_after: list[str]) -> None:
    site = slurm_site(walltime="10")
    keys = write_project(tmp_path, configs="ac")       # b's postprocess will fail
    fake_imaging_of(tmp_path, "b")
    env = fake_casa_env(tmp_path)
    doc = json.loads(hpcddf("phangs", "submit", str(keys), "--site-file", str(site), "--stages",
                            "postprocess,derived", "--casa-env", str(env), "--json").stdout)
    jobs = doc["jobs"]
    cancel_after += jobs.values()
    assert len({jobs[f"postprocess/gal1/co21/{c}"].split("_")[0] for c in "abc"}) == 1
    assert len({jobs[f"derived/gal1/co21/{c}"].split("_")[0] for c in "abc"}) == 1
    post = {c: jobs[f"postprocess/gal1/co21/{c}"] for c in "abc"}
    recorded = {tid: r.get("waits_for") for tid, r in status(keys).items()}
    assert recorded["derived/gal1/co21/a"] == ["postprocess/gal1/co21/a",
                                               "postprocess/gal1/co21/b"]
    assert recorded["derived/gal1/co21/c"] == ["postprocess/gal1/co21/c"]

    def settled() -> bool:
        st = status(keys)
        return (st["derived/gal1/co21/c"]["state"] == "done"
                and st["derived/gal1/co21/a"]["state"] == "cancelled"
                and st["derived/gal1/co21/b"]["state"] == "cancelled")
    wait_for(settled, 240, "c done, a and b cancelled by Slurm")
    st = status(keys)
    assert st["postprocess/gal1/co21/b"]["state"] == "failed"
    assert st["postprocess/gal1/co21/b"]["job_id"] == post["b"]
    # a's own postprocess succeeded: only the failed LINKED predecessor cancelled it
    assert st["postprocess/gal1/co21/a"]["state"] == "done"
    assert st["derived/gal1/co21/a"]["slurm_state"] == "CANCELLED"
    assert st["derived/gal1/co21/a"].get("attempts", 0) == 0     # never started
    assert st["derived/gal1/co21/c"]["started"] >= st["postprocess/gal1/co21/c"]["ended"]
    assert derived(tmp_path, "c", "broad_mom0").is_file()
    assert not derived(tmp_path, "a", "broadmask").exists()
