"""The stage plan: which stages and steps a configuration gives, their resources and chaining."""

from __future__ import annotations

from pathlib import Path

import pytest

from hpcddf.engine.plan import chains
from hpcddf.engine.sites import load_site, load_site_file
from hpcddf.errors import ConfigError, FieldError, PlanError
from hpcddf.lofar.config import load_config
from hpcddf.lofar.plan import plan_reduction
from hpcddf.lofar.prepare import DEFAULT_LISTS, dry_run_document, field_config, prepare
from hpcddf.lofar.steps import STAGES, STEP_NAMES, STEPS

pytestmark = pytest.mark.usefixtures("isolated_env")

ALL_STAGES = ["initial", "dirin", "dirin_di", "bootstrap", "phase", "ampphase", "ampphase_di",
              "fullampphase", "fulllow", "final"]
DI_STEPS = {"DIS0", "image_dirin_SSD_m_c_di", "image_dirin_SSD_m_c_di_m", "Predict_DI1", "DIS1",
            "image_ampphase1_di", "Predict_DDS2", "DIS2_full"}
CAT = "/srv/catalogues"


@pytest.fixture
def site(site_file: Path):
    return load_site_file(site_file)


@pytest.fixture
def cat_site(write_site):
    return load_site_file(write_site("catsite", catalog_dir=CAT))


@pytest.fixture
def plan_of(site, data_dir: Path):
    """plan_of("tier1-sep2024.cfg", "--control-x=y", ...) -> Plan (None: the submit defaults)."""
    def _plan(cfg_name: str | None = None, *overrides: str):
        files = [str(data_dir / cfg_name)] if cfg_name else []
        extra = [] if cfg_name else [f"--{o.section}-{o.name}={o.value}" for o in DEFAULT_LISTS]
        cfg = load_config(files, extra + list(overrides), catalog_dir=CAT)
        return plan_reduction(cfg, site, "L123456")
    return _plan


def names(plan) -> list[str]:
    return [s.name for s in plan.stages]


def all_steps(plan) -> list[str]:
    return [step for s in plan.stages for step in s.steps]


def where(plan, step: str) -> str:
    return next(s.name for s in plan.stages if step in s.steps)


def check_invariants(plan, cfg) -> None:
    """Every enabled step exactly once, in table order; stages in order, each after the last."""
    enabled = [s.name for s in STEPS if s.enabled(cfg)]
    assert all_steps(plan) == enabled
    assert [STAGES.index(n) for n in names(plan)] == sorted(STAGES.index(n) for n in names(plan))
    for prev, stage in zip((None, *plan.stages), plan.stages):
        assert stage.depends_on == ((prev.name,) if prev else ())
        assert stage.steps, stage.name


# ------------------------------------------------------------------------------- shapes

def test_default_config_plan(plan_of):
    plan = plan_of(None)
    assert names(plan) == ["initial", "dirin", "dirin_di", "phase", "ampphase", "ampphase_di",
                           "fullampphase", "final"]
    # bootstrap is off: DDS0 joins the phase stage, ahead of image_phase1
    assert plan.stage("phase").steps == ("DDS0", "image_phase1")
    assert "bootstrap" not in all_steps(plan)
    # no low-resolution image: the fulllow steps run in the final stage
    assert plan.stage("final").steps[:3] == ("image_full_ampphase_di_m", "DDS3_full",
                                             "DDS3_full_slow")
    assert "image_full_low" not in all_steps(plan)
    assert plan.stage("final").steps[-1] == "summary"
    assert plan.stage("initial").steps == ("image_dirin_SSD_init", "external_mask",
                                           "image_dirin_SSD", "mask_diffuse", "image_dirin_SSD_m")


def test_tier1_sep2024_has_all_ten_stages(plan_of):
    plan = plan_of("tier1-sep2024.cfg")
    assert names(plan) == ALL_STAGES
    assert plan.stage("bootstrap").steps == ("DDS0", "bootstrap")
    assert plan.stage("phase").steps == ("image_phase1",)
    assert plan.stage("fulllow").steps[-4:] == ("image_full_low", "image_full_low_im", "image_full_low_m",
                                                "external_mask_ext_deep")
    assert "extended_mask" in plan.stage("fullampphase").steps
    final = plan.stage("final").steps
    assert {"polcubes", "stokesv", "dynspec", "compress_ms", "summary"} <= set(final)
    assert "offsets" not in final and "spectral_restored" not in final  # method=None
    assert "image_full_wide" not in all_steps(plan)


