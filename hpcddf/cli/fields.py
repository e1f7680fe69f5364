"""Commands on fields: submit, resubmit, cancel, status, logs, quality, plot-factors."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import click

from hpcddf.cli.app import (
    PASS_THROUGH,
    choose_site,
    cli,
    fields_of,
    out,
    print_json,
    print_result,
    progress,
    site_options,
    split_args,
)


@cli.command(context_settings=PASS_THROUGH)
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
@click.option("--dry-run", is_flag=True, help="Make every check a real submit makes and print the plan; queue nothing.")
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
    _, overrides = split_args([a for a in args if a.startswith("-")])
    if fields_file:
        fields += app.read_fields_file(fields_file)
    s = choose_site(site, site_file)
    recipe = make_recipe(pipeline, pipeline_opts)
    jobs = app.prepare(s, fields, configs, overrides, work_root)
    from hpcddf.lofar.submit import check_fields, submit_fields
    if dry_run:
        # exactly the checks a real submit makes before queueing; catalogues it would download
        # are named, not downloaded
        check_fields(s, jobs, recipe, fetch=False, report=progress)
        _warn_no_effect(jobs)
        doc = app.dry_run_document(s, jobs)
        if as_json:
            print_json(doc)
        else:
            from hpcddf.cli.report import plan_table
            out.print(plan_table(doc))
        return
    result = submit_fields(s, jobs, recipe, progress)
    _warn_no_effect(jobs)
    print_result(result, as_json)


def _warn_no_effect(jobs: Sequence[Any]) -> None:
    """One line per option the configs set that has no effect here (after the checks: an
    error stays the one line a refused submission prints)."""
    from hpcddf.lofar.option_effects import no_effect_warnings
    for line in dict.fromkeys(w for j in jobs for w in no_effect_warnings(j.config)):
        click.echo(f"hpcddf: {line}", err=True)



@cli.command()
@click.argument("fields", nargs=-1, required=True)
@site_options
@click.option("--work-root", type=click.Path(file_okay=False, path_type=Path), help="Override the site's work root.")
@click.option("--json", "as_json", is_flag=True, help="Print the submission as JSON.")
def resubmit(fields: tuple[str, ...], site: str | None, site_file: str | None,
             work_root: Path | None, as_json: bool) -> None:
    """Resume failed or cancelled FIELD(s) from the first stage not done."""
    from hpcddf.lofar.prepare import prepare_resubmit
    from hpcddf.lofar.submit import resubmit_fields
    s = choose_site(site, site_file)
    print_result(resubmit_fields(s, prepare_resubmit(s, fields, work_root), progress), as_json)


@cli.command()
@click.argument("fields", nargs=-1, required=True)
@site_options
@click.option("--work-root", type=click.Path(file_okay=False, path_type=Path), help="Override the site's work root.")
def cancel(fields: tuple[str, ...], site: str | None, site_file: str | None, work_root: Path | None) -> None:
    """Cancel the queued and running jobs of FIELD(s)."""
    from hpcddf.engine.submission import cancel_fields
    s = choose_site(site, site_file)
    for fid, ids in cancel_fields(s, fields_of(s, fields, work_root)).items():
        click.echo(f"{fid}: cancelled {' '.join(ids) if ids else 'nothing (no live jobs)'}")



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
    s = choose_site(site, site_file, starts_jobs=False)
    click.echo(field_logs(fields_of(s, [field], work_root)[0], step, tail_lines), nl=False)


@cli.command()
@click.argument("fields", nargs=-1)
@site_options
@click.option("--work-root", type=click.Path(file_okay=False, path_type=Path), help="Override the site's work root.")
@click.option("--mosaics", "only_mosaics", is_flag=True, help="Show only the mosaics.")
@click.option("--phangs", "phangs_dir", type=click.Path(path_type=Path), metavar="KEYDIR",
              help="Show the tasks of this PHANGS project instead (as `hpcddf phangs status`).")
@click.option("--efficiency", is_flag=True,
              help="Add each stage's CPU efficiency and peak memory (one sacct call); under 50 %% is flagged.")
@click.option("--json", "as_json", is_flag=True, help="Print the states as JSON.")
def status(fields: tuple[str, ...], site: str | None, site_file: str | None,
           work_root: Path | None, only_mosaics: bool, phangs_dir: Path | None, efficiency: bool,
           as_json: bool) -> None:
    """Show the stages, job ids, states and attempts of FIELD(s) (default: all fields, then
    the mosaics), or of a PHANGS project's tasks. An ended stage shows its class (why it
    ended, whether a retry may pass, the fix)."""
    from hpcddf.cli.report import phangs_table, status_table
    from hpcddf.engine.status import collect_status
    from hpcddf.mosaic.jobs import collect_mosaic_status
    if phangs_dir is not None:
        if efficiency:
            from hpcddf.errors import ConfigError
            raise ConfigError("--efficiency is for fields and mosaics, not --phangs",
                              "drop --efficiency, or drop --phangs to see fields")
        from hpcddf.phangs.submit import phangs_status
        rows = phangs_status(phangs_dir)
        if as_json:
            print_json(rows)
        else:
            out.print(phangs_table(rows))
        return
    the_site = choose_site(site, site_file, starts_jobs=False)
    from hpcddf.lofar.quality import status_of
    states = [] if only_mosaics else collect_status(the_site, fields, work_root, products=status_of)
    mosaics = collect_mosaic_status(the_site, work_root) if only_mosaics or not fields else []
    if efficiency:
        _add_efficiency(the_site, states + mosaics)
    if as_json:
        print_json(states + [{**m, "kind": "mosaic"} for m in mosaics])
        return
    if states or not mosaics:
        out.print(status_table(states, efficiency=efficiency))
    if mosaics:
        out.print(status_table(mosaics, title="mosaics", efficiency=efficiency))


def _add_efficiency(site: Any, states: list[dict[str, Any]]) -> None:
    """Only Slurm keeps the accounting --efficiency reads: elsewhere say so, never ignore it."""
    from hpcddf.engine.status import add_efficiency
    if getattr(site, "scheduler", None) != "slurm":
        from hpcddf.errors import SiteError
        raise SiteError("--efficiency needs a Slurm site (it reads sacct's accounting)",
                        "choose a site whose scheduler is slurm, or drop --efficiency")
    add_efficiency(states)


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
    the_site = choose_site(site, site_file, starts_jobs=False)
    comps = [parse_comparison(c) for c in catalogues]
    if quality_cfg:
        comps += comparisons_from_parset(quality_cfg)
    check_comparisons(comps)
    wd = fields_of(the_site, [field], work_root)[0].workdir
    doc = run_quality(wd, comps, min_matches)
    if as_json:
        print_json(doc)
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
    the_site = choose_site(site, site_file, starts_jobs=False)
    wd = fields_of(the_site, [field], work_root)[0].workdir
    for path in plot_field(wd, out):
        click.echo(str(path))
