"""The DDFacet/killMS reduction: every step of ddf-pipeline's sequence as a declared Step.

Each builder returns the step's commands (argv lists from the configuration), the outputs
that must exist for it to count as done, and the parameters its done-marker records. Image
and solution names are ddf-pipeline's, so ``image_full_ampphase_di_m.NS.app.restored.fits``
is where users and their scripts expect it.

A step bundles everything ddf-pipeline ran inside one "not done yet" branch (kMS and its
ClipCal, DDF and the mask made from its image): the marker is written only after the last of
them, so a kill between two sub-commands reruns the whole step instead of skipping one.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from hpcddf.engine.paths import FROZEN_CONFIG_REL
from hpcddf.engine.runner import Command, Step
from hpcddf.errors import PlanError
from hpcddf.lofar.compress import archive_name
from hpcddf.lofar.config import PipelineConfig
from hpcddf.lofar.ddfcommands import (
    Image,
    Machine,
    Solve,
    clipcal,
    ddf_image,
    ddf_shift,
    dirty_of,
    hpcddf_tool,
    kms,
    make_mask,
    mask_dicomodel,
    sols_file,
)

# Steps whose builders are not written yet; submit refuses configs that switch them on.
UNSUPPORTED = {
    "redo_DI": "[control] redo_DI (DP3 against a downloaded sky model)",
    "image_full_wide": "[image] do_wide",
    "extended_mask": "[masking] extended_size (needs the bootstrap)",
    "spectral_restored": "[control] spectral_restored",
    "polcubes": "[control] polcubes",
    "stokesv": "[control] stokesv",
    "dynspec": "[spectra] do_dynspec",
}

CLUSTER_CAT = "image_dirin_SSD_m.npy.ClusterCat.npy"
EXT_MASK = "external_mask.fits"  # written only when something is masked: DDF refuses empty masks
EXT_MASK_RECORD = "external_mask.json"
DI_COL = "DATA_DI_CORRECTED"
SCALED_COL = "SCALED_DATA"


@dataclass(frozen=True)
class Reduction:
    """The configuration and node facts every step builder needs."""

    cfg: PipelineConfig
    m: Machine
    mss: tuple[str, ...]          # MSs of [data] mslist
    full_mss: tuple[str, ...]     # MSs of [data] full_mslist
    # which columns hold the data at this step (see columns_at): after the bootstrap the
    # calibration starts from SCALED_DATA, and until DIS1 rewrites DATA_DI_CORRECTED from it
    # the self-cal images image DATA_DI_CORRECTED_SCALED
    scaled: bool = False
    di_scaled: bool = False

    def get(self, section: str, name: str):
        return self.cfg.get(section, name)

    @property
    def mslist(self) -> str:
        return self.cfg.get("data", "mslist")

    @property
    def full_mslist(self) -> str:
        return self.cfg.get("data", "full_mslist") or self.mslist

    @property
    def col(self) -> str:
        """The column calibration starts from (the raw or, after bootstrap, scaled data)."""
        return SCALED_COL if self.scaled else self.cfg.get("data", "colname")

    @property
    def di(self) -> bool:
        return not self.cfg.get("control", "skip_di")

    @property
    def img_col(self) -> str:
        """What the self-cal images image once DI calibration has run."""
        if not self.di:
            return self.col
        return f"{DI_COL}_SCALED" if self.di_scaled else DI_COL

    def thr(self, i: int) -> float:
        t = self.cfg.get("masking", "thresholds")
        return float(t[min(i, len(t) - 1)])

    def weights(self, i: int) -> bool:
        w = self.cfg.get("image", "apply_weights")
        return bool(w[min(i, len(w) - 1)])

    def niterkf(self, i: int) -> int:
        n = self.cfg.get("solutions", "NIterKF")
        return int(n[min(i, len(n) - 1)])

    def apply(self, i: int) -> str:
        a = self.cfg.get("solutions", "apply_sols")
        return str(a[min(i, len(a) - 1)])

    def norm(self, i: int) -> str | None:
        """``[solutions] normalize[i]`` as DDFacet's GlobalNorm: [0] the self-cal images and
        predicts, [1] the full-bandwidth and final images, [2] the low-resolution ones. 'None'
        passes nothing; the old 'Abs...' spelling is DDFacet's 'MeanAbs...'."""
        n = self.cfg.get("solutions", "normalize") or [None]
        v = n[min(i, len(n) - 1)]
        if v in (None, "None", ""):
            return None
        return f"Mean{v}" if str(v).startswith("Abs") else str(v)

    def image(self, name: str, **kw) -> Image:
        kw.setdefault("mslist", self.mslist)
        kw.setdefault("colname", self.img_col)
        kw.setdefault("robust", self.get("image", "robust"))
        kw.setdefault("psf_arcsec", self.get("image", "psf_arcsec"))
        kw.setdefault("global_norm", self.norm(0))
        return Image(name=name, **kw)


def obsid_of(ms: str) -> str:
    """ddf-pipeline's observation id: the MS file name up to its first underscore."""
    return Path(ms).name.split("_", 1)[0]


