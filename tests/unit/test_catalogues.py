"""Catalogues at submit (issue 22 item 6): what a configuration needs, the site's URL templates,
the PanSTARRS tiling, and downloads from a small HTTP server on 127.0.0.1 started here: once,
atomically, checked to be the table the step reads."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

from tests._require import need

np = need("numpy", "science")
need("astropy", "science")
need("casacore", "science")

from hpcddf.engine.sites import load_site_file  # noqa: E402
from hpcddf.errors import ConfigError, SiteError  # noqa: E402
from hpcddf.lofar import catalogues as cat  # noqa: E402

CSV = b"objID,raMean,decMean\n1,150.0,55.0\n2,150.1,55.1\n3,149.9,54.9\n"


class Server:
    """``http.server`` in a thread: every GET is counted; a path's prefix picks the reply."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        self.routes: dict[str, tuple[int, bytes]] = {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                outer.requests.append(self.path)
                status, body = next((v for k, v in outer.routes.items() if self.path.startswith(k)), (404, b"no"))
                cut = status < 0  # promise the whole body, send a tenth of it, hang up
                self.send_response(-status if cut else status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 10] if cut else body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()


@pytest.fixture
def server(monkeypatch):
    for var in ("no_proxy", "NO_PROXY"):  # a proxy of the environment must not take 127.0.0.1
        monkeypatch.setenv(var, "127.0.0.1")
    s = Server()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


def _site(tmp_path: Path, catalogues: str, catalog_dir: Path | None = None):
    cats = f'catalog_dir = "{catalog_dir}"\n' if catalog_dir else ""
    path = tmp_path / "site.toml"
    path.write_text(f'scheduler = "local"\n[paths]\nwork_root = "{tmp_path / "fields"}"\n{cats}'
                    f"[catalogues]\n{catalogues}\n")
    return load_site_file(path)


def make_ms(path: Path, ra: float = 150.0, dec: float = 55.0) -> Path:
    """An empty Measurement Set whose FIELD table holds one phase centre."""
    from casacore.tables import default_ms, table
    path.parent.mkdir(parents=True, exist_ok=True)
    default_ms(str(path)).close()
    with table(str(path / "FIELD"), readonly=False, ack=False) as t:
        t.addrows(1)
        t.putcell("PHASE_DIR", 0, np.radians([[ra, dec]]))
    return path


def _cfg(*overrides: str):
    from hpcddf.lofar.config import load_config
    return load_config([], ["--image-imsize=2000", "--image-cellsize=1.5", *overrides])


def _ensure(site, cfg, workdir: Path, steps, ms, fetch: bool, report) -> set[str]:
    """As ``check_fields`` runs the catalogue half of the checks for one field."""
    fetches = cat.plan_fetches(site, cfg, workdir, steps, ms)
    for f in fetches:
        report(cat.run_fetch(site, f) if fetch else cat.describe(f))
    return set() if fetch else {str(f.need.path) for f in fetches}


def _leftovers(d: Path) -> list[str]:
    return sorted(p.name for p in d.rglob("*")) if d.exists() else []


# ---------------------------------------------------------------- templates and the site config

def test_a_tile_url_fills_centre_and_radius_in_degrees():
    url = cat.tile_url("http://cats.invalid/ps?ra={ra}&dec={dec}&r={radius}&fmt=csv", 150.0, -5.25, 0.5)
    assert url == "http://cats.invalid/ps?ra=150.000000&dec=-5.250000&r=0.5&fmt=csv"


@pytest.mark.parametrize("line,needle", [
    ('panstarrs_url = "http://x.invalid/?ra={ra}&d={decl}"', "names {decl}"),
    ('panstarrs_url = "ftp://x.invalid/{ra}"', "not an http(s) URL"),
    ('panstarrs_url = "http://x.invalid/{ra"', "not a template"),
    ('files = { "sub/VLSS.fits" = "http://x.invalid/v" }', "is not a file name"),
    ("max_mb = 0", "at least 1"),
    ('panstarrs = "http://x.invalid"', "unknown key 'panstarrs'"),
])
def test_a_wrong_catalogues_section_is_refused_when_the_site_loads(tmp_path, line, needle):
    with pytest.raises(SiteError) as exc:
        _site(tmp_path, line)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


# ---------------------------------------------------------------- tiling

