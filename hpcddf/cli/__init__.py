"""The ``hpcddf`` command line: parse arguments, call one function, print. No logic here."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import click
from rich.console import Console

from hpcddf import __version__
from hpcddf.errors import ExitCode, HpcddfError

out = Console(soft_wrap=False, width=160)
_PASS = {"ignore_unknown_options": True, "allow_extra_args": True}


def _split(args: Sequence[str]) -> tuple[list[str], list[Any]]:
    from hpcddf.lofar.config import split_cli_args
    return split_cli_args(args)


def _site(site: str | None, site_file: str | None, *, starts_jobs: bool = True,
          local: bool = False) -> Any:
    """The one rule for every command: ``--site-file``, else ``--site`` (``--local`` is
    ``--site local``), else ``$HPCDDF_SITE``; with none of them, commands that only look at
    fields use the embedded ``local`` site, and commands that start jobs refuse (a reduction
    must never start on a login node because a flag was forgotten)."""
    from hpcddf.engine.sites import load_site
    from hpcddf.errors import SiteError
    ctx = click.get_current_context(silent=True)
    from_env = ctx is not None and ctx.get_parameter_source("site") == click.core.ParameterSource.ENVIRONMENT
    given = [flag for flag, value in (("--site", site and not from_env), ("--site-file", site_file),
                                      ("--local", local)) if value]
    if len(given) > 1:
        raise SiteError(f"{' and '.join(given)} given together", "choose the site with only one of them")
    if site_file or local:
        return load_site("local" if local else None, site_file)
    if site or starts_jobs:
        return load_site(site)
    return load_site("local")


def _print_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, default=str))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hpcddf")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, verbose: int, debug: bool) -> None:
    """Reduce LOFAR fields with ddf-pipeline's DDFacet/killMS self-calibration on a cluster.

    \b
    Typical use on a login node:
      hpcddf sites                                 # which clusters are known
      hpcddf submit L123456 --site spider -c tier1.cfg --dry-run
      hpcddf submit L123456 --site spider -c tier1.cfg
      hpcddf status
    """
    ctx.obj = {"debug": debug}
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


_site_opts = [
    click.option("--site", "site", metavar="NAME", envvar="HPCDDF_SITE",
                 help="Site (cluster) name; see `hpcddf sites`. Default: $HPCDDF_SITE."),
    click.option("--site-file", type=click.Path(dir_okay=False), help="Use this site TOML file."),
]


def site_options(f: Any) -> Any:
    for opt in reversed(_site_opts):
        f = opt(f)
    return f


@cli.command(context_settings=_PASS)
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="FIELD... [--section-option=value]...")
@site_options
@click.option("-c", "--config", "configs", multiple=True, type=click.Path(dir_okay=False),
              help="ddf-pipeline .cfg file (repeatable; later files win).")
@click.option("--fields-file", type=click.Path(dir_okay=False), help="File with one field id per line.")
@click.option("--work-root", type=click.Path(file_okay=False, path_type=Path),
              help="Override the site's work root (field directories live under it).")
@click.option("--pipeline", default="ddf", show_default=True, type=click.Choice(["ddf", "scaled"]),
              help="ddf: the DDFacet/killMS reduction; scaled: seconds-long stand-in steps to test a site.")
@click.option("--pipeline-opt", "pipeline_opts", multiple=True, metavar="KEY=VALUE",
              help="Option of the scaled pipeline, e.g. seconds=2 (repeatable).")
@click.option("--dry-run", is_flag=True, help="Check everything and print the plan; queue nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan or the submission as JSON.")
def submit(args: tuple[str, ...], site: str | None, site_file: str | None, configs: tuple[str, ...],
           fields_file: str | None, work_root: Path | None, pipeline: str, pipeline_opts: tuple[str, ...],
           dry_run: bool, as_json: bool) -> None:
    """Check FIELD(s) and the site, plan the stages and queue them.

    Options of the pipeline configuration are given as in ddf-pipeline,
    e.g. --control-restart=False; they override the -c files.
    """
    from hpcddf.lofar import prepare as app
    from hpcddf.lofar.recipes import make_recipe
    # ddf-pipeline style: config files may also be given bare, among the field ids
    configs = configs + tuple(a for a in args if a.endswith(".cfg"))
    fields = [a for a in args if not a.startswith("-") and not a.endswith(".cfg")]
    _, overrides = _split([a for a in args if a.startswith("-")])
    if fields_file:
        fields += app.read_fields_file(fields_file)
    s = _site(site, site_file)
    recipe = make_recipe(pipeline, pipeline_opts)
    jobs = app.prepare(s, fields, configs, overrides, work_root)
    if dry_run:
        doc = app.dry_run_document(s, jobs, reduction=pipeline == "ddf")
        if as_json:
            _print_json(doc)
        else:
            from hpcddf.cli.report import plan_table
            out.print(plan_table(doc))
            for what in doc["unsupported"]:
                click.echo(f"warning: a real submit refuses this config: this hpcddf version cannot run "
                           f"{what} yet (switch it off)", err=True)
        return
    from hpcddf.engine.submission import submit_fields
    _print_result(submit_fields(s, jobs, recipe, _progress), as_json)


def _progress(msg: str) -> None:
    click.echo(f"hpcddf: {msg}", err=True)


def _print_result(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _print_json(result)
        return
    for fid, info in result["fields"].items():
        jobs_txt = " ".join(f"{k}={v}" for k, v in info["jobs"].items())
        click.echo(f"{fid}: {info['status']} {jobs_txt}".rstrip())


def _fields_of(site: Any, fields: Sequence[str], work_root: Path | None) -> list[Any]:
    from hpcddf.engine.fields import field_for
    return [field_for(site, f, work_root or site.work_root) for f in fields]


@cli.command()
@click.argument("fields", nargs=-1, required=True)
@site_options
@click.option("--work-root", type=click.Path(file_okay=False, path_type=Path), help="Override the site's work root.")
@click.option("--json", "as_json", is_flag=True, help="Print the submission as JSON.")
def resubmit(fields: tuple[str, ...], site: str | None, site_file: str | None,
             work_root: Path | None, as_json: bool) -> None:
    """Resume failed or cancelled FIELD(s) from the first stage not done."""
    from hpcddf.engine.submission import resubmit_fields
    from hpcddf.lofar.prepare import prepare_resubmit
    s = _site(site, site_file)
    _print_result(resubmit_fields(s, prepare_resubmit(s, fields, work_root), _progress), as_json)


@cli.command()
@click.argument("fields", nargs=-1, required=True)
@site_options
@click.option("--work-root", type=click.Path(file_okay=False, path_type=Path), help="Override the site's work root.")
def cancel(fields: tuple[str, ...], site: str | None, site_file: str | None, work_root: Path | None) -> None:
    """Cancel the queued and running jobs of FIELD(s)."""
    from hpcddf.engine.submission import cancel_fields
    s = _site(site, site_file)
    for fid, ids in cancel_fields(s, _fields_of(s, fields, work_root)).items():
        click.echo(f"{fid}: cancelled {' '.join(ids) if ids else 'nothing (no live jobs)'}")


@cli.command()
@site_options
@click.option("--scratch", type=click.Path(file_okay=False, path_type=Path),
              help="Check free space here (default: the site's scratch pattern expanded on this node).")
@click.option("--no-clean", is_flag=True, help="Report stale /dev/shm entries but do not remove them.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def preflight(site: str | None, site_file: str | None, scratch: Path | None, no_clean: bool, as_json: bool) -> None:
    """Check this node for DDFacet: /dev/shm, hugepages, map count, memlock, CPUs, scratch, image."""
    from hpcddf.engine.preflight import run_preflight
    from hpcddf.errors import PreflightError
    s = _site(site, site_file, starts_jobs=False)
    report = run_preflight(s, scratch=scratch, clean_shm=not no_clean)
    if as_json:
        _print_json(report.to_dict())
    else:
        click.echo(report.text())
    if not report.ok:
        raise PreflightError(f"{len(report.failed())} preflight check(s) failed", "see the report above")


@cli.command()
@click.argument("field")
@site_options
@click.option("--work-root", type=click.Path(file_okay=False, path_type=Path), help="Override the site's work root.")
@click.option("--step", help="Print this step's command log(s) instead of the overview.")
@click.option("--tail", "tail_lines", type=int, default=0, help="Only the last N lines of each log.")
def logs(field: str, site: str | None, site_file: str | None, work_root: Path | None,
         step: str | None, tail_lines: int) -> None:
    """Where FIELD's logs are, and the time per step and stage (like analyse_logs.py)."""
    from hpcddf.cli.logview import field_logs
    s = _site(site, site_file, starts_jobs=False)
    click.echo(field_logs(_fields_of(s, [field], work_root)[0], step, tail_lines), nl=False)