def group_by_obsid(mss: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
    """The MSs of each observation, in list order (the bootstrap makes one cube per observation)."""
    groups: dict[str, list[str]] = {}
    for ms in mss:
        groups.setdefault(obsid_of(ms), []).append(ms)
    return groups


def check_inputs(cfg: PipelineConfig, step_names: list[str] | tuple[str, ...],
                 workdir: Path | None = None, pending: Collection[str] = ()) -> None:
    """Refuse, before anything is queued, a step whose external inputs are missing or wrong:
    the bootstrap's catalogues (files and PyBDSM columns) and the offsets' reference catalogue
    (``workdir``: the field directory a downloaded one lives in). ``pending`` catalogues are
    still to be downloaded (``--dry-run``): their files are not read."""
    try:  # the full check reads the tables (astropy); a bare login-node install checks the files
        from hpcddf.lofar.bootstrap import catalogues_from_config
        from hpcddf.lofar.offsets import reference_catalogue
    except ImportError:
        _files_exist(cfg, pending)
        return _check_quality(cfg, step_names)
    if "bootstrap" in step_names:
        catalogues_from_config(cfg, pending=pending)
    if "offsets" in step_names:
        reference_catalogue(cfg, workdir, pending)
    _check_quality(cfg, step_names)


def _check_quality(cfg: PipelineConfig, step_names: list[str] | tuple[str, ...]) -> None:
    if "quality" in step_names:
        try:
            from hpcddf.lofar.quality import check_comparisons, parse_comparison
        except ImportError:  # a bare login-node install: the node checks them
            return
        check_comparisons([parse_comparison(str(c)) for c in cfg.get("control", "quality")])


def _files_exist(cfg: PipelineConfig, pending: Collection[str] = ()) -> None:
    from hpcddf.errors import ConfigError
    paths = list(cfg.get("bootstrap", "catalogues") or []) + [cfg.get("offsets", "catalogue") or ""]
    for p in paths:
        if p and str(Path(str(p))) not in pending and not Path(str(p)).is_file():
            raise ConfigError(f"catalogue {p} does not exist", "fix the path in the config ($$ is the site's catalogue dir)")


def read_list(workdir: Path, name: str | None) -> tuple[str, ...]:
    """MS names from an MS list file (relative to the field directory)."""
    if not name:
        return ()
    path = workdir / name
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise PlanError(f"cannot read MS list {path}: {exc.strerror}",
                        "hpcddf submit writes it from the field's *.ms; check the field directory") from None
    return tuple(ln.strip() for ln in lines if ln.strip())


# ------------------------------------------------------------------------------ helpers

def _step(name: str, commands: list[Command], outputs: list[str], estimate_s: float,
          **params) -> Step:
    return Step(name=name, stage="", commands=tuple(commands), outputs=tuple(outputs),
                params=params, estimate_s=estimate_s)


def restored(name: str) -> str:
    return f"{name}.app.restored.fits"


def _masked(r: Reduction, name: str, threshold: float, merge_external: bool = True,
            dico: bool = True) -> list[Command]:
    """MakeMask on an image, OR'd with the external mask, then MaskDicoModel (ddf-pipeline's
    ``make_mask`` + ``merge_mask`` + ``mask_dicomodel``)."""
    cmds = [make_mask(r.m, restored(name), threshold, f"{name}.makemask.log")]
    sources = [f"{restored(name)}.mask.fits"] + (["--optional", EXT_MASK] if merge_external else [])
    cmds.append(hpcddf_tool(r.m, ["merge-masks", "--out", f"{name}.mask.fits", *sources],
                            f"{name}.mergemask.log"))
    if dico:
        cmds.append(mask_dicomodel(r.m, f"{name}.mask.fits", f"{name}.DicoModel",
                                   f"{name}_masked.DicoModel", f"{name}.maskdico.log"))
    return cmds


def _solve(r: Reduction, sols: str, mss: tuple[str, ...], solve: Solve, smooth: bool = True) -> tuple[list[Command], list[str]]:
    """killMS on every MS (+ ClipCal where a corrected column is written), then merge/smooth."""
    cmds, outs = [], []
    for ms in mss:
        cmds.append(kms(r.cfg, r.m, replace(solve, ms=ms, sols=sols), f"{sols}.{Path(ms).name}.kms.log"))
        if solve.di:
            cmds.append(clipcal(r.m, ms, DI_COL, f"{sols}.{Path(ms).name}.clipcal.log"))
        outs.append(sols_file(r.cfg, ms, sols))
    if smooth and r.get("solutions", "smoothing") and not solve.di:
        solsdir = r.get("solutions", "SolsDir")
        merged, smoothed = f"{sols}_merged.npz", f"{sols}_smoothed.npz"
        cmds += [Command(("MergeSols.py", f"--SolsFilesIn={solsdir}/*/killMS.{sols}.sols.npz",
                          f"--SolFileOut={solsdir}/{merged}"), f"{sols}.merge.log",
                         timeout_s=r.m.timeout_s),
                 Command(("SmoothSols.py", f"--SolsFileIn={solsdir}/{merged}",
                          f"--SolsFileOut={solsdir}/{smoothed}",
                          f"--InterpMode={r.get('solutions', 'smoothingtype')}",
                          f"--NCPU={r.m.ncpu_kms}"), f"{sols}.smooth.log", timeout_s=r.m.timeout_s),
                 hpcddf_tool(r.m, ["link-sols", "--solsdir", solsdir, "--sols", f"{sols}_smoothed",
                                   "--target", smoothed, *mss], f"{sols}.link.log")]
        outs += [sols_file(r.cfg, ms, f"{sols}_smoothed") for ms in mss]
    return cmds, outs


def applied(r: Reduction, sols: str) -> str:
    """The solution name DDF applies: the smoothed one when smoothing is on."""
    return f"{sols}_smoothed" if r.get("solutions", "smoothing") else sols


# ------------------------------------------------------------------------------ initial

def image_dirin_SSD_init(r: Reduction) -> Step:
    cmds = [hpcddf_tool(r.m, ["prepare-ms", "--colname", r.col, *sorted(set(r.mss + r.full_mss))],
                        "prepare-ms.log")]
    if r.get("control", "clearcache"):
        cmds.append(hpcddf_tool(r.m, ["clear-cache", "--cache-dir", r.m.cache_dir, r.mslist,
                                      r.full_mslist, *r.mss, *r.full_mss], "clear-cache.log"))
    cmds.append(ddf_image(r.cfg, r.m, dirty_of(r.image("image_dirin_SSD_init", colname=r.col))))
    return _step("image_dirin_SSD_init", cmds, ["image_dirin_SSD_init.dirty.fits"], 60)


def tgss_args(r: Reduction) -> list[str]:
    """The external-mask tool's TGSS and region arguments, the same for every external mask."""
    args: list[str] = []
    if r.get("masking", "tgss"):
        args += ["--tgss", r.get("masking", "tgss"), "--tgss-radius", str(r.get("masking", "tgss_radius")),
                 "--tgss-flux", str(r.get("masking", "tgss_flux"))]
        if r.get("masking", "tgss_extended"):
            args += ["--tgss-extended", "--tgss-pointlike", str(r.get("masking", "tgss_pointlike"))]
    if r.get("masking", "region"):
        args += ["--region", r.get("masking", "region")]
    return args


def external_mask(r: Reduction) -> Step:
    args = ["external-mask", "--template", "image_dirin_SSD_init.dirty.fits", "--out", EXT_MASK,
            "--record", EXT_MASK_RECORD, *tgss_args(r)]
    if r.get("masking", "external_fits_mask"):
        args += ["--fits", r.get("masking", "external_fits_mask")]
    return _step("external_mask", [hpcddf_tool(r.m, args, "external_mask.log")],
                 [EXT_MASK_RECORD], 10)


def image_dirin_SSD(r: Reduction) -> Step:
    img = r.image("image_dirin_SSD", colname=r.col, majorcycles=1, cleanmask=EXT_MASK, cleanmask_optional=True,
                  automask_sigma=r.thr(0), peakfactor=0.01, rms_factor=3, reuse_psf=True,
                  reuse_dirty="forcedirty")
    return _step("image_dirin_SSD", [ddf_image(r.cfg, r.m, img)], [restored("image_dirin_SSD")], 120)


def mask_diffuse(r: Reduction) -> Step:
    """MaskDiffuse from the first residual, and the first clean mask (T0 + external + diffuse)."""
    cmds = [make_mask(r.m, "image_dirin_SSD.residual01.fits",
                      r.get("masking", "thres_outmaskextended"), "mask_diffuse.makemask.log",
                      ["--OutMaskExtended=MaskDiffuse", "--OutNameNoiseMap=Noise"]),
            make_mask(r.m, restored("image_dirin_SSD"), r.thr(0), "image_dirin_SSD.makemask.log")]
    sources = [f"{restored('image_dirin_SSD')}.mask.fits", "--optional", EXT_MASK]
    if r.get("masking", "use_maskdiffuse"):  # MakeMask writes none when nothing is diffuse
        sources += ["--optional", "MaskDiffuse.fits"]
    cmds.append(hpcddf_tool(r.m, ["merge-masks", "--out", "image_dirin_SSD.mask.fits", *sources],
                            "image_dirin_SSD.mergemask.log"))
    return _step("mask_diffuse", cmds, ["image_dirin_SSD.mask.fits"], 30)


def image_dirin_SSD_m(r: Reduction) -> Step:
    img = r.image("image_dirin_SSD_m", colname=r.col, majorcycles=1,
                  cleanmask="image_dirin_SSD.mask.fits", automask_sigma=r.thr(0),
                  init_dico="image_dirin_SSD.DicoModel", reuse_psf=True,
                  reuse_dirty="forceresidual", predict_col="DD_PREDICT")
    return _step("image_dirin_SSD_m", [ddf_image(r.cfg, r.m, img)], [restored("image_dirin_SSD_m")], 120)


# ------------------------------------------------------------------------------ dirin

def cluster(r: Reduction) -> Step:
    """The calibration directions: a given clusterfile, ClusterCat, or hpcddf's small-field clustering."""
    user = r.get("image", "clusterfile")
    ndir = r.get("solutions", "ndir")
    if user:
        cmds = [hpcddf_tool(r.m, ["cluster", "--copy", user, "--out", CLUSTER_CAT], "cluster.log")]
    else:
        catalogue = "image_dirin_SSD_m.app.restored.pybdsf.srl.fits"
        cmds = [Command(("MakeCatalog.py", f"--RestoredIm={restored('image_dirin_SSD_m')}"),
                        "cluster.makecatalog.log", timeout_s=r.m.timeout_s)]
        if ndir >= 6:  # ClusterCat's tessellation fails below 6 clusters on small catalogues
            avoid = ["--AvoidPolygons", "MaskDiffuse.pickle"] if r.get("masking", "use_maskdiffuse") else []
            cmds.append(Command(("ClusterCat.py", "--SourceCat", catalogue, "--NGen", "100",
                                 "--NCluster", str(ndir), "--DoPlot=0", "--NCPU", str(r.m.ncpu_ddf),
                                 "--OutClusterCat", CLUSTER_CAT, *avoid),
                                "cluster.clustercat.log", timeout_s=r.m.timeout_s))
        else:
            cmds.append(hpcddf_tool(r.m, ["cluster", "--catalogue", catalogue, "--ndir", str(ndir),
                                          "--out", CLUSTER_CAT], "cluster.log"))
    return _step("cluster", cmds, [CLUSTER_CAT], 30, ndir=ndir)


def image_dirin_SSD_m_c(r: Reduction) -> Step:
    img = r.image("image_dirin_SSD_m_c", colname=r.col, majorcycles=1, clusterfile=CLUSTER_CAT,
                  cleanmask="image_dirin_SSD.mask.fits", automask_sigma=r.thr(0),
                  init_dico="image_dirin_SSD_m.DicoModel", predict_col="DD_PREDICT")
    cmds = [ddf_image(r.cfg, r.m, img)] + _masked(r, "image_dirin_SSD_m_c", r.thr(0))
    return _step("image_dirin_SSD_m_c", cmds, [restored("image_dirin_SSD_m_c"),
                                                "image_dirin_SSD_m_c_masked.DicoModel"], 150)


# ------------------------------------------------------------------------------ dirin_di

def di_solve(r: Reduction, **kw) -> Solve:
    """A DI solve: its time interval [solutions] dt_di, its channels [solutions] NChanSols, each
    worked out from the MS's data where the config leaves it None (ddf-pipeline's give_dt_dnu)."""
    dt = r.get("solutions", "dt_di")
    return Solve(ms="", sols="", colname=r.col, di=True, dt_min=dt or 0.0, auto_dt=dt is None,
                 auto_nchan=r.get("solutions", "NChanSols") is None, **kw)


def DIS0(r: Reduction) -> Step:
    cmds, outs = _solve(r, "DIS0", r.mss, di_solve(r))
    return _step("DIS0", cmds, outs, 60, dt_min=r.get("solutions", "dt_di") or "auto")


def image_dirin_SSD_m_c_di(r: Reduction) -> Step:
    img = r.image("image_dirin_SSD_m_c_di", majorcycles=1, clusterfile=CLUSTER_CAT,
                  cleanmask="image_dirin_SSD_m_c.mask.fits", automask_sigma=r.thr(1),
                  init_dico="image_dirin_SSD_m_c_masked.DicoModel", imaging_weights=r.weights(0))
    cmds = [ddf_image(r.cfg, r.m, img)] + _masked(r, "image_dirin_SSD_m_c_di", r.thr(1))
    return _step("image_dirin_SSD_m_c_di", cmds, [restored("image_dirin_SSD_m_c_di")], 150)


def image_dirin_SSD_m_c_di_m(r: Reduction) -> Step:
    """The last DI-only image: the self-calibration below is measured against it."""
    img = r.image("image_dirin_SSD_m_c_di_m", majorcycles=1, clusterfile=CLUSTER_CAT,
                  cleanmask="image_dirin_SSD_m_c_di.mask.fits", automask_sigma=r.thr(1),
                  init_dico="image_dirin_SSD_m_c_di_masked.DicoModel", reuse_psf=True,
                  imaging_weights=r.weights(0))
    cmds = [ddf_image(r.cfg, r.m, img)] + _masked(r, "image_dirin_SSD_m_c_di_m", r.thr(1))
    return _step("image_dirin_SSD_m_c_di_m", cmds, [restored("image_dirin_SSD_m_c_di_m"),
                                                     "image_dirin_SSD_m_c_di_m_masked.DicoModel"], 150)


def _last_di_image(r: Reduction) -> str:
    return "image_dirin_SSD_m_c_di_m" if r.di else "image_dirin_SSD_m_c"


# ------------------------------------------------------------------------------ self-cal on mslist

def DDS0(r: Reduction) -> Step:
    base = _last_di_image(r)
    solve = Solve(ms="", sols="", colname=r.img_col, dicomodel=f"{base}_masked.DicoModel",
                  base_image=base, clusterfile=CLUSTER_CAT, dt_min=r.get("solutions", "dt_slow"),
                  niterkf=r.niterkf(0), covq=0.02, uvmin=r.get("solutions", "uvmin"))
    cmds, outs = _solve(r, "DDS0", r.mss, solve)
    return _step("DDS0", cmds, outs, 90)


BOOTSTRAP_MEAN = "image_bootstrap.app.mean.fits"


def low_res(r: Reduction) -> dict:
    """The low-resolution image knobs (beam, cell, size, uv range) the bootstrap cube uses."""
    psf = r.get("image", "low_psf_arcsec")
    if psf is None:
        raise PlanError("the bootstrap needs a low-resolution beam: [image] low_psf_arcsec is not set",
                        "set [image] low_psf_arcsec (20 for LoTSS) or switch off [control] bootstrap")
    cell = r.get("image", "low_cell")
    size = r.get("image", "low_imsize") or int(r.get("image", "imsize") * r.get("image", "cellsize") / cell)
    return {"psf_arcsec": psf, "cellsize": cell, "imsize": size, "robust": r.get("image", "low_robust"),
            "uvrange": (r.get("image", "uvmin") or 0.0, 2.5 * 206.0 / psf)}


def _bootstrap_mask(r: Reduction, name: str, out: str) -> list[Command]:
    """The bootstrap clean's mask on its dirty image's grid: TGSS sources (when ``[masking]
    tgss`` is set) OR MakeMask's islands."""
    dirty = f"{name}.dirty.fits"
    cmds = [make_mask(r.m, dirty, r.thr(0), f"{name}.makemask.log")]
    optional = []
    if tgss_args(r):
        tgss = f"{name}.tgss_mask.fits"
        cmds.append(hpcddf_tool(r.m, [
            "external-mask", "--template", dirty, "--out", tgss, "--record", f"{name}.tgss_mask.json",
            *tgss_args(r)], f"{name}.tgss_mask.log"))
        optional = ["--optional", tgss]  # not written when no TGSS source falls in the image
    cmds.append(hpcddf_tool(r.m, ["merge-masks", "--out", out, f"{dirty}.mask.fits", *optional],
                            f"{name}.mergemask.log"))
    return cmds


def bootstrap(r: Reduction) -> Step:
    """Per observation: a low-resolution cube (one band per subband, DDS0 applied), PyBDSF with
    per-channel fluxes, the factor fit against the [bootstrap] catalogues, then SCALED_DATA (and
    DATA_DI_CORRECTED_SCALED) in every MS of that observation in both MS lists.

    As in ddf-pipeline, a dirty image comes first and the clean is masked. The mask is the
    ``[masking] tgss`` catalogue's sources drawn on the dirty image's grid (ddf-pipeline's
    bootstrap mask; the node reads the file, downloaded at submit if missing and the site names
    its URL), OR'd with MakeMask's mask of that dirty image at the first masking threshold,
    which is all there is without a TGSS file.
    A source outside the mask is left to the 15-sigma automask, whose noise on a dirty,
    sidelobe-limited image is high: it stays uncleaned, and PyBDSF then fits it with the
    narrower dirty beam and finds a third of its flux against the restoring beam (measured on
    the simulated field), which biases every factor.

    The clean is SSD whatever ``[image] cleanmode`` says, as ddf-pipeline's bootstrap: on the
    simulated field HMP's cube left one band's fluxes up to 40 % low while SSD's are within
    5 % in every band (measured per source with PyBDSF's per-channel fluxes)."""
    cmds: list[Command] = []
    outs: list[str] = []
    full = group_by_obsid(r.full_mss or r.mss)
    apps = []
    for obsid, mss in group_by_obsid(r.mss).items():
        lst, name = f"bootstrap_{obsid}_mslist.txt", f"image_bootstrap_{obsid}"  # DDF reads *.txt as a list
        cmds.append(hpcddf_tool(r.m, ["write-list", "--out", lst, *mss], f"{name}.list.log"))
        mask = f"{name}.mask.fits"
        img = r.image(name, mslist=lst, colname=r.col, majorcycles=5, automask_sigma=15.0,
                      clusterfile=CLUSTER_CAT, ddsols=applied(r, "DDS0"), apply=r.apply(6),
                      nband=len(mss), cubes="Ii", cleanmask=mask, deconv_mode="SSD", global_norm=None,
                      **low_res(r))
        cmds += [ddf_image(r.cfg, r.m, dirty_of(replace(img, cleanmask=None, cubes=None))),
                 *_bootstrap_mask(r, name, mask), ddf_image(r.cfg, r.m, img)]
        factors = f"{obsid}-bootstrap-factors.json"
        cmds.append(hpcddf_tool(r.m, ["bootstrap-fit", "--cube", f"{name}.cube.int.restored.fits",
                                      "--config", FROZEN_CONFIG_REL, "--out", factors],
                                f"{name}.fit.log"))
        targets = sorted(set(mss) | set(full.get(obsid, [])))
        di = ["--di-col", DI_COL] if r.di else []
        apply = ["bootstrap-apply", "--factors", factors, "--colname", r.col, *di, *targets]
        cmds.append(hpcddf_tool(r.m, apply, f"{name}.apply.log"))
        outs += [factors, f"{name}.cube.int.restored.fits"]
        apps.append(f"{name}.app.restored.fits")
    cmds.append(hpcddf_tool(r.m, ["mean-image", "--out", BOOTSTRAP_MEAN, *apps], "image_bootstrap.mean.log"))
    return _step("bootstrap", cmds, outs + [BOOTSTRAP_MEAN], 300)


def image_phase1(r: Reduction) -> Step:
    base = _last_di_image(r)
    img = r.image("image_phase1", majorcycles=2, clusterfile=CLUSTER_CAT,
                  cleanmask=f"{base}.mask.fits", automask_sigma=r.thr(1),
                  init_dico=f"{base}_masked.DicoModel", ddsols=applied(r, "DDS0"),
                  apply=r.apply(0), imaging_weights=r.weights(1))
    return _step("image_phase1", [ddf_image(r.cfg, r.m, img)], [restored("image_phase1")], 150)


def mask_phase1(r: Reduction) -> Step:
    return _step("mask_phase1", _masked(r, "image_phase1", r.thr(1)),
                 ["image_phase1.mask.fits", "image_phase1_masked.DicoModel"], 20)


def DDS1(r: Reduction) -> Step:
    solve = Solve(ms="", sols="", colname=r.img_col, dicomodel="image_phase1_masked.DicoModel",
                  base_image="image_phase1", clusterfile=CLUSTER_CAT,
                  dt_min=r.get("solutions", "dt_slow"), niterkf=r.niterkf(1), covq=0.02,
                  uvmin=r.get("solutions", "uvmin"))
    cmds, outs = _solve(r, "DDS1", r.mss, solve)
    return _step("DDS1", cmds, outs, 90)


def image_ampphase1(r: Reduction) -> Step:
    img = r.image("image_ampphase1", majorcycles=1, clusterfile=CLUSTER_CAT,
                  cleanmask="image_phase1.mask.fits", automask_sigma=r.thr(1),
                  init_dico="image_phase1_masked.DicoModel", ddsols=applied(r, "DDS1"),
                  apply=r.apply(1), imaging_weights=r.weights(2))
    cmds = [ddf_image(r.cfg, r.m, img)] + _masked(r, "image_ampphase1", r.thr(1))
    return _step("image_ampphase1", cmds, [restored("image_ampphase1"),
                                            "image_ampphase1_masked.DicoModel"], 150)


def Predict_DI1(r: Reduction) -> Step:
    img = r.image("Predict_DI1", colname=r.col, mode="Predict", clusterfile=CLUSTER_CAT,
                  init_dico="image_ampphase1_masked.DicoModel", ddsols=applied(r, "DDS1"),
                  apply=r.apply(1), predict_col="DD_PREDICT")
    return _step("Predict_DI1", [ddf_image(r.cfg, r.m, img)], [], 60)


def DIS1(r: Reduction) -> Step:
    cmds, outs = _solve(r, "DIS1", r.mss, di_solve(r, update_weights=False))
    return _step("DIS1", cmds, outs, 60)


def image_ampphase1_di(r: Reduction) -> Step:
    img = r.image("image_ampphase1_di", majorcycles=1, clusterfile=CLUSTER_CAT,
                  cleanmask="image_ampphase1.mask.fits", automask_sigma=r.thr(1),
                  init_dico="image_ampphase1_masked.DicoModel", ddsols=applied(r, "DDS1"),
                  apply=r.apply(2), imaging_weights=r.weights(2))
    cmds = [ddf_image(r.cfg, r.m, img)] + _masked(r, "image_ampphase1_di", r.thr(1))
    return _step("image_ampphase1_di", cmds, [restored("image_ampphase1_di"),
                                               "image_ampphase1_di_masked.DicoModel"], 150)


def _last_small_image(r: Reduction) -> str:
    return "image_ampphase1_di" if r.di else "image_ampphase1"


def from_model(r: Reduction) -> bool:
    """[inputmodel] basedicomodel: the run starts at DDS2_full from a previous run's model."""
    return bool(r.get("inputmodel", "basedicomodel"))


def base_dico(r: Reduction) -> str:
    """The model the full-bandwidth calibration starts from: the last small image's masked
    model, or the given previous model, unmasked (as ddf-pipeline does)."""
    if from_model(r):
        return f"{r.get('inputmodel', 'basedicomodel')}.DicoModel"
    return f"{_last_small_image(r)}_masked.DicoModel"


def base_image(r: Reduction) -> str:
    """killMS's --BaseImageName for DDS2_full: the last small image, or [inputmodel] baseimagename."""
    return r.get("inputmodel", "baseimagename") if from_model(r) else _last_small_image(r)


def base_mask(r: Reduction) -> str:
    """The first full-bandwidth image's clean mask: the last small image's, or [inputmodel]
    basemaskname (copied to the external mask, which it also is in ddf-pipeline)."""
    return EXT_MASK if from_model(r) else f"{_last_small_image(r)}.mask.fits"


def _inputmodel_setup(r: Reduction) -> list[Command]:
    """What the skipped steps would have left for DDS2_full: the imaging columns, the given
    clusterfile as the cluster catalogue, the given mask as the external mask."""
    return [hpcddf_tool(r.m, ["prepare-ms", "--colname", r.col, *sorted(set(r.mss + r.full_mss))],
                        "prepare-ms.log"),
            hpcddf_tool(r.m, ["cluster", "--copy", r.get("image", "clusterfile"), "--out", CLUSTER_CAT],
                        "cluster.log"),
            hpcddf_tool(r.m, ["merge-masks", "--out", EXT_MASK, r.get("inputmodel", "basemaskname")],
                        "external_mask.log")]


# ------------------------------------------------------------------------------ full mslist

def DDS2_full(r: Reduction) -> Step:
    solve = Solve(ms="", sols="", colname=r.col, dicomodel=base_dico(r),
                  base_image=base_image(r), clusterfile=CLUSTER_CAT, dt_min=r.get("solutions", "dt_slow"),
                  niterkf=r.niterkf(4), covq=0.1, uvmin=r.get("solutions", "uvmin"))
    cmds, outs = _solve(r, "DDS2_full", r.full_mss, solve)
    if from_model(r):
        cmds, outs = _inputmodel_setup(r) + cmds, [CLUSTER_CAT, EXT_MASK] + outs
    return _step("DDS2_full", cmds, outs, 120)


def Predict_DDS2(r: Reduction) -> Step:
    img = r.image("Predict_DDS2", mslist=r.full_mslist, colname=r.col, mode="Predict",
                  clusterfile=CLUSTER_CAT, init_dico=base_dico(r),
                  ddsols=applied(r, "DDS2_full"), apply=r.apply(3), predict_col="DD_PREDICT")
    return _step("Predict_DDS2", [ddf_image(r.cfg, r.m, img)], [], 60)


def DIS2_full(r: Reduction) -> Step:
    cmds, outs = _solve(r, "DIS2_full", r.full_mss, di_solve(r, update_weights=False))
    return _step("DIS2_full", cmds, outs, 90)


def _full_image(r: Reduction, name: str, **kw) -> Image:
    kw.setdefault("robust", r.get("image", "final_robust"))
    kw.setdefault("psf_arcsec", final_beam(r))
    kw.setdefault("global_norm", r.norm(1))
    return r.image(name, mslist=r.full_mslist, clusterfile=CLUSTER_CAT,
                   imaging_weights=r.weights(3), **kw)


def final_beam(r: Reduction) -> float | tuple[float, float, float] | None:
    """The full-resolution images' restoring beam: circular (final_psf_arcsec), or elliptical
    when [image] final_psf_minor_arcsec and final_psf_pa_deg are both set (as ddf-pipeline)."""
    major = r.get("image", "final_psf_arcsec")
    minor, pa = r.get("image", "final_psf_minor_arcsec"), r.get("image", "final_psf_pa_deg")
    if major is None or minor is None:
        return major
    return (float(major), float(minor), float(pa))


def image_full_ampphase_di(r: Reduction) -> Step:
    img = _full_image(r, "image_full_ampphase_di", majorcycles=0, automask_sigma=r.thr(2),
                      init_dico=base_dico(r), cleanmask=base_mask(r),
                      ddsols=applied(r, "DDS2_full"), apply=r.apply(3))
    cmds = [ddf_image(r.cfg, r.m, img)]
    return _step("image_full_ampphase_di", cmds, [restored("image_full_ampphase_di")], 120)


def image_full_ampphase_di_m(r: Reduction) -> Step:
    cmds = [make_mask(r.m, restored("image_full_ampphase_di"), 10, "image_full_ampphase_di.makemask.log"),
            hpcddf_tool(r.m, ["merge-masks", "--out", "image_full_ampphase_di.mask.fits",
                              f"{restored('image_full_ampphase_di')}.mask.fits", "--optional", EXT_MASK],
                        "image_full_ampphase_di.mergemask.log")]
    img = _full_image(r, "image_full_ampphase_di_m", majorcycles=1, automask_sigma=r.thr(2),
                      init_dico=base_dico(r), cleanmask="image_full_ampphase_di.mask.fits",
                      ddsols=applied(r, "DDS2_full"), apply=r.apply(3), reuse_psf=True,
                      reuse_dirty="forceresidual")
    cmds += [ddf_image(r.cfg, r.m, img)] + _masked(r, "image_full_ampphase_di_m", r.thr(2))
    return _step("image_full_ampphase_di_m", cmds, [restored("image_full_ampphase_di_m"),
                                                     "image_full_ampphase_di_m_masked.DicoModel"], 180)


def DDS3_full(r: Reduction) -> Step:
    solve = Solve(ms="", sols="", colname=r.img_col, dicomodel="image_full_ampphase_di_m_masked.DicoModel",
                  base_image="image_full_ampphase_di_m", clusterfile=CLUSTER_CAT,
                  dt_min=r.get("solutions", "dt_fast"), niterkf=r.niterkf(5), covq=0.1,
                  uvmin=r.get("solutions", "uvmin"), nchan=1)
    cmds, outs = _solve(r, "DDS3_full", r.full_mss, solve)
    return _step("DDS3_full", cmds, outs, 120)


SLOW_MERGED = "DDS3_full_slow_merged"


def DDS3_full_slow(r: Reduction) -> Step:
    """The very slow amplitude solutions on top of the fast smoothed ones (pre-applied to the
    model), then merged per observation with outliers clipped, as ddf-pipeline does. kMS's
    NIterKF here is its own 6, not the NIterKF list."""
    solve = Solve(ms="", sols="", colname=r.img_col, dicomodel="image_full_ampphase_di_m_masked.DicoModel",
                  base_image="image_full_ampphase_di_m", clusterfile=CLUSTER_CAT,
                  dt_min=r.get("solutions", "dt_very_slow"), niterkf=6, covq=0.1,
                  uvmin=r.get("solutions", "uvmin_very_slow"), nchan=1,
                  preapply_sols=f"[{applied(r, 'DDS3_full')}]")
    cmds, outs = _solve(r, "DDS3_full_slow", r.full_mss, solve, smooth=False)
    merge_cmds, merge_outs = _merge_slow(r)
    return _step("DDS3_full_slow", cmds + merge_cmds, outs + merge_outs, 120)


def _merge_slow(r: Reduction) -> tuple[list[Command], list[str]]:
    """MergeSols with ``--SigmaFilterOutliers [solutions] sigma_clip`` over each observation's
    MSs (ddf-pipeline groups them by solution start time: one observation each), then per-MS
    ``killMS.DDS3_full_slow_merged.sols.npz`` links for DDF. No SmoothSols."""
    solsdir = r.get("solutions", "SolsDir")
    cmds: list[Command] = []
    for obsid, mss in group_by_obsid(r.full_mss).items():
        lst, merged = f"solslist_DDS3_full_slow_{obsid}.txt", f"DDS3_full_slow_{obsid}_merged.npz"
        files = [sols_file(r.cfg, ms, "DDS3_full_slow") for ms in mss]
        merge = ["MergeSols.py", f"--SolsFilesIn={lst}", f"--SolFileOut={solsdir}/{merged}"]
        if r.get("solutions", "sigma_clip") is not None:
            merge += ["--SigmaFilterOutliers", _fmt_num(r.get("solutions", "sigma_clip"))]
        cmds += [hpcddf_tool(r.m, ["write-list", "--out", lst, *files], f"DDS3_full_slow.{obsid}.list.log"),
                 Command(tuple(merge), f"DDS3_full_slow.{obsid}.merge.log", timeout_s=r.m.timeout_s),
                 hpcddf_tool(r.m, ["link-sols", "--solsdir", solsdir, "--sols", SLOW_MERGED,
                                   "--target", merged, *mss], f"DDS3_full_slow.{obsid}.link.log")]
    return cmds, [sols_file(r.cfg, ms, SLOW_MERGED) for ms in r.full_mss]


def _fmt_num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else str(v)


def final_sols(r: Reduction) -> str:
    """The final images' solutions: the fast smoothed ones, times the merged very slow ones
    (DDFacet multiplies the two sets per time, direction, station and channel)."""
    fast = applied(r, "DDS3_full")
    return f"[{fast},{SLOW_MERGED}]" if r.get("solutions", "do_very_slow") else fast


def image_full_low(r: Reduction) -> Step:
    psf = r.get("image", "low_psf_arcsec")
    uvmax = 2.5 * 206.0 / psf
    img = _full_image(r, "image_full_low", majorcycles=2, automask_sigma=5.0,
                      robust=r.get("image", "low_robust"), psf_arcsec=psf, global_norm=r.norm(2),
                      imsize=r.get("image", "low_imsize") or r.get("image", "imsize"),
                      cellsize=r.get("image", "low_cell"),
                      uvrange=(r.get("image", "uvmin"), uvmax),
                      init_dico=None, cleanmask=EXT_MASK, cleanmask_optional=True,
                      ddsols=final_sols(r), apply=r.apply(6))
    cmds = [ddf_image(r.cfg, r.m, img)]
    return _step("image_full_low", cmds, [restored("image_full_low")], 180, uvmax_km=uvmax)


def image_full_ampphase_di_m_NS(r: Reduction) -> Step:
    name = "image_full_ampphase_di_m.NS"
    img = _full_image(r, name, majorcycles=1, automask_sigma=r.thr(2),
                      init_dico="image_full_ampphase_di_m_masked.DicoModel",
                      cleanmask="image_full_ampphase_di_m.mask.fits",
                      ddsols=final_sols(r), apply=r.apply(6), predict_col="DD_PREDICT",
                      rms_factor=r.get("image", "final_rmsfactor"))
    return _step(name, [ddf_image(r.cfg, r.m, img)], [restored(name)], 180)


FINAL_NS = "image_full_ampphase_di_m.NS"


def offsets(r: Reduction) -> Step:
    """Per-direction astrometric offsets of the final image against the local reference
    catalogue, then DDFacet's RestoreAndShift with them (the ``_shift`` images).

    RestoreAndShift reads the final image's PSF and last-residual cache, which lives in this
    job's cache directory: the step runs in the same stage as the image."""
    method = r.get("offsets", "method")
    cmds = [hpcddf_tool(r.m, ["offsets", "--root", FINAL_NS, "--config", FROZEN_CONFIG_REL], "offsets.log"),
            ddf_shift(r.m, FINAL_NS, "facet-offset.txt")]
    outs = [f"{method}-facet_offsets.fits", "facet-offset.txt", "astromap.fits", f"{method}-offsets.png",
            f"{FINAL_NS}_shift.app.facetRestored.fits"]
    return _step("offsets", cmds, outs, 120)


def quality(r: Reduction) -> Step:
    """``hpcddf quality`` as the last science step: its report in ``quality/``."""
    args = ["quality"]
    for c in r.get("control", "quality"):
        args += ["--catalogue", str(c)]
    return _step("quality", [hpcddf_tool(r.m, args, "quality.log")],
                 ["quality/quality.json", "quality/quality.txt"], 120)


def compress_ms(r: Reduction) -> Step:
    """A Dysco-compressed ``<ms>.archive`` of every MS of the full list (ddf-pipeline's
    ``archivems``), each verified against its MS before it gets its name; the MSs are only read.

    The archive's DATA is the column the final image was made from (``img_col`` after the
    final stage's column switch): DATA_DI_CORRECTED when DI calibration runs (bootstrap-scaled,
    as DIS1/DIS2_full rewrite it from SCALED_DATA), else the calibration's input column
    (SCALED_DATA after the bootstrap, [data] colname without it). ddf-pipeline archives
    DATA_DI_CORRECTED, the same column in its default configuration."""
    mss = r.full_mss or r.mss
    cmd = Command((r.m.python, "-m", "hpcddf.lofar.compress", "--column", r.img_col, *mss),
                  "compress_ms.log", timeout_s=r.m.timeout_s)
    return _step("compress_ms", [cmd], [archive_name(ms) for ms in mss], 30 * len(mss), column=r.img_col)


def summary(r: Reduction) -> Step:
    cmds = [hpcddf_tool(r.m, ["summary", "--config", FROZEN_CONFIG_REL, "--out", "summary.txt"],
                        "summary.log")]
    if r.get("control", "clearcache_end"):
        cmds.append(hpcddf_tool(r.m, ["clear-cache", "--cache-dir", r.m.cache_dir, r.mslist,
                                      r.full_mslist, *r.mss, *r.full_mss], "clear-cache-end.log"))
    return _step("summary", cmds, ["summary.txt"], 10)


BUILDERS: dict[str, Callable[[Reduction], Step]] = {
    f.__name__: f for f in (
        image_dirin_SSD_init, external_mask, image_dirin_SSD, mask_diffuse, image_dirin_SSD_m,
        cluster, image_dirin_SSD_m_c, DIS0, image_dirin_SSD_m_c_di, image_dirin_SSD_m_c_di_m,
        DDS0, bootstrap, image_phase1, mask_phase1, DDS1, image_ampphase1, Predict_DI1, DIS1,
        image_ampphase1_di, DDS2_full, Predict_DDS2, DIS2_full, image_full_ampphase_di,
        image_full_ampphase_di_m, DDS3_full, DDS3_full_slow, image_full_low, offsets, compress_ms, quality, summary)
}
BUILDERS["image_full_ampphase_di_m.NS"] = image_full_ampphase_di_m_NS


# Steps that run on the unscaled data even when the bootstrap is on; and, after it, the steps
# that still image the scaled copy of DIS0's output (DIS1 then recalibrates from SCALED_DATA).
BEFORE_BOOTSTRAP = frozenset({
    "image_dirin_SSD_init", "external_mask", "image_dirin_SSD", "mask_diffuse", "image_dirin_SSD_m",
    "cluster", "image_dirin_SSD_m_c", "DIS0", "image_dirin_SSD_m_c_di", "image_dirin_SSD_m_c_di_m",
    "DDS0", "bootstrap"})
BEFORE_DIS1 = frozenset({"image_phase1", "mask_phase1", "DDS1", "image_ampphase1", "Predict_DI1"})


def columns_at(r: Reduction, name: str) -> Reduction:
    """The reduction as step ``name`` sees it: which columns hold the (scaled) data."""
    if not r.get("control", "bootstrap") or name in BEFORE_BOOTSTRAP:
        return r
    return replace(r, scaled=True, di_scaled=name in BEFORE_DIS1)


def build(r: Reduction, stage: str, names: list[str] | tuple[str, ...]) -> list[Step]:
    """The steps of one stage, in order."""
    steps = []
    for name in names:
        if name in UNSUPPORTED or name not in BUILDERS:
            raise PlanError(f"step {name} is not implemented in this hpcddf version",
                            f"switch off {UNSUPPORTED.get(name, name)} in the config")
        steps.append(replace(BUILDERS[name](columns_at(r, name)), stage=stage))
    return steps


def unsupported(step_names: list[str] | tuple[str, ...]) -> list[str]:
    """Which enabled steps the reduction cannot run yet (checked before anything is queued)."""
    return [UNSUPPORTED[n] for n in step_names if n in UNSUPPORTED]