def test_tier1_jul2018_plan(plan_of):
    plan = plan_of("tier1-jul2018.cfg")
    assert names(plan) == ALL_STAGES
    assert "offsets" in plan.stage("final").steps  # method=panstarrs
    assert "compress_ms" not in plan.stage("final").steps


def test_lgps_plan_has_no_bootstrap_stage(plan_of):
    plan = plan_of("lgps_optimized.cfg")
    assert names(plan) == [n for n in ALL_STAGES if n != "bootstrap"]
    assert plan.stage("initial").steps[0] == "image_full_wide"  # do_wide=True
    assert plan.stage("phase").steps == ("DDS0", "image_phase1")
    assert "extended_mask" not in all_steps(plan)  # needs bootstrap


def test_no_full_mslist_ends_at_ampphase_di(plan_of):
    plan = plan_of("tier1-sep2024.cfg", "--data-full_mslist=None")
    assert names(plan) == ALL_STAGES[:7]
    assert plan.stages[-1].steps[-1] == "summary"
    assert not {"DDS2_full", "image_full_low", "image_full_ampphase_di_m.NS"} & set(all_steps(plan))


def test_skip_di_removes_di_stages_and_steps(plan_of):
    plan = plan_of("tier1-sep2024.cfg", "--control-skip_di=True")
    assert names(plan) == [n for n in ALL_STAGES if n not in ("dirin_di", "ampphase_di")]
    assert not DI_STEPS & set(all_steps(plan))
    full = plan_of("tier1-sep2024.cfg")
    assert DI_STEPS <= set(all_steps(full))
    assert where(full, "DIS0") == "dirin_di" and where(full, "DIS1") == "ampphase_di"


def test_skip_di_without_full_mslist(plan_of):
    plan = plan_of(None, "--control-skip_di=True", "--data-full_mslist=None")
    assert names(plan) == ["initial", "dirin", "phase", "ampphase"]
    assert plan.stage("ampphase").steps[-1] == "summary"


@pytest.mark.parametrize("stop,last", [
    ("initial", "initial"), ("dirin", "dirin"), ("phase", "phase"), ("ampphase_di", "ampphase_di"),
    ("fulllow", "fulllow"), ("bootstrap", "bootstrap"),
])
def test_exitafter_truncates(plan_of, stop, last):
    plan = plan_of("tier1-sep2024.cfg", f"--control-exitafter={stop}")
    assert names(plan) == ALL_STAGES[:ALL_STAGES.index(last) + 1]
    assert "summary" not in all_steps(plan)


def test_exitafter_phase_without_bootstrap_keeps_dds0(plan_of):
    plan = plan_of(None, "--control-exitafter=phase")
    assert names(plan)[-1] == "phase"
    assert plan.stages[-1].steps == ("DDS0", "image_phase1")


def test_exitafter_cleanup_plans_nothing(plan_of):
    assert plan_of(None, "--control-exitafter=cleanup").stages == ()


def test_exitafter_a_stage_this_config_does_not_have(plan_of):
    with pytest.raises(PlanError, match="exitafter=bootstrap is not a stage") as info:
        plan_of(None, "--control-exitafter=bootstrap")
    assert "use one of initial, dirin" in str(info.value)
    with pytest.raises(PlanError, match="exitafter=fulllow"):
        plan_of(None, "--control-exitafter=fulllow")


# a previous run's model and everything that goes with it (ddf-pipeline's tier1-rerun.cfg)
INPUTMODEL = ("--inputmodel-basedicomodel=prev/image_full_ampphase_di_m", "--image-clusterfile=prev/cat.npy",
              "--inputmodel-baseimagename=prev/image_full_ampphase_di_m",
              "--inputmodel-basemaskname=prev/image_full_ampphase_di_m.mask.fits")


def test_input_model_starts_at_fullampphase(plan_of):
    plan = plan_of("tier1-sep2024.cfg", *INPUTMODEL)
    assert names(plan) == ["fullampphase", "fulllow", "final"]
    assert plan.stages[0].steps[0] == "DDS2_full"
    assert plan.stages[0].depends_on == ()


def test_input_model_without_full_mslist_is_an_error(plan_of):
    with pytest.raises(PlanError, match="leaves no stage to run"):
        plan_of(None, *INPUTMODEL, "--data-full_mslist=None")


def test_input_model_without_its_mask_image_or_clusters_is_refused(plan_of):
    with pytest.raises(PlanError, match=r"basedicomodel is set but \[inputmodel\] basemaskname is not"):
        plan_of(None, *INPUTMODEL[:3])