def test_hex_tiles_lie_on_a_centred_hex_grid_of_the_image():
    from astropy.wcs import WCS
    centre, npix, cell = (150.0, 55.0), 20000, 1.5 / 3600
    tiles = cat.hex_tiles(centre, npix * cell)
    assert len(tiles) == 11 * 11  # 8.3 deg / (sqrt(3) x 0.45 deg), rounded
    w = WCS(naxis=2)
    w.wcs.ctype, w.wcs.crval = ["RA---SIN", "DEC--SIN"], list(centre)
    w.wcs.cdelt, w.wcs.crpix = [-cell, cell], [npix / 2 + 1, npix / 2 + 1]
    # hextile's pixel positions (row j, column i, odd rows shifted by half a spacing), centred
    x = np.array([npix * (i + 0.5 + (0.25 if j % 2 else -0.25)) / 11 for j in range(11) for i in range(11)])
    y = np.array([npix * (j + 0.5) / 11 for j in range(11) for i in range(11)])
    ra, dec = w.wcs_pix2world(x, y, 0)
    assert np.allclose(np.array(tiles), np.column_stack([ra, dec]), atol=1e-6)
    # every point of the image but a border of a quarter spacing lies within a tile's 0.5 deg
    # (hextile's rows, starting at the east edge, left a whole spacing uncovered in the west)
    from hpcddf.facets import tangent
    half = npix * cell / 2 - 0.25 * 0.45 * np.sqrt(3)
    g = np.mgrid[-half:half:80j, -half:half:80j].reshape(2, -1).T
    t = tangent(np.array(tiles)[:, 0], np.array(tiles)[:, 1], centre)
    assert np.hypot(g[:, None, 0] - t[None, :, 0], g[:, None, 1] - t[None, :, 1]).min(axis=1).max() < 0.5


def test_an_image_smaller_than_a_tile_gets_one_tile_at_its_centre():
    assert cat.hex_tiles((10.0, 40.0), 0.5) == [pytest.approx((10.0, 40.0))]


# ---------------------------------------------------------------- the table check

def test_the_table_check_reads_csv_fits_and_votable_and_names_a_missing_column(tmp_path):
    from astropy.table import Table
    t = Table({"RA": [1.0], "DEC": [2.0], "Peak_flux": [400.0]})
    t.write(tmp_path / "t.fits")
    t.write(tmp_path / "t.vo", format="votable")
    (tmp_path / "t.csv").write_bytes(CSV)
    assert cat.check_table(tmp_path / "t.fits", cat.TGSS_COLUMNS, "x") == ["RA", "DEC", "Peak_flux"]
    assert cat.check_table(tmp_path / "t.vo", cat.SKY_COLUMNS, "x") == ["RA", "DEC"]
    assert cat.check_table(tmp_path / "t.csv", cat.SKY_COLUMNS, "x") == ["raMean", "decMean"]
    with pytest.raises(ConfigError, match="has no Total_flux column"):
        cat.check_table(tmp_path / "t.fits", cat.BOOTSTRAP_COLUMNS, "x")
    (tmp_path / "err.html").write_text("<html><body>Please try again later</body></html>")
    with pytest.raises(ConfigError, match="is not a FITS, VOTable or CSV table|has no ra"):
        cat.check_table(tmp_path / "err.html", cat.SKY_COLUMNS, "x")


# ---------------------------------------------------------------- downloads

def _panstarrs(tmp_path: Path, server: Server):
    site = _site(tmp_path, f'panstarrs_url = "{server.url}/ps?ra={{ra}}&dec={{dec}}&radius={{radius}}"')
    ms = make_ms(tmp_path / "L1" / "a.ms")
    return site, ms, tmp_path / "L1"


def test_panstarrs_is_downloaded_once_per_tile_then_merged_and_a_second_run_downloads_nothing(tmp_path, server):
    from astropy.table import Table
    server.routes["/ps"] = (200, CSV)
    site, ms, workdir = _panstarrs(tmp_path, server)
    said: list[str] = []
    cfg = _cfg("--offsets-method=panstarrs", "--image-imsize=3000")  # 1.25 deg: 2 x 2 tiles
    assert _ensure(site, cfg, workdir, ["offsets"], lambda: ms, True, said.append) == set()
    assert len(server.requests) == 4 and all("radius=0.5" in r for r in server.requests)
    assert "ra=150.0" not in " ".join(server.requests)  # tile centres, not the field centre
    merged = Table.read(workdir / cat.PANSTARRS_MERGED)
    assert len(merged) == 3 and set(merged.colnames) == {"ra", "dec"}  # tile overlaps dropped
    assert said == [f"downloaded the PanSTARRS catalogue ([offsets] method=panstarrs) (4 tiles, 3 sources) "
                    f"into {workdir / cat.PANSTARRS_MERGED}"]
    assert _leftovers(workdir / "panstarrs") == [f"panstarrs-{i}.vo" for i in range(4)] + ["panstarrs.fits"]
    _ensure(site, cfg, workdir, ["offsets"], lambda: ms, True, said.append)
    assert len(server.requests) == 4 and len(said) == 1


