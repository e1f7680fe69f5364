"""DDF.py and kMS.py command lines built from a ddf-pipeline configuration.

These follow ddf-pipeline's own calls (``ddf_image``, ``killms_data``, ``make_mask``, ...)
option for option where the option exists in DDFacet 0.9.1 / killMS 3.3.0, so a field reduced
here matches one reduced by ddf-pipeline. Everything is an argv list; nothing is a shell
string. Two things differ on purpose:

* CPU counts come from the job's allocation and DDFacet's affinity pinning is switched off
  to the job's own cores (``--Parallel-Affinity=[3,5,...]``): by default DDFacet pins to cores
  ``0..N-1``, which a Slurm job that was given other cores does not own (DDFacet#36,
  killMS#22). killMS takes its affinity from the image's parset, so it follows.
* The beam model is a configuration option (``[image] beam_model``, hpcddf's addition) so a
  simulated field without LOFAR station tables can run with ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from hpcddf.engine.runner import Command
from hpcddf.lofar.config import PipelineConfig

# DDF.py starts by listing /dev/shm and stat-ing each entry (its stale-memory cleanup): a
# semaphore another process removes in between (Python's multiprocessing makes and unlinks
# them all the time) kills it 0.1 s in with nothing done. Seen when two DDFacet runs start
# together on one node; the runner runs it again when its log ends like this.
DDF_START_RACE = (r"cleanupStaleShm[\s\S]*FileNotFoundError: .*/dev/shm/",)
DDF_PIPELINE_WMAX_M = 50000.0  # ddf-pipeline's --CF-wmax for every image
CLEAN_DEFAULTS = {"peakfactor": 0.001, "rms_factor": 0.0}


@dataclass(frozen=True)
class Machine:
    """What the node gives the science commands."""

    ncpu_ddf: int
    ncpu_kms: int
    cache_dir: str
    cpus: tuple[int, ...] = ()     # the cores this job owns
    timeout_s: float | None = None
    python: str = "python3"
    # DDFacet's w-kernels reach this |w|; ddf-pipeline fixes 50 km, which no shorter array's
    # data reach (see recipes.cf_wmax_m)
    cf_wmax_m: float = DDF_PIPELINE_WMAX_M


@dataclass(frozen=True)
class Image:
    """One ``ddf_image`` call: the knobs ddf-pipeline varies between its images."""

    name: str
    mslist: str
    colname: str
    majorcycles: int = 1
    robust: float = -0.15
    psf_arcsec: float | tuple[float, float, float] | None = None  # circular, or (major, minor, PA)
    imsize: int | None = None
    cellsize: float | None = None
    uvrange: tuple[float, float] | None = None
    cleanmask: str | None = None
    cleanmask_optional: bool = False  # pass it only if it exists (DDF refuses an empty mask)
    automask_sigma: float | None = None
    peakfactor: float = 0.001
    rms_factor: float = 0.0
    init_dico: str | None = None
    clusterfile: str | None = None
    ddsols: str | None = None
    apply: str = "AP"             # P or AP
    imaging_weights: bool = False  # killMS's IMAGING_WEIGHT column
    predict_col: str | None = None  # PredictSettings ("Clean", col): model into this column
    mode: str = "Clean"            # Clean, Dirty, Predict
    reuse_psf: bool = False
    reuse_dirty: str | None = None  # "forcedirty" or "forceresidual"
    nband: int = 2                 # frequency bands (the bootstrap's cube: one per subband)
    cubes: str | None = None       # also save these images as cubes (DDF --Output-Cubes codes)
    deconv_mode: str | None = None  # None: [image] cleanmode (the bootstrap cube always SSD)
    global_norm: str | None = None  # DDFacet's --DDESolutions-GlobalNorm, with ddsols only
    clean_round: int | None = None  # index into the per-round WSCMS lists (None: from the threshold)
    extra: tuple[str, ...] = ()


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_fmt(x) for x in v) + "]"
    return str(v)


def _opts(**kw: Any) -> list[str]:
    """``--Section-Name=value`` for every keyword (``Section_Name`` spelt with one underscore)."""
    out = []
    for key, value in kw.items():
        if value is None:
            continue
        section, _, name = key.partition("_")
        out.append(f"--{section}-{name}={_fmt(value)}")
    return out


def beam_model(cfg: PipelineConfig) -> str:
    """``LOFAR`` or ``None``; a config's ``beam_model = None`` reads as Python None."""
    return cfg.get("image", "beam_model") or "None"