@cli.command()
@click.argument("fields", nargs=-1)
@site_options
@click.option("--work-root", type=click.Path(file_okay=False, path_type=Path), help="Override the site's work root.")
@click.option("--mosaics", "only_mosaics", is_flag=True, help="Show only the mosaics.")
@click.option("--phangs", "phangs_dir", type=click.Path(path_type=Path), metavar="KEYDIR",
              help="Show the tasks of this PHANGS project instead (as `hpcddf phangs status`).")
@click.option("--json", "as_json", is_flag=True, help="Print the states as JSON.")
def status(fields: tuple[str, ...], site: str | None, site_file: str | None,
           work_root: Path | None, only_mosaics: bool, phangs_dir: Path | None, as_json: bool) -> None:
    """Show the stages, job ids, states and attempts of FIELD(s) (default: all fields, then
    the mosaics), or of a PHANGS project's tasks."""
    from hpcddf.cli.report import status_table
    from hpcddf.engine.status import collect_status
    from hpcddf.mosaic.jobs import collect_mosaic_status
    if phangs_dir is not None:
        from hpcddf.phangs.submit import phangs_status
        from hpcddf.phangs.submit import status_table as phangs_table
        rows = phangs_status(phangs_dir)
        if as_json:
            _print_json(rows)
        else:
            out.print(phangs_table(rows))
        return
    the_site = _site(site, site_file, starts_jobs=False)
    states = [] if only_mosaics else collect_status(the_site, fields, work_root)
    mosaics = collect_mosaic_status(the_site, work_root) if only_mosaics or not fields else []
    if as_json:
        _print_json(states + [{**m, "kind": "mosaic"} for m in mosaics])
        return
    if states or not mosaics:
        out.print(status_table(states))
    if mosaics:
        out.print(status_table(mosaics, title="mosaics"))