def test_a_dry_run_says_what_it_would_download_and_downloads_nothing(tmp_path, server):
    server.routes["/ps"] = (200, CSV)
    site, ms, workdir = _panstarrs(tmp_path, server)
    said: list[str] = []
    pending = _ensure(site, _cfg("--offsets-method=panstarrs"), workdir, ["offsets"], lambda: ms, False, said.append)
    assert pending == {str(workdir / cat.PANSTARRS_MERGED)}
    assert said == [f"would download the PanSTARRS catalogue ([offsets] method=panstarrs) into "
                    f"{workdir / cat.PANSTARRS_MERGED} (1 cone(s) of 0.5 deg from [catalogues] panstarrs_url)"]
    assert server.requests == [] and not (workdir / "panstarrs").exists()


@pytest.mark.parametrize("reply,needle", [
    ((500, b"oops"), "HTTP 500"),
    ((-200, CSV + b"4,150.2,55.2\n" * 500), "ended after"),
    ((200, CSV * 2), "is not numeric"),
    ((200, b""), "gave an empty file"),
    ((200, b"<html>Please try again</html>\n"), "download of"),
    ((200, b"x" * 4096), "is not a FITS, VOTable or CSV table|has no"),
])
def test_a_failed_download_is_one_line_and_leaves_no_file(tmp_path, server, reply, needle):
    server.routes["/ps"] = reply
    site, ms, workdir = _panstarrs(tmp_path, server)
    with pytest.raises(ConfigError) as exc:
        _ensure(site, _cfg("--offsets-method=panstarrs"), workdir, ["offsets"], lambda: ms, True, print)
    assert any(n in str(exc.value) for n in needle.split("|")) and "\n" not in str(exc.value)
    assert _leftovers(workdir / "panstarrs") == []


def test_a_download_above_the_size_cap_is_refused_and_leaves_no_file(tmp_path, server):
    server.routes["/big"] = (200, CSV * 50_000)  # ~3.5 MB
    with pytest.raises(ConfigError, match="more than 1 MB"):
        cat.download(f"{server.url}/big", tmp_path / "c" / "big.csv", cat.SKY_COLUMNS, 10, 2**20)
    assert _leftovers(tmp_path / "c") == []


def test_a_catalogue_in_the_catalogue_dir_is_fetched_from_the_sites_files_table_once(tmp_path, server):
    from astropy.table import Table
    body = tmp_path / "tgss-src.fits"
    Table({"RA": [150.0], "DEC": [55.0], "Peak_flux": [500.0]}).write(body)
    server.routes["/tgss"] = (200, body.read_bytes())
    cats = tmp_path / "cats"
    site = _site(tmp_path, f'files = {{ "TGSS.fits" = "{server.url}/tgss" }}', catalog_dir=cats)
    cfg = _cfg(f"--masking-tgss={cats}/TGSS.fits")
    # two fields of one submission need it: planned for both, downloaded once
    first, second = (cat.plan_fetches(site, cfg, tmp_path / f, [], lambda: Path("unused")) for f in ("L1", "L2"))
    assert cat.run_fetch(site, first[0]).startswith("downloaded the TGSS catalogue")
    assert cat.run_fetch(site, second[0]).endswith(f"is in place at {cats}/TGSS.fits")
    assert cat.plan_fetches(site, cfg, tmp_path / "L3", [], lambda: Path("unused")) == []  # a later submit
    assert server.requests == ["/tgss"] and len(Table.read(cats / "TGSS.fits")) == 1


def test_a_dry_run_leaves_a_catalogue_still_to_come_unread_by_the_step_checks(tmp_path, server):
    from hpcddf.lofar.reduction import check_inputs
    cats = tmp_path / "cats"
    site = _site(tmp_path, f'files = {{ "VLSS.fits" = "{server.url}/vlss" }}', catalog_dir=cats)
    cfg = _cfg(f"--bootstrap-catalogues=['{cats}//VLSS.fits']", "--bootstrap-frequencies=[74e6]")
    said: list[str] = []
    pending = _ensure(site, cfg, tmp_path, ["bootstrap"], lambda: Path("x"), False, said.append)
    assert said == [f"would download the bootstrap catalogue into {cats}/VLSS.fits (one file from "
                    "[catalogues] files 'VLSS.fits')"]
    check_inputs(cfg, ["bootstrap"], tmp_path, pending)  # not read: it is still to come
    with pytest.raises(ConfigError, match="VLSS.fits does not exist"):
        check_inputs(cfg, ["bootstrap"], tmp_path)
    assert server.requests == []


