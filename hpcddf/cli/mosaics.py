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
@click.option("--apply-shifts", is_flag=True,
              help="Move each facet by its astrometric offset (the field's offsets step: facet-offset.txt).")
@click.option("--blank-bad-facets", is_flag=True,
              help="Give no weight to facets in the field's Badfacets.txt or marked Bad by its offsets step.")
@click.option("--astromap-blank", type=float, metavar="ARCSEC",
              help="Give no weight where the field's astromap.fits positional error exceeds ARCSEC.")
@click.option("--facet-noise", is_flag=True, help="Weight by the noise of each facet, not one number per field.")
@click.option("--common-beam", default="auto", show_default=True, metavar="auto|none|ARCSEC",
              help="Convolve inputs with differing beams to their common beam (auto), keep them (none), "
                   "or to a round beam of ARCSEC.")
@click.option("--scale-from-quality", metavar="CATALOGUE|any",
              help="Flux-scale each field by 1/its LOFAR-to-CATALOGUE flux ratio from its quality step.")
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
           exact: bool, apply_shifts: bool, blank_bad_facets: bool, astromap_blank: float | None,
           facet_noise: bool, common_beam: str, scale_from_quality: str | None, catalogue: bool, no_preview: bool, force: bool, local: bool, cpus: int,
           mem_gb: int, walltime: int, max_running: int | None, work_root: Path | None,
           dry_run: bool, as_json: bool) -> None:
    """Mosaic CENTRE pointing(s) with their neighbours, once those are reduced.

    On a Slurm site this is ONE job array, a task per mosaic, each waiting only for the
    neighbours still being reduced. Products go to WORK_ROOT/mosaics/CENTRE/.
    """
    from hpcddf.mosaic.combine import MosaicOptions
    from hpcddf.mosaic.corrections import CorrectionOptions
    from hpcddf.mosaic.jobs import MosaicResources, submit_mosaics
    s = choose_site(site, site_file, local=local)
    doc = submit_mosaics(s, pointings, fields, region, all_, products, work_root or s.work_root,
                         exclude, allow_missing, scales, noises,
                         MosaicOptions(beamcut=beamcut, method="exact" if exact else "bilinear", workers=0,
                                       common_beam=common_beam),
                         force, not no_preview, catalogue,
                         MosaicResources(cpus, mem_gb, walltime, max_running), dry_run,
                         CorrectionOptions(apply_shifts, blank_bad_facets, astromap_blank, facet_noise,
                                           scale_from_quality), progress)
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
