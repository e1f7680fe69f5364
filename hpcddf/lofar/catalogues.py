"""Catalogues a field's configuration reads, put in place on the login node before anything is
queued.

Compute nodes often have no network, so a catalogue that ddf-pipeline downloads while it runs
(the PanSTARRS reference of ``[offsets] method=panstarrs``, ``utils/get_cat.py``) is downloaded
by ``hpcddf submit`` on the login node instead, and a catalogue the site keeps in its catalogue
directory (TGSS, the bootstrap's VLSS/WENSS/NVSS) may be fetched there once if the site names
its URL. Where the files come from is the site's data (``[catalogues]`` of its config); a
catalogue that is missing and has no URL is a one-line error before anything is queued.

Every download goes to a temporary name beside its target, is checked to be a table with the
columns its step reads, and only then renamed into place: a failed or cut download leaves
nothing behind, and a second submit finds the file and downloads nothing.

PanSTARRS as ddf-pipeline's ``get_cat``: one cone of 0.5 deg radius per tile of a hexagonal
tiling of the image (circles of 0.9 x 0.5 deg), each saved as ``panstarrs/panstarrs-<i>.vo`` in
the field directory; the tiles are then stacked, duplicates (tile overlaps) dropped, into
``panstarrs/panstarrs.fits``, which the offsets step reads. ddf-pipeline tiles its
``image_ampphase1`` image, which does not exist before the run; hpcddf tiles the same grid
(``[image] imsize`` x ``cellsize``, SIN about the phase centre of the first MS; ``hex_tiles``
says how its tiles differ).
"""

from __future__ import annotations

import http.client
import math
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from hpcddf.engine.atomic import atomic_path
from hpcddf.engine.sites import Site
from hpcddf.errors import ConfigError, FieldError

PANSTARRS_DIR = "panstarrs"
PANSTARRS_MERGED = f"{PANSTARRS_DIR}/panstarrs.fits"
TILE_RADIUS_DEG = 0.5        # get_cat's CSIZE: the radius of each cone query
SKYMODEL_RADIUS_DEG = 5.0    # redo_DI's sky model: ddf-pipeline asks for 5 deg around the field
TILE_PACKING = 0.9           # tiles are laid out for circles of 0.9 x that radius (hextile)
RA_NAMES = ("ra", "ramean", "raj2000", "ra_deg")
DEC_NAMES = ("dec", "decmean", "dej2000", "dec_deg")
TGSS_COLUMNS = (("RA",), ("DEC",), ("Peak_flux",))
BOOTSTRAP_COLUMNS = (("RA",), ("DEC",), ("Total_flux",), ("E_Total_flux",))
SKY_COLUMNS = (RA_NAMES, DEC_NAMES)
DYNSPEC_COLUMNS = tuple((c,) for c in ("DESIGNATION", "ra", "dec", "pmra", "pmdec", "ref_epoch", "parallax", "Type"))
CHUNK = 1 << 20


@dataclass(frozen=True)
class Need:
    """One catalogue file a step of the field reads."""

    label: str                              # "TGSS catalogue ([masking] tgss)"
    path: Path
    columns: tuple[tuple[str, ...], ...]    # per column the names it may have (any case)
    panstarrs: bool = False
    skymodel: str | None = None             # a redo_DI sky model of this type (makesourcedb text)


@dataclass(frozen=True)
class Fetch:
    """The downloads that make one missing catalogue: (url, file) each, then a merge for tiles."""

    need: Need
    parts: tuple[tuple[str, Path], ...]
    origin: str                             # which site key gave the URL(s)


# ---------------------------------------------------------------- what a configuration needs

def in_field(workdir: Path | str | None, name: object) -> Path:
    """A catalogue file as a step opens it. A relative name is the field directory's, as
    for ddf-pipeline, whose steps run there (lgps_optimized.cfg names its TGSS and bootstrap
    catalogues so); ``$$`` names are absolute by the time they get here."""
    return Path(workdir or ".") / str(name)


def needs(cfg: object, workdir: Path, steps: Sequence[str]) -> list[Need]:
    """The catalogue files the field's planned steps read, where the steps open them (`in_field`)."""
    get = cfg.get  # type: ignore[attr-defined]
    out: list[Need] = []
    if get("masking", "tgss"):
        out.append(Need("TGSS catalogue ([masking] tgss)", in_field(workdir, get("masking", "tgss")), TGSS_COLUMNS))
    if "bootstrap" in steps:
        out += [Need("bootstrap catalogue", in_field(workdir, p), BOOTSTRAP_COLUMNS)
                for p in get("bootstrap", "catalogues") or []]
    if "redo_DI" in steps:
        kind = str(get("control", "redo_DI_type"))
        out.append(Need(f"{kind} sky model ([control] redo_DI)", in_field(workdir, redo_di_skymodel(kind)), (),
                        skymodel=kind))
    if "dynspec" in steps:
        out.append(Need("dynamic-spectrum targets ([spectra] catalogue)", in_field(workdir, get("spectra", "catalogue")),
                        DYNSPEC_COLUMNS))
    if "offsets" in steps and not get("offsets", "catalogue") and get("offsets", "method") == "panstarrs":
        out.append(Need("PanSTARRS catalogue ([offsets] method=panstarrs)", in_field(workdir, PANSTARRS_MERGED),
                        SKY_COLUMNS, panstarrs=True))
    return out


