"""hpcddf survey: many fields reduced and mosaicked as one survey, with a database as ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hpcddf.cli.app import choose_site, cli, out, print_json, site_options

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
      hpcddf survey status --site spider --png survey.png
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
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def survey_init(pointings: str, site: str | None, site_file: str | None, configs: tuple[str, ...],
                work_root: Path | None, database: str | None, name: str | None, as_json: bool) -> None:
    """Create the survey database from the pointings table, or add the table's new pointings to
    it (fields already in it keep their state and history)."""
    from hpcddf.survey.setup import init_survey
    s = choose_site(site, site_file)
    doc = init_survey(s, pointings, configs, work_root or s.work_root, _database(s, database), name)
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
