"""The runner of the ``derived`` stage of one PHANGS task: pure Python, no CASA.

Convolution to every resolution, noise cubes, strict masks (this config's and its linked
configs', under per-product locks), the broad mask, then the moments round by round, with the
velocity field and flat masks between the rounds that need them, and a mom1wprior prior of
another config made here when the plan says so. Calls the noise, mask, moment and convolution
functions of :mod:`hpcddf.phangs.noise`, :mod:`hpcddf.phangs.masks`,
:mod:`hpcddf.phangs.moments` and :mod:`hpcddf.phangs.convolution`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpcddf.phangs.run_common import PhangsRunError, RunContext

# ---------------------------------------------------------------------------------------------
# Derived products
# ---------------------------------------------------------------------------------------------

def _native_beam(path: str) -> Any:
    from astropy.io import fits
    from radio_beam import Beam

    from hpcddf.errors import ConfigError
    try:
        return Beam.from_fits_header(fits.getheader(path))
    except Exception as exc:
        raise ConfigError(f"{path} has no restoring beam ({exc})",
                          "the postprocessed cube needs BMAJ/BMIN/BPA") from exc


def _target_beam(level: dict[str, Any], distance_mpc: float | None) -> Any:
    from hpcddf.phangs.convolution import target_beam
    if "ang_arcsec" in level:
        return target_beam(ang_res_arcsec=level["ang_arcsec"])
    return target_beam(phys_res_pc=level["phys_pc"], distance_mpc=distance_mpc)


def _levels_made(ctx: RunContext, chain: dict[str, Any], distance: float | None
                 ) -> list[dict[str, Any]]:
    """Convolve (native copy + each resolution); the levels that can exist. A resolution finer
    than the native beam is left out with a note (PHANGS cannot make it either)."""
    from hpcddf.phangs.convolution import smooth_cube

    tol = float(chain.get("convolve_kw", {}).get("tol", 0.1))
    native = chain["levels"][0]
    cube_in = chain["cube_in"]
    ctx.ensure([native["cube"], native["coverage"], native["coverage2d"]],
               lambda: smooth_cube(cube_in, native["cube"], _native_beam(cube_in), tol,
                                   coverage_path=native["coverage"],
                                   coverage2d_path=native["coverage2d"]))
    bmaj = float(_native_beam(native["cube"]).major.to("arcsec").value)
    levels = [native]
    for lvl in chain["levels"][1:]:
        beam = _target_beam(lvl, distance)
        theta = float(beam.major.to("arcsec").value)
        if (theta - bmaj) / bmaj < -tol:
            ctx.notes.append(f"{chain['config']} {lvl['tag']}: {theta:.3g}\" is finer than the "
                             f"native {bmaj:.3g}\" beam, not made")
            continue
        ctx.ensure([lvl["cube"], lvl["coverage"], lvl["coverage2d"]],
                   lambda lvl=lvl, beam=beam: smooth_cube(
                       native["cube"], lvl["cube"], beam, tol, coverage_path=lvl["coverage"],
                       coverage2d_path=lvl["coverage2d"],
                       distance_mpc=distance if "phys_pc" in lvl else None))
        levels.append(lvl)
    return levels


def _strict_chain(ctx: RunContext, chain: dict[str, Any], distance: float | None
                  ) -> list[dict[str, Any]]:
    """Convolution, noise and strict mask of one config at every level it can have."""
    from hpcddf.phangs.masks import strict_mask
    from hpcddf.phangs.noise import phangs_noise

    levels = _levels_made(ctx, chain, distance)
    for lvl in levels:
        ctx.ensure([lvl["noise"]], lambda lvl=lvl: phangs_noise(
            lvl["cube"], lvl["noise"], **chain.get("noise_kw", {})))
        ctx.ensure([lvl["strictmask"]], lambda lvl=lvl: strict_mask(
            lvl["cube"], lvl["noise"], lvl["coverage"], out_path=lvl["strictmask"],
            **chain.get("strictmask_kw", {})))
    return levels


def _level_products(levels: list[dict[str, Any]]) -> list[str]:
    return [lvl[k] for lvl in levels
            for k in ("cube", "coverage", "coverage2d", "noise", "strictmask")]


def _moment_outputs(m: dict[str, Any]) -> list[str]:
    return [m["out"]] + ([m["err"]] if m["err"] else [])


def _write_cube_moment(m: dict[str, Any]) -> Any:
    from hpcddf.phangs.moments import write_moment
    return write_moment(m["cube"], m["noise"], m["mask"], m["algorithm"], m["out"], m["err"],
                        **m["kwargs"])


def _make_other_prior(ctx: RunContext, prior: dict[str, Any], distance: float | None) -> None:
    """A prior map of another config, made here (its cube, noise, strict mask at that level
    and the moment) under the product locks, as linked strict masks are: whichever task
    comes second finds it made."""
    before = len(ctx.made)
    levels = _strict_chain(ctx, prior["chain"], distance)
    m = prior["moment"]
    if m["tag"] in {lvl["tag"] for lvl in levels}:
        ctx.ensure(_moment_outputs(m), lambda: _write_cube_moment(m))
    if len(ctx.made) > before:
        ctx.notes.append(f"made {len(ctx.made) - before} products of config {prior['config']} "
                         f"for the prior {Path(m['out']).name}")


def _prior_map(ctx: RunContext, m: dict[str, Any]) -> str:
    """The prior velocity field of a mom1wprior map. When the planned prior is missing (or
    none is named) the fallback is the broad mom1 of the coarsest level made: smooth enough to
    reject outliers of the finer broad maps, and present wherever the chain ran. At the
    coarsest level the broad mom1 is then its own prior, so there every detected broad value
    (broad mom0 above its S/N cut) fills a gap."""
    prior = m["prior"]
    path = prior.get("path")
    if prior["source"] != "fallback" and path and Path(path).exists():
        return path
    fallback = next((f for f in prior["fallback"] if Path(f).exists()), None)
    if fallback is None:
        raise PhangsRunError(f"moment {m['moment']}: no prior velocity field (none of "
                             f"{', '.join(Path(f).name for f in prior['fallback'])} exists)",
                             "make the broad mom1 maps first (round 1)")
    why = f"{Path(path).name} is missing" if path else "the moment key names no prior"
    note = (f"moment {m['moment']}: {why}; the prior is {Path(fallback).name} (broad mom1 "
            f"of the coarsest level made)")
    if note not in ctx.notes:
        ctx.notes.append(note)
    return fallback


def _make_moment(ctx: RunContext, m: dict[str, Any], p: dict[str, Any],
                 distance: float | None) -> list[str]:
    """One moment map (and its error map) of any round."""
    from hpcddf.phangs.moments import write_moment
    from hpcddf.phangs.plan_common import FLAT_MASKS

    outs = _moment_outputs(m)
    if m["algorithm"] == "mom1wprior":
        if m["prior"]["source"] == "config" and not all(Path(o).exists() for o in outs):
            # before taking this map's lock: making the prior takes the other config's locks
            _make_other_prior(ctx, p["priors"][m["prior"]["path"]], distance)
        ctx.ensure(outs, lambda: write_moment(
            None, None, None, "mom1wprior", m["out"], m["err"],
            maps_to_pass={**m["maps"], "prior_mom1": _prior_map(ctx, m)}, **m["kwargs"]))
        return outs
    if m.get("mask_kind") in FLAT_MASKS and not Path(m["mask"]).exists():
        ctx.notes.append(f"moment {m['moment']} {m['tag'] or 'native'}: its "
                         f"{m['mask_kind']} was not made (no velocity field), not made")
        return []
    ctx.ensure(outs, lambda: _write_cube_moment(m))
    return outs


def _vfield_and_flat_masks(ctx: RunContext, p: dict[str, Any], made_tags: set[str]
                           ) -> list[str]:
    """The velocity field from the mom1wprior maps made (finest first, then the window key's
    field), then the flat masks that follow it within the window and the shuffled cube."""
    from hpcddf.phangs.masks import flat_mask
    from hpcddf.phangs.moments import write_velocity_field
    from hpcddf.phangs.shuffle import shuffle_cube

    v = p.get("vfield")
    if not v:
        return []
    layers = [f for f in v["layers"] if Path(f).exists()]
    if v.get("external"):
        if Path(v["external"]).exists():
            layers.append(v["external"])
        else:
            ctx.notes.append(f"velocity field {v['external']} (window key) is missing: not used")
    if not layers:
        ctx.notes.append("velocity field not made: none of its maps exists, so no flat masks")
        return []
    ctx.ensure([v["out"]], lambda: write_velocity_field(layers, v["out"], v["template"]))
    products = [v["out"]]
    for f in p.get("flatmasks", []):
        if f["tag"] not in made_tags:
            continue
        ctx.ensure([f["out"]], lambda f=f: flat_mask(f["cube"], v["out"], out_path=f["out"],
                                                     window=f["window_kms"],
                                                     mask_path=f["mask"]))
        products.append(f["out"])
    s = p.get("shuffle")
    if s:  # of the native cube, always made
        ctx.ensure([s["out"]], lambda: shuffle_cube(s["cube"], s["vfield"], out_path=s["out"],
                                                    **s["kw"]))
        products.append(s["out"])
    return products


def run_derived(ctx: RunContext) -> list[str]:
    """Convolve, noise, strict masks (this config and the linked ones), broad mask, then the
    moments round by round: round 1 from the masks, round 2 (mom1wprior) from round-1 maps,
    then the velocity field and flat masks, then round 3 (flat-mask moments)."""
    from hpcddf.phangs.masks import broad_mask

    p = ctx.task.params
    distance = p.get("distance_mpc")
    levels = {p["config"]: _strict_chain(ctx, p["chains"][p["config"]], distance)}
    for c in p["linked"]:
        # the linked config's own task may be running too: the product locks let whichever
        # comes second find the masks made
        before = len(ctx.made)
        levels[c] = _strict_chain(ctx, p["chains"][c], distance)
        if len(ctx.made) > before:
            ctx.notes.append(f"made {len(ctx.made) - before} products of linked config {c}")
    own = levels[p["config"]]
    strict = [lvl["strictmask"] for c in [p["config"], *p["linked"]] for lvl in levels[c]]
    broad = p["broadmask"]
    ctx.ensure([broad["out"]], lambda: broad_mask(own[0]["cube"], strict, out_path=broad["out"],
                                                  **broad["kw"]))
    made_tags = {lvl["tag"] for lvl in own}
    products = _level_products(own) + [broad["out"]]
    ctx.notes += p.get("notes", [])
    vfield_after = (p.get("vfield") or {}).get("after_round")
    rounds = sorted({m.get("round", 1) for m in p["moments"]})
    for rnd in rounds:
        if vfield_after is not None and rnd > vfield_after:
            products += _vfield_and_flat_masks(ctx, p, made_tags)
            vfield_after = None
        for m in p["moments"]:
            if m.get("round", 1) == rnd and m["tag"] in made_tags:
                products += _make_moment(ctx, m, p, distance)
    if vfield_after is not None:
        products += _vfield_and_flat_masks(ctx, p, made_tags)
    for s in p.get("skipped_moments", []):
        ctx.notes.append(f"moment {s['moment']} not made: {s['reason']}")
    return products