def redo_di_skymodel(kind: str) -> str:
    """Where redo_DI's sky model is put in the field directory (and its step reads it)."""
    return f"redo_di-{kind.lower()}.skymodel"


def missing_error(need: Need) -> ConfigError:
    """The one line for a catalogue that is missing and that the site cannot download."""
    if need.skymodel:
        return ConfigError(f"{need.label}: {need.path} does not exist and the site has no {need.skymodel} URL",
                           f"set [catalogues] skymodel_urls = {{{need.skymodel} = \"URL with {{ra}}, {{dec}}, "
                           "{radius}\"}} in the site config (the login node downloads it at submit), or put "
                           "the sky model there")
    if need.panstarrs:
        return ConfigError(f"{need.label}: {need.path} does not exist and the site has no PanSTARRS URL",
                           "set [catalogues] panstarrs_url in the site config (the login node downloads it "
                           "at submit), or set [offsets] catalogue to a local file")
    return ConfigError(f"{need.label} {need.path} does not exist",
                       f"put it there, or name its URL in the site config: [catalogues] files = "
                       f"{{\"{need.path.name}\" = \"URL\"}} with [paths] catalog_dir = \"{need.path.parent}\"")


def fetch_for(site: Site, need: Need, centre: Callable[[], tuple[float, float]],
              width_deg: float) -> Fetch | None:
    """How the site downloads a missing catalogue, or None if it cannot."""
    cat = site.catalogues
    if need.skymodel:
        url = cat.skymodel_urls.get(need.skymodel)
        if not url:
            return None
        ra, dec = centre()
        return Fetch(need, ((tile_url(url, ra, dec, SKYMODEL_RADIUS_DEG), need.path),),
                     f"[catalogues] skymodel_urls {need.skymodel!r}")
    if need.panstarrs:
        if not cat.panstarrs_url:
            return None
        tiles = hex_tiles(centre(), width_deg)
        parts = tuple((tile_url(cat.panstarrs_url, ra, dec, TILE_RADIUS_DEG),
                       need.path.parent / f"panstarrs-{i}.vo") for i, (ra, dec) in enumerate(tiles))
        return Fetch(need, parts, "[catalogues] panstarrs_url")
    url = cat.files.get(need.path.name)
    if url is None or site.catalog_dir is None or not _same_dir(need.path.parent, site.catalog_dir):
        return None
    return Fetch(need, ((url, need.path),), f"[catalogues] files {need.path.name!r}")


def _same_dir(a: Path, b: Path) -> bool:
    return a.expanduser().absolute() == b.expanduser().absolute() or (
        a.exists() and b.exists() and a.resolve() == b.resolve())


# ---------------------------------------------------------------- PanSTARRS tiles

def tile_url(template: str, ra: float, dec: float, radius: float) -> str:
    """The site's template with a tile's centre and radius in degrees."""
    return template.format(ra=f"{ra:.6f}", dec=f"{dec:.6f}", radius=f"{radius:g}")


def hex_tiles(centre: tuple[float, float], width_deg: float) -> list[tuple[float, float]]:
    """Tile centres (ra, dec degrees) over a square image of ``width_deg`` about ``centre``:
    ddf-pipeline's ``hextile`` rows of n circles, n = width / (sqrt(3) x 0.9 x 0.5 deg) rounded,
    alternate rows half a spacing apart.

    Reference quirk: hextile starts every row at the image's east edge, so its rows end one
    spacing (0.78 deg, more than the 0.5 deg radius) short of the west edge, and an image
    narrower than half a spacing gets no tile. Fixed here: the rows are centred on the image
    (even rows a quarter spacing east, odd rows a quarter west), which covers all but a border
    of a quarter spacing, and there is at least one tile."""
    spacing = TILE_PACKING * TILE_RADIUS_DEG * math.sqrt(3.0)
    n = max(1, int(0.5 + width_deg / spacing))
    out = []
    for j in range(n):
        shift = (0.25 if j % 2 else -0.25) if n > 1 else 0.0
        for i in range(n):
            x = width_deg * ((i + 0.5 + shift) / n - 0.5)  # image x grows west
            y = width_deg * ((j + 0.5) / n - 0.5)
            out.append(sin_to_sky(centre, -x, y))
    return out


