"""Commands about sites and nodes: sites, sites show, preflight, config show."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from hpcddf.cli.app import (
    PASS_THROUGH,
    choose_site,
    cli,
    out,
    print_json,
    site_options,
    split_args,
)
from hpcddf.errors import HpcddfError


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
    s = choose_site(site, site_file, starts_jobs=False)
    report = run_preflight(s, scratch=scratch, clean_shm=not no_clean)
    if as_json:
        print_json(report.to_dict())
    else:
        click.echo(report.text())
    if not report.ok:
        raise PreflightError(f"{len(report.failed())} preflight check(s) failed", "see the report above")



@cli.group()
def config() -> None:
    """Inspect pipeline configurations (ddf-pipeline .cfg files)."""


@config.command("show", context_settings=PASS_THROUGH)
@click.argument("args", nargs=-1, type=click.UNPROCESSED, metavar="[CFG...] [--section-option=value]...")
@site_options
@click.option("--cfg", "as_cfg", is_flag=True, help="Print as a .cfg file instead of a table.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def config_show(args: tuple[str, ...], site: str | None, site_file: str | None,
                as_cfg: bool, as_json: bool) -> None:
    """Print the effective configuration: defaults < CFG files in order < overrides in order."""
    from hpcddf.cli.report import config_table
    from hpcddf.lofar.config import load_config
    files, overrides = split_args(args)
    catalog = None
    if site or site_file:
        s = choose_site(site, site_file, starts_jobs=False)
        catalog = str(s.catalog_dir) if s.catalog_dir else None
    cfg = load_config(files, overrides, catalog_dir=catalog)
    from hpcddf.lofar.option_effects import no_effect_warnings
    for line in no_effect_warnings(cfg):
        click.echo(f"hpcddf: {line}", err=True)
    if as_json:
        print_json(cfg.to_dict())
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
    print_json(s.to_dict()) if as_json else click.echo(site_text(s), nl=False)