@cli.command()
@click.argument("field")
@site_options
@click.option("--catalogue", "catalogues", multiple=True, metavar="NAME=PATH[:RADIUS[:FLUXFACTOR]]",
              help="Comparison catalogue in PyBDSM format (repeatable); fluxfactor 1000 for mJy.")
@click.option("--quality-cfg", type=click.Path(dir_okay=False),
              help="A ddf-pipeline quality parset: its [comparison_cats] are used.")
@click.option("--min-matches", type=int, default=10, show_default=True,
              help="A catalogue with fewer matches is reported but not used.")
@click.option("--work-root", type=click.Path(file_okay=False, path_type=Path), help="Override the site's work root.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def quality(field: str, site: str | None, site_file: str | None, catalogues: tuple[str, ...],
            quality_cfg: str | None, min_matches: int, work_root: Path | None, as_json: bool) -> None:
    """Measure the final image of FIELD: noise, dynamic range, positions and fluxes against
    comparison catalogues. Writes FIELD/quality/ and shows the summary in `hpcddf status`."""
    from hpcddf.lofar.quality import (
        check_comparisons,
        comparisons_from_parset,
        parse_comparison,
        report_text,
        run_quality,
    )
    the_site = _site(site, site_file, starts_jobs=False)
    comps = [parse_comparison(c) for c in catalogues]
    if quality_cfg:
        comps += comparisons_from_parset(quality_cfg)
    check_comparisons(comps)
    wd = _fields_of(the_site, [field], work_root)[0].workdir
    doc = run_quality(wd, comps, min_matches)
    if as_json:
        _print_json(doc)
    else:
        click.echo(report_text(field, doc), nl=False)


@cli.command("plot-factors")
@click.argument("field")
@site_options
@click.option("--work-root", type=click.Path(file_okay=False, path_type=Path), help="Override the site's work root.")
@click.option("--out", type=click.Path(dir_okay=False), help="PNG to write (default: beside the factors).")
def plot_factors(field: str, site: str | None, site_file: str | None, work_root: Path | None,
                 out: str | None) -> None:
    """Plot FIELD's flux-scale bootstrap: source spectra with the fitted factors applied, and
    the factors against frequency (one PNG per observation)."""
    from hpcddf.lofar.bootstrap import plot_field
    the_site = _site(site, site_file, starts_jobs=False)
    wd = _fields_of(the_site, [field], work_root)[0].workdir
    for path in plot_field(wd, out):
        click.echo(str(path))