def sin_to_sky(centre: tuple[float, float], east_deg: float, north_deg: float) -> tuple[float, float]:
    """The sky position at SIN-projection offsets (degrees east and north) from ``centre``."""
    ra0, dec0 = math.radians(centre[0]), math.radians(centre[1])
    l, m = math.radians(east_deg), math.radians(north_deg)
    n = math.sqrt(max(0.0, 1.0 - l * l - m * m))
    dec = math.asin(m * math.cos(dec0) + n * math.sin(dec0))
    ra = ra0 + math.atan2(l, n * math.cos(dec0) - m * math.sin(dec0))
    return math.degrees(ra) % 360.0, math.degrees(dec)


def field_centre(ms: Path) -> tuple[float, float]:
    """The phase centre (ra, dec degrees) of a Measurement Set: its FIELD table's PHASE_DIR."""
    try:
        from casacore.tables import table  # type: ignore[import-not-found]
    except ImportError:
        raise ConfigError("the PanSTARRS download needs the field centre, read from the MS with python-casacore",
                          "pip install 'hpcddf[science]' on the login node, or set [offsets] catalogue") from None
    try:
        with table(str(ms / "FIELD"), ack=False, readonly=True) as t:
            ra, dec = (float(v) for v in t.getcol("PHASE_DIR")[0][0])
    except Exception as exc:
        raise FieldError(f"cannot read the phase centre of {ms}: {str(exc).splitlines()[0][:150]}",
                         "check that it is a complete Measurement Set (FIELD table)") from None
    return math.degrees(ra) % 360.0, math.degrees(dec)


# ---------------------------------------------------------------- download and check