def test_a_missing_catalogue_without_a_url_is_one_line_naming_the_fix(tmp_path):
    site = _site(tmp_path, "")
    with pytest.raises(ConfigError) as exc:
        _ensure(site, _cfg(f"--masking-tgss={tmp_path}/TGSS.fits"), tmp_path, [], lambda: Path("x"), True, print)
    assert "TGSS catalogue ([masking] tgss)" in str(exc.value) and "[catalogues] files" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        _ensure(site, _cfg("--offsets-method=panstarrs"), tmp_path, ["offsets"], lambda: Path("x"), True, print)
    assert "panstarrs_url" in str(exc.value) and "\n" not in str(exc.value)


def test_submits_checks_download_and_the_offsets_step_reads_the_download(tmp_path, server, monkeypatch):
    """The real path: prepare and check_fields as ``hpcddf submit`` runs them; the node's
    offsets step (in the field directory) then finds the same file."""
    from hpcddf.lofar.config import Override
    from hpcddf.lofar.offsets import read_reference, reference_catalogue
    from hpcddf.lofar.prepare import prepare
    from hpcddf.lofar.submit import check_fields
    server.routes["/ps"] = (200, CSV)
    site, _, _ = _panstarrs(tmp_path, server)
    (tmp_path / "fields").mkdir()
    workdir = tmp_path / "fields" / "L123456"
    make_ms(workdir / "L123456_SB000.ms")
    jobs = prepare(site, ["L123456"], overrides=[Override("offsets", "method", "panstarrs"),
                                                 Override("image", "imsize", "2000")])
    said: list[str] = []
    check_fields(site, jobs, {"name": "ddf", "options": {}}, fetch=False, report=said.append)
    assert server.requests == [] and "would download the PanSTARRS catalogue" in said[0]
    check_fields(site, jobs, {"name": "ddf", "options": {}}, fetch=True, report=said.append)
    n = len(server.requests)
    assert n > 0 and said[1].startswith("field L123456: downloading the PanSTARRS catalogue")
    assert said[2].startswith("field L123456: downloaded the PanSTARRS catalogue")
    check_fields(site, jobs, {"name": "ddf", "options": {}}, fetch=True, report=said.append)
    assert len(server.requests) == n and len(said) == 3
    monkeypatch.chdir(workdir)
    ra, _ = read_reference(reference_catalogue(jobs[0].config))
    assert len(ra) == 3


def test_a_relative_catalogue_name_is_the_field_directorys(tmp_path, monkeypatch):
    """lgps_optimized.cfg names its TGSS and bootstrap catalogues without a directory: the steps
    run in the field directory and open them there, so submit looks there too, wherever it is
    typed."""
    from astropy.table import Table

    from hpcddf.lofar.reduction import check_inputs
    field = tmp_path / "L1"
    field.mkdir()
    Table({"RA": [150.0], "DEC": [55.0], "Total_flux": [5.0], "E_Total_flux": [0.1]}).write(field / "VLSS.fits")
    Table({"RA": [150.0], "DEC": [55.0], "Peak_flux": [500.0]}).write(field / "TGSS.fits")
    monkeypatch.chdir(tmp_path)  # not the field directory
    site = _site(tmp_path, "")
    cfg = _cfg("--masking-tgss=TGSS.fits", "--bootstrap-catalogues=['VLSS.fits']", "--bootstrap-frequencies=[74e6]")
    assert cat.plan_fetches(site, cfg, field, ["bootstrap"], lambda: Path("x")) == []
    check_inputs(cfg, ["bootstrap"], field)
    (field / "TGSS.fits").unlink()
    with pytest.raises(ConfigError, match=f"{field}/TGSS.fits does not exist"):
        cat.plan_fetches(site, cfg, field, ["bootstrap"], lambda: Path("x"))
    (field / "VLSS.fits").rename(tmp_path / "VLSS.fits")  # beside the submit, not in the field
    with pytest.raises(ConfigError, match="VLSS.fits does not exist"):
        check_inputs(cfg, ["bootstrap"], field)
