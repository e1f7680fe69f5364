"""hpcddf survey: many fields reduced and mosaicked as one survey, with a database as ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hpcddf.cli.app import choose_site, cli, out, print_json, progress, site_options

_db_option = click.option(
    "--db", "database", metavar="URL|PATH",
    help="The survey database: a SQLite file on a local disk, or mysql+pymysql://USER:PASS@HOST/DB. "
         "Default: the site's [survey] database, else ~/.local/state/hpcddf/survey-SITE.sqlite.")


def _database(site: Any, database: str | None) -> str:
    from hpcddf.survey.storage import default_database
    return database or default_database(site)


@cli.group()
def survey() -> None:
    """A survey: a pointings table, a site, cfg files and a work root, with a database as its
    ledger (each field's state, attempts, node-hours, last error and history).

    \b
      hpcddf survey init --pointings lotss.csv --site spider -c tier1.cfg
      hpcddf survey tick --site spider        # one round: fetch, submit, recover, mosaic
      hpcddf survey run --site spider         # a tick every [survey] tick_minutes, as Slurm jobs
      hpcddf survey status --site spider --png survey.png
      hpcddf survey retry L123456 --site spider --reason "bad station flagged"
    """


@survey.command("init")
@click.option("--pointings", required=True, type=click.Path(dir_okay=False),
              help="The survey's pointings: CSV or FITS table with id, ra, dec (degrees), as for `mosaic`.")
@site_options
@click.option("-c", "--config", "configs", multiple=True, type=click.Path(dir_okay=False),
              help="ddf-pipeline .cfg file for every field (repeatable; later files win).")
@click.option("--work-root", type=click.Path(file_okay=False, path_type=Path),
              help="Where the field directories live. Default: the site's work root.")
@_db_option
@click.option("--name", help="The survey's name. Default: the pointings file's name.")
@click.option("--pipeline", default="ddf", show_default=True, type=click.Choice(["ddf", "scaled"]),
              help="ddf: the DDFacet/killMS reduction; scaled: seconds-long stand-in steps to test a site.")
@click.option("--pipeline-opt", "pipeline_opts", multiple=True, metavar="KEY=VALUE",
              help="Option of the scaled pipeline, e.g. seconds=2 (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def survey_init(pointings: str, site: str | None, site_file: str | None, configs: tuple[str, ...],
                work_root: Path | None, database: str | None, name: str | None, pipeline: str,
                pipeline_opts: tuple[str, ...], as_json: bool) -> None:
    """Create the survey database from the pointings table, or add the table's new pointings to
    it (fields already in it keep their state and history)."""
    from hpcddf.lofar.recipes import make_recipe
    from hpcddf.survey.setup import init_survey
    s = choose_site(site, site_file)
    doc = init_survey(s, pointings, configs, work_root or s.work_root, _database(s, database), name,
                      make_recipe(pipeline, pipeline_opts))
    if as_json:
        print_json(doc)
        return
    click.echo(f"survey {doc['survey']['name']} in {doc['database']}: {len(doc['added'])} field(s) added, "
               f"{doc['kept']} already there, {doc['fields']} in all")
    if doc["not_in_table"]:
        click.echo(f"{doc['not_in_table']} field(s) of the database are not in this table (kept)")


@survey.command("status")
@site_options
@_db_option
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path),
              help="Also draw the pointings on the sky coloured by state into this PNG file.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def survey_status(site: str | None, site_file: str | None, database: str | None, png: Path | None,
                  as_json: bool) -> None:
    """Fields per state, node-hours, fields done per day over the last week, the ETA at that
    rate, and the failed fields with their errors."""
    from hpcddf.cli.report import survey_summary, survey_tables
    from hpcddf.survey.status import plot_sky, survey_status
    db = _database(choose_site(site, site_file, starts_jobs=False), database)
    doc = survey_status(db)
    if png is not None:
        doc["png"] = str(plot_sky(db, png))
    if as_json:
        print_json(doc)
        return
    click.echo(survey_summary(doc))
    for table in survey_tables(doc):
        out.print(table)
    if png is not None:
        click.echo(f"sky plot: {png}")


@survey.command("tick")
@site_options
@_db_option
@click.option("--json", "as_json", is_flag=True, help="Print what the tick did as JSON.")
def survey_tick(site: str | None, site_file: str | None, database: str | None, as_json: bool) -> None:
    """One round: reducing fields reconciled from their states (failures recovered or failed),
    new fields fetched and unpacked, ready fields submitted up to [survey] max_queued, mosaics
    queued for complete neighbourhoods."""
    from hpcddf.survey.tick import tick
    s = choose_site(site, site_file)
    doc = tick(s, _database(s, database), progress)
    if as_json:
        print_json(doc)
        return
    for move, ids in doc["moves"].items():
        click.echo(f"{move}: {len(ids)} field(s): {' '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}")
    for note in doc["notes"]:
        click.echo(note)
    if not doc["moves"]:
        click.echo("nothing moved")


@survey.command("run")
@site_options
@_db_option
@click.option("--stop", is_flag=True, help="Cancel the scheduled tick: the survey stops moving.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def survey_run(site: str | None, site_file: str | None, database: str | None, stop: bool, as_json: bool) -> None:
    """Keep the survey moving without anyone logged in: on Slurm, a tick job that queues its
    successor every [survey] tick_minutes (needs the survey on MySQL/MariaDB); on the local
    site, ticks in the foreground until every field is done, mosaicked or failed."""
    from hpcddf.survey import run
    s = choose_site(site, site_file)
    db = _database(s, database)
    if stop:
        doc = run.stop(db)
        msg = f"cancelled tick job {doc['cancelled']}" if doc["cancelled"] else "no tick job was scheduled"
    elif s.scheduler == "slurm":
        doc = run.start(s, db)
        msg = (f"tick job {doc['tick_job']} queued; it queues the next one every {s.survey.tick_minutes} min"
               if doc["started"] else f"already running: tick job {doc['tick_job']}")
    else:
        doc = run.run_foreground(s, db, progress)
        msg = f"{doc['ticks']} tick(s); every field is done, mosaicked or failed"
    if as_json:
        print_json(doc)
    else:
        click.echo(msg)


@survey.command("retry")
@click.argument("fields", nargs=-1, required=True)
@site_options
@_db_option
@click.option("--reason", required=True, help="Why it may pass now (kept in the field's history).")
@click.option("--json", "as_json", is_flag=True, help="Print the moves as JSON.")
def survey_retry(fields: tuple[str, ...], site: str | None, site_file: str | None, database: str | None,
                 reason: str, as_json: bool) -> None:
    """Put failed fields back once their cause is fixed: to ready if their data is in place (the
    next tick resumes each from its first stage not done), else to new (fetched again)."""
    from hpcddf.survey.tick import retry_failed
    s = choose_site(site, site_file, starts_jobs=False)
    doc = retry_failed(s, _database(s, database), fields, reason)
    if as_json:
        print_json(doc)
        return
    for move, ids in doc["moves"].items():
        click.echo(f"{move}: {' '.join(ids)}")