def download(url: str, dest: Path, columns: tuple[tuple[str, ...], ...], timeout_s: float,
             max_bytes: int, skymodel: bool = False) -> int:
    """``url`` to ``dest``, atomically: streamed to a temporary name, refused above
    ``max_bytes``, checked to be a table with ``columns`` (or a makesourcedb sky model with
    sources), then renamed. Returns its size."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        size = _fetch(url, tmp, timeout_s, max_bytes)
        if size == 0:
            raise ConfigError(f"downloading {url} gave an empty file", "check the URL in the site's [catalogues]")
        if skymodel:
            check_skymodel(tmp, what=f"the download of {url}")
        else:
            check_table(tmp, columns, what=f"the download of {url}")
    return size


def check_skymodel(path: Path, what: str) -> int:
    """A makesourcedb sky model with at least one source (a GSM/TGSS error page is HTML)."""
    from hpcddf.lofar.redodi import RedoDIError, check_makesourcedb
    try:
        return check_makesourcedb(path.read_text(errors="replace"), what)
    except RedoDIError as exc:
        raise ConfigError(str(exc), "check [catalogues] skymodel_urls and the field's position") from None


def _fetch(url: str, out: Path, timeout_s: float, max_bytes: int) -> int:
    hint = "check the URL in the site's [catalogues] and that this login node reaches it"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(out, "wb") as fh:
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise _too_big(url, int(length), max_bytes)
            size = 0
            while chunk := resp.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise _too_big(url, size, max_bytes)
                fh.write(chunk)
            if length and length.isdigit() and size != int(length):
                raise ConfigError(f"downloading {url} ended after {size} of {length} bytes", hint)
            return size
    except urllib.error.HTTPError as exc:
        raise ConfigError(f"downloading {url} failed: HTTP {exc.code} {exc.reason}", hint) from None
    except urllib.error.URLError as exc:
        raise ConfigError(f"downloading {url} failed: {exc.reason}", hint) from None
    except (TimeoutError, OSError, http.client.HTTPException) as exc:
        raise ConfigError(f"downloading {url} failed: {type(exc).__name__} {exc}".rstrip(), hint) from None


def _too_big(url: str, size: int, max_bytes: int) -> ConfigError:
    return ConfigError(f"downloading {url}: more than {max_bytes // 2**20} MB ({size} bytes), not a catalogue this size",
                       "check the URL, or raise [catalogues] max_mb in the site config")


def read_table(path: Path) -> object:
    """A FITS, VOTable or CSV table, told apart by its first bytes (downloads need not be named
    after their format)."""
    from astropy.table import Table
    with open(path, "rb") as fh:
        head = fh.read(512).lstrip()
    if head.startswith(b"SIMPLE"):
        return Table.read(path, format="fits")
    if head.startswith((b"<?xml", b"<VOTABLE")):
        return Table.read(path, format="votable")
    return Table.read(path, format="ascii.csv", comment="#")


def check_table(path: Path, columns: tuple[tuple[str, ...], ...], what: str) -> list[str]:
    """The table's column names holding each of ``columns``; a one-line error if it is not a
    table or lacks one."""
    try:
        table = read_table(path)
        names = list(table.colnames)  # type: ignore[attr-defined]
    except ImportError:
        raise ConfigError("checking a downloaded catalogue needs astropy",
                          "pip install 'hpcddf[science]' on the login node") from None
    except Exception as exc:
        raise ConfigError(f"{what} is not a FITS, VOTable or CSV table: {str(exc).splitlines()[0][:150] if str(exc) else type(exc).__name__}",
                          "check the URL in the site's [catalogues]: it must return the catalogue itself") from None
    lower = {n.lower(): n for n in names}
    found = [next((lower[c.lower()] for c in alts if c.lower() in lower), None) for alts in columns]
    if None in found:
        want = " or ".join(columns[found.index(None)])
        raise ConfigError(f"{what} has no {want} column (has {', '.join(names[:8])})",
                          "check the URL in the site's [catalogues]: it must return the catalogue the step reads")
    for name in found:
        _numeric(table, str(name), what)
    return [str(f) for f in found]


def _numeric(table: object, name: str, what: str) -> None:
    import numpy as np
    try:
        np.asarray(table[name], dtype=float)  # type: ignore[index]
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: column {name} is not numeric",
                          "check the URL in the site's [catalogues]: it must return the catalogue the step reads") from None


def merge_tiles(tiles: Sequence[Path], out: Path) -> int:
    """The tiles stacked into one FITS table of ra, dec (degrees), duplicates of overlapping
    tiles dropped (get_cat's merge: unique on ra and dec). Returns the number of sources."""
    import numpy as np
    from astropy.table import Table
    ra, dec = [], []
    for t in tiles:
        ra_c, dec_c = check_table(t, SKY_COLUMNS, what=str(t))
        tab = read_table(t)
        ra.append(np.asarray(tab[ra_c], float))  # type: ignore[index]
        dec.append(np.asarray(tab[dec_c], float))  # type: ignore[index]
    pairs = np.unique(np.column_stack([np.concatenate(ra), np.concatenate(dec)]), axis=0)
    with atomic_path(out) as tmp:
        Table({"ra": pairs[:, 0], "dec": pairs[:, 1]}).write(tmp, format="fits", overwrite=True)
    return len(pairs)


def run_fetch(site: Site, fetch: Fetch) -> str:
    """Download what ``fetch`` names (tiles already there are kept) and put the catalogue in
    place; returns what was done, for the submit's progress line."""
    if fetch.need.path.is_file():  # another field of this submission needed it too
        return f"the {fetch.need.label} is in place at {fetch.need.path}"
    timeout, cap = site.catalogues.timeout_s, site.catalogues.max_mb * 2**20
    columns = SKY_COLUMNS if fetch.need.panstarrs else fetch.need.columns
    got = sum(download(url, dest, columns, timeout, cap, skymodel=bool(fetch.need.skymodel))
              for url, dest in fetch.parts if not dest.is_file())
    if fetch.need.panstarrs:
        n = merge_tiles([dest for _, dest in fetch.parts], fetch.need.path)
        return f"downloaded the {fetch.need.label} ({len(fetch.parts)} tiles, {n} sources) into {fetch.need.path}"
    return f"downloaded the {fetch.need.label} ({got} bytes) into {fetch.need.path}"


def describe(fetch: Fetch, now: bool = False) -> str:
    """What a real submit downloads (``now``) or would download (``--dry-run`` prints it and
    downloads nothing)."""
    count = f"{len(fetch.parts)} cone(s) of {TILE_RADIUS_DEG:g} deg" if fetch.need.panstarrs else "one file"
    verb = "downloading" if now else "would download"
    return f"{verb} the {fetch.need.label} into {fetch.need.path} ({count} from {fetch.origin})"


def plan_fetches(site: Site, cfg: object, workdir: Path, steps: Sequence[str],
                 first_ms: Callable[[], Path]) -> list[Fetch]:
    """The downloads that put every missing catalogue of the field's steps in place; a one-line
    error for one the site cannot download. Nothing is fetched yet: the submit makes its other
    checks first, and ``--dry-run`` only says what would be fetched (``describe``)."""
    get = cfg.get  # type: ignore[attr-defined]
    width = float(get("image", "imsize")) * float(get("image", "cellsize")) / 3600.0
    fetches = []
    for need in needs(cfg, workdir, steps):
        if need.path.is_file():
            continue
        plan = fetch_for(site, need, lambda: field_centre(first_ms()), width)
        if plan is None:
            raise missing_error(need)
        fetches.append(plan)
    return fetches
