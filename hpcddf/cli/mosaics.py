"""hpcddf mosaic: mosaics of neighbouring fields."""

from __future__ import annotations

from pathlib import Path

import click

from hpcddf.cli.app import (
    choose_site,
    cli,
    print_json,
    progress,
    site_options,
)


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
    s = choose_site(site, site_file, local=local)
    doc = submit_mosaics(s, pointings, fields, region, all_, products, work_root or s.work_root,
                         exclude, allow_missing, scales, noises,
                         MosaicOptions(beamcut=beamcut, method="exact" if exact else "bilinear", workers=0),
                         force, not no_preview, catalogue,
                         MosaicResources(cpus, mem_gb, walltime, max_running), dry_run, progress)
    if as_json:
        print_json(doc)
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
