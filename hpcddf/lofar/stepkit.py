"""What every step builder of the reduction shares: the Reduction (configuration, node, MS
lists, which columns hold the data), ddf-pipeline's file names, and the helpers that make a
Step from commands (images with their masks, solves with their merge and smoothing)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from hpcddf.engine.runner import Command, Step
from hpcddf.errors import PlanError
from hpcddf.lofar.config import PipelineConfig
from hpcddf.lofar.ddfcommands import (
    Image,
    Machine,
    Solve,
    clipcal,
    ddf_cleanmode,
    hpcddf_tool,
    kms,
    make_mask,
    mask_dicomodel,
    sols_file,
)
from hpcddf.lofar.mstables import obsid_of

CLUSTER_CAT = "image_dirin_SSD_m.npy.ClusterCat.npy"
EXT_MASK = "external_mask.fits"  # written only when something is masked: DDF refuses empty masks
EXT_MASK_RECORD = "external_mask.json"
EXT_MASK_EXT = "external_mask_ext.fits"  # the bootstrap extended mask OR'd in; only when non-empty
DI_COL = "DATA_DI_CORRECTED"
SCALED_COL = "SCALED_DATA"
SUB_COL = "DATA_SUB"  # [image] do_wide: the data less the sources outside the field


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
    # the field directory the MS names are relative to: builders that size their calls from
    # the MSs themselves (one DDF.py per frequency, per band) read them there, on the node
    workdir: Path = Path(".")

    def get(self, section: str, name: str):
        return self.cfg.get(section, name)

    @property
    def mslist(self) -> str:
        return self.cfg.get("data", "mslist")

    @property
    def full_mslist(self) -> str:
        return self.cfg.get("data", "full_mslist") or self.mslist

    @property
    def base_col(self) -> str:
        """The data the reduction works on: DATA_SUB once do_wide has subtracted the sources
        outside the field (as ddf-pipeline switches to it), else [data] colname."""
        return SUB_COL if self.cfg.get("image", "do_wide") else self.cfg.get("data", "colname")

    @property
    def col(self) -> str:
        """The column calibration starts from (the raw or, after bootstrap, scaled data)."""
        return SCALED_COL if self.scaled else self.base_col

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


def from_model(r: Reduction) -> bool:
    """[inputmodel] basedicomodel: the run starts at DDS2_full from a previous run's model."""
    return bool(r.get("inputmodel", "basedicomodel"))


def extended_mask_on(r: Reduction) -> bool:
    """The bootstrap extended mask exists: the bootstrap ran (its mean image is the input)
    and ``[masking] extended_size`` is set. A run from a previous model has no bootstrap."""
    return bool(r.get("control", "bootstrap") and r.get("masking", "extended_size")
                and not from_model(r))


def external_mask_now(r: Reduction) -> str:
    """The external mask the full-bandwidth clean masks OR in: ``external_mask_ext.fits`` once
    the extended mask exists (ddf-pipeline then drops ``external_mask.fits``), else that one.
    Both are written only when something is masked, so callers pass it as optional."""
    return EXT_MASK_EXT if extended_mask_on(r) else EXT_MASK


def group_by_obsid(mss: tuple[str, ...] | list[str]) -> dict[str, list[str]]:
    """The MSs of each observation, in list order (the bootstrap makes one cube per observation)."""
    groups: dict[str, list[str]] = {}
    for ms in mss:
        groups.setdefault(obsid_of(ms), []).append(ms)
    return groups




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

def step_of(name: str, commands: list[Command], outputs: list[str], estimate_s: float,
          **params) -> Step:
    return Step(name=name, stage="", commands=tuple(commands), outputs=tuple(outputs),
                params=params, estimate_s=estimate_s)


def restored(name: str) -> str:
    return f"{name}.app.restored.fits"


def masked(r: Reduction, name: str, threshold: float, merge_external: bool = True,
            dico: bool = True, external: str = EXT_MASK) -> list[Command]:
    """MakeMask on an image, OR'd with the external mask (``external``: after the bootstrap
    extended mask, ``external_mask_ext.fits``), then MaskDicoModel (ddf-pipeline's
    ``make_mask`` + ``merge_mask`` + ``mask_dicomodel``)."""
    cmds = [make_mask(r.m, restored(name), threshold, f"{name}.makemask.log")]
    sources = [f"{restored(name)}.mask.fits"] + (["--optional", external] if merge_external else [])
    cmds.append(hpcddf_tool(r.m, ["merge-masks", "--out", f"{name}.mask.fits", *sources],
                            f"{name}.mergemask.log"))
    if dico:
        cmds.append(mask_dicomodel(r.m, f"{name}.mask.fits", f"{name}.DicoModel", f"{name}_masked.DicoModel",
                                   f"{name}.maskdico.log", wscms=ddf_cleanmode(r.cfg) == "WSCMS"))
    return cmds


def solve_all(r: Reduction, sols: str, mss: tuple[str, ...], solve: Solve, smooth: bool = True) -> tuple[list[Command], list[str]]:
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