@cli.command()
@click.argument("fields", nargs=-1, metavar="[CENTRE...]")
@site_options
@click.option("--pointings", required=True, type=click.Path(dir_okay=False),
              help="The survey's pointings: CSV or FITS table with id, ra, dec (degrees).")
@click.option("--region", metavar="RA,DEC,RADIUS", help="Mosaic every pointing within RADIUS deg of RA,DEC.")
@click.option("--all", "all_", is_flag=True, help="Mosaic every pointing of the table.")
@click.option("--product", "products", multiple=True, default=("full",), show_default=True,
              type=click.Choice(["full", "low"]), help="Which final images (repeatable).")
@click.option("--exclude", multiple=True, metavar="FIELD", help="Leave this field out of every mosaic (repeatable).")
@click.option("--allow-missing", is_flag=True,
              help="Make mosaics without neighbours that are neither reduced nor being reduced.")
@click.option("--scale", "scales", multiple=True, metavar="FIELD=FACTOR", help="Flux-scale factor of a field.")
@click.option("--noise", "noises", multiple=True, metavar="FIELD=JY", help="Noise of a field (default: measured).")
@click.option("--beamcut", type=float, default=0.3, show_default=True, help="Ignore a field where its beam is below this.")
@click.option("--exact", is_flag=True, help="Flux-conserving exact reprojection (slower) instead of bilinear.")
@click.option("--catalogue", is_flag=True, help="Also run PyBDSF on each mosaic.")
@click.option("--no-preview", is_flag=True, help="Do not write PNG previews.")
@click.option("--force", is_flag=True, help="Remake mosaics that are already done.")
@click.option("--local", is_flag=True, help="Run here with the local executor (the local site).")
@click.option("--cpus", type=int, default=4, show_default=True, help="CPUs per mosaic task.")
@click.option("--mem-gb", type=int, default=16, show_default=True, help="Memory per mosaic task.")
@click.option("--walltime", type=int, default=120, show_default=True, help="Minutes per mosaic task.")
@click.option("--max-running", type=int, help="At most this many mosaic tasks at once (default: the site's).")
@click.option("--work-root", type=click.Path(file_okay=False, path_type=Path), help="Override the site's work root.")
@click.option("--dry-run", is_flag=True, help="Show what would be made and what it waits for; queue nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def mosaic(fields: tuple[str, ...], site: str | None, site_file: str | None, pointings: str,
           region: str | None, all_: bool, products: tuple[str, ...], exclude: tuple[str, ...],
           allow_missing: bool, scales: tuple[str, ...], noises: tuple[str, ...], beamcut: float,
           exact: bool, catalogue: bool, no_preview: bool, force: bool, local: bool, cpus: int,
           mem_gb: int, walltime: int, max_running: int | None, work_root: Path | None,
           dry_run: bool, as_json: bool) -> None:
    """Mosaic CENTRE pointing(s) with their neighbours, once those are reduced.

    On a Slurm site this is ONE job array, a task per mosaic, each waiting only for the
    neighbours still being reduced. Products go to WORK_ROOT/mosaics/CENTRE/.
    """
    from hpcddf.mosaic.combine import MosaicOptions
    from hpcddf.mosaic.jobs import MosaicResources, submit_mosaics
    s = _site(site, site_file, local=local)
    doc = submit_mosaics(s, pointings, fields, region, all_, products, work_root or s.work_root,
                         exclude, allow_missing, scales, noises,
                         MosaicOptions(beamcut=beamcut, method="exact" if exact else "bilinear", workers=0),
                         force, not no_preview, catalogue,
                         MosaicResources(cpus, mem_gb, walltime, max_running), dry_run, _progress)
    if as_json:
        _print_json(doc)
        return
    for item in doc["to_submit"]:
        waits = ", ".join(item["waits_for"]) or "nothing"
        job = doc["jobs"].get(item["mosaic"], "dry run" if dry_run else "-")
        click.echo(f"{item['mosaic']}: {len(item['inputs'])} fields, waits for {waits}: {job}")
    for name in doc["done"]:
        click.echo(f"{name}: already done")
    for name in doc["already_queued"]:
        click.echo(f"{name}: already queued")
    for name, missing in doc["blocked"].items():
        click.echo(f"{name}: not queued, needs {', '.join(missing)}")