def test_no_mslist_is_an_error(site):
    with pytest.raises(PlanError, match=r"\[data\] mslist is not set") as info:
        plan_reduction(load_config(), site, "L1")
    assert "mslist=mslist.txt" in str(info.value)


@pytest.mark.parametrize("cfg_name,overrides", [
    (None, ()),
    ("tier1-sep2024.cfg", ()),
    ("tier1-jul2018.cfg", ("--control-skip_di=True",)),
    ("lgps_optimized.cfg", ("--data-full_mslist=None",)),
    ("lgps_optimized.cfg", ("--control-redo_DI=True", "--control-spectral_restored=True")),
    ("tier1-sep2024.cfg", (*INPUTMODEL, "--solutions-do_very_slow=False")),
    (None, ("--image-low_psf_arcsec=20", "--control-bootstrap=True")),
])
def test_every_enabled_step_once_in_order(site, data_dir, cfg_name, overrides):
    files = [str(data_dir / cfg_name)] if cfg_name else []
    extra = [] if cfg_name else ["--data-mslist=mslist.txt", "--data-full_mslist=big-mslist.txt"]
    cfg = load_config(files, extra + list(overrides), catalog_dir=CAT)
    check_invariants(plan_reduction(cfg, site, "L1"), cfg)


def test_step_table_is_consistent():
    assert len(set(STEP_NAMES)) == len(STEP_NAMES)
    assert all(s.stage in STAGES for s in STEPS)
    assert [STAGES.index(s.stage) for s in STEPS] == sorted(STAGES.index(s.stage) for s in STEPS)


# ------------------------------------------------------------------------------ resources

def test_resources_come_from_the_site(plan_of):
    plan = plan_of(None)
    for stage in plan.stages:
        r = stage.resources
        assert (r.cpus, r.mem_gb, r.walltime_min, r.exclusive) == (8, 32, 120, True)
        assert r.partition is None and r.account is None and r.qos is None
    d = plan.to_dict()
    assert d["field"] == "L123456" and d["site"] == "testsite"
    assert d["stages"][1]["depends_on"] == ["initial"]
    assert isinstance(d["stages"][0]["steps"], list)
    assert d["stages"][0]["resources"]["walltime_min"] == 120


def test_resources_of_a_cluster_site(data_dir: Path):
    cfg = load_config([str(data_dir / "tier1-sep2024.cfg")], catalog_dir=CAT)
    spider = plan_reduction(cfg, load_site("spider"), "L123456").stages[0].resources
    assert (spider.cpus, spider.mem_gb, spider.walltime_min) == (32, 256, 7200)
    assert spider.partition == "normal" and spider.account == "lofarsurveys"
    assert spider.extra == {"constraint": "skylake"}
    cosma = plan_reduction(cfg, load_site("cosma"), "L123456").stages[0].resources
    assert cosma.qos is None  # qos = "" in the site: the partition's default
    assert cosma.walltime_min == 72 * 60


def test_plan_shape_and_stage_lookup(plan_of):
    plan = plan_of("tier1-sep2024.cfg")
    assert plan.shape[0] == ("initial", plan.stages[0].steps)
    with pytest.raises(KeyError):
        plan.stage("nonexistent")


def test_chains_group_plans_of_the_same_shape(site, data_dir: Path):
    base = load_config([str(data_dir / "tier1-sep2024.cfg")], catalog_dir=CAT)
    other = load_config([str(data_dir / "tier1-sep2024.cfg")], ["--control-skip_di=True"],
                        catalog_dir=CAT)
    plans = [plan_reduction(base, site, "L1"), plan_reduction(other, site, "L2"),
             plan_reduction(base, site, "L3")]
    grouped = chains(plans)
    assert [[p.field for p in g] for g in grouped] == [["L1", "L3"], ["L2"]]


# ------------------------------------------------------------------ submit: several fields

def test_fields_with_the_same_config_make_one_chain(cat_site, data_dir: Path, work_root: Path,
                                                   tree):
    jobs = prepare(cat_site, ["L111111", "L222222", "L333333"],
                   [str(data_dir / "tier1-sep2024.cfg")], [], None)
    doc = dry_run_document(cat_site, jobs)
    assert doc["chains"] == 1
    assert doc["fields"] == ["L111111", "L222222", "L333333"]
    assert [s["name"] for s in doc["stages"]] == ALL_STAGES
    assert all(s["fields"] == ["L111111", "L222222", "L333333"] for s in doc["stages"])
    assert all(s["chain"] == 0 for s in doc["stages"])
    assert tree(work_root) == []  # planning writes nothing


