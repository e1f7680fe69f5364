"""The ddf-pipeline option table: every section and option with its type and default.

This is data, not code: users' existing ddf-pipeline ``.cfg`` files must load unchanged, so the
sections, names, types and defaults follow ddf-pipeline's own option table (``utils/parset.py``,
2024 epoch) plus the few newer options the production tier1 and LGPS configs use.
``NCPU_DDF``/``NCPU_killms`` default to ``None`` here, meaning "from the job's CPU allocation",
which hpcddf works out on the node (ddf-pipeline's ``getcpus`` breaks on Slurm values like
``24(x2)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Types: "int", "float", "bool", "str", "list". ``item`` constrains list elements.
STOP_POINTS = ("cleanup", "initial", "dirin", "dirin_di", "bootstrap", "phase", "ampphase",
               "ampphase_di", "fullampphase", "fulllow")
REDO_POINTS = ("start", "dirin")


@dataclass(frozen=True)
class Option:
    section: str
    name: str
    type: str
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    item: str | None = None  # element type of a list: "int", "float", "bool", "str", "any"

    @property
    def key(self) -> tuple[str, str]:
        return (self.section, self.name)


def _o(section: str, name: str, type_: str, default: Any, help_: str, **kw: Any) -> Option:
    return Option(section, name, type_, default, help_, **kw)


OPTIONS: tuple[Option, ...] = (
    # [machine]
    _o("machine", "NCPU_DDF", "int", None, "CPUs for DDF.py (None: the job's allocation)"),
    _o("machine", "NCPU_killms", "int", None, "CPUs for kMS.py (None: the job's allocation)"),
    # [data]
    _o("data", "mslist", "str", None, "Initial (small) measurement set list; required"),
    _o("data", "full_mslist", "str", None, "Full-bandwidth MS list for the final steps, if any"),
    _o("data", "colname", "str", "CORRECTED_DATA", "MS column to image"),
    # [solutions]
    _o("solutions", "ndir", "int", 45, "Number of calibration directions"),
    _o("solutions", "SolsDir", "str", "SOLSDIR", "Directory for killMS solutions"),
    _o("solutions", "NChanSols", "int", None, "NChanSols for killMS (None: automatic)"),
    _o("solutions", "dt_slow", "float", 1.0, "Time interval for killMS (minutes)"),
    _o("solutions", "do_very_slow", "bool", True, "Enable very slow amplitude smoothing"),
    _o("solutions", "sigma_clip", "float", 5.0, "Sigma clip for amplitude outliers"),
    _o("solutions", "dt_very_slow", "float", 43.63, "Very slow killMS time interval (minutes)"),
    _o("solutions", "dt_di", "float", None, "DI killMS time interval (minutes; None: automatic)"),
    _o("solutions", "dt_fast", "float", 0.5, "Full-bandwidth killMS time interval (minutes)"),
    _o("solutions", "LambdaKF", "float", 0.5, "Kalman filter lambda for killMS"),
    _o("solutions", "NIterKF", "list", [1, 1, 1, 1, 6, 1, 6],
       "Kalman filter iterations for the 7 killMS steps", item="int"),
    _o("solutions", "normalize", "list", ["BLBased", "BLBased", "SumBLBased"],
       "Solution normalisation for the three self-cal steps", item="str"),
    _o("solutions", "uvmin", "float", None, "Minimum baseline in self-calibration (km)"),
    _o("solutions", "uvmin_very_slow", "float", 0.5, "Minimum baseline for very slow solutions (km)"),
    _o("solutions", "wtuv", "float", None, "Weight factor for data below uvmin (None: zero)"),
    _o("solutions", "robust", "float", None, "Briggs robust for killMS (None: natural)"),
    _o("solutions", "smoothing", "bool", True, "Smooth the solutions"),
    _o("solutions", "smoothingtype", "str", "TEC,PolyAmp", "Smoothing type for the solutions"),
    _o("solutions", "apply_sols", "list", ["P", "AP", "AP", "AP", "AP", "AP", "AP"],
       "Solutions to apply after the 7 killMS steps", item="str"),
    # [image]
    _o("image", "do_wide", "bool", False, "Widefield image and subtract sources in the annulus"),
    _o("image", "wide_imsize", "int", 10000, "Widefield image size (pixels)"),
    _o("image", "wide_cell", "float", 10.0, "Widefield pixel size (arcsec)"),
    _o("image", "wide_robust", "float", -0.2, "Widefield imaging robust"),
    _o("image", "wide_psf_arcsec", "float", 45.0, "Widefield restoring beam (arcsec)"),
    _o("image", "imsize", "int", 20000, "Image size (pixels)"),
    _o("image", "cellsize", "float", 1.5, "Pixel size (arcsec)"),
    _o("image", "robust", "float", -0.15, "Imaging robust"),
    _o("image", "final_robust", "float", -0.5, "Final imaging robust"),
    _o("image", "psf_arcsec", "float", 12.0, "Restoring beam of self-cal images (arcsec)"),
    _o("image", "final_psf_arcsec", "float", 6.0, "Final restoring beam (arcsec)"),
    _o("image", "final_psf_minor_arcsec", "float", None, "Final restoring beam minor axis (arcsec)"),
    _o("image", "final_psf_pa_deg", "float", None, "Final restoring beam position angle (deg)"),
    _o("image", "final_rmsfactor", "float", 1.0, "Final image RMS factor for cleaning"),
    _o("image", "low_psf_arcsec", "float", None, "Low-resolution beam (arcsec; None: no low-res image)"),
    _o("image", "low_robust", "float", -0.2, "Low-resolution image robust"),
    _o("image", "low_cell", "float", 4.5, "Low-resolution pixel size (arcsec)"),
    _o("image", "low_imsize", "int", None, "Low-resolution image size (pixels)"),
    _o("image", "vlow_psf_arcsec", "float", None, "Very-low-resolution QU beam (arcsec; None: none)"),
    _o("image", "vlow_robust", "float", -0.2, "Very-low-resolution QU robust"),
    _o("image", "vlow_cell", "float", 50.0, "Very-low-resolution QU pixel size (arcsec)"),
    _o("image", "vlow_imsize", "int", 500, "Very-low-resolution QU image size (pixels)"),
    _o("image", "do_decorr", "bool", True, "Use DDFacet's decorrelation mode"),
    _o("image", "HMPsize", "int", 10, "Island size for HMP initialisation"),
    _o("image", "uvmin", "float", 0.1, "Minimum baseline in imaging (km)"),
    _o("image", "uvmax", "float", 1000.0, "Maximum baseline in imaging (km)"),
    _o("image", "apply_weights", "list", [False, True, True, True],
       "Use killMS's IMAGING_WEIGHT column per imaging round", item="bool"),
    _o("image", "use_weightspectrum", "bool", False, "Use WEIGHT_SPECTRUM when not using IMAGING_WEIGHT"),
    _o("image", "clusterfile", "str", None, "User-defined cluster (ClusterCat) file"),
    _o("image", "centralfreqs", "list", [128.0, 143.7, 160.2],
       "Central frequencies for channel images (MHz)", item="float"),
    _o("image", "use_splitisland", "bool", False, "Use DDFacet's SSDClean-MaxIslandSize"),
    _o("image", "splitisland_size", "int", 100, "Island size for use_splitisland"),
    _o("image", "beam_model", "str", "LOFAR", "hpcddf: beam model for DDF/kMS (None for simulated data)",
       choices=("LOFAR", "None")),
    _o("image", "cleanmode", "str", "SSD", "Deconvolution mode (SSD, SSD2, HMP, WSCMS, WSCMS2)"),
    _o("image", "wscms_max_scale", "int", None, "WSCMS maximum scale"),
    _o("image", "wscms_scales", "list", None, "WSCMS scales", item="float"),
    _o("image", "wscms_nsubminoriter", "int", None, "WSCMS sub-minor iterations"),
    _o("image", "wscms_rms_factor", "list", None, "WSCMS RMS factor per round", item="float"),
    _o("image", "wscms_peakfactor", "list", None, "WSCMS peak factor per round", item="float"),
    # [masking]
    _o("masking", "thresholds", "list", [15, 10, 10, 5],
       "Auto-mask sigmas for the initial clean and 3 self-cal rounds", item="float"),
    _o("masking", "low_threshold", "float", 3.0, "Mask threshold of the low-resolution image"),
    _o("masking", "wide_threshold", "float", 3.0, "Mask threshold of the widefield image"),
    _o("masking", "tgss", "str", None, "TGSS catalogue file ($$ = catalogue directory)"),
    _o("masking", "tgss_radius", "float", 8.0, "TGSS mask radius (pixels)"),
    _o("masking", "tgss_flux", "float", 300.0, "TGSS peak flux threshold (mJy)"),
    _o("masking", "tgss_extended", "bool", False, "Extended regions for non-pointlike TGSS sources"),
    _o("masking", "tgss_pointlike", "float", 30.0, "TGSS pointlike size limit (arcsec)"),
    _o("masking", "region", "str", None, "ds9 region to merge with the mask"),
    _o("masking", "external_fits_mask", "str", None, "FITS mask to merge with the masks"),
    _o("masking", "extended_size", "int", None, "Island size for the bootstrap extended mask (pixels)"),
    _o("masking", "extended_rms", "float", 3.0, "Island threshold of the extended mask"),
    _o("masking", "rmsfacet", "bool", False, "One rms per facet for the extended rms maps"),
    _o("masking", "thres_outmaskextended", "float", 15.0, "Threshold for MaskDiffuse.fits"),
    _o("masking", "use_maskdiffuse", "bool", True, "Merge the diffuse mask into the clean mask"),
    _o("masking", "wscms_automask_rms_factor", "list", None, "WSCMS auto-mask RMS factor per round",
       item="float"),
    # [control]
    _o("control", "quiet", "bool", False, "Do not log to screen"),
    _o("control", "nobar", "bool", False, "Do not print progress bars"),
    _o("control", "logging", "str", "logs", "Directory for per-command logs"),
    _o("control", "dryrun", "bool", False, "Print what would be run, run nothing"),
    _o("control", "restart", "bool", True, "Skip steps that are already done"),
    _o("control", "cache_dir", "str", None, "DDF cache directory (hpcddf: node-local scratch)"),
    _o("control", "clearcache", "bool", True, "Clear the DDF cache before running"),
    _o("control", "clearcache_end", "bool", True, "Clear the DDF cache at a successful end"),
    _o("control", "skip_di", "bool", False, "Skip the DI calibration steps"),
    _o("control", "bootstrap", "bool", False, "Do the flux-scale bootstrap"),
    _o("control", "quality", "list", None,
       "Quality report as the last step, against these catalogues (NAME=PATH[:RADIUS[:FLUXFACTOR]]); hpcddf's addition",
       item="str"),
    _o("control", "catch_signal", "bool", True, "SIGUSR1 stops at the next step boundary"),
    _o("control", "exitafter", "str", None, "Stop point to exit after", choices=STOP_POINTS),
    _o("control", "redofrom", "str", None, "Redo from after this step", choices=REDO_POINTS),
    _o("control", "archive_dir", "str", "old", "Where redofrom archives old products"),
    _o("control", "msss_mode", "bool", False, "MSSS mode: smooth beam and cube in ampphase1"),
    _o("control", "remove_columns", "bool", False, "Remove pipeline-generated columns first"),
    _o("control", "pull", "bool", False, "Obsolete (kept so old configs load)"),
    _o("control", "spectral_restored", "bool", False, "Make multi-frequency restored images"),
    _o("control", "polcubes", "bool", False, "Make polarisation cubes"),
    _o("control", "split_polcubes", "bool", False, "Split polarisation cubes into Q and U"),
    _o("control", "stokesv", "bool", False, "Make a Stokes V image"),
    _o("control", "redo_DI", "bool", False, "Redo DI calibration with DP3 (needs a sky model)"),
    _o("control", "redo_DI_type", "str", "GSM", "Sky model for redo_DI", choices=("GSM", "TGSS")),
    _o("control", "beam_at", "str", "facet", "Where DDF/kMS compute the beam",
       choices=("facet", "tessel")),
    # [bootstrap]
    _o("bootstrap", "catalogues", "list", None, "PyBDSM-format catalogues ($$ = catalogue dir)",
       item="str"),
    _o("bootstrap", "groups", "list", None, "Group number per catalogue", item="int"),
    _o("bootstrap", "frequencies", "list", None, "Catalogue frequencies (Hz)", item="float"),
    _o("bootstrap", "names", "list", None, "Short catalogue names", item="str"),
    _o("bootstrap", "radii", "list", None, "Crossmatch radii (arcsec)", item="float"),
    # [compression]
    _o("compression", "compress_polcubes", "bool", False, "fpack the polarisation cubes"),
    _o("compression", "fpack_q", "int", 4, "fpack quantisation"),
    _o("compression", "delete_compressed", "bool", False, "Delete cubes after compression"),
    _o("compression", "compress_ms", "bool", False, "Compress the MSs with dysco (DP3)"),
    # [offsets]
    _o("offsets", "method", "str", None, "Optical catalogue for offsets (pslocal, panstarrs, ...)"),
    _o("offsets", "fit", "str", "mcmc", "Histogram fit method", choices=("mcmc", "chi2")),
    _o("offsets", "catalogue", "str", None,
       "Local reference catalogue (FITS/CSV with RA and Dec columns; $$ = catalogue dir); hpcddf's addition: "
       "without it, method=panstarrs is downloaded at submit from the site's [catalogues] panstarrs_url"),
    _o("offsets", "mode", "str", "normal", "normal or test", choices=("normal", "test")),
    # [spectra]
    _o("spectra", "do_dynspec", "bool", False, "Make dynamic spectra (DynSpecMS)"),
    _o("spectra", "bright_threshold", "float", 1.0, "Bright-source threshold for dynspec (Jy)"),
    _o("spectra", "catalogue", "str", "$$/dyn_spec_catalogue_addedexo_addvlotss.fits",
       "hpcddf's addition: the dynamic spectra's target catalogue (DESIGNATION, ra, dec, pmra, pmdec, "
       "ref_epoch, parallax, Type; $$ = catalogue dir), which ddf-pipeline takes from $DDF_PIPELINE_CATALOGS"),
    # [inputmodel]
    _o("inputmodel", "basedicomodel", "str", None, "Input DicoModel: skip to DDS2_full"),
    _o("inputmodel", "basemaskname", "str", None, "Input mask for the input model"),
    _o("inputmodel", "baseimagename", "str", None, "Input image for the input model"),
)

SECTIONS: tuple[str, ...] = tuple(dict.fromkeys(o.section for o in OPTIONS))
BY_KEY: dict[tuple[str, str], Option] = {(o.section, o.name.lower()): o for o in OPTIONS}


def lookup(section: str, name: str) -> Option | None:
    """The option ``[section] name``; option names are case-insensitive as in ConfigParser."""
    return BY_KEY.get((section, name.lower()))