@cli.command()
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--n-ms", type=int, default=2, show_default=True, help="Subbands (one MS each).")
@click.option("--dde-rms-deg", type=float, default=0.0, show_default=True,
              help="RMS of the direction-dependent phase errors (0: none).")
@click.option("--ndir", type=int, default=3, show_default=True, help="Directions of the phase errors.")
@click.option("--noise", type=float, default=0.05, show_default=True, help="Jy per visibility real/imag part.")
@click.option("--ntime", type=int, default=60, show_default=True, help="Integrations of 8 s.")
@click.option("--seed", type=int, default=1, show_default=True)
def simulate(outdir: Path, n_ms: int, dde_rms_deg: float, ndir: int, noise: float, ntime: int, seed: int) -> None:
    """Write a small simulated LOFAR-like field into OUTDIR (MSs, true sky, MS lists, config).

    OUTDIR can then be reduced as a field: hpcddf submit NAME --work-root PARENT.
    """
    from hpcddf.lofar.simulate import SimSpec, simulate_field
    res = simulate_field(outdir, SimSpec(n_ms=n_ms, dde_rms_deg=dde_rms_deg, ndir=ndir,
                                         noise_jy=noise, ntime=ntime, seed=seed))
    for path in (*res.ms, res.skymodel, res.nodes, res.phases, res.config):
        if path is not None:
            click.echo(f"wrote {path}")


@cli.command()
@click.option("--work-root", type=click.Path(file_okay=False, path_type=Path),
              default=Path("hpcddf-demo"), show_default=True, help="Where the demo field lives.")
@click.option("--field", "field_id", default="SIM1", show_default=True, help="Name of the demo field.")
@click.option("--dde-rms-deg", type=float, default=20.0, show_default=True,
              help="RMS of the simulated direction-dependent phase errors.")
@click.option("--timeout", "timeout_s", type=float, default=900.0, show_default=True,
              help="Seconds any one DDF.py/kMS.py command may take.")
def demo(work_root: Path, field_id: str, dde_rms_deg: float, timeout_s: float) -> None:
    """Simulate a small field and reduce it here with DDFacet and killMS (about 10 min on 2 cores).

    Runs the same stages as a cluster run, with --site local, then checks the final image
    against the simulated sky. Needs the science extra: pip install 'hpcddf[science]'.
    """
    from hpcddf.lofar.demo import run_demo
    result = run_demo(work_root, field_id, dde_rms_deg, timeout_s=timeout_s, progress=_progress)
    click.echo(result.text())
    if not result.final.ok():
        raise SystemExit(1)


@cli.group()
def config() -> None:
    """Inspect pipeline configurations (ddf-pipeline .cfg files)."""


@config.command("show", context_settings=_PASS)
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[CFG...] [--section-option=value]...")
@site_options
@click.option("--cfg", "as_cfg", is_flag=True, help="Print as a .cfg file instead of a table.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def config_show(args: tuple[str, ...], site: str | None, site_file: str | None,
                as_cfg: bool, as_json: bool) -> None:
    """Print the effective configuration: defaults < CFG files in order < overrides in order."""
    from hpcddf.cli.report import config_table
    from hpcddf.lofar.config import load_config
    files, overrides = _split(args)
    catalog = None
    if site or site_file:
        s = _site(site, site_file, starts_jobs=False)
        catalog = str(s.catalog_dir) if s.catalog_dir else None
    cfg = load_config(files, overrides, catalog_dir=catalog)
    if as_json:
        _print_json(cfg.to_dict())
    elif as_cfg:
        click.echo(cfg.to_cfg_text(), nl=False)
    else:
        out.print(config_table(cfg))


@cli.group(invoke_without_command=True)
@click.pass_context
def sites(ctx: click.Context) -> None:
    """List the known sites (clusters); `sites show NAME` prints one."""
    if ctx.invoked_subcommand is None:
        from hpcddf.cli.report import sites_table
        from hpcddf.engine.sites import available_sites, load_site_file
        loaded: dict[str, Any] = {}
        for name, path in available_sites().items():
            try:
                loaded[name] = load_site_file(path, name)
            except HpcddfError as exc:
                loaded[name] = exc
        out.print(sites_table(loaded))


