"""Pipeline configuration: ddf-pipeline .cfg files, defaults, overrides, types, bad input."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hpcddf.errors import ConfigError, ExitCode
from hpcddf.lofar.config import (
    Override,
    format_value,
    is_override,
    load_config,
    parse_override,
    split_cli_args,
    uses_catalog_token,
)
from hpcddf.lofar.options import OPTIONS, SECTIONS, lookup

pytestmark = pytest.mark.usefixtures("isolated_env")

PRODUCTION = ("tier1-sep2024.cfg", "tier1-jul2018.cfg", "lgps_optimized.cfg")

# A tier1-style config that touches every section and every value type.
FULL_CFG = """\
[machine]
NCPU_DDF = 32
NCPU_killms = 16

[data]
mslist = mslist.txt
full_mslist = big-mslist.txt
colname = DATA

[solutions]
ndir = 40
NChanSols = None
dt_slow = 1.
do_very_slow = False
NIterKF = [6, 6, 6, 6, 6, 6, 6]
normalize = ['None', 'None', 'None']
uvmin = .1
apply_sols = ('P', 'AP', 'AP', 'AP', 'AP', 'AP', 'AP')

[image]
cleanmode = WSCMS2
imsize = 20000
robust = -0.20
final_psf_pa_deg = 90
low_psf_arcsec = 20
apply_weights = [False, True, True, True]
centralfreqs = [128, 143.7, 160.2]
wscms_scales = [0,4,8,16]

[masking]
thresholds = [15,5,5,5]
tgss = $$/TGSSADR1_7sigma_catalog.fits
extended_size = 2000
rmsfacet = yes

[control]
restart = True
bootstrap = on
exitafter = ampphase
redo_DI_type = TGSS

[bootstrap]
catalogues = ['$$/VLSS.fits', '$$/wenss.fits']
names = ['VLSS', 'WENSS']
radii = [40, 10]
groups = [1, 2]
frequencies = [74e6, 327e6]

[compression]
fpack_q = 8
compress_ms = 1

[offsets]
method = None
fit = chi2

[spectra]
do_dynspec = True
bright_threshold = 2

