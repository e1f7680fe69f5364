"""hpcddf phangs: PHANGS-ALMA-style products from key files."""

from __future__ import annotations

from pathlib import Path

import click

from hpcddf.cli.app import (
    choose_site,
    cli,
    out,
    print_json,
    progress,
    site_options,
)

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
              help="Only these stages: stage_ms, stage_line, imaging, postprocess, derived, release.")
@click.option("--casa-env", type=click.Path(file_okay=False),
              help="The CASA environment for the CASA stages. Default: $HPCDDF_CASA_ENV.")
@click.option("--dry-run", is_flag=True, help="Check and print the task arrays; queue nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the plan or the submission as JSON.")
def phangs_submit(keydir: Path, site: str | None, site_file: str | None, targets: str | None,
                  stages: str | None, casa_env: str | None, dry_run: bool, as_json: bool) -> None:
    """Queue the PHANGS project of KEYDIR: one job array per stage, each task waiting only
    for the tasks that make its inputs."""
    from hpcddf.phangs.submit import submission_lines, submit_phangs
    doc = submit_phangs(choose_site(site, site_file), keydir, _name_list(targets), _name_list(stages),
                        dry_run, casa_env, progress)
    if as_json:
        print_json(doc)
        return
    for line in submission_lines(doc):
        click.echo(line)


@phangs.command("status")
@click.argument("keydir", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the task states as JSON.")
def phangs_status_cmd(keydir: Path, as_json: bool) -> None:
    """Show the state, job and attempts of every PHANGS task of KEYDIR (or its work dir)."""
    from hpcddf.cli.report import phangs_table
    from hpcddf.phangs.submit import phangs_status
    rows = phangs_status(keydir)
    if as_json:
        print_json(rows)
    else:
        out.print(phangs_table(rows))


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
