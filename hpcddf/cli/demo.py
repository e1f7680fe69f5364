"""hpcddf simulate and hpcddf demo: a simulated field, reduced here."""

from __future__ import annotations

from pathlib import Path

import click

from hpcddf.cli.app import (
    cli,
    progress,
)


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
    result = run_demo(work_root, field_id, dde_rms_deg, timeout_s=timeout_s, progress=progress)
    click.echo(result.text())
    if not result.final.ok():
        raise SystemExit(1)
