"""The real ``hpcddf`` executable in a subprocess: sites, config show, submit --dry-run, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpcddf.lofar.config import load_config

ALL_STAGES = ["initial", "dirin", "dirin_di", "bootstrap", "phase", "ampphase", "ampphase_di",
              "fullampphase", "fulllow", "final"]
DEFAULT_STAGES = [s for s in ALL_STAGES if s not in ("bootstrap", "fulllow")]
CAT = "/srv/catalogues"


def ok(proc) -> str:
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr)
    return proc.stdout


def ok_json(proc):
    return json.loads(ok(proc))


# ----------------------------------------------------------------------------------- basics

def test_help_and_version(run_cli):
    assert "submit" in ok(run_cli("--help"))
    assert "hpcddf, version" in ok(run_cli("--version"))


def test_python_m_hpcddf_is_the_same_cli(isolated_env, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "hpcddf", "sites", "show", "local", "--json"],
                          env=isolated_env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert json.loads(ok(proc))["name"] == "local"


# ------------------------------------------------------------------------------------ sites

def test_sites_lists_the_shipped_sites(run_cli):
    out = ok(run_cli("sites"))
    for name in ("local", "spider", "cosma", "jureca"):
        assert f"│ {name} " in out
    assert "5-00:00:00" in out  # spider's walltime


def test_sites_show(run_cli):
    out = ok(run_cli("sites", "show", "spider"))
    assert out.startswith("# site spider: ")
    assert 'partition = "normal"' in out
    assert "cpus = 32" in out
    assert 'extra_sbatch = { constraint = "skylake" }' in out
    d = ok_json(run_cli("sites", "show", "cosma", "--json"))
    assert d["name"] == "cosma" and d["node"]["cpus"] == 28
    assert d["slurm"]["max_walltime"] == "72:00:00"


def test_user_sites_shadow_shipped_ones(run_cli, write_site, user_sites_dir: Path):
    path = write_site("spider", cpus=4)
    write_site("mine", cpus=2)
    out = ok(run_cli("sites"))
    assert str(path) in out
    assert "│ mine " in out
    d = ok_json(run_cli("sites", "show", "spider", "--json"))
    assert d["node"]["cpus"] == 4 and d["path"] == str(path)


def test_user_sites_from_xdg_config_home(run_cli, write_site, isolated_env, tmp_path: Path):
    xdg = tmp_path / "xdg"
    sites = xdg / "hpcddf" / "sites"
    sites.mkdir(parents=True)
    write_site("jureca", cpus=7, directory=sites)
    env = {"XDG_CONFIG_HOME": str(xdg), "HPCDDF_SITES_DIR": ""}
    assert ok_json(run_cli("sites", "show", "jureca", "--json", env=env))["node"]["cpus"] == 7
    # HPCDDF_SITES_DIR comes first
    write_site("jureca", cpus=9)
    env = {"XDG_CONFIG_HOME": str(xdg)}
    assert ok_json(run_cli("sites", "show", "jureca", "--json", env=env))["node"]["cpus"] == 9


def test_sites_show_site_file(run_cli, write_site, tmp_path: Path):
    path = write_site("adhoc", cpus=3, directory=tmp_path)
    d = ok_json(run_cli("sites", "show", "--site-file", path, "--json"))
    assert d["name"] == "adhoc" and d["node"]["cpus"] == 3


def test_broken_user_site_is_listed_as_invalid(run_cli, write_site):
    write_site("broken", text="[node]\ncpus = -2\n")
    out = ok(run_cli("sites"))
    assert "broken" in out and "invalid" in out
    assert "│ spider " in out


def test_unknown_site(run_cli, cli_error, tmp_path, tree):
    before = tree(tmp_path)
    cli_error(run_cli("sites", "show", "spyder"), "unknown site 'spyder'", "did you mean 'spider'?")
    cli_error(run_cli("submit", "L123456", "--site", "nowhere"), "unknown site 'nowhere'",
              "known sites: cosma, jureca, local, spider")
    cli_error(run_cli("submit", "L123456", "--dry-run", env={"HPCDDF_SITE": "spyder"}),
              "unknown site 'spyder'")
    cli_error(run_cli("submit", "L123456"), "no site given", "--site NAME")
    assert tree(tmp_path) == before


def test_site_from_environment_and_site_file(run_cli, site_file, write_site, tmp_path, observed):
    observed("L123456")
    doc = ok_json(run_cli("submit", "L123456", "--dry-run", "--json",
                          env={"HPCDDF_SITE": "testsite"}))
    assert doc["site"] == "testsite"
    path = write_site("adhoc", cpus=3, directory=tmp_path)
    doc = ok_json(run_cli("submit", "L123456", "--site-file", path, "--dry-run", "--json"))
    assert doc["site"] == "adhoc" and doc["stages"][0]["resources"]["cpus"] == 3
    # one rule everywhere: a site file beats $HPCDDF_SITE, a --site beside it is refused
    doc = ok_json(run_cli("submit", "L123456", "--site-file", path, "--dry-run", "--json",
                          env={"HPCDDF_SITE": "testsite"}))
    assert doc["site"] == "adhoc"


def test_one_rule_for_the_site(run_cli, cli_error, site_file, tmp_path, tree):
    before = tree(tmp_path)
    for cmd in (("submit", "L123456", "--dry-run"), ("status",), ("logs", "L123456"),
                ("quality", "L123456", "--catalogue", "X=/nonexistent.fits")):
        cli_error(run_cli(*cmd, "--site", "testsite", "--site-file", site_file),
                  "--site and --site-file given together", "only one of them")
    cli_error(run_cli("mosaic", "F1", "--local", "--site", "spider", "--pointings", "p.fits"),
              "--site and --local given together")
    # commands that only look default to this machine; those that start jobs never do
    assert run_cli("status").returncode == 0
    cli_error(run_cli("resubmit", "L123456"), "no site given")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("text,needles", [
    ("[node\ncpus = 4\n", ("is not valid TOML",)),
    ("[node]\ncpu = 4\n", ("unknown key 'cpu'", "did you mean 'cpus'?")),
    ("[node]\ncpus = '4'\n", ("cpus = '4' is not a number",)),
    ("[slurm]\nexclusive = 1\n", ("exclusive = 1 has the wrong type", "true or false")),
    ("[preflight]\nshm_min_fraction = 1.5\n", ("shm_min_fraction 1.5 is not in (0, 1]",)),
    ("[node]\ncpus = -8\n", ("cpus = -8 is impossible",)),
    ("[slurm]\nmax_walltime = '3 days'\n", ("max_walltime", "'3 days' is not a walltime")),
    ("[slurm]\nextra_sbatch = { job-name = 'x' }\n", ("extra_sbatch may not set 'job-name'",)),
    ("[slurm]\nextra_sbatch = { job_name = 'x' }\n", ("extra_sbatch may not set 'job_name'",)),
    ("[slurm]\nmax_walltime = '10:99:00'\n", ("max_walltime", "field out of range")),
    ("[slurm]\nmax_walltime = '1-25:00:00'\n", ("max_walltime", "field out of range")),
    ("[slurm]\nmax_walltime = '00:05:00'\nsignal_delay_s = 300\n", ("signal_delay_s = 300 is not below",)),
    ("[node]\nscratch_dir = 'scratch/x'\n", ("scratch_dir = 'scratch/x' is a relative path", "absolute")),
    ("[node]\nscratch_min_free_gb = nan\n", ("scratch_min_free_gb = nan has the wrong type",)),
    ("[preflight]\nshm_min_fraction = inf\n", ("shm_min_fraction = inf has the wrong type",)),
    ("[slurm]\nextra_sbatch = { constraint = \"a\\nb\" }\n", ("extra_sbatch constraint contains '\\n'",)),
    ("[slurm]\nextra_sbatch = { mail_user = 'x; rm -rf $HOME' }\n", ("extra_sbatch mail_user contains", "';'")),
    ("[slurm]\nextra_sbatch = { comment = 'x' }\n", ("extra_sbatch may not set 'comment'",)),  # the token
    ("[slurm]\nmax_array_size = -1\n", ("max_array_size must be 0 or more",)),
])
def test_malformed_site_file(run_cli, cli_error, tmp_path: Path, tree, text, needles):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    before = tree(tmp_path)
    cli_error(run_cli("sites", "show", "--site-file", path), str(path), *needles, "(fix: ")
    cli_error(run_cli("submit", "L123456", "--site-file", path), *needles)
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------ config show

def test_config_show_defaults(run_cli):
    out = ok(run_cli("config", "show"))
    assert "effective configuration (defaults)" in out
    assert "NIterKF" in out and "[1, 1, 1, 1, 6, 1, 6]" in out
    assert "│ default" in out
    d = ok_json(run_cli("config", "show", "--json"))
    assert d == load_config().to_dict()
    assert d["solutions"]["ndir"] == 45 and d["data"]["mslist"] is None


def test_config_show_files_and_overrides(run_cli, data_dir: Path, tmp_path: Path):
    extra = tmp_path / "extra.cfg"
    extra.write_text("[solutions]\nndir = 33\n[image]\nimsize = 100\n")
    args = [data_dir / "tier1-sep2024.cfg", extra, "--image-imsize=200", "--control-skip_di=True",
            "--image-imsize=300"]
    d = ok_json(run_cli("config", "show", *args, "--json"))
    assert d["solutions"]["ndir"] == 33            # later file beats earlier
    assert d["image"]["imsize"] == 300             # later override beats earlier and files
    assert d["control"]["skip_di"] is True
    assert d["masking"]["thresholds"] == [15.0, 5.0, 5.0, 5.0]
    assert d["offsets"]["method"] is None
    assert d["bootstrap"]["catalogues"] == ["$$/VLSS.fits", "$$/wenss.fits"]  # no catalogue dir
    table = ok(run_cli("config", "show", *args))
    assert "--image-imsize" in table and str(extra) in table


def test_config_show_catalog_dir(run_cli, data_dir: Path, write_site):
    cfg = data_dir / "tier1-sep2024.cfg"
    env_d = ok_json(run_cli("config", "show", cfg, "--json", env={"DDF_PIPELINE_CATALOGS": "/env"}))
    assert env_d["masking"]["tgss"] == "/env/TGSSADR1_7sigma_catalog.fits"
    write_site("withcat", catalog_dir=CAT)
    site_d = ok_json(run_cli("config", "show", cfg, "--site", "withcat", "--json",
                             env={"DDF_PIPELINE_CATALOGS": "/env"}))
    assert site_d["bootstrap"]["catalogues"] == [f"{CAT}/VLSS.fits", f"{CAT}/wenss.fits"]


@pytest.mark.parametrize("name", ["tier1-sep2024.cfg", "tier1-jul2018.cfg", "lgps_optimized.cfg"])
def test_config_show_cfg_and_json_reload_to_the_same_values(run_cli, data_dir: Path,
                                                            tmp_path: Path, name: str):
    args = [data_dir / name, "--solutions-NIterKF=[2, 3]", "--control-exitafter=phase"]
    as_json = ok_json(run_cli("config", "show", *args, "--json"))
    text = ok(run_cli("config", "show", *args, "--cfg"))
    saved = tmp_path / "effective.cfg"
    saved.write_text(text)
    assert ok_json(run_cli("config", "show", saved, "--json")) == as_json
    assert load_config([str(saved)]).to_dict() == as_json
    assert as_json["solutions"]["NIterKF"] == [2, 3]


def test_option_names_are_case_insensitive_on_the_command_line(run_cli, tmp_path: Path):
    cfg = tmp_path / "c.cfg"
    cfg.write_text("[machine]\nncpu_ddf = 12\n")
    d = ok_json(run_cli("config", "show", cfg, "--machine-ncpu_killms=5", "--json"))
    assert d["machine"] == {"NCPU_DDF": 12, "NCPU_killms": 5}


# ------------------------------------------------------------------------------- bad config

@pytest.fixture
def cfg(tmp_path: Path):
    def _write(text: str, name: str = "bad.cfg") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p
    return _write


@pytest.mark.parametrize("text,needles", [
    ("mslist = x\n", ("has a syntax error", "no section headers")),
    ("[data]\nmslist\n", ("has a syntax error", "[line  2]: 'mslist")),
    ("[contrl]\nrestart = True\n", ("unknown section [contrl]", "did you mean [control]?")),
    ("[control]\nrestrt = True\n", ("unknown option 'restrt'", "did you mean 'restart'?")),
    ("[solutions]\nndir = many\n", ("ndir = 'many'", "ndir must be an integer")),
    ("[control]\nrestart = perhaps\n", ("restart", "True or False")),
    ("[image]\nrobust = low\n", ("robust = 'low'", "a number")),
    ("[masking]\nthresholds = [5, 5\n", ("thresholds", "not a list literal")),
    ("[control]\nexitafter = phaze\n", ("exitafter", "not a valid choice")),
    ("[image]\nimsize = 0\n", ("[image] imsize = 0 is not positive",)),
    ("[image]\ncellsize = -1.5\n", ("[image] cellsize = -1.5 is not positive",)),
    ("[solutions]\nndir = 0\n", ("[solutions] ndir = 0 is not positive",)),
    ("[masking]\nthresholds = []\n", ("thresholds = [] is not a list of positive numbers",)),
    ("[image]\nrobust = nan\n", ("robust = 'nan'", "not a finite number")),
    ("[image]\nimsize = 100\nimsize = 200\n", ("option 'imsize' in section 'image' already exists",
                                                 "give each section and option once")),
])
def test_bad_config(run_cli, cli_error, cfg, site_file, tmp_path, work_root, tree, text, needles):
    path = cfg(text)
    before = tree(tmp_path)
    cli_error(run_cli("config", "show", path), str(path), *needles, "(fix: ")
    cli_error(run_cli("submit", "L123456", "--site", "testsite", "-c", path), *needles)
    cli_error(run_cli("submit", "L123456", "--site", "testsite", "-c", path, "--dry-run", "--json"),
              *needles)
    assert tree(tmp_path) == before
    assert tree(work_root) == []


def test_bad_override(run_cli, cli_error, site_file, tmp_path, tree):
    before = tree(tmp_path)
    cli_error(run_cli("config", "show", "--imag-imsize=1"), "--imag-imsize", "did you mean [image]?")
    cli_error(run_cli("config", "show", "--solutions-ndir=x"), "--solutions-ndir", "an integer")
    cli_error(run_cli("submit", "L123456", "--site", "testsite", "--image-imsze=5"),
              "unknown option 'imsze'", "did you mean 'imsize'?")
    assert tree(tmp_path) == before


def test_missing_cfg(run_cli, cli_error, site_file, tmp_path, tree):
    missing = tmp_path / "missing.cfg"
    before = tree(tmp_path)
    cli_error(run_cli("config", "show", missing), f"config file {missing} does not exist")
    cli_error(run_cli("submit", "L123456", "--site", "testsite", "-c", missing), str(missing),
              "does not exist")
    assert tree(tmp_path) == before


def test_list_is_never_evaluated(run_cli, cli_error, cfg, site_file, tmp_path: Path):
    marker = tmp_path / "X"
    path = cfg(f"[masking]\nthresholds=__import__('os').system('touch {marker}')\n")
    cli_error(run_cli("config", "show", path), "thresholds", "not a list literal")
    cli_error(run_cli("submit", "L123456", "--site", "testsite", "-c", path), "not a list literal")
    cli_error(run_cli("config", "show", "--masking-thresholds=__import__('os').system('touch X')"),
              "not a list literal")
    assert not marker.exists()
    assert not (tmp_path / "X").exists()  # the relative one (cwd is tmp_path)


def test_unreadable_cfg(run_cli, cli_error, plain_user: bool, tmp_path: Path, tree):
    path = tmp_path / "secret.cfg"
    path.write_text("[data]\nmslist = x\n")
    path.chmod(0)
    before = tree(tmp_path)
    cli_error(run_cli("config", "show", path, plain_user=plain_user),
              f"config file {path} is not readable", f"chmod u+r {path}")
    assert tree(tmp_path) == before


def test_unreadable_site_file(run_cli, cli_error, plain_user: bool, write_site):
    path = write_site("locked")
    path.chmod(0)
    cli_error(run_cli("sites", "show", "locked", plain_user=plain_user),
              f"site file {path} is not readable", f"chmod u+r {path}")


# ---------------------------------------------------------------------------- bad field ids

@pytest.mark.parametrize("fid,needle", [
    ("L123/456", "a path separator"),
    ("..", "is not a name"),
    ("L123 456", "whitespace"),
    ("L123'456", "a quote"),
    ('L12"3', "a quote"),
    ("L1;rm -rf x", "a shell character"),
    ("L$(id)", "a shell character"),
    ("L1`id`", "a backquote"),
    ("L1|x", "a shell character"),
    ("L12345*", "a wildcard"),
    ("SIM1", "does not match this site's pattern"),
    ("L1234", "does not match this site's pattern"),
])
def test_invalid_field_id(run_cli, cli_error, site_file, tmp_path, work_root, tree, fid, needle):
    before = tree(tmp_path)
    cli_error(run_cli("submit", fid, "--site", "testsite"), repr(fid), needle, "(fix: ")
    cli_error(run_cli("submit", "L123456", fid, "--site", "testsite", "--dry-run"), needle)
    assert tree(tmp_path) == before
    assert tree(work_root) == []


def test_fields_file_with_a_bad_id(run_cli, cli_error, site_file, tmp_path, tree, work_root):
    ff = tmp_path / "fields.txt"
    ff.write_text("# fields to do\nL111111\n\nL222/222  # a typo\n")
    before = tree(tmp_path)
    cli_error(run_cli("submit", "--fields-file", ff, "--site", "testsite"), "'L222/222'",
              "path separator")
    assert tree(tmp_path) == before


# ------------------------------------------------------------------------------- work root

def test_work_root_under_a_file(run_cli, cli_error, site_file, tmp_path, tree):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    before = tree(tmp_path)
    cli_error(run_cli("submit", "L123456", "--site", "testsite", "--work-root", blocker / "w"),
              f"work root {blocker / 'w'} is not writable", "work_root")
    assert tree(tmp_path) == before


def test_work_root_not_writable(run_cli, cli_error, plain_user: bool, write_site, tmp_path, tree):
    ro = tmp_path / "readonly"
    ro.mkdir()
    write_site("rosite", root=ro / "fields")
    ro.chmod(0o555)
    before = tree(tmp_path)
    try:
        for extra in ([], ["--dry-run"]):
            cli_error(run_cli("submit", "L123456", "--site", "rosite", *extra, plain_user=plain_user),
                      f"work root {ro / 'fields'} is not writable", "work_root")
        # the existing root itself read-only, given on the command line
        cli_error(run_cli("submit", "L123456", "--site", "rosite", "--work-root", ro,
                          plain_user=plain_user), f"work root {ro} is not writable")
    finally:
        ro.chmod(0o755)
    assert tree(tmp_path) == before


# --------------------------------------------------------------------------- submit dry-run

def test_dry_run_default_config(run_cli, site_file, tmp_path, work_root, tree, observed):
    observed("L123456")
    before = tree(tmp_path)
    doc = ok_json(run_cli("submit", "L123456", "--site", "testsite", "--dry-run", "--json"))
    assert doc["site"] == "testsite" and doc["fields"] == ["L123456"] and doc["chains"] == 1
    stages = doc["stages"]
    assert [s["name"] for s in stages] == DEFAULT_STAGES
    for prev, s in zip([None, *stages], stages):
        assert set(s) >= {"name", "steps", "resources", "depends_on"}
        assert s["depends_on"] == ([prev["name"]] if prev else [])
        assert s["steps"] and s["fields"] == ["L123456"] and s["chain"] == 0
        assert s["resources"]["cpus"] == 8 and s["resources"]["walltime_min"] == 120
    assert stages[DEFAULT_STAGES.index("phase")]["steps"] == ["DDS0", "image_phase1"]
    assert tree(tmp_path) == before  # a dry run writes nothing


def test_dry_run_local_site(run_cli, tmp_path, tree, observed):
    before = tree(observed("L123456", root=tmp_path / "w"))
    doc = ok_json(run_cli("submit", "L123456", "--site", "local", "--dry-run", "--json",
                          "--work-root", tmp_path / "w"))
    assert doc["scheduler"] == "local"
    assert [s["name"] for s in doc["stages"]] == DEFAULT_STAGES
    assert doc["stages"][0]["resources"]["cpus"] == len(os.sched_getaffinity(0))
    assert tree(tmp_path / "w") == before


def test_dry_run_table(run_cli, cli_error, site_file, observed):
    observed("L123456")
    # the QU cubes are sized from the low-resolution beam: refused at once without it
    cli_error(run_cli("submit", "L123456", "--site", "testsite", "--dry-run", "--control-polcubes=True"),
              "[control] polcubes needs [image] low_psf_arcsec", "fix: set [image] low_psf_arcsec")
    out = ok(run_cli("submit", "L123456", "--site", "testsite", "--dry-run"))
    assert "plan on site testsite (local): 1 field(s), 1 chain(s)" in out
    for name in DEFAULT_STAGES:
        assert name in out


def test_a_missing_catalogue_is_refused_by_the_dry_run_as_by_the_submit(run_cli, cli_error, data_dir, write_site,
                                                                        observed, work_root, tree):
    """The tier1 config reads catalogues the site's directory does not have: the dry run says so
    as the real submit does (one line, exit 2, nothing written), and both pass the default config."""
    write_site("withcat", catalog_dir=CAT)
    observed("L123456")
    before = tree(work_root)
    for extra in (["--dry-run"], []):
        cli_error(run_cli("submit", "L123456", "--site", "withcat", "-c", data_dir / "tier1-sep2024.cfg", *extra),
                  f"TGSS catalogue ([masking] tgss) {CAT}/TGSSADR1_7sigma_catalog.fits does not exist")
    assert tree(work_root) == before
    assert ok_json(run_cli("submit", "L123456", "--site", "withcat", "--dry-run", "--json"))["stages"]


PRODUCTION_SITE = """
scheduler = "local"
[node]
cpus = 8
mem_gb = 32
[paths]
work_root = "{work_root}"
catalog_dir = "{cats}"
[catalogues]
panstarrs_url = "http://127.0.0.1:9/ps?ra={{ra}}&dec={{dec}}&r={{radius}}"
"""
# what each shipped production config switches on that an older hpcddf refused
PRODUCTION_STEPS = {
    "tier1-sep2024.cfg": {"bootstrap", "extended_mask", "DDS3_full_slow", "image_full_low", "image_full_low_im",
                          "image_full_low_m", "external_mask_ext_deep", "polcubes", "stokesv", "dynspec",
                          "compress_ms"},
    "tier1-jul2018.cfg": {"bootstrap", "extended_mask", "image_full_low_m", "offsets", "polcubes", "stokesv",
                          "dynspec"},
    "lgps_optimized.cfg": {"image_full_wide", "wide_mask", "image_full_wide_im", "image_full_wide_predict",
                           "image_full_wide_im_sub", "image_full_ampphase_di_m.NS"},
}


# the one line each shipped config gets (no option of theirs is ignored otherwise): the LOFAR beam
# is not applied to the dynamic spectra; LGPS's WSCMS2 is cleaned with 0.9.1's WSCMS, which cannot
# auto-mask an image that has a clean mask
_NO_BEAM = ("hpcddf: warning: [spectra] do_dynspec: the dynamic spectra are made without the beam ([image] "
            "beam_model LOFAR): hpcddf's extraction applies none, so their fluxes are apparent")
PRODUCTION_WARNINGS = {
    "tier1-sep2024.cfg": [_NO_BEAM], "tier1-jul2018.cfg": [_NO_BEAM],
    "lgps_optimized.cfg": ["hpcddf: warning: [image] cleanmode WSCMS2 is not in DDFacet 0.9.1.0 (which killMS "
                           "3.3.0 needs): the images are cleaned with WSCMS",
                           "hpcddf: warning: [masking] WSCMS auto-masking applies only to images without a clean "
                           "mask: DDFacet 0.9.1.0's WSCMS stops when given both, so the others are cleaned inside "
                           "their mask alone"],
}


def _catalogues(*dirs: Path) -> None:
    """Every catalogue the production configs name, as the steps read them."""
    from astropy.table import Table

    from hpcddf.lofar.simulate import DEFAULT_SOURCES, write_catalogue, write_tgss_catalogue
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        write_tgss_catalogue(d / "TGSSADR1_7sigma_catalog.fits", DEFAULT_SOURCES)
        for name in ("VLSS.fits", "wenss.fits", "NVSS.fits"):
            write_catalogue(d / name, DEFAULT_SOURCES)
        Table({"DESIGNATION": ["S1"], "ra": [180.0], "dec": [60.0], "pmra": [float("nan")],
               "pmdec": [float("nan")], "ref_epoch": [2016.0], "parallax": [float("nan")],
               "Type": ["test"]}).write(d / "dyn_spec_catalogue_addedexo_addvlotss.fits")


@pytest.mark.parametrize("cfg", sorted(PRODUCTION_STEPS))
def test_the_production_configs_plan_every_step_unchanged(cfg, run_cli, data_dir, user_sites_dir, work_root,
                                                         tmp_path):
    """A survey's own config, unchanged: every step it switches on is planned (nothing "cannot
    run yet"), the catalogues it reads are checked, and each option that has no effect here is
    one warning line naming it."""
    from hpcddf.lofar.simulate import SimSpec, simulate_field
    # a real (tiny) MS: the PanSTARRS tiles of tier1-jul2018's offsets are planned on its phase centre
    simulate_field(work_root / "L123456", SimSpec(nant=4, ntime=2, nchan=2))
    (work_root / "L123456" / "hpcddf.cfg").unlink()  # the production config alone
    _catalogues(tmp_path / "cats", work_root / "L123456")  # lgps names its catalogues relative to the field
    (user_sites_dir / "prod.toml").write_text(PRODUCTION_SITE.format(work_root=work_root, cats=tmp_path / "cats"))
    proc = run_cli("submit", "L123456", "--site", "prod", "-c", data_dir / cfg, "--dry-run", "--json",
                   cwd=work_root / "L123456")
    assert proc.returncode == 0, proc.stderr
    assert "cannot run" not in proc.stdout + proc.stderr
    steps = {s for st in json.loads(proc.stdout)["stages"] for s in st["steps"]}
    assert PRODUCTION_STEPS[cfg] <= steps, PRODUCTION_STEPS[cfg] - steps
    warnings = [ln for ln in proc.stderr.splitlines() if "warning:" in ln]
    print("\n".join(warnings))
    assert warnings == PRODUCTION_WARNINGS[cfg], warnings


def test_dry_run_and_submit_refuse_a_field_without_measurement_sets(run_cli, cli_error, site_file, work_root, tree):
    for extra in (["--dry-run"], []):
        cli_error(run_cli("submit", "L123456", "--site", "testsite", *extra),
                  "no measurement sets for field L123456")
    assert tree(work_root) == []


def test_dry_run_and_submit_refuse_a_missing_catalogue(run_cli, cli_error, site_file, observed, tmp_path):
    observed("L123456")
    for extra in (["--dry-run"], []):
        cli_error(run_cli("submit", "L123456", "--site", "testsite", "--control-bootstrap=True",
                          "--image-low_psf_arcsec=20", *extra), "[bootstrap] catalogues is empty")
    opts = ["--control-bootstrap=True", "--image-low_psf_arcsec=20",
            f"--bootstrap-catalogues=['{tmp_path}/VLSS.fits']", "--bootstrap-names=['VLSS']",
            "--bootstrap-radii=[40]", "--bootstrap-frequencies=[74e6]"]
    for extra in (["--dry-run"], []):
        cli_error(run_cli("submit", "L123456", "--site", "testsite", *opts, *extra), "VLSS.fits")


def test_dry_run_and_submit_refuse_a_bad_ms_list(run_cli, cli_error, site_file, work_root):
    (work_root / "L123456").mkdir()
    (work_root / "L123456" / "mslist.txt").write_text("nothere.ms\n")
    for extra in (["--dry-run"], []):
        cli_error(run_cli("submit", "L123456", "--site", "testsite", *extra), "names 'nothere.ms'")


def test_dry_run_needs_a_catalogue_dir_for_dollar_dollar(run_cli, cli_error, data_dir, site_file, observed):
    observed("L123456")
    cli_error(run_cli("submit", "L123456", "--site", "testsite", "-c",
                      data_dir / "tier1-sep2024.cfg", "--dry-run"),
              "uses $$ but site testsite has no catalogue directory", "catalog_dir")
    # with the catalogue dir from the environment the config resolves; the submit then stops
    # where a real one does (the catalogues are not there)
    cli_error(run_cli("submit", "L123456", "--site", "testsite", "-c", data_dir / "tier1-sep2024.cfg",
                      "--dry-run", "--json", env={"DDF_PIPELINE_CATALOGS": CAT}), f"{CAT}/TGSSADR1_7sigma_catalog.fits")


@pytest.mark.parametrize("overrides,expected", [
    (["--data-full_mslist=None"], DEFAULT_STAGES[:DEFAULT_STAGES.index("ampphase_di") + 1]),
    (["--control-skip_di=True"], [s for s in DEFAULT_STAGES if s not in ("dirin_di", "ampphase_di")]),
    (["--control-exitafter=phase"], DEFAULT_STAGES[:DEFAULT_STAGES.index("phase") + 1]),
    (["--inputmodel-basedicomodel=m", "--image-clusterfile=c.npy", "--inputmodel-baseimagename=m",
      "--inputmodel-basemaskname=m.mask.fits"], ["fullampphase", "final"]),
])
def test_dry_run_shapes(run_cli, site_file, overrides, expected, observed):
    observed("L123456")
    doc = ok_json(run_cli("submit", "L123456", "--site", "testsite", *overrides, "--dry-run",
                          "--json"))
    assert [s["name"] for s in doc["stages"]] == expected


def test_dry_run_skip_di_drops_di_steps(run_cli, site_file, observed):
    observed("L123456")
    doc = ok_json(run_cli("submit", "L123456", "--site", "testsite", "--control-skip_di=True",
                          "--dry-run", "--json"))
    steps = {step for s in doc["stages"] for step in s["steps"]}
    assert not steps & {"DIS0", "DIS1", "DIS2_full", "Predict_DI1", "image_ampphase1_di"}


def test_dry_run_several_fields_one_chain(run_cli, site_file, tmp_path, observed):
    observed("L111111", "L222222", "L333333")
    ff = tmp_path / "fields.txt"
    ff.write_text("L333333\n")
    doc = ok_json(run_cli("submit", "L111111", "L222222", "--fields-file", ff, "--site",
                          "testsite", "--dry-run", "--json"))
    assert doc["chains"] == 1
    assert [s["name"] for s in doc["stages"]] == DEFAULT_STAGES
    for s in doc["stages"]:
        assert s["fields"] == ["L111111", "L222222", "L333333"] and s["chain"] == 0


def test_dry_run_field_with_own_config_is_a_separate_chain(run_cli, site_file, work_root, observed):
    observed("L111111", "L222222", "L333333")
    (work_root / "L222222" / "hpcddf.cfg").write_text("[control]\nexitafter = ampphase\n")
    doc = ok_json(run_cli("submit", "L111111", "L222222", "L333333", "--site", "testsite",
                          "--dry-run", "--json"))
    assert doc["chains"] == 2
    chain = {}
    for s in doc["stages"]:
        chain.setdefault(tuple(s["fields"]), []).append(s)
    assert set(chain) == {("L111111", "L333333"), ("L222222",)}
    main, own = chain[("L111111", "L333333")], chain[("L222222",)]
    assert {s["chain"] for s in main} != {s["chain"] for s in own}
    assert len({s["chain"] for s in main}) == 1 and len({s["chain"] for s in own}) == 1
    assert [s["name"] for s in main] == DEFAULT_STAGES
    assert [s["name"] for s in own] == DEFAULT_STAGES[:DEFAULT_STAGES.index("ampphase") + 1]
    assert own[0]["depends_on"] == [] and own[1]["depends_on"] == [own[0]["name"]]


def test_duplicate_field(run_cli, cli_error, site_file):
    cli_error(run_cli("submit", "L111111", "L111111", "--site", "testsite", "--dry-run"),
              "field L111111 is given twice")


def test_no_field(run_cli, cli_error, site_file):
    cli_error(run_cli("submit", "--site", "testsite", "--dry-run"), "no field given")



def test_demo_without_the_science_stack_says_how_to_install_it(tmp_path, monkeypatch):
    """With no DDF.py beside the interpreter or on PATH, the demo stops before simulating."""
    from hpcddf.errors import PlanError
    from hpcddf.lofar.demo import run_demo
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setattr(sys, "executable", str(bindir / "python"))
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    with pytest.raises(PlanError, match="DDF.py is not installed") as err:
        run_demo(tmp_path / "w")
    assert "hpcddf[science]" in str(err.value)
    assert not (tmp_path / "w").exists()


TIER1_RUNNABLE = ("--masking-extended_size=None", "--control-polcubes=False", "--control-stokesv=False",
                  "--spectra-do_dynspec=False", "--compression-compress_ms=False")


def test_a_missing_bootstrap_catalogue_is_refused_before_anything_is_queued(run_cli, data_dir, write_site, tmp_path):
    write_site("nocats", catalog_dir=str(tmp_path / "cats"))  # VLSS.fits is not there
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "TGSSADR1_7sigma_catalog.fits").touch()  # only present files are not read
    proc = run_cli("submit", "L123456", "--site", "nocats", "-c", data_dir / "tier1-sep2024.cfg", *TIER1_RUNNABLE)
    assert proc.returncode == 2, proc.stderr
    assert "bootstrap catalogue" in proc.stderr and "VLSS.fits does not exist" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_missing_tgss_catalogue_without_a_url_is_refused_naming_the_site_key(run_cli, data_dir, write_site, tmp_path):
    write_site("nocats", catalog_dir=str(tmp_path / "cats"))
    proc = run_cli("submit", "L123456", "--site", "nocats", "-c", data_dir / "tier1-sep2024.cfg", *TIER1_RUNNABLE)
    assert proc.returncode == 2, proc.stderr
    assert "TGSS catalogue ([masking] tgss)" in proc.stderr and "[catalogues] files" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_submit_dry_run_names_the_panstarrs_download_and_downloads_nothing(run_cli, write_site, work_root, tmp_path):
    """The site's PanSTARRS URL points at a server that counts requests: the dry run reads the
    field centre from the MS and says what a real submit would download, in one line."""
    from tests.unit.test_catalogues import Server, make_ms
    server = Server()
    try:
        path = write_site("ps")
        path.write_text(path.read_text() + f'\n[catalogues]\npanstarrs_url = "{server.url}/ps?ra={{ra}}&dec={{dec}}&r={{radius}}"\n')
        make_ms(work_root / "L123456" / "L123456_SB000.ms")
        proc = run_cli("submit", "L123456", "--site", "ps", "--offsets-method=panstarrs", "--image-imsize=2000",
                       "--dry-run", env={"no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"})
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
    assert proc.returncode == 0, proc.stderr
    said = [ln for ln in proc.stderr.splitlines() if "would download" in ln]
    assert len(said) == 1 and "PanSTARRS catalogue" in said[0] and "1 cone(s) of 0.5 deg" in said[0]
    assert server.requests == [] and not (work_root / "L123456" / "panstarrs").exists()


def test_an_offsets_method_without_a_local_catalogue_is_refused(run_cli, data_dir, write_site):
    write_site("plain")
    proc = run_cli("submit", "L123456", "--site", "plain", "--offsets-method=pslocal")
    assert proc.returncode == 2, proc.stderr
    assert "needs a local reference catalogue" in proc.stderr and "[offsets] catalogue" in proc.stderr


# ------------------------------------------------------------------ bad input found by trying

@pytest.mark.parametrize("text,needle", [
    (b"[]", "a JSON list, not an object"),
    (b"\x00\xff\xfe", "is corrupt"),
    (b'{"stages": 5}', '"stages" is a int, not a JSON object'),
    (b'{"stages": {"initial": 3}}', 'stage "initial" is a int'),
    (b'{"submissions": {}}', '"submissions" is a dict, not a JSON array'),
])
def test_a_state_file_of_the_wrong_shape_is_one_line(run_cli, cli_error, work_root, text, needle):
    (work_root / "L123456" / ".hpcddf").mkdir(parents=True)
    (work_root / "L123456" / ".hpcddf" / "state.json").write_bytes(text)
    cli_error(run_cli("status", "L123456", "--work-root", work_root), needle, "move it aside", code=2)


def test_a_fields_file_that_is_not_text(run_cli, cli_error, site_file, tmp_path):
    (tmp_path / "fields.txt").write_bytes(b"L123456\nL12345\xff\n")
    cli_error(run_cli("submit", "--fields-file", tmp_path / "fields.txt", "--site", "testsite", "--dry-run"),
              "is not UTF-8 text")


@pytest.mark.parametrize("opts,needles", [
    (("--pipeline", "scaled", "--pipeline-opt", "nosuch=1"), ("nosuch is not an option of the scaled pipeline",)),
    (("--pipeline", "scaled", "--pipeline-opt", "seconds=abc"), ("seconds=abc is not a non-negative number",)),
    (("--pipeline", "scaled", "--pipeline-opt", "seconds.nostep=1"), ("'nostep' is not a step",)),
    (("--pipeline", "scaled", "--pipeline-opt", "fail=xx"), ("fail=xx: not a step",)),
    (("--pipeline", "scaled", "--pipeline-opt", "seconds=1", "--pipeline-opt", "seconds=2"), ("given twice",)),
    (("--pipeline-opt", "timeout=0"), ("timeout=0 is not a positive number",)),
    (("--pipeline-opt", "seconds=1"), ("seconds is not an option of the ddf pipeline",)),
])
def test_bad_pipeline_options(run_cli, cli_error, site_file, tmp_path, tree, opts, needles):
    before = tree(tmp_path)
    cli_error(run_cli("submit", "L123456", "--site", "testsite", "--dry-run", *opts), *needles)
    assert tree(tmp_path) == before


def _field_with_list(work_root: Path, listing: str) -> Path:
    wd = work_root / "L123456"
    (wd / "notms").mkdir(parents=True)  # a directory, but no Measurement Set
    (wd / "mslist.txt").write_text(listing)
    return wd


@pytest.mark.parametrize("listing,needles", [
    ("", ("MS list", "mslist.txt is empty")),
    ("notms\n", ("names 'notms', which is not a Measurement Set (no table.dat)",)),
    ("gone.ms\n", ("names 'gone.ms', which does not exist",)),
])
def test_a_bad_ms_list_is_refused_before_queueing(run_cli, cli_error, site_file, work_root, tree,
                                                  listing, needles):
    _field_with_list(work_root, listing)
    before = tree(work_root)
    cli_error(run_cli("submit", "L123456", "--site", "testsite"), *needles)
    assert tree(work_root) == before


def test_a_directory_named_like_an_ms_that_is_none_is_refused(run_cli, cli_error, site_file, work_root):
    (work_root / "L123456" / "fake.ms").mkdir(parents=True)
    cli_error(run_cli("submit", "L123456", "--site", "testsite"), "fake.ms is not a Measurement Set")


def test_a_field_symlinked_out_of_the_work_root_is_refused(run_cli, cli_error, site_file, work_root, tmp_path,
                                                          observed):
    (tmp_path / "elsewhere" / "L123456").mkdir(parents=True)
    (work_root / "L123456").symlink_to(tmp_path / "elsewhere" / "L123456")
    for cmd in (("submit", "L123456", "--site", "testsite", "--dry-run"), ("status", "L123456", "--site", "testsite")):
        cli_error(run_cli(*cmd), "is a symlink to", "outside the work root")
    observed("inside")
    (work_root / "L654321").symlink_to(work_root / "inside")
    ok(run_cli("submit", "L654321", "--site", "testsite", "--dry-run"))


# ----------------------------------------------------------------------------------- mosaic

def _facet_survey(work: Path) -> Path:
    """Three tiny reduced fields with facet files and a quality result; their pointings CSV."""
    from hpcddf.mosaic.combine import PRODUCTS
    from hpcddf.mosaic.survey_sim import FieldSpec, SkySource, hex_grid, write_field
    pts = hex_grid(100.0, 40.0, 0.4, 1, prefix="M")[:3]
    spec = FieldSpec(cell_arcsec=20.0, resolution_arcsec=80.0, npix=96, pb_fwhm_deg=0.8, facets=2)
    full = PRODUCTS["full"]
    for i, p in enumerate(pts):
        write_field(work / p.id, p, spec, [SkySource(p.ra, p.dec, 1.0)], full.int_image, full.app_image,
                    seed=i, offsets={0: (5.0, 0.0)})
        (work / p.id / "quality").mkdir()
        (work / p.id / "quality" / "quality.json").write_text(json.dumps(
            {"catalogues": {"NVSS": {"used": True, "flux_ratio": {"value": 1.25}}}}))
    table = work / "pointings.csv"
    table.write_text("id,ra,dec\n" + "".join(f"{p.id},{p.ra},{p.dec}\n" for p in pts))
    return table


def test_mosaic_corrections_from_the_fields_products(run_cli, cli_error, tmp_path):
    """--apply-shifts, --blank-bad-facets, --scale-from-quality read the fields' own products and
    are recorded in the mosaic's HISTORY and done-marker; bad values stop before anything runs."""
    from astropy.io import fits
    work = tmp_path / "work"
    table = _facet_survey(work)
    common = ("mosaic", "M000", "--local", "--pointings", str(table), "--work-root", str(work), "--no-preview")
    cli_error(run_cli(*common, "--common-beam", "big"), "--common-beam 'big' is not auto, none or arcsec", code=1)
    cli_error(run_cli(*common, "--blank-bad-facets"), "field M000 has neither Badfacets.txt nor an offsets table",
              code=1)
    cli_error(run_cli(*common, "--scale-from-quality", "TGSS"), "no usable flux ratio against TGSS",
              "usable: NVSS", code=1)
    assert not (work / "mosaics").exists()
    (work / "M001" / "Badfacets.txt").write_text("3\n")
    for fid in ("M000", "M002"):
        (work / fid / "Badfacets.txt").write_text("\n")
    ok(run_cli(*common, "--apply-shifts", "--blank-bad-facets", "--scale-from-quality", "NVSS"))
    head = fits.getheader(work / "mosaics" / "M000" / "M000-full-mosaic.fits")
    history = "\n".join(head["HISTORY"])
    assert "scale 0.8 (quality NVSS)" in history and "1 facets shifted (max 5.00\")" in history
    assert "M001 1 facets shifted (max 5.00\"); facets 3 blanked" in history
    marker = json.loads(next((work / "mosaics" / "M000").rglob("full.done.json")).read_text())
    assert marker["scales"] == {"M000": 0.8, "M001": 0.8, "M002": 0.8} and marker["recipe"]
    assert "already done" in ok(run_cli(*common, "--apply-shifts", "--blank-bad-facets",
                                        "--scale-from-quality", "NVSS"))
    assert "already done" not in ok(run_cli(*common, "--apply-shifts", "--scale-from-quality", "NVSS"))


def test_submit_dry_run_names_each_option_without_effect_once(run_cli, site_file, observed, tmp_path):
    observed("L123456")
    cfg = tmp_path / "lgps.cfg"
    cfg.write_text("[data]\nmslist = mslist.txt\n[offsets]\nmode = test\n[control]\ndryrun = True\n")
    proc = run_cli("submit", "L123456", "-c", str(cfg), "--dry-run", "--json", env={"HPCDDF_SITE": "testsite"})
    assert json.loads(ok(proc))["stages"]
    lines = [ln for ln in proc.stderr.splitlines() if "has no effect" in ln]
    assert len(lines) == 2, proc.stderr
    assert any("[control] dryrun" in ln and "hpcddf submit --dry-run" in ln for ln in lines)
    assert any("[offsets] mode" in ln and "normal mode" in ln for ln in lines)