def test_site_catalog_dir_expands_the_token(cat_site, data_dir: Path, monkeypatch):
    monkeypatch.delenv("DDF_PIPELINE_CATALOGS", raising=False)
    jobs = prepare(cat_site, ["L123456"], [str(data_dir / "tier1-sep2024.cfg")])
    assert jobs[0].config.get("masking", "tgss") == f"{CAT}/TGSSADR1_7sigma_catalog.fits"


def test_unexpanded_catalog_token_is_an_error(site, data_dir: Path, monkeypatch):
    monkeypatch.delenv("DDF_PIPELINE_CATALOGS", raising=False)
    with pytest.raises(ConfigError, match=r"\[masking\] tgss uses \$\$ but site testsite") as info:
        prepare(site, ["L123456"], [str(data_dir / "tier1-sep2024.cfg")])
    assert "catalog_dir" in str(info.value)
    monkeypatch.setenv("DDF_PIPELINE_CATALOGS", "/env/cat")
    jobs = prepare(site, ["L123456"], [str(data_dir / "tier1-sep2024.cfg")])
    assert jobs[0].config.get("masking", "tgss").startswith("/env/cat/")


def test_field_with_its_own_config_gets_its_own_chain(site, work_root: Path):
    own = work_root / "L222222"
    own.mkdir()
    (own / "hpcddf.cfg").write_text("[control]\nskip_di = True\n")
    jobs = prepare(site, ["L111111", "L222222", "L333333"])
    doc = dry_run_document(site, jobs)
    assert doc["chains"] == 2
    by_chain: dict[int, list] = {}
    for s in doc["stages"]:
        by_chain.setdefault(s["chain"], []).append(s)
    assert {tuple(v[0]["fields"]) for v in by_chain.values()} == {("L111111", "L333333"),
                                                                   ("L222222",)}
    chain_of = {tuple(v[0]["fields"]): k for k, v in by_chain.items()}
    assert chain_of[("L111111", "L333333")] != chain_of[("L222222",)]
    skip = by_chain[chain_of[("L222222",)]]
    assert "dirin_di" not in [s["name"] for s in skip]
    # the field's config only changed skip_di: it still uses the usual MS lists
    assert jobs[1].config.get("data", "mslist") == "mslist.txt"
    assert jobs[1].config.get("data", "full_mslist") == "big-mslist.txt"
    assert [s["name"] for s in skip][-1] == "final"
    for stages in by_chain.values():
        for prev, s in zip([None, *stages], stages):
            assert s["depends_on"] == ([prev["name"]] if prev else [])


def test_field_config_layering(site, tmp_path: Path, data_dir: Path):
    wd = tmp_path / "L1"
    wd.mkdir()
    (wd / "hpcddf.cfg").write_text("[data]\nmslist = own.txt\n[solutions]\nndir = 12\n")
    given = tmp_path / "given.cfg"
    given.write_text("[data]\nmslist = given.txt\nfull_mslist = big.txt\n[solutions]\nndir = 30\n")
    from hpcddf.lofar.config import parse_override
    cfg = field_config(site, wd, [str(given)], [parse_override("--solutions-ndir=99")])
    assert cfg.get("data", "mslist") == "own.txt"          # field config beats -c files
    assert cfg.get("data", "full_mslist") == "big.txt"
    assert cfg.get("solutions", "ndir") == 99              # overrides beat both
    # no -c file: the usual lists, unless the field config or an override sets them
    cfg = field_config(site, wd, [], [parse_override("--data-full_mslist=None")])
    assert cfg.get("data", "mslist") == "own.txt"
    assert cfg.get("data", "full_mslist") is None
    bare = field_config(site, tmp_path / "nothing", [], [])
    assert (bare.get("data", "mslist"), bare.get("data", "full_mslist")) == (
        "mslist.txt", "big-mslist.txt")


def test_prepare_rejects_bad_fields(site, work_root: Path, tree):
    with pytest.raises(FieldError, match="no field given"):
        prepare(site, [])
    with pytest.raises(FieldError, match="field L111111 is given twice"):
        prepare(site, ["L111111", "L222222", "L111111"])
    with pytest.raises(FieldError, match="path separator"):
        prepare(site, ["L111111", "../L222222"])
    assert tree(work_root) == []


def test_prepare_checks_the_work_root(site, tmp_path: Path):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(FieldError, match="is not writable"):
        prepare(site, ["L111111"], work_root=blocker / "fields")
