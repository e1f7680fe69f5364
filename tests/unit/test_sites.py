"""Site configs: shipped sites, user sites shadowing them, validation of every key, walltimes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpcddf.engine.sites import (
    MANAGED_SBATCH,
    available_sites,
    load_site,
    load_site_file,
    site_dirs,
    walltime_minutes,
)
from hpcddf.errors import ExitCode, SiteError

pytestmark = pytest.mark.usefixtures("isolated_env")

SHIPPED = ["cosma", "jureca", "local", "spider"]


def site_error(match: str, *needles: str):
    """pytest.raises(SiteError) that also checks the message is one line naming ``needles``."""
    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(SiteError, match=match)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            ok = self.cm.__exit__(*exc)
            text = str(self.info.value)
            assert "\n" not in text, text
            assert "(fix: " in text, text
            for n in needles:
                assert n in text, (n, text)
            assert self.info.value.exit_code == ExitCode.CONFIG
            return ok
    return _Ctx()


# ------------------------------------------------------------------------------ walltimes

@pytest.mark.parametrize("text,minutes", [
    ("90", 90),                 # MM
    ("5", 5),
    ("30:00", 30),              # MM:SS
    ("30:01", 31),              # seconds round up
    ("0:30", 1),
    ("24:00:00", 1440),         # HH:MM:SS
    ("01:02:03", 63),
    ("72:00:00", 4320),
    ("2-0", 2880),              # D-HH
    ("1-12", 2160),
    ("1-02:30", 1590),          # D-HH:MM
    ("5-00:00:00", 7200),       # D-HH:MM:SS
    ("0-00:00:01", 1),
    (" 48:00:00 ", 2880),
])
def test_walltime_formats(text, minutes):
    assert walltime_minutes(text) == minutes


@pytest.mark.parametrize("text", ["", "abc", "1:2:3:4", "-5", "1-", "-1:00", "24h", "1:2:3-4",
                                  "0", "00:00:00", "0-0", "1.5", "1-2-3"])
def test_bad_walltimes(text):
    with pytest.raises(ValueError):
        walltime_minutes(text)


# ------------------------------------------------------------------------------ shipped sites

def test_shipped_sites_are_listed(user_sites_dir: Path):
    sites = available_sites()
    assert list(sites) == SHIPPED
    for name, path in sites.items():
        assert path.name == f"{name}.toml"
        assert path.parent == site_dirs()[-1]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_sites_are_valid(name):
    site = load_site(name)
    assert site.name == name
    assert site.max_walltime_min > 0
    assert site.cpus >= 1 and site.mem_gb >= 1
    assert 0 < site.preflight.shm_min_fraction <= 1
    assert not any(k.lstrip("-") in MANAGED_SBATCH for k in site.slurm.extra_sbatch)


def test_spider_values():
    s = load_site("spider")
    assert s.scheduler == "slurm"
    assert (s.cpus, s.mem_gb) == (32, 256)
    assert s.max_walltime_min == 5 * 1440
    assert s.slurm.partition == "normal"
    assert s.slurm.extra_sbatch == {"constraint": "skylake"}
    assert s.container.runtime == "apptainer"
    assert s.preflight.thp_defrag == ["never"]
    assert s.catalog_dir == Path("/project/lofarsurveys/Software/bootstrap")
    assert s.fields.pattern == "L[0-9]{6}"


def test_local_site_is_this_machine():
    s = load_site("local")
    assert s.scheduler == "local"
    assert s.cpus == len(os.sched_getaffinity(0))
    assert s.mem_gb >= 1
    assert s.container.runtime == "none"
    assert s.work_root == Path(os.environ["HOME"]) / "hpcddf-fields"  # ~ expanded
    assert s.catalog_dir is None and s.data_root is None


def test_cosma_and_jureca():
    cosma, jureca = load_site("cosma"), load_site("jureca")
    assert cosma.max_walltime_min == 72 * 60 and cosma.slurm.qos == ""
    assert cosma.preflight.shm_min_fraction == 0.5
    assert jureca.cpus == 128 and jureca.max_walltime_min == 1440
    assert jureca.container.runtime == "apptainer"


def test_work_root_expands_variables(write_site, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    monkeypatch.setenv("HPCDDF_TEST_ROOT", str(tmp_path / "x"))
    write_site("vars", root="$HPCDDF_TEST_ROOT/fields")
    assert load_site("vars").work_root == tmp_path / "x" / "fields"


def test_to_dict_round_trips_every_section():
    d = load_site("spider").to_dict()
    assert set(d) == {"name", "path", "scheduler", "description", "slurm", "node", "preflight",
                      "container", "paths", "catalogues", "fields", "survey"}
    assert d["node"]["cpus"] == 32


# ----------------------------------------------------------------------------- user sites

def test_user_site_from_sites_dir_shadows_shipped(write_site, user_sites_dir: Path):
    path = write_site("spider", cpus=4)
    write_site("mycluster", scheduler="slurm")
    sites = available_sites()
    assert sites["spider"] == path
    assert sites["mycluster"] == user_sites_dir / "mycluster.toml"
    assert set(sites) == set(SHIPPED) | {"mycluster"}
    spider = load_site("spider")
    assert spider.cpus == 4 and spider.path == str(path)
    assert load_site("mycluster").scheduler == "slurm"


def test_user_site_from_xdg_config(write_site, isolated_env, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("HPCDDF_SITES_DIR")
    xdg_sites = Path(isolated_env["XDG_CONFIG_HOME"]) / "hpcddf" / "sites"
    xdg_sites.mkdir(parents=True)
    path = write_site("cosma", cpus=3, directory=xdg_sites)
    assert available_sites()["cosma"] == path
    assert load_site("cosma").cpus == 3


def test_home_config_when_xdg_unset_or_empty(write_site, isolated_env, monkeypatch):
    monkeypatch.delenv("HPCDDF_SITES_DIR")
    home_sites = Path(isolated_env["HOME"]) / ".config" / "hpcddf" / "sites"
    home_sites.mkdir(parents=True)
    write_site("homesite", directory=home_sites)
    monkeypatch.delenv("XDG_CONFIG_HOME")
    assert "homesite" in available_sites()
    monkeypatch.setenv("XDG_CONFIG_HOME", "")  # empty counts as unset
    assert "homesite" in available_sites()
    assert site_dirs()[0] == home_sites


def test_sites_dir_beats_xdg(write_site, isolated_env, user_sites_dir: Path):
    xdg_sites = Path(isolated_env["XDG_CONFIG_HOME"]) / "hpcddf" / "sites"
    xdg_sites.mkdir(parents=True)
    write_site("both", cpus=2, directory=xdg_sites)
    write_site("both", cpus=6)
    assert site_dirs()[:2] == [user_sites_dir, xdg_sites]
    assert load_site("both").cpus == 6


def test_site_file_is_used_directly(write_site, tmp_path: Path):
    path = write_site("elsewhere", cpus=5, directory=tmp_path)
    site = load_site(None, str(path))
    assert site.name == "elsewhere" and site.cpus == 5 and site.path == str(path)
    assert "elsewhere" not in available_sites()
    assert load_site("local", str(path)).name == "elsewhere"  # the file wins over a name


def test_unknown_site_suggests_the_closest():
    with site_error("unknown site 'spyder'", "did you mean 'spider'?", "--site-file"):
        load_site("spyder")
    with site_error("unknown site 'qqqqqq'", "known sites: cosma, jureca, local, spider"):
        load_site("qqqqqq")


def test_no_site_given():
    with site_error("no site given", "--site NAME"):
        load_site(None)


# ------------------------------------------------------------------------- malformed sites

def load_text(tmp_path: Path, text: str, name: str = "bad"):
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return load_site_file(path)


def test_missing_and_directory_site_file(tmp_path: Path):
    with site_error("does not exist", str(tmp_path / "none.toml")):
        load_site_file(tmp_path / "none.toml")
    d = tmp_path / "dir.toml"
    d.mkdir()
    with site_error("is a directory", str(d)):
        load_site_file(d)


def test_unreadable_site_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = tmp_path / "locked.toml"
    path.write_text('scheduler = "local"\n')
    path.chmod(0)
    if os.geteuid() == 0:  # root reads it anyway: refuse as the kernel would a normal user
        real = Path.read_text

        def read_text(self, *a, **kw):
            if self == path:
                raise PermissionError(13, "Permission denied", str(self))
            return real(self, *a, **kw)
        monkeypatch.setattr(Path, "read_text", read_text)
    with site_error("is not readable", f"chmod u+r {path}"):
        load_site_file(path)


@pytest.mark.parametrize("text", [
    "scheduler = slurm\n",
    "[node\ncpus = 4\n",
    "[node]\ncpus = 4\ncpus = 5\n",
    "scheduler = 'a' 'b'\n",
])
def test_bad_toml(tmp_path: Path, text: str):
    with site_error("is not valid TOML", "bad.toml", "fix the syntax"):
        load_text(tmp_path, text)


def test_binary_site_file(tmp_path: Path):
    path = tmp_path / "bin.toml"
    path.write_bytes(b"\xff\xfe\x00\x9c")
    with site_error("is not valid TOML"):
        load_site_file(path)


@pytest.mark.parametrize("text,needles", [
    ('schedular = "slurm"\n', ("unknown key 'schedular'", "did you mean 'scheduler'?")),
    ("[node]\ncpu = 4\n", ("[node]", "unknown key 'cpu'", "did you mean 'cpus'?")),
    ("[slurm]\nmax_walltme = '1:00:00'\n", ("unknown key 'max_walltme'", "'max_walltime'")),
    ("[preflight]\nshm_fraction = 0.5\n", ("unknown key 'shm_fraction'", "'shm_min_fraction'")),
    ("[nodes]\ncpus = 4\n", ("unknown key 'nodes'", "did you mean 'node'?")),
    ("name = 'x'\n", ("unknown key 'name'",)),
    ("[fields]\nzzzzzz = 1\n", ("unknown key 'zzzzzz'", "valid keys: pattern, max_running")),
])
def test_unknown_keys(tmp_path: Path, text: str, needles):
    with site_error("unknown key", *needles):
        load_text(tmp_path, text)


@pytest.mark.parametrize("text,needles", [
    ("[node]\ncpus = 4.5\n", ("cpus = 4.5", "an integer or a string")),
    ("[node]\ncpus = true\n", ("cpus = True", "wrong type")),
    ("[node]\nscratch_min_free_gb = '10'\n", ("scratch_min_free_gb", "a number")),
    ("[slurm]\nexclusive = 'yes'\n", ("exclusive", "true or false")),
    ("[slurm]\nmax_walltime = 60\n", ("max_walltime = 60", "a string")),
    ("[slurm]\nmax_requeues = 1.0\n", ("max_requeues", "an integer")),
    ("[slurm]\nextra_sbatch = { constraint = 1 }\n", ("extra_sbatch", "a table of strings")),
    ("[slurm]\npartition = ['a']\n", ("partition", "a string")),
    ("[preflight]\nshm_min_fraction = '0.5'\n", ("shm_min_fraction", "a number")),
    ("[preflight]\nthp_defrag = 'never'\n", ("thp_defrag", "a list of a string")),
    ("[preflight]\nthp_defrag = [1]\n", ("thp_defrag", "wrong type")),
    ("[preflight]\nrequire_swap = 0\n", ("require_swap", "true or false")),
    ("[container]\nbinds = '/a'\n", ("binds", "a list")),
    ("scheduler = 1\n", ("scheduler = 1", "a string")),
    ("slurm = 'x'\n", ("[slurm] must be a table",)),
])
def test_wrong_types(tmp_path: Path, text: str, needles):
    with site_error(".", *needles):
        load_text(tmp_path, text)


@pytest.mark.parametrize("text,needles", [
    ("[preflight]\nshm_min_fraction = 1.5\n", ("shm_min_fraction 1.5 is not in (0, 1]",)),
    ("[preflight]\nshm_min_fraction = 0\n", ("shm_min_fraction 0.0",)),
    ("[preflight]\nshm_min_fraction = -0.1\n", ("shm_min_fraction",)),
    ("[node]\ncpus = -4\n", ("[node] cpus = -4 is impossible", "at least 1")),
    ("[node]\ncpus = 0\n", ("[node] cpus = 0 is impossible",)),
    ("[node]\nmem_gb = -1\n", ("[node] mem_gb = -1",)),
    ("[node]\ncpus = 'lots'\n", ("cpus = 'lots' is not a number", '"auto"')),
    ("[node]\nscratch_min_free_gb = -1\n", ("scratch_min_free_gb is negative",)),
    ("[slurm]\nmax_walltime = '1 day'\n", ("max_walltime", "'1 day' is not a walltime", "72:00:00")),
    ("[slurm]\nmax_walltime = '00:00:00'\n", ("max_walltime", "is zero")),
    ("[slurm]\nmax_walltime = '25h'\n", ("max_walltime",)),
    ("[slurm]\nmax_requeues = -1\n", ("max_requeues",)),
    ("[slurm]\nsignal_delay_s = -5\n", ("signal_delay_s",)),
    ("[fields]\nmax_running = 0\n", ("max_running must be at least 1",)),
    ("[fields]\npattern = 'L[0-9'\n", ("pattern is not a regular expression",)),
    ("scheduler = 'pbs'\n", ("scheduler 'pbs' is unknown", "slurm, local")),
    ("[container]\nruntime = 'docker'\n", ("runtime 'docker' is unknown", "apptainer")),
    ("[container]\nruntime = 'apptainer'\n", ("needs an image", "[container] image")),
])
def test_impossible_values(tmp_path: Path, text: str, needles):
    with site_error("site bad", "bad.toml", *needles):
        load_text(tmp_path, text)


@pytest.mark.parametrize("key", ["job-name", "--job-name", "job_name", "time", "partition",
                                 "dependency", "dep", "array", "output", "signal", "mem",
                                 "cpus-per-task", "cpus_per_task", "exclusive", "chdir"])
def test_extra_sbatch_may_not_set_managed_flags(tmp_path: Path, key: str):
    text = f'[slurm]\nextra_sbatch = {{ "{key}" = "x" }}\n'
    with site_error("extra_sbatch may not set", repr(key), "hpcddf manages it"):
        load_text(tmp_path, text)


@pytest.mark.parametrize("key", ["constraint", "gres", "mail-type", "mail_user", "reservation",
                                 "nodelist", "mem-per-cpu"])
def test_extra_sbatch_allows_other_flags(tmp_path: Path, key: str):
    site = load_text(tmp_path, f'[slurm]\nextra_sbatch = {{ "{key}" = "v" }}\n', name="ok")
    assert site.slurm.extra_sbatch == {key: "v"}


def test_minimal_site_takes_defaults(tmp_path: Path):
    site = load_text(tmp_path, "", name="empty")
    assert site.name == "empty" and site.scheduler == "slurm"
    assert site.max_walltime_min == 1440
    assert site.cpus == 1 and site.fields.pattern == r"L[0-9]{5,7}"


def test_invalid_user_site_is_an_error_by_name(write_site):
    write_site("broken", text="[node]\ncpus = -1\n")
    assert "broken" in available_sites()
    with site_error("site broken", "cpus = -1"):
        load_site("broken")