def affinity(m: Machine) -> str:
    """Pin DDFacet's workers to cores this job owns, never to 0..N-1 (DDFacet#36)."""
    if len(m.cpus) >= m.ncpu_ddf:
        return _fmt(list(m.cpus[:m.ncpu_ddf]))
    return "disable"


def nfacets(imsize: int) -> int:
    """ddf-pipeline uses 11 facets on its 20000-px images; a small test image gets fewer."""
    return 11 if imsize >= 2200 else max(3, imsize // 200)


def cache_path(m: Machine, mslist: str, what: str) -> str:
    """Where DDFacet keeps its PSF/Dirty/LastResidual cache for this MS list."""
    return f"{m.cache_dir}/{Path(mslist).name}.ddfcache/{what}"


def ddf_image(cfg: PipelineConfig, m: Machine, img: Image) -> Command:
    """``DDF.py`` for one image, as ddf-pipeline's ``ddf_image`` builds it."""
    imsize = img.imsize or cfg.get("image", "imsize")
    cell = img.cellsize or cfg.get("image", "cellsize")
    beam = beam_model(cfg)
    uvrange = img.uvrange or (cfg.get("image", "uvmin"), cfg.get("image", "uvmax"))
    argv = ["DDF.py"]
    # DDF 0.9.1 cannot sort the data in Predict mode (it loads no weights to sort with)
    argv += _opts(Data_MS=img.mslist, Data_ColName=img.colname, Data_Sort=int(img.mode != "Predict"),
                  Output_Name=img.name, Output_Mode=img.mode, Output_Clobber=1,
                  Misc_ConserveMemory=1, Parallel_NCPU=m.ncpu_ddf, Parallel_Affinity=affinity(m),
                  Beam_Model=beam)
    if beam != "None":
        argv += _opts(Beam_LOFARBeamMode="A", Beam_At=cfg.get("control", "beam_at"))
    argv += _opts(Facets_NFacets=nfacets(imsize), Facets_DiamMax=1.5, Facets_DiamMin=0.1,
                  Facets_CatNodes=img.clusterfile,
                  CF_wmax=m.cf_wmax_m, CF_Nw=100,
                  Cache_Dir=m.cache_dir, Cache_DirWisdomFFTW=m.cache_dir, Cache_Weight="reset",
                  Debug_Pdb="never", Log_Memory=1, Log_Boring=1,
                  DDESolutions_SolsDir=cfg.get("solutions", "SolsDir"),
                  RIME_DecorrMode="FT" if cfg.get("image", "do_decorr") else None,
                  Freq_NBand=img.nband, Output_Cubes=img.cubes,
                  Weight_ColName="IMAGING_WEIGHT" if img.imaging_weights else
                  ("WEIGHT_SPECTRUM" if cfg.get("image", "use_weightspectrum") else "None"),
                  Weight_Mode="Briggs", Weight_Robust=img.robust,
                  Image_NPix=imsize, Image_Cell=cell,
                  Output_RestoringBeam=img.psf_arcsec,
                  Selection_UVRangeKm=[float(uvrange[0] or 0.0), float(uvrange[1])])
    argv += _deconv(cfg, img)
    if img.ddsols:
        argv += _opts(DDESolutions_DDSols=img.ddsols, DDESolutions_DDModeGrid=img.apply,
                      DDESolutions_DDModeDeGrid=img.apply, DDESolutions_GlobalNorm=img.global_norm)
    if img.predict_col:
        argv += _opts(Predict_ColName=img.predict_col)
    if img.init_dico:
        argv += _opts(Predict_InitDicoModel=img.init_dico)
    argv += list(img.extra)
    optional = []
    if img.cleanmask and img.cleanmask_optional and img.mode == "Clean":
        optional.append((img.cleanmask, _optional_mask(cfg, img)))
    if img.reuse_psf:
        optional.append((cache_path(m, img.mslist, "PSF"), ("--Cache-PSF=force",)))
    if img.reuse_dirty:
        what = "LastResidual" if img.reuse_dirty == "forceresidual" else "Dirty"
        optional.append((cache_path(m, img.mslist, what), (f"--Cache-Dirty={img.reuse_dirty}",)))
    return Command(tuple(argv), f"{img.name}.log", timeout_s=m.timeout_s,
                   when_exists=tuple(optional), retry_if=DDF_START_RACE)


def _optional_mask(cfg: PipelineConfig, img: Image) -> tuple[str, ...]:
    """The options an optional clean mask adds when it exists at run time. Under WSCMS it also
    turns the auto-mask off (later options win in DDFacet's parser): 0.9.1's WSCMS cannot have
    both (`_wscms`), and without the file the image keeps its auto-mask."""
    args = (f"--Mask-External={img.cleanmask}",)
    if img.automask_sigma is not None and deconv_mode(cfg, img) == "WSCMS":
        args += ("--WSCMS-AutoMask=0",)
    return args


def ddf_shift(m: Machine, name: str, shift_file: str) -> Command:
    """``DDF.py <name>.parset --Output-Mode=RestoreAndShift``: restore ``name`` again with every
    facet shifted by the offsets in ``shift_file`` (``<name>_shift.{app,int}.facetRestored``),
    from the PSF and last residual DDFacet cached while making ``name``."""
    argv = ["DDF.py", f"{name}.parset", *_opts(
        Output_Name=f"{name}_shift", Output_Mode="RestoreAndShift", Output_ShiftFacetsFile=shift_file,
        Predict_InitDicoModel=f"{name}.DicoModel", Cache_Dir=m.cache_dir, Cache_DirWisdomFFTW=m.cache_dir,
        Parallel_NCPU=m.ncpu_ddf, Parallel_Affinity=affinity(m), Debug_Pdb="never", Log_Boring=1)]
    return Command(tuple(argv), f"{name}_shift.log", timeout_s=m.timeout_s,
                   retry_if=DDF_START_RACE)


# deconvolution modes of newer DDFacets that 0.9.1.0 lacks, and the one it runs instead (a
# warning at submit says so: hpcddf.lofar.option_effects)
DDF_MODE_FALLBACK = {"WSCMS2": "WSCMS", "SSD3": "SSD2"}


def ddf_cleanmode(cfg: PipelineConfig) -> str:
    """[image] cleanmode as DDFacet 0.9.1 runs it (a newer mode: its predecessor)."""
    mode = cfg.get("image", "cleanmode")
    return DDF_MODE_FALLBACK.get(mode, mode)


def deconv_mode(cfg: PipelineConfig, img: Image) -> str:
    """DDFacet's --Deconv-Mode for an image: its own, else [image] cleanmode (as 0.9.1 has it)."""
    if not img.deconv_mode:
        return ddf_cleanmode(cfg)
    return DDF_MODE_FALLBACK.get(img.deconv_mode, img.deconv_mode)


def _deconv(cfg: PipelineConfig, img: Image) -> list[str]:
    mode = deconv_mode(cfg, img)
    if img.mode == "Predict":
        # DDF reads the model with the minor cycle of --Deconv-Mode (default HMP) and refuses a
        # model of another kind ("different minor cycle and IniDicoModel types [HMP vs SSD]")
        return _opts(Deconv_Mode=mode)
    if img.mode != "Clean":
        return []
    out = _opts(Deconv_Mode=mode, Deconv_MaxMajorIter=img.majorcycles,
                Deconv_PeakFactor=img.peakfactor, Deconv_RMSFactor=img.rms_factor,
                Deconv_FluxThreshold=0.0, Deconv_MaxMinorIter=1000000,
                GAClean_MinSizeInit=cfg.get("image", "HMPsize"),
                Mask_External=None if img.cleanmask_optional else img.cleanmask)
    if mode.startswith("SSD"):
        out += _opts(SSDClean_SSDSolvePars="[S,Alpha]", SSDClean_BICFactor=0)
    if mode == "WSCMS":
        out = _wscms(cfg, img, out)
    if img.automask_sigma is not None and mode != "WSCMS":  # WSCMS masks with its own (_wscms)
        out += _opts(Mask_Auto=1, Mask_SigTh=img.automask_sigma)
    if cfg.get("image", "use_splitisland"):
        out += _opts(SSDClean_MaxIslandSize=cfg.get("image", "splitisland_size"))
    return out


def _wscms(cfg: PipelineConfig, img: Image, out: list[str]) -> list[str]:
    """WSCMS's own settings, as ddf-pipeline's LGPS configs give them: the per-round lists
    (rms and peak factors, auto-mask factor) at the image's clean round, the scales in pixels
    of [image] cellsize converted to the image's own cell (a low-resolution image's scales
    cover the same sky). An auto-masked image is masked by WSCMS's scale-dependent mask, as
    ddf-pipeline asks for it: DDFacet 0.9.1 refuses --Mask-Auto outside HMP and SSD. Not with
    a clean mask: 0.9.1's WSCMS stops with both ("No scale has been selected. This should never
    happen. Bug!"), so such an image is cleaned inside its mask alone (a warning at submit,
    hpcddf.lofar.option_effects)."""
    g = cfg.get
    i = clean_round(cfg, img)
    ratio = float(g("image", "cellsize")) / float(img.cellsize or g("image", "cellsize"))
    extra = _opts(WSCMS_MultiScale=1, WSCMS_NSubMinorIter=g("image", "wscms_nsubminoriter"))
    if g("image", "wscms_max_scale") is not None:
        extra += _opts(WSCMS_MaxScale=max(1, int(g("image", "wscms_max_scale") * ratio)))
    if g("image", "wscms_scales"):
        extra += _opts(WSCMS_Scales=sorted({int(float(v) * ratio) for v in g("image", "wscms_scales")}))
    # an optional mask is chosen at run time: ddf_image's when_exists turns the auto-mask off with it
    auto = img.automask_sigma is not None and (img.cleanmask is None or img.cleanmask_optional)
    if img.majorcycles == 0:  # 0.9.1's WSCMS model has no spectral-index map before a minor cycle
        extra += _opts(Output_Images=WSCMS_NO_ALPHA_IMAGES)  # (AttributeError: ... no attribute 'Npix')
    extra += _opts(WSCMS_AutoMask=int(auto), Mask_FluxImageType="ModelConv")
    if auto and g("masking", "wscms_automask_rms_factor"):
        extra += _opts(WSCMS_AutoMaskRMSFactor=_at(g("masking", "wscms_automask_rms_factor"), i))
    replaced = {"--Deconv-RMSFactor": _at(g("image", "wscms_rms_factor"), i),
                "--Deconv-PeakFactor": _at(g("image", "wscms_peakfactor"), i)}
    return [_replace_opt(a, replaced) for a in out] + extra


# DDFacet 0.9.1's default --Output-Images (DdPAMRIikemz) without the spectral-index map A
WSCMS_NO_ALPHA_IMAGES = "DdPMRIikemz"


def _at(values: list | None, i: int) -> Any:
    return None if not values else values[min(i, len(values) - 1)]


def _replace_opt(arg: str, replaced: dict[str, Any]) -> str:
    key = arg.split("=", 1)[0]
    return f"{key}={_fmt(replaced[key])}" if replaced.get(key) is not None else arg


def clean_round(cfg: PipelineConfig, img: Image) -> int:
    """Which round of ddf-pipeline's per-round lists an image is: its own ``clean_round``, else
    the index of its auto-mask threshold in [masking] thresholds (the same rounds)."""
    if img.clean_round is not None:
        return img.clean_round
    thresholds = [float(t) for t in cfg.get("masking", "thresholds")]
    sigma = img.automask_sigma
    return thresholds.index(float(sigma)) if sigma is not None and float(sigma) in thresholds else 0


def dirty_of(img: Image) -> Image:
    return replace(img, mode="Dirty", majorcycles=0)


# ------------------------------------------------------------------------------ killMS

@dataclass(frozen=True)
class Solve:
    """One ``killms_data`` call on one MS."""

    ms: str
    sols: str
    colname: str
    dicomodel: str | None = None
    base_image: str | None = None
    clusterfile: str | None = None
    di: bool = False                  # CohJones IFull against DD_PREDICT (DI) vs KAFCA (DD)
    dt_min: float = 1.0
    niterkf: int = 6
    covq: float = 0.02
    uvmin: float | None = None
    uvmax: float = 1000.0
    evolution_sols: str | None = None
    preapply_sols: str | None = None
    update_weights: bool = True
    nchan: int | None = None          # NChanSols; None: [solutions] NChanSols, else 1
    auto_dt: bool = False             # DI: dt from the data (hpcddf.lofar.solint), not dt_min
    auto_nchan: bool = False          # DI: NChanSols from the data
    extra: tuple[str, ...] = field(default_factory=tuple)


def kms(cfg: PipelineConfig, m: Machine, s: Solve, log_name: str) -> Command:
    """``kMS.py`` for one MS; run under a timeout because a killMS worker crash hangs the master."""
    beam = beam_model(cfg)
    argv = ["kMS.py", "--MSName", s.ms, "--SolverType", "CohJones" if s.di else "KAFCA",
            "--PolMode", "IFull" if s.di else "Scalar", "--InCol", s.colname,
            "--OutSolsName", s.sols, "--SolsDir", cfg.get("solutions", "SolsDir"),
            "--NCPU", str(m.ncpu_kms), "--DDFCacheDir", m.cache_dir, "--DoBar", "0",
            "--BeamModel", beam]
    if beam != "None":
        argv += ["--LOFARBeamMode", "A", "--BeamAt", cfg.get("control", "beam_at")]
    if s.di:
        argv += ["--SkyModelCol", "DD_PREDICT", "--OutCol", "DATA_DI_CORRECTED",
                 "--ApplyToDir", "0", "--NIterLM", "10"]
    else:
        argv += ["--BaseImageName", s.base_image or "", "--DicoModel", s.dicomodel or "",
                 "--NodesFile", s.clusterfile or "", "--NIterKF", str(s.niterkf),
                 "--CovQ", _fmt(s.covq), "--LambdaKF", _fmt(cfg.get("solutions", "LambdaKF"))]
    if s.evolution_sols:
        argv += ["--EvolutionSolFile", s.evolution_sols]
    if s.preapply_sols:
        argv += ["--PreApplySols", s.preapply_sols]
    if not s.update_weights:
        argv += ["--UpdateWeights", "0"]
    wtuv = cfg.get("solutions", "wtuv")
    if wtuv is not None:  # down-weight baselines outside the range instead of dropping them
        argv += ["--WTUV", _fmt(wtuv), "--WeightUVMinMax", f"{_fmt(s.uvmin or 0.0)},{_fmt(s.uvmax)}"]
    elif s.uvmin is not None:
        argv += ["--UVMinMax", f"{_fmt(s.uvmin)},{_fmt(s.uvmax)}"]
    if cfg.get("solutions", "robust") is not None:
        argv += ["--Weighting", "Briggs", "--Robust", _fmt(cfg.get("solutions", "robust"))]
    argv += list(s.extra)
    nchan = s.nchan or cfg.get("solutions", "NChanSols") or 1
    if s.auto_dt or s.auto_nchan:  # decided on the node from the MS's own data
        auto = [m.python, "-m", "hpcddf.lofar.solint", "--ms", s.ms, "--col", s.colname]
        auto += [] if s.auto_dt else ["--dt", _fmt(s.dt_min)]
        auto += [] if s.auto_nchan else ["--nchan", str(nchan)]
        return Command(tuple(auto + ["--", *argv]), log_name, timeout_s=m.timeout_s)
    argv += ["--dt", _fmt(s.dt_min), "--NChanSols", str(nchan)]
    return Command(tuple(argv), log_name, timeout_s=m.timeout_s)


def clipcal(m: Machine, ms: str, colname: str, log_name: str) -> Command:
    """ClipCal after every kMS that writes a corrected column: its own command, same step."""
    return Command(("ClipCal.py", "--MSName", ms, "--ColName", colname), log_name,
                   timeout_s=m.timeout_s)


def sols_file(cfg: PipelineConfig, ms: str, sols: str) -> str:
    return f"{cfg.get('solutions', 'SolsDir')}/{Path(ms).name}/killMS.{sols}.sols.npz"


# ------------------------------------------------------------------------------ masks and models

def make_mask(m: Machine, image: str, threshold: float, log_name: str,
              extra: Sequence[str] = ()) -> Command:
    """``MakeMask.py`` writes ``<image>.mask.fits``."""
    return Command(("MakeMask.py", f"--RestoredIm={image}", f"--Th={_fmt(threshold)}",
                    "--Box=50,2", *extra), log_name, timeout_s=m.timeout_s)


def mask_dicomodel(m: Machine, mask: str, dico_in: str, dico_out: str, log_name: str,
                   wscms: bool = False) -> Command:
    """Drop the model components outside the mask: ``MaskDicoModel.py``, or for a WSCMS model,
    which 0.9.1's MaskDicoModel.py cannot mask, hpcddf's ``wscmsmodel``."""
    if wscms:
        return Command((m.python, "-m", "hpcddf.lofar.wscmsmodel", "--mask", mask, "--in", dico_in,
                        "--out", dico_out), log_name, timeout_s=m.timeout_s)
    return Command(("MaskDicoModel.py", f"--MaskName={mask}", f"--InDicoModel={dico_in}",
                    f"--OutDicoModel={dico_out}"), log_name, timeout_s=m.timeout_s)


def hpcddf_tool(m: Machine, args: Sequence[str], log_name: str) -> Command:
    """One of hpcddf's own small node tools (masks, clustering, summary), as a command."""
    return Command((m.python, "-m", "hpcddf.lofar.tools", *args), log_name, timeout_s=m.timeout_s)