@sites.command("show")
@click.argument("name", required=False)
@click.option("--site-file", type=click.Path(dir_okay=False), help="Show this site TOML file.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def sites_show(name: str | None, site_file: str | None, as_json: bool) -> None:
    """Print one site's effective settings."""
    from hpcddf.cli.report import site_text
    from hpcddf.engine.sites import load_site
    s = load_site(name, site_file)
    _print_json(s.to_dict()) if as_json else click.echo(site_text(s), nl=False)


# ------------------------------------------------------------------------------ PHANGS

@cli.group()
def phangs() -> None:
    """PHANGS-ALMA-style line cubes, masks and moment maps from a project's key files."""


def _name_list(text: str | None) -> list[str] | None:
    return [n.strip() for n in text.split(",") if n.strip()] if text else None


@phangs.command("submit")
@click.argument("keydir", type=click.Path(path_type=Path))
@site_options
@click.option("--targets", metavar="T,...", help="Only these targets (a mosaic brings its parts).")
@click.option("--stages", metavar="S,...",
              help="Only these stages: stage_ms, stage_line, imaging, postprocess, derived.")
@click.option("--casa-env", type=click.Path(file_okay=False),
              help="The CASA environment for the CASA stages. Default: $HPCDDF_CASA_ENV.")
@click.option("--dry-run", is_flag=True, help="Check and print the task arrays; queue nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan or the submission as JSON.")
def phangs_submit(keydir: Path, site: str | None, site_file: str | None, targets: str | None,
                  stages: str | None, casa_env: str | None, dry_run: bool, as_json: bool) -> None:
    """Queue the PHANGS project of KEYDIR: one job array per stage, each task waiting only
    for the tasks that make its inputs."""
    from hpcddf.phangs.submit import submission_lines, submit_phangs
    doc = submit_phangs(_site(site, site_file), keydir, _name_list(targets), _name_list(stages),
                        dry_run, casa_env, _progress)
    if as_json:
        _print_json(doc)
        return
    for line in submission_lines(doc):
        click.echo(line)


@phangs.command("status")
@click.argument("keydir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the task states as JSON.")
def phangs_status_cmd(keydir: Path, as_json: bool) -> None:
    """Show the state, job and attempts of every PHANGS task of KEYDIR (or its work dir)."""
    from hpcddf.phangs.submit import phangs_status, status_table
    rows = phangs_status(keydir)
    if as_json:
        _print_json(rows)
    else:
        out.print(status_table(rows))


@phangs.command("simulate")
@click.argument("outdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--casa-env", type=click.Path(file_okay=False),
              help="The CASA environment (containers/make-casa-env.sh). Default: $HPCDDF_CASA_ENV.")
@click.option("--noise-jy", type=float, default=None,
              help="Gaussian noise per visibility part (Jy) instead of CASA's tsys-atm noise.")
def phangs_simulate(outdir: Path, casa_env: str | None, noise_jy: float | None) -> None:
    """Write a small PHANGS project into OUTDIR: a rotating-disk CO(2-1) galaxy observed by ALMA's
    12 m array with CASA's simulator, its key files (OUTDIR/keys) and the true model."""
    from dataclasses import replace

    from hpcddf.phangs.casaenv import find_casa_env
    from hpcddf.phangs.galaxy import GalaxySpec, simulate_galaxy
    spec = GalaxySpec() if noise_jy is None else replace(GalaxySpec(), noise_jy=noise_jy)
    res = simulate_galaxy(outdir, spec, casa_env=find_casa_env(casa_env))
    click.echo(f"simulated {res.ms}")
    click.echo(f"keys:  {res.master_key}   (hpcddf phangs submit {res.master_key.parent} --site local)")
    click.echo(f"truth: {res.truth}")



def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: the only place where errors become exit codes."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="hpcddf",
                 standalone_mode=False)
    except HpcddfError as exc:
        if debug:
            raise
        click.echo(f"hpcddf: error: {exc}", err=True)
        sys.exit(int(exc.exit_code))
    except click.exceptions.Abort:
        click.echo("hpcddf: interrupted", err=True)
        sys.exit(int(ExitCode.INTERRUPTED))
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("hpcddf: interrupted", err=True)
        sys.exit(int(ExitCode.INTERRUPTED))
    except BrokenPipeError:
        sys.exit(int(ExitCode.OK))
    except Exception as exc:  # a bug: say so in one line, the traceback is one flag away
        if debug:
            raise
        click.echo(f"hpcddf: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)",
                   err=True)
        sys.exit(int(ExitCode.ERROR))
