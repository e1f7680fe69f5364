"""ddf-pipeline's polarisation-cube glue as a node tool: ``python -m hpcddf.lofar.cubes SUBCOMMAND``.

* ``lists``: the MS lists the cube, Stokes V and spectral images read: ``stokes-mslist-<i>.txt``
  per unique frequency (ddf-pipeline's ``MSList`` rules), ``mslist-<obsid>.txt`` per
  observation, ``mslist_iBand_<i>.txt`` per ``[image] centralfreqs`` band. Unlike ddf-pipeline's
  ``MSList`` it never rewrites REF_FREQUENCY in an MS: the frequency used is the mean CHAN_FREQ
  (what that rewrite copies into REF_FREQUENCY), and DDFacet 0.9.1 / killMS 3.3.0 read
  REF_FREQUENCY only into attributes their imaging and solving do not use.
* ``assemble``: stack the per-frequency ``<root>_IQU_Cube<i>.cube.dirty[.corr].fits`` by
  frequency into ``<root>_QU.cube.dirty[.corr].fits`` (Stokes I dropped), and with ``--split``
  ``<root>_StokesQ/U.cube.dirty[.corr].fits`` whose headers say what the data are (frequency
  axis 3, Stokes axis 4; ddf-pipeline writes them with the 4-D header of the QU cube and fixes
  them in a later script). A missing subband is refused: a linear FITS frequency axis cannot
  describe a gap, and ddf-pipeline's stacked header then labels every later plane wrongly.
* ``compress``: fpack's ``-q`` quantisation through astropy (RICE_1, SUBTRACTIVE_DITHER_1, one
  tile per row, as fpack) into ``<file>.fz``; or, with ``--fpack-clean``/``--fpack-adopt``,
  the bookkeeping around a real ``fpack -O`` command. Every ``.fz`` is decompressed and checked
  against its original, tile by tile within half its quantisation step, before it gets its name;
  ``--delete`` removes an original only after that.
* ``bands``: ddf-pipeline's ``update_frequencies``: the frequency-axis CRVAL and RESTFRQ of every
  FITS image of a spectral band set to the band's central frequency.

Every output is written under a temporary name in its directory and renamed into place.
numpy, astropy and casacore are imported where used: the planner imports the names below on a
login node without the science stack.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from hpcddf.engine.atomic import write_text_atomic
from hpcddf.lofar.stepkit import group_by_obsid

MAX_STOKES_FREQS = 25      # ddf-pipeline's limit on the number of per-frequency cube images
FREQ_KEY_HZ = 1000.0       # MSs whose mean frequencies agree to 1 kHz share a frequency
STOKES_Q, STOKES_U = 2, 3  # FITS STOKES axis values
KINDS = ("dirty", "dirty.corr")  # DDF's --Output-Cubes d and D
FZ = ".fz"


class CubeError(Exception):
    """A cube or list that cannot be made as asked (the message says why)."""


# ------------------------------------------------------------------------------ names

def stokes_list(i: int) -> str:
    return f"stokes-mslist-{i}.txt"


def obsid_list(obsid: str) -> str:
    return f"mslist-{obsid}.txt"


def band_list(i: int) -> str:
    return f"mslist_iBand_{i}.txt"


def cube_image(root: str, i: int) -> str:
    """The DDF image (``--Output-Name``) of frequency ``i`` of a cube set."""
    return f"{root}_IQU_Cube{i}"


def qu_cube(root: str, kind: str) -> str:
    return f"{root}_QU.cube.{kind}.fits"


def split_cube(root: str, stokes: str, kind: str) -> str:
    return f"{root}_Stokes{stokes}.cube.{kind}.fits"


def assembled(root: str, split: bool) -> list[str]:
    """Every cube ``assemble`` writes for a set (the QU cubes first, as ddf-pipeline)."""
    names = [qu_cube(root, k) for k in KINDS]
    return names + ([split_cube(root, s, k) for s in "QU" for k in KINDS] if split else [])


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


# ------------------------------------------------------------------------------ MS frequencies

@dataclass(frozen=True)
class MsFreq:
    ms: str          # as listed (relative to the field directory)
    freq_hz: float   # mean CHAN_FREQ
    nchan: int


def read_ms_freqs(mss: Sequence[str], base: Path = Path(".")) -> list[MsFreq]:
    """Mean CHAN_FREQ and channel count of each MS, from its SPECTRAL_WINDOW subtable only (a
    few rows: cheap enough for a step builder)."""
    from casacore.tables import table
    out = []
    for ms in mss:
        path = Path(ms) if Path(ms).is_absolute() else base / ms
        try:
            with table(f"{path}/SPECTRAL_WINDOW", ack=False) as t:
                freqs = t.getcell("CHAN_FREQ", 0)
        except RuntimeError as exc:
            raise CubeError(f"cannot read the frequencies of {path}: {str(exc).splitlines()[0]}") from None
        out.append(MsFreq(ms, float(sum(freqs) / len(freqs)), len(freqs)))
    return out


@dataclass(frozen=True)
class FreqGroup:
    """The MSs at one frequency (one per observation): one cube image."""

    freq_hz: float
    nchan: int
    mss: tuple[str, ...]


def _by_frequency(infos: Iterable[MsFreq]) -> list[FreqGroup]:
    groups: dict[int, list[MsFreq]] = {}
    for f in infos:
        groups.setdefault(round(f.freq_hz / FREQ_KEY_HZ), []).append(f)
    out = []
    for key in sorted(groups):
        members = groups[key]
        nchans = {m.nchan for m in members}
        if len(nchans) > 1:
            raise CubeError(f"the MSs at {key / 1e3:.3f} MHz have different channel counts "
                            f"({', '.join(f'{m.ms}: {m.nchan}' for m in members)})")
        out.append(FreqGroup(members[0].freq_hz, nchans.pop(), tuple(m.ms for m in members)))
    return out


def stokes_groups(infos: Iterable[MsFreq]) -> list[FreqGroup]:
    """ddf-pipeline's MSList frequencies: all of them up to 25; with more, only those carried
    by the most MSs; still more than 25 is refused."""
    groups = _by_frequency(infos)
    if len(groups) > MAX_STOKES_FREQS:
        most = max(len(g.mss) for g in groups)
        groups = [g for g in groups if len(g.mss) == most]
    if len(groups) > MAX_STOKES_FREQS:
        raise CubeError(f"too many frequencies for the Stokes cubes: {len(groups)} carried by "
                        f"{most} MSs each (at most {MAX_STOKES_FREQS})")
    return groups


def band_groups(infos: Iterable[MsFreq], centralfreqs_mhz: Sequence[float]) -> dict[int, list[str]]:
    """Each MS in the band of the nearest central frequency; bands without an MS are left out."""
    bands: dict[int, list[str]] = {}
    for f in infos:
        i = min(range(len(centralfreqs_mhz)), key=lambda b: abs(centralfreqs_mhz[b] * 1e6 - f.freq_hz))
        bands.setdefault(i, []).append(f.ms)
    return dict(sorted(bands.items()))


def write_lists(mss: Sequence[str], outdir: Path, stokes: bool, obsids: bool,
                centralfreqs: Sequence[float] | None) -> list[Path]:
    written: list[tuple[Path, list[str]]] = []
    if obsids:
        written += [(outdir / obsid_list(o), g) for o, g in group_by_obsid(mss).items()]
    if stokes or centralfreqs:
        infos = read_ms_freqs(mss)
        if stokes:
            written += [(outdir / stokes_list(i), list(g.mss)) for i, g in enumerate(stokes_groups(infos))]
        if centralfreqs:
            written += [(outdir / band_list(i), g) for i, g in band_groups(infos, centralfreqs).items()]
    for path, group in written:
        write_text_atomic(path, "".join(f"{ms}\n" for ms in group))
    return [p for p, _ in written]


# ------------------------------------------------------------------------------ assemble

@dataclass(frozen=True)
class _Cube:
    path: Path
    freqs: Any      # numpy array of the planes' frequencies (Hz)
    q: int          # index of the Q and U planes on the Stokes axis
    u: int


def _axes(path: Path) -> _Cube:
    """The frequencies and the Q/U planes of one DDF cube (Stokes axis 3, frequency axis 4)."""
    import numpy as np
    from astropy.io import fits
    from astropy.wcs import WCS
    header = fits.getheader(path)
    w = WCS(header)
    ctype = [c.split("-")[0] for c in w.wcs.ctype]
    if header.get("NAXIS") != 4 or ctype[2:] != ["STOKES", "FREQ"]:
        raise CubeError(f"{path}: axes {ctype}, expected DDF's [RA, DEC, STOKES, FREQ]")
    freqs = w.sub([4]).pixel_to_world_values(np.arange(header["NAXIS4"]))
    stokes = list(np.rint(w.sub([3]).pixel_to_world_values(np.arange(header["NAXIS3"]))).astype(int))
    if STOKES_Q not in stokes or STOKES_U not in stokes:
        raise CubeError(f"{path}: Stokes planes {stokes} do not include Q and U")
    return _Cube(path, np.atleast_1d(freqs), stokes.index(STOKES_Q), stokes.index(STOKES_U))


def _check_contiguous(cubes: list[_Cube], cdelt: float) -> float:
    """The channel spacing, after refusing a gap or an overlap between subbands."""
    import numpy as np
    freqs = np.concatenate([c.freqs for c in cubes])
    if len(freqs) < 2:
        return float(cdelt)
    steps = np.diff(freqs)
    step = float(np.median(steps))
    bad = np.flatnonzero(np.abs(steps - step) > 1e-3 * abs(step))
    if len(bad):
        i = int(bad[0])
        raise CubeError(f"channels {freqs[i] / 1e6:.4f} and {freqs[i + 1] / 1e6:.4f} MHz are not "
                        f"{step / 1e6:.4f} MHz apart: a subband is missing (or overlaps), and a FITS "
                        "frequency axis cannot describe the gap")
    return step


def _out_header(template: Any, nfreq: int, f0: float, df: float, stokes: Sequence[int],
                freq_axis: int) -> Any:
    """The template's header with the frequency axis on ``freq_axis`` (3 or 4) spanning the
    stacked channels from its first plane, and the Stokes axis on the other one starting at
    ``stokes[0]`` (ddf-pipeline keeps the template's CRVAL3 = I, which labels Q as I)."""
    h = template.copy()
    s_axis = 7 - freq_axis
    h[f"NAXIS{freq_axis}"], h[f"NAXIS{s_axis}"] = nfreq, len(stokes)
    for ax, ctype, crval, cdelt, unit in ((freq_axis, "FREQ", f0, df, "Hz"),
                                          (s_axis, "STOKES", float(stokes[0]), 1.0, None)):
        h[f"CTYPE{ax}"] = (ctype, "Frequency (linear)" if unit else "Coordinate type code")
        h[f"CRVAL{ax}"] = (crval, f"[{unit}] Coordinate value at reference point" if unit else "")
        h[f"CDELT{ax}"] = (cdelt, f"[{unit}] Coordinate increment at reference point" if unit else "")
        h[f"CRPIX{ax}"] = 1.0
        if unit:
            h[f"CUNIT{ax}"] = unit
        else:
            h.remove(f"CUNIT{ax}", ignore_missing=True)
    return h


def _inputs(root: str, count: int, kind: str) -> list[_Cube]:
    paths = [Path(f"{cube_image(root, i)}.cube.{kind}.fits") for i in range(count)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CubeError(f"missing subband cube(s) {', '.join(missing)}: refusing to stack the "
                        "others on a wrong frequency axis")
    return sorted((_axes(p) for p in paths), key=lambda c: float(c.freqs[0]))


def assemble(root: str, count: int, kind: str, split: bool) -> list[Path]:
    """Stack one kind of cube of a set; each input is read once and written plane by plane,
    so only one subband cube is in memory at a time."""
    from astropy.io import fits
    cubes = _inputs(root, count, kind)
    template = fits.getheader(cubes[0].path)
    df = _check_contiguous(cubes, template["CDELT4"])
    nfreq, f0 = sum(len(c.freqs) for c in cubes), float(cubes[0].freqs[0])
    outs = {Path(qu_cube(root, kind)): _out_header(template, nfreq, f0, df, (STOKES_Q, STOKES_U), 4)}
    if split:
        for s, v in (("Q", STOKES_Q), ("U", STOKES_U)):
            outs[Path(split_cube(root, s, kind))] = _out_header(template, nfreq, f0, df, (v,), 3)
    tmps = {p: _tmp(p) for p in outs}
    streams = [fits.StreamingHDU(tmps[p], h) for p, h in outs.items()]
    try:
        for c in cubes:
            _stream_planes(c, streams, split)
    finally:
        for s in streams:
            s.close()
    for p, tmp in tmps.items():
        _check_written(tmp, outs[p])
        os.replace(tmp, p)
    return list(outs)


def _stream_planes(c: _Cube, streams: list[Any], split: bool) -> None:
    import numpy as np
    from astropy.io import fits
    with fits.open(c.path, memmap=True) as hdul:
        data = hdul[0].data
        streams[0].write(np.ascontiguousarray(data[:, [c.q, c.u]], dtype=">f4"))
        if split:
            streams[1].write(np.ascontiguousarray(data[:, c.q], dtype=">f4"))
            streams[2].write(np.ascontiguousarray(data[:, c.u], dtype=">f4"))


def _check_written(path: Path, header: Any) -> None:
    """Read back what was streamed: complete and of the declared shape."""
    from astropy.io import fits
    with fits.open(path, memmap=True) as hdul:
        shape = hdul[0].data.shape
    want = tuple(header[f"NAXIS{i}"] for i in range(header["NAXIS"], 0, -1))
    if shape != want:
        raise CubeError(f"{path}: written shape {shape}, expected {want}")


# ------------------------------------------------------------------------------ compress

def fz_name(path: Path) -> Path:
    return path.with_name(path.name + FZ)


def fpack_tmp(path: Path) -> Path:
    """Where an ``fpack -O`` command writes before the ``.fz`` is verified."""
    return path.with_name(f".{path.name}{FZ}.fpack")


def compress_astropy(path: Path, q: float, tmp: Path) -> None:
    """fpack -q <q>: quantised to 1/q of each row's noise, dithered, Rice-coded."""
    from astropy.io import fits
    with fits.open(path, memmap=True) as hdul:
        data, header = hdul[0].data, hdul[0].header
        tile = (1,) * (data.ndim - 1) + (data.shape[-1],)
        comp = fits.CompImageHDU(data=data, header=header, compression_type="RICE_1",
                                 quantize_level=q, quantize_method=1, dither_seed=1, tile_shape=tile)
        fits.HDUList([fits.PrimaryHDU(), comp]).writeto(tmp, overwrite=True)


def _quantisation(fz: Path, shape: tuple[int, ...]) -> Any:
    """Half the quantisation step of each image row, shaped ``shape[:-1] + (1,)``: the tile's
    ZSCALE / 2 when the file is tiled row by row (fpack's and our default), else half the
    largest step of any tile. A tile stored losslessly has no step (0: exact)."""
    import numpy as np
    from astropy.io import fits
    with fits.open(fz, disable_image_compression=True) as hdul:
        h, table = hdul[1].header, hdul[1].data
        scale = np.nan_to_num(table["ZSCALE"]) if "ZSCALE" in table.columns.names else np.zeros(1)
        rowwise = all(h.get(f"ZTILE{i}", 1) == 1 for i in range(2, h["ZNAXIS"] + 1))
    if rowwise and scale.size == int(np.prod(shape[:-1])):
        return 0.5 * scale.reshape(*shape[:-1], 1)
    return np.full((*shape[:-1], 1), 0.5 * float(scale.max(initial=0.0)))


def _plane_error(got: Any, want: Any, half_step: Any) -> float:
    """The worst error of one plane, or CubeError if a NaN moved or a value is off by more
    than half its row's step (plus float32 rounding of the restored value)."""
    import numpy as np
    if not np.array_equal(np.isnan(got), np.isnan(want)):
        raise CubeError("its NaN pixels differ from the original's")
    err = np.nan_to_num(np.abs(got.astype(np.float64) - want))
    if np.any(err > half_step * (1 + 1e-6) + 1e-6 * np.abs(np.nan_to_num(want))):
        raise CubeError(f"it differs from the original by up to {err.max():.3g}, more than its quantisation allows")
    return float(err.max(initial=0.0))


def verify_fz(original: Path, fz: Path) -> float:
    """Decompress ``fz`` plane by plane (one value of the first axis at a time: a large cube
    never has to fit in memory) and compare it with ``original``: the same shape, NaNs where
    the original has them, every value within half its tile's quantisation step. Returns the
    worst error."""
    from astropy.io import fits
    try:
        with fits.open(fz) as hdul, fits.open(original, memmap=True) as ref:
            comp, want = hdul[1], ref[0].data
            if not isinstance(comp, fits.CompImageHDU) or comp.shape != want.shape:
                raise CubeError(f"not a compressed image of shape {want.shape}")
            half = _quantisation(fz, want.shape)
            return max(_plane_error(comp.section[i], want[i], half[i]) for i in range(want.shape[0]))
    except CubeError as exc:
        raise CubeError(f"{fz} does not verify against {original}: {exc}") from None
    except (OSError, ValueError, TypeError, IndexError, KeyError) as exc:
        raise CubeError(f"{fz} cannot be read back: {exc}") from None


def adopt(path: Path, tmp: Path, delete: bool) -> str:
    """Verify ``tmp`` against ``path``, give it the ``.fz`` name, then delete the original
    when asked."""
    err = verify_fz(path, tmp)
    os.replace(tmp, fz_name(path))
    if delete:
        path.unlink()
    return f"{fz_name(path)}: verified (max error {err:.3g})" + ("; original deleted" if delete else "")


def compress(path: Path, q: float, delete: bool) -> str:
    """``<file>.fz`` with astropy; a file already replaced by its verified ``.fz`` is done."""
    if not path.exists():
        if fz_name(path).is_file():
            return f"{fz_name(path)}: the original was deleted after an earlier verified compression"
        raise CubeError(f"{path} does not exist")
    tmp = _tmp(fz_name(path))
    try:
        compress_astropy(path, q, tmp)
        return adopt(path, tmp, delete)
    finally:
        tmp.unlink(missing_ok=True)


def fpack_clean(path: Path) -> str:
    """fpack refuses an existing output: remove one a killed fpack left."""
    fpack_tmp(path).unlink(missing_ok=True)
    return f"{fpack_tmp(path)}: cleared for fpack"


# ------------------------------------------------------------------------------ bands

def band_images(root: str, i: int) -> list[Path]:
    """Every FITS image of band ``i``: ``<root>_Band<i>.*fits`` and its ``_shift`` images."""
    name = f"{root}_Band{i}"
    return sorted({*Path(".").glob(f"{name}.*fits"), *Path(".").glob(f"{name}_shift.*fits")})


def set_frequency(path: Path, freq_hz: float) -> None:
    """CRVAL of the frequency axis and RESTFRQ to ``freq_hz`` (ddf-pipeline's update_frequencies)."""
    from astropy.io import fits
    with fits.open(path, memmap=True) as hdul:
        h = hdul[0].header
        axes = [i for i in range(1, h.get("NAXIS", 0) + 1) if str(h.get(f"CTYPE{i}", "")).startswith("FREQ")]
        if not axes:
            raise CubeError(f"{path} has no frequency axis")
        h[f"CRVAL{axes[0]}"] = freq_hz
        h["RESTFRQ"] = freq_hz
        tmp = _tmp(path)
        hdul.writeto(tmp, overwrite=True)
    os.replace(tmp, path)


def update_bands(root: str, bands: dict[int, float]) -> list[Path]:
    done = []
    for i, mhz in bands.items():
        images = band_images(root, i)
        if not images:
            raise CubeError(f"no images {root}_Band{i}.*fits to set to {mhz} MHz")
        for p in images:
            set_frequency(p, mhz * 1e6)
        done += images
    return done


# ------------------------------------------------------------------------------ CLI

def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _band(text: str) -> tuple[int, float]:
    i, _, mhz = text.partition("=")
    return int(i), float(mhz)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m hpcddf.lofar.cubes", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("lists", help="stokes-mslist-<i>, mslist-<obsid>, mslist_iBand_<i> files")
    p.add_argument("--stokes", action="store_true", help="one list per unique frequency")
    p.add_argument("--obsids", action="store_true", help="one list per observation")
    p.add_argument("--bands", type=_floats, help="central frequencies (MHz), comma-separated")
    p.add_argument("--outdir", default=".")
    p.add_argument("ms", nargs="+")
    p = sub.add_parser("assemble", help="stack a set's per-frequency cubes into QU cubes")
    p.add_argument("--root", required=True)
    p.add_argument("--count", type=int, required=True, help="number of per-frequency cubes")
    p.add_argument("--split", action="store_true", help="also separate Stokes Q and U cubes")
    p = sub.add_parser("compress", help="<file>.fz as fpack -q would, verified before rename")
    p.add_argument("--q", type=float, default=4.0)
    p.add_argument("--delete", action="store_true", help="delete each original once its .fz verified")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--fpack-clean", action="store_true", help="remove what a killed fpack -O left")
    mode.add_argument("--fpack-adopt", action="store_true", help="verify and rename fpack -O outputs")
    p.add_argument("file", nargs="+")
    p = sub.add_parser("bands", help="set the band images' frequency to the band's central one")
    p.add_argument("--root", required=True)
    p.add_argument("--band", type=_band, action="append", required=True, metavar="I=MHZ")
    return ap


def _run(a: argparse.Namespace) -> list[str]:
    if a.cmd == "lists":
        return [str(p) for p in write_lists(a.ms, Path(a.outdir), a.stokes, a.obsids, a.bands)]
    if a.cmd == "assemble":
        return [str(p) for k in KINDS for p in assemble(a.root, a.count, k, a.split)]
    if a.cmd == "bands":
        return [str(p) for p in update_bands(a.root, dict(a.band))]
    files = [Path(f) for f in a.file]
    if a.fpack_clean:
        return [fpack_clean(f) for f in files]
    if a.fpack_adopt:
        return [adopt(f, fpack_tmp(f), a.delete) for f in files]
    return [compress(f, a.q, a.delete) for f in files]


def main(argv: Sequence[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    try:
        for line in _run(a):
            print(line, flush=True)
    except CubeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
