"""The ``hpcddf`` command group, the helpers every command module shares (the one rule for the
site, JSON and progress output) and the entry point, the only place where errors become exit
codes."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import click
from rich.console import Console

from hpcddf import __version__
from hpcddf.errors import ExitCode, HpcddfError

# tables are as wide as $COLUMNS says (a wide terminal shows whole paths), else 160 columns,
# also when the output is a pipe (rich would squeeze them into 80)
out = Console(soft_wrap=False, width=int(os.environ["COLUMNS"]) if os.environ.get("COLUMNS", "").isdigit() else 160)
PASS_THROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


def split_args(args: Sequence[str]) -> tuple[list[str], list[Any]]:
    from hpcddf.lofar.config import split_cli_args
    return split_cli_args(args)


def choose_site(site: str | None, site_file: str | None, *, starts_jobs: bool = True,
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


def print_json(obj: Any) -> None:
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



def progress(msg: str) -> None:
    click.echo(f"hpcddf: {msg}", err=True)


def print_result(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    for fid, info in result["fields"].items():
        jobs_txt = " ".join(f"{k}={v}" for k, v in info["jobs"].items())
        click.echo(f"{fid}: {info['status']} {jobs_txt}".rstrip())


def fields_of(site: Any, fields: Sequence[str], work_root: Path | None) -> list[Any]:
    from hpcddf.engine.fields import field_for
    return [field_for(site, f, work_root or site.work_root) for f in fields]


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