[inputmodel]
basedicomodel = None
"""


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.fixture
def cfg_file(tmp_path: Path):
    counter = iter(range(1000))

    def _make(text: str) -> str:
        return write(tmp_path / f"c{next(counter)}.cfg", text)
    return _make


# ----------------------------------------------------------------------------------- defaults

def test_defaults_are_the_option_table():
    cfg = load_config()
    assert set(cfg.to_dict()) == set(SECTIONS)
    for opt in OPTIONS:
        assert cfg[opt.section][opt.name] == opt.default, opt.key
    assert cfg.get("solutions", "ndir") == 45
    assert cfg.get("control", "restart") is True
    assert cfg.get("data", "mslist") is None
    assert cfg.get("masking", "thresholds") == [15, 10, 10, 5]
    assert cfg.origins == {} and cfg.files == ()


def test_defaults_are_not_shared_between_loads():
    first = load_config()
    first["solutions"]["NIterKF"].append(99)
    assert load_config().get("solutions", "NIterKF") == [1, 1, 1, 1, 6, 1, 6]
    assert lookup("solutions", "NIterKF").default == [1, 1, 1, 1, 6, 1, 6]


def test_get_unknown_option_raises_keyerror():
    with pytest.raises(KeyError):
        load_config().get("control", "no_such_option")


# ------------------------------------------------------------------------------ full config

def test_full_tier1_style_config(cfg_file):
    cfg = load_config([cfg_file(FULL_CFG)], catalog_dir="/cats")
    v = cfg.to_dict()
    assert v["machine"] == {"NCPU_DDF": 32, "NCPU_killms": 16}
    assert v["data"]["colname"] == "DATA"
    assert v["solutions"]["NChanSols"] is None
    assert v["solutions"]["dt_slow"] == 1.0 and isinstance(v["solutions"]["dt_slow"], float)
    assert v["solutions"]["do_very_slow"] is False
    assert v["solutions"]["NIterKF"] == [6] * 7
    assert v["solutions"]["normalize"] == ["None", "None", "None"]  # strings, as ddf-pipeline
    assert v["solutions"]["uvmin"] == pytest.approx(0.1)
    assert v["solutions"]["apply_sols"] == ["P"] + ["AP"] * 6  # a tuple literal is a list
    assert v["image"]["cleanmode"] == "WSCMS2"
    assert v["image"]["robust"] == pytest.approx(-0.2)
    assert v["image"]["final_psf_pa_deg"] == 90.0 and isinstance(v["image"]["final_psf_pa_deg"], float)
    assert v["image"]["apply_weights"] == [False, True, True, True]
    centralfreqs = v["image"]["centralfreqs"]
    assert centralfreqs == [128.0, 143.7, 160.2] and all(isinstance(f, float) for f in centralfreqs)
    assert v["image"]["wscms_scales"] == [0.0, 4.0, 8.0, 16.0]
    assert v["masking"]["thresholds"] == [15.0, 5.0, 5.0, 5.0]
    assert v["masking"]["tgss"] == "/cats/TGSSADR1_7sigma_catalog.fits"
    assert v["masking"]["rmsfacet"] is True
    assert v["control"]["bootstrap"] is True
    assert v["control"]["exitafter"] == "ampphase"
    assert v["control"]["redo_DI_type"] == "TGSS"
    assert v["bootstrap"]["catalogues"] == ["/cats/VLSS.fits", "/cats/wenss.fits"]
    assert v["bootstrap"]["groups"] == [1, 2]
    assert v["bootstrap"]["frequencies"] == [74e6, 327e6]
    assert v["compression"] == {"compress_polcubes": False, "fpack_q": 8,
                                "delete_compressed": False, "compress_ms": True}
    assert v["offsets"] == {"method": None, "fit": "chi2", "mode": "normal", "catalogue": None}
    assert v["spectra"]["bright_threshold"] == 2.0
    assert v["inputmodel"]["basedicomodel"] is None
    # options not in the file keep their defaults
    assert v["solutions"]["LambdaKF"] == 0.5
    assert cfg.origins[("image", "imsize")] == cfg.files[0]
    assert ("image", "cellsize") not in cfg.origins


# ----------------------------------------------------------------------- production configs

@pytest.mark.parametrize("name", PRODUCTION)
def test_production_configs_load_unchanged(data_dir: Path, name: str):
    cfg = load_config([str(data_dir / name)], catalog_dir="/cat")
    assert cfg.get("data", "mslist") == "mslist.txt"
    assert cfg.get("data", "full_mslist") == "big-mslist.txt"
    assert cfg.get("solutions", "NIterKF") == [6, 6, 6, 6, 6, 6, 6]
    assert all(type(n) is int for n in cfg.get("solutions", "NIterKF"))
    assert cfg.get("solutions", "normalize") == ["None", "None", "None"]
    assert cfg.get("image", "low_psf_arcsec") == 20.0
    assert cfg.get("image", "low_imsize") == 6000
    assert cfg.get("masking", "extended_size") == 2000
    assert cfg.get("control", "polcubes") is True
    freqs = cfg.get("bootstrap", "frequencies")
    assert freqs[:2] == [74e6, 327e6] and all(isinstance(f, float) for f in freqs)


def test_tier1_sep2024_values(data_dir: Path):
    cfg = load_config([str(data_dir / "tier1-sep2024.cfg")], catalog_dir="/srv/cat")
    assert cfg.get("offsets", "method") is None
    assert cfg.get("control", "bootstrap") is True
    assert cfg.get("control", "clearcache") is False
    assert cfg.get("control", "spectral_restored") is False
    assert cfg.get("masking", "thresholds") == [15.0, 5.0, 5.0, 5.0]
    assert all(isinstance(t, float) for t in cfg.get("masking", "thresholds"))
    assert cfg.get("masking", "rmsfacet") is True
    assert cfg.get("masking", "tgss") == "/srv/cat/TGSSADR1_7sigma_catalog.fits"
    assert cfg.get("bootstrap", "catalogues") == ["/srv/cat/VLSS.fits", "/srv/cat/wenss.fits"]
    assert cfg.get("bootstrap", "names") == ["VLSS", "WENSS"]
    assert cfg.get("bootstrap", "radii") == [40.0, 10.0]
    assert cfg.get("bootstrap", "groups") is None  # not in the file: the default
    assert cfg.get("solutions", "ndir") == 45
    assert cfg.get("solutions", "dt_di") is None
    assert cfg.get("image", "robust") == -0.15
    assert cfg.get("compression", "compress_polcubes") is True
    assert cfg.get("compression", "compress_ms") is True
    assert cfg.get("data", "colname") == "CORRECTED_DATA"


def test_tier1_jul2018_values(data_dir: Path):
    cfg = load_config([str(data_dir / "tier1-jul2018.cfg")], catalog_dir="/srv/cat")
    assert cfg.get("masking", "thresholds") == [15.0, 5.0, 5.0, 5.0]
    assert cfg.get("offsets", "method") == "panstarrs"
    assert cfg.get("control", "bootstrap") is True
    assert cfg.get("solutions", "dt_di") == 0.2
    assert cfg.get("spectra", "do_dynspec") is True
    assert cfg.get("control", "clearcache") is True  # not in the file: the default
    assert cfg.get("bootstrap", "catalogues") == ["/srv/cat/VLSS.fits", "/srv/cat/wenss.fits"]


def test_lgps_values(data_dir: Path):
    cfg = load_config([str(data_dir / "lgps_optimized.cfg")])
    assert cfg.get("offsets", "method") is None
    assert cfg.get("control", "bootstrap") is False
    assert cfg.get("data", "colname") == "DATA"
    assert cfg.get("image", "cleanmode") == "WSCMS2"
    assert cfg.get("image", "do_wide") is True
    assert cfg.get("image", "wide_cell") == 10.0
    assert cfg.get("image", "wscms_scales") == [0, 4, 8, 16, 32, 64, 128, 256, 512]
    assert all(isinstance(s, float) for s in cfg.get("image", "wscms_scales"))
    assert cfg.get("image", "wscms_peakfactor") == [0.1, 0.01, 0.01, 0.001]
    assert cfg.get("image", "final_psf_minor_arcsec") == 8.0
    assert cfg.get("image", "final_psf_pa_deg") == 90.0
    assert cfg.get("masking", "wscms_automask_rms_factor") == [8.0, 6.0, 5.0, 4.0]
    assert cfg.get("masking", "thresholds") == [15, 10, 10, 5]  # not in the file: default
    assert cfg.get("masking", "tgss") == "TGSSADR1_7sigma_catalog.fits"
    assert cfg.get("bootstrap", "groups") == [1, 2, 2]
    assert all(type(g) is int for g in cfg.get("bootstrap", "groups"))
    assert cfg.get("bootstrap", "frequencies") == [74e6, 327e6, 1400e6]
    assert cfg.get("bootstrap", "names") == ["VLSS", "WENSS", "NVSS"]
    assert cfg.get("solutions", "ndir") == 40
    assert cfg.get("compression", "compress_ms") is False


@pytest.mark.parametrize("name", PRODUCTION)
def test_cfg_text_round_trip(data_dir: Path, tmp_path: Path, name: str):
    cfg = load_config([str(data_dir / name)], ["--control-exitafter=phase"], catalog_dir="/c")
    again = load_config([write(tmp_path / "out.cfg", cfg.to_cfg_text())])
    assert again.to_dict() == cfg.to_dict()


def test_cfg_text_round_trip_of_defaults(tmp_path: Path):
    cfg = load_config()
    assert load_config([write(tmp_path / "d.cfg", cfg.to_cfg_text())]).to_dict() == cfg.to_dict()


def test_format_value():
    assert format_value(None) == "None"
    assert format_value(True) == "True"
    assert format_value([1, "a"]) == "[1, 'a']"
    assert format_value(1.5) == "1.5"


# -------------------------------------------------------------------------- layering order

def test_later_files_beat_earlier(cfg_file):
    a = cfg_file("[solutions]\nndir = 10\ndt_slow = 2.0\n")
    b = cfg_file("[solutions]\nndir = 20\n")
    cfg = load_config([a, b])
    assert cfg.get("solutions", "ndir") == 20
    assert cfg.get("solutions", "dt_slow") == 2.0  # only in a: kept
    assert cfg.origins[("solutions", "ndir")] == b
    assert cfg.origins[("solutions", "dt_slow")] == a
    assert load_config([b, a]).get("solutions", "ndir") == 10
    assert cfg.files == (a, b)


def test_overrides_beat_files_and_later_overrides_win(cfg_file):
    a = cfg_file("[solutions]\nndir = 10\n[control]\nrestart = True\n")
    cfg = load_config([a], ["--solutions-ndir=30", "--control-restart=False",
                            "--solutions-ndir=40"])
    assert cfg.get("solutions", "ndir") == 40
    assert cfg.get("control", "restart") is False
    assert cfg.origins[("solutions", "ndir")] == "--solutions-ndir"


def test_override_objects_and_strings_mix(cfg_file):
    cfg = load_config([], [Override("image", "imsize", "100"), "--image-imsize=200"])
    assert cfg.get("image", "imsize") == 200


def test_option_names_are_case_insensitive(cfg_file):
    a = cfg_file("[machine]\nncpu_ddf = 12\nNCPU_KILLMS = 6\n[solutions]\nniterkf = [2,2]\n")
    cfg = load_config([a])
    assert cfg["machine"]["NCPU_DDF"] == 12
    assert cfg["machine"]["NCPU_killms"] == 6
    assert cfg.get("machine", "ncpu_ddf") == 12
    assert cfg.get("solutions", "NIterKF") == [2, 2]
    assert "ncpu_ddf" not in cfg["machine"]
    over = load_config([a], ["--machine-ncpu_ddf=24", "--machine-NCPU_DDF=48"])
    assert over["machine"]["NCPU_DDF"] == 48


def test_an_option_given_twice_in_one_file_is_refused(cfg_file):
    # Python 3's ConfigParser (ddf-pipeline's) is strict: it refuses the file rather than
    # silently taking one of the two values
    with pytest.raises(ConfigError, match="option 'imsize' in section 'image' already exists"):
        load_config([cfg_file("[image]\nimsize=1\nimsize=2\n")])
    # across files, later files still win
    assert load_config([cfg_file("[image]\nimsize=1\n"), cfg_file("[image]\nimsize=2\n")]).get("image", "imsize") == 2


# ------------------------------------------------------------------------------ every type

@pytest.mark.parametrize("section,name,text,expected", [
    ("solutions", "ndir", "12", 12),
    ("solutions", "ndir", " 7 ", 7),
    ("solutions", "dt_slow", "2", 2.0),
    ("solutions", "dt_slow", "1.", 1.0),
    ("bootstrap", "frequencies", "[1.4e9]", [1.4e9]),
    ("control", "restart", "True", True),
    ("control", "restart", "false", False),
    ("control", "restart", "1", True),
    ("control", "restart", "no", False),
    ("control", "restart", "ON", True),
    ("control", "restart", "off", False),
    ("data", "colname", "DATA", "DATA"),
    ("masking", "tgss", "/a/b c.fits", "/a/b c.fits"),
    ("control", "exitafter", "fulllow", "fulllow"),
    ("offsets", "fit", "chi2", "chi2"),
    ("solutions", "NIterKF", "[1, 2, 3]", [1, 2, 3]),
    ("solutions", "NIterKF", "(4, 5)", [4, 5]),
    ("solutions", "NIterKF", "[]", []),
    ("masking", "thresholds", "[15, 7.5]", [15.0, 7.5]),
    ("bootstrap", "names", "['A', \"B\"]", ["A", "B"]),
    ("image", "apply_weights", "[True, False]", [True, False]),
    ("bootstrap", "groups", "[1, None]", [1, None]),
])
def test_every_type_converts(section, name, text, expected):
    value = load_config([], [f"--{section}-{name}={text}"]).get(section, name)
    assert value == expected
    assert type(value) is type(expected)
    if isinstance(expected, list):
        assert [type(v) for v in value] == [type(v) for v in expected]


@pytest.mark.parametrize("section,name", [
    ("solutions", "ndir"), ("solutions", "dt_slow"), ("control", "restart"),
    ("data", "colname"), ("solutions", "NIterKF"), ("control", "exitafter"),
])
def test_none_means_none_for_every_type(cfg_file, section, name):
    assert load_config([], [f"--{section}-{name}=None"]).get(section, name) is None
    assert load_config([cfg_file(f"[{section}]\n{name} = None\n")]).get(section, name) is None


# ------------------------------------------------------------------------------ bad input

def raises_config(match: str, *needles: str):
    """A ConfigError whose message matches ``match`` and whose full text names each needle."""
    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(ConfigError, match=match)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *exc):
            ok = self.cm.__exit__(*exc)
            err = self.info.value
            text = str(err)
            assert "\n" not in text, text
            for n in needles:
                assert n in text, (n, text)
            assert err.exit_code == ExitCode.CONFIG
            return ok
    return _Ctx()


def test_missing_cfg(tmp_path: Path):
    missing = tmp_path / "nope.cfg"
    with raises_config("does not exist", str(missing), "fix: check the path"):
        load_config([str(missing)])


def test_cfg_that_is_a_directory(tmp_path: Path):
    with raises_config("is a directory", str(tmp_path)):
        load_config([str(tmp_path)])


def test_unreadable_cfg(cfg_file, monkeypatch: pytest.MonkeyPatch):
    path = cfg_file("[data]\nmslist=x\n")
    if os.geteuid() == 0:  # root reads anything: make access() answer as for a normal user
        real = os.access
        monkeypatch.setattr(os, "access",
                            lambda p, m, **kw: False if str(p) == path else real(p, m, **kw))
    os.chmod(path, 0)
    with raises_config("is not readable", path, f"chmod u+r {path}"):
        load_config([path])


@pytest.mark.parametrize("text,needle", [
    ("mslist = x\n", "no section headers"),
    ("[data\nmslist = x\n", "no section headers"),
    ("[data]\nmslist\n", "[line  2]: 'mslist"),
    ("[data]\n  = x\n", "[line  2]"),
])
def test_cfg_syntax_error(cfg_file, text, needle):
    path = cfg_file(text)
    with raises_config("syntax error", path, needle, "fix:"):
        load_config([path])


def test_binary_cfg(tmp_path: Path):
    path = tmp_path / "bin.cfg"
    path.write_bytes(b"\xff\xfe\x00[data]\x00\x9c")
    with raises_config("is not text", str(path)):
        load_config([str(path)])


def test_unknown_section_names_the_closest(cfg_file):
    path = cfg_file("[contrl]\nrestart = True\n")
    with raises_config(r"unknown section \[contrl\]", path, "did you mean [control]?"):
        load_config([path])
    with raises_config(r"unknown section \[Control\]", "did you mean [control]?"):
        load_config([cfg_file("[Control]\nrestart = True\n")])


def test_unknown_section_without_close_match_lists_sections(cfg_file):
    with raises_config(r"unknown section \[zzzzqqq\]", "valid sections: machine, data"):
        load_config([cfg_file("[zzzzqqq]\nx = 1\n")])


def test_unknown_option_names_the_closest(cfg_file):
    path = cfg_file("[control]\nrestrt = True\n")
    with raises_config("unknown option 'restrt' in \\[control\\]", path, "did you mean 'restart'?"):
        load_config([path])


def test_option_in_the_wrong_section_says_where_it_belongs(cfg_file):
    with raises_config("unknown option 'mslist' in \\[control\\]", "mslist belongs in [data]"):
        load_config([cfg_file("[control]\nmslist = x\n")])


def test_unknown_override_section_and_option():
    with raises_config(r"unknown section \[imag\]", "--imag-imsize", "did you mean [image]?"):
        load_config([], ["--imag-imsize=10"])
    with raises_config("unknown option 'imsze'", "--image-imsze", "did you mean 'imsize'?"):
        load_config([], ["--image-imsze=10"])


@pytest.mark.parametrize("override,needles", [
    ("--solutions-ndir=ten", ("ndir", "'ten'", "an integer")),
    ("--solutions-ndir=4.5", ("ndir", "'4.5'", "an integer")),
    ("--solutions-ndir=", ("ndir", "an integer")),
    ("--solutions-dt_slow=fast", ("dt_slow", "'fast'", "a number")),
    ("--control-restart=maybe", ("restart", "not a boolean", "True or False")),
    ("--control-restart=2", ("restart", "True or False")),
    ("--solutions-NIterKF=[1, 'a']", ("NIterKF", "element 'a' is not int", "list literal of int")),
    ("--solutions-NIterKF=[1.5]", ("NIterKF", "element 1.5 is not int")),
    ("--solutions-NIterKF=[True]", ("NIterKF", "element True is not int")),
    ("--masking-thresholds=['5']", ("thresholds", "is not float")),
    ("--bootstrap-names=[1]", ("names", "is not str")),
    ("--image-apply_weights=[1, 0]", ("apply_weights", "is not bool")),
    ("--masking-thresholds=5", ("thresholds", "not a list literal")),
    ("--masking-thresholds='[5]'", ("thresholds", "not a list literal")),
    ("--masking-thresholds=[5", ("thresholds", "not a list literal")),
    ("--masking-thresholds=[[5]]", ("thresholds", "is not float")),
    ("--control-exitafter=phse", ("exitafter", "not a valid choice", "use one of cleanup, initial")),
    ("--offsets-fit=MCMC", ("fit", "not a valid choice", "mcmc, chi2")),
])
def test_wrong_type(override, needles):
    with raises_config(".", override.split("=")[0], *needles):
        load_config([], [override])


def test_wrong_type_in_file_names_the_file(cfg_file):
    path = cfg_file("[image]\nimsize = big\n")
    with raises_config("imsize", path, "'big'", "imsize must be an integer"):
        load_config([path])


@pytest.mark.parametrize("payload", [
    "__import__('os').system('touch {x}')",
    "[__import__('os').system('touch {x}')]",
    "(lambda: open('{x}', 'w'))()",
    "[open('{x}', 'w')]",
    "[1, 2] + [__import__('pathlib').Path('{x}').touch()]",
])
def test_list_is_never_evaluated(cfg_file, tmp_path: Path, payload: str):
    marker = tmp_path / "PWNED"
    value = payload.format(x=marker)
    path = cfg_file(f"[masking]\nthresholds={value}\n")
    with raises_config("not a list literal", "thresholds"):
        load_config([path])
    with raises_config("not a list literal"):
        load_config([], [f"--masking-thresholds={value}"])
    assert not marker.exists()


def test_deeply_nested_list_is_an_error_not_a_crash():
    with raises_config("not a list literal|is not float"):
        load_config([], ["--masking-thresholds=" + "[" * 5000 + "]" * 5000])


@pytest.mark.parametrize("arg", ["--control", "--control-restart", "-control-restart=1",
                                 "--=1", "control-restart=1"])
def test_unparseable_override(arg):
    with raises_config("cannot parse option", "--section-option=value"):
        parse_override(arg)
    assert not is_override(arg)


def test_parse_override():
    assert parse_override("--control-restart=False") == Override("control", "restart", "False")
    assert parse_override("--image-final_psf_arcsec = 6") == Override("image", "final_psf_arcsec", "6")
    assert parse_override("--masking-tgss=a=b") == Override("masking", "tgss", "a=b")
    assert is_override("--control-restart=False")


def test_split_cli_args():
    files, overrides = split_cli_args(["a.cfg", "--control-restart=False", "b.cfg"])
    assert files == ["a.cfg", "b.cfg"]
    assert overrides == [Override("control", "restart", "False")]
    with raises_config("unknown option '-x'"):
        split_cli_args(["-x"])
    with raises_config("cannot parse option"):
        split_cli_args(["--json"])


def test_first_error_stops_loading(cfg_file):
    good = cfg_file("[image]\nimsize=5\n")
    with raises_config("unknown option"):
        load_config([good, cfg_file("[image]\nbogus_option_name=5\n")])


# ---------------------------------------------------------------------------- $$ catalogues

def test_catalog_token_expands_to_given_dir(data_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DDF_PIPELINE_CATALOGS", "/from/env")
    cfg = load_config([str(data_dir / "tier1-jul2018.cfg")], catalog_dir="/given")
    assert cfg.get("masking", "tgss") == "/given/TGSSADR1_7sigma_catalog.fits"
    assert uses_catalog_token(cfg) == []


def test_catalog_token_from_environment(data_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("DDF_PIPELINE_CATALOGS", "/from/env")
    cfg = load_config([str(data_dir / "tier1-jul2018.cfg")])
    assert cfg.get("masking", "tgss") == "/from/env/TGSSADR1_7sigma_catalog.fits"
    assert cfg.get("bootstrap", "catalogues") == ["/from/env/VLSS.fits", "/from/env/wenss.fits"]


def test_catalog_token_left_alone_without_a_dir(data_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DDF_PIPELINE_CATALOGS", raising=False)
    cfg = load_config([str(data_dir / "tier1-jul2018.cfg")])
    assert cfg.get("masking", "tgss") == "$$/TGSSADR1_7sigma_catalog.fits"
    assert cfg.get("bootstrap", "catalogues") == ["$$/VLSS.fits", "$$/wenss.fits"]
    # and the dynamic spectra's target catalogue (hpcddf's [spectra] catalogue, $$ by default),
    # which tier1 reads because it makes dynamic spectra; with them off it is not in use
    assert uses_catalog_token(cfg) == ["[masking] tgss", "[bootstrap] catalogues", "[spectra] catalogue"]
    off = load_config([str(data_dir / "tier1-jul2018.cfg")], ["--spectra-do_dynspec=False"])
    assert uses_catalog_token(off) == ["[masking] tgss", "[bootstrap] catalogues"]


def test_catalog_token_in_override(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("DDF_PIPELINE_CATALOGS", raising=False)
    cfg = load_config([], ["--masking-region=$$/r.reg"], catalog_dir="/c")
    assert cfg.get("masking", "region") == "/c/r.reg"
