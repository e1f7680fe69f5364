"""The runners of the CASA stages of one PHANGS task: stage_ms, stage_line, imaging, postprocess.

Each maps the task's planned parameters to ``casa_tasks`` options and runs the stages in the
separate CASA environment through :meth:`hpcddf.phangs.run_common.RunContext.casa`; the
postprocess of a linear mosaic then combines the parts here (:mod:`hpcddf.phangs.linmos`).
A feather config's postprocess feathers line cubes and continuum images alike.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from hpcddf.engine.atomic import write_json_atomic
from hpcddf.phangs.linmos import MOSAIC_PRODUCTS, linear_mosaic
from hpcddf.phangs.run_common import PhangsRunError, RunContext

# ---------------------------------------------------------------------------------------------
# CASA stages
# ---------------------------------------------------------------------------------------------

def _not_implemented(what: str, hint: str) -> PhangsRunError:
    return PhangsRunError(f"{what} is not implemented in this version's casa_tasks", hint)


def _line_only(ctx: RunContext) -> dict[str, Any]:
    p = ctx.task.params
    if p.get("kind") != "line":
        raise _not_implemented(f"task {ctx.task.id}: continuum product {p.get('product')}",
                               "leave continuum products out of the CASA stages for now "
                               "(only line cubes are imaged)")
    return p


def _product_params(ctx: RunContext) -> dict[str, Any]:
    """The task's parameters; staging and imaging take line and continuum products."""
    p = ctx.task.params
    if p.get("kind") not in ("line", "cont"):
        raise PhangsRunError(f"task {ctx.task.id}: product {p.get('product')} has no kind "
                             f"(line or cont) in its plan",
                             "plan the project again with this version (hpcddf phangs submit)")
    return p


def _mkparents(*paths: str) -> None:
    for path in paths:
        Path(path).parent.mkdir(parents=True, exist_ok=True)


def _window(p: dict[str, Any]) -> dict[str, Any]:
    return {"restfreq_ghz": p["restfreq_ghz"], "vsys_kms": p["vsys_kms"],
            "vwidth_kms": p["vwidth_kms"]}


def _timebin(p: dict[str, Any]) -> str | None:
    """The array_tag config's split timebin; None (the option left out) for no averaging."""
    timebin = p.get("timebin") or "0s"
    return None if float(timebin.rstrip("minsh") or 0) == 0 else timebin


def run_stage_ms(ctx: RunContext) -> list[str]:
    p = _product_params(ctx)
    if p["kind"] == "cont":
        # the whole band (or the product's frequency ranges): lines are flagged in stage_line
        _mkparents(p["split"])
        ctx.casa("split", vis=p["vis"], outputvis=p["split"], field=p["field"] or None,
                 continuum=True, freq_range_ghz=p["freq_ranges_ghz"], timebin=_timebin(p))
        return [p["split"]]
    _mkparents(p["split"], p["contsub"])
    # the line_product's flag_edge_fraction and combinespw (None/False: the option is left out)
    ctx.casa("split", vis=p["vis"], outputvis=p["split"], field=p["field"] or None,
             margin_kms=p["margin_kms"], flag_edge_fraction=p.get("flag_edge_fraction") or None,
             timebin=_timebin(p), **_window(p))
    ctx.casa("contsub", vis=p["split"], outputvis=p["contsub"], fitorder=p["fitorder"],
             combinespw=bool(p.get("combinespw")),
             exclude_kms=[f"{lo},{hi}" for lo, hi in p["exclude_kms"]], **_window(p))
    return [p["contsub"]]


def run_stage_line(ctx: RunContext) -> list[str]:
    p = _product_params(ctx)
    _mkparents(p["outputvis"])
    if p["kind"] == "cont":
        ctx.casa("extract_continuum", vis=p["vis"], outputvis=p["outputvis"],
                 channel_ghz=p["channel_ghz"], flag_ghz=p["flag_ghz"])
        return [p["outputvis"]]
    ctx.casa("extract_line", vis=p["vis"], outputvis=p["outputvis"],
             channel_kms=p["channel_kms"], statwt_edge_kms=p["statwt_edge_kms"], **_window(p))
    return [p["outputvis"]]


_ARCSEC = re.compile(r"^\s*([0-9.eE+-]+)\s*arcsec\s*$")


def _cell_arcsec(value: Any) -> float | None:
    """'0.3arcsec' (or a list of two of them) as a number; None when not in arcsec."""
    if isinstance(value, (list, tuple)) and value:
        value = value[0]
    m = _ARCSEC.match(str(value)) if value else None
    return float(m.group(1)) if m else None


def scales_in_pixels(scales_arcsec: list[float], cell_arcsec: float | None) -> str | None:
    """The interf config's clean_scales_arcsec as casa_tasks' ``--scales-pix`` text."""
    if not scales_arcsec or not cell_arcsec:
        return None
    pix = sorted({round(float(s) / cell_arcsec) for s in scales_arcsec})
    return ",".join(str(s) for s in pix)


def run_imaging(ctx: RunContext) -> list[str]:
    # a continuum product's recipes say specmode 'mfs' (the plan sees to it) and it has no
    # rest frequency: the same steps then make one plane
    p = _product_params(ctx)
    ctx.notes += p.get("overrides", [])  # the override key lines the recipes carry
    if p.get("chunk"):
        return _run_chunk(ctx, p)
    base = p["imagename"]
    _mkparents(base)
    if p.get("gather"):
        # the chunks' images into the cube, with the single call's names and layout
        missing = [m for m in p["inputs"] if not Path(m).is_file()]
        if missing:
            raise PhangsRunError(f"task {ctx.task.id}: a chunk is not done: no {missing[0]}",
                                 "resubmit: the chunks not done run again, then this gather")
        ctx.casa("gather_chunks", imagename=base, chunk_imagename=p["gather"])
    else:
        _image_steps(ctx, p, base)
    ctx.casa("export_image", imagename=base)
    return [f"{base}.image", f"{base}.pb", f"{base}_singlescale.image", f"{base}.fits"]


def _image_steps(ctx: RunContext, p: dict[str, Any], base: str) -> None:
    """dirty, clean mask, multiscale, singlescale of the whole cube, or the steps of a chunk's
    phase (``chunk_phase``: dirty; clean mask and multiscale; singlescale), to the noise of
    the whole cube from every chunk's residual (``noise_from``, see plan_chunks)."""
    recipes = p["recipes"]
    phase = p.get("chunk_phase")
    img = {"vis": p["vis"], "imagename": base, "restfreq_ghz": p["restfreq_ghz"],
           "chunk": ",".join(map(str, p["chunk"])) if phase else None}
    noise = {"noise_from": p.get("noise_from") or None}
    dirty: dict[str, Any] = {}
    if phase in (None, "dirty"):
        dirty = ctx.casa("dirty", tclean=recipes["dirty"], **img)
    # the cleanmask_key's mask put on the cube's (chunk's) grid when the key gives one, else a
    # S/N mask of the dirty cube; with a key mask the single-scale S/N mask stays inside it
    user_mask = p.get("cleanmask")
    if phase in (None, "multiscale"):
        ctx.casa("clean_mask", imagename=base, from_fits=user_mask, **noise)
        scales = scales_arcsec = None
        if "scales" not in recipes["multiscale"]:
            # the dirty stage reports the cell it chose; a rerun that skipped it has it recorded
            cell = (dirty.get("cell") or ctx.previous_steps.get("dirty", {}).get("cell")
                    or recipes["multiscale"].get("cell"))
            scales = scales_in_pixels(p["clean_scales_arcsec"], _cell_arcsec(cell))
            if scales is None and p["clean_scales_arcsec"]:
                # a chunk's dirty cube was another task's: the stage converts with its cell
                scales_arcsec = ",".join(str(s) for s in p["clean_scales_arcsec"])
        ctx.casa("multiscale", tclean=recipes["multiscale"], scales_pix=scales,
                 scales_arcsec=scales_arcsec, **img, **noise)
    if phase in (None, "singlescale"):
        ctx.casa("singlescale", tclean=recipes["singlescale"],
                 within_mask=f"{base}_cleanmask.im" if user_mask else None, **img, **noise)


def _run_chunk(ctx: RunContext, p: dict[str, Any]) -> list[str]:
    """One phase of one chunk of a cube, in the chunk's own directory (its imagename's); the
    last phase then writes the chunk's done-marker, last and atomically: the gather and a
    resubmission trust the marker, not the images a killed attempt may have left."""
    k, n = p["chunk"]
    base = p["imagename"]
    _mkparents(base)
    _image_steps(ctx, p, base)
    if "marker" not in p:
        return list(ctx.task.outputs)
    write_json_atomic(Path(p["marker"]), {"task": ctx.task.id, "chunk": k, "of": n,
                                          "imagename": base})
    ctx.notes.append(f"chunk {k + 1} of {n}")
    return [p["marker"]]


def _postprocess_continuum(ctx: RunContext) -> list[str]:
    """A continuum image through the same casa_tasks postprocess as a cube: pbcor, round
    beam, Jy/beam -> K (PHANGS's cleanup converts every product, continuum included, and the
    products are named ``_k``), trim, and a 2-D FITS image whose FREQ card keeps the
    frequency the K scale refers to. A mosaic's parts are postprocessed one by one and then
    combined by :func:`linear_mosaic` into a 2-D mosaic, as for line cubes. A feather config
    feathers the round-beam image with the one-plane single-dish image its singledish key
    names (casa_tasks ``feather`` sees one plane and regrids the single dish on the sky only)."""
    p = ctx.task.params
    return _postprocess_and_mosaic(ctx, "feather" if p["feather"] else "postprocess")


def run_postprocess(ctx: RunContext) -> list[str]:
    if ctx.task.params.get("kind") == "cont":
        return _postprocess_continuum(ctx)
    p = _line_only(ctx)
    # pbcor, round beam (feathered with the single dish for a feather config), K, trim
    return _postprocess_and_mosaic(ctx, "feather" if p["feather"] else "postprocess")


def _postprocess_and_mosaic(ctx: RunContext, stage: str) -> list[str]:
    """One CASA ``stage`` run per imaged target (the plan's ``units``), then for a linear
    mosaic the combination of the parts' products here (:func:`linear_mosaic`). A single
    target's products are the task's own, a mosaic part's go to the part's own directory."""
    p = ctx.task.params
    units = p.get("units")
    if not units:
        raise PhangsRunError(f"task {ctx.task.id} was planned without its postprocess units",
                             "plan the project again with this version (hpcddf phangs submit)")
    for unit in units:
        extra = {"singledish": _singledish(ctx, unit)} if stage == "feather" else {}
        summary = ctx.casa(stage, imagename=unit["imagename"], outdir=unit["outdir"],
                           stem=unit["stem"], **extra)
        if p["mosaic"]:
            ctx.steps[f"{stage} {unit['target']}"] = summary
    if p["mosaic"]:
        out = {k: str(Path(p["outdir"]) / f"{p['stem']}_{k}.fits") for k in MOSAIC_PRODUCTS}
        summary = linear_mosaic([u["fits"] for u in units], out, name=p["target"])
        ctx.steps["linear_mosaic"] = summary
        ctx.notes.append(f"linear mosaic of {', '.join(p['parts'])} at a round "
                         f"{summary['beam_arcsec']:.3g}\" beam")
    return list(ctx.task.outputs)


def _singledish(ctx: RunContext, unit: dict[str, Any]) -> str:
    """The single-dish cube a unit feathers with: the key's cube, or, when the plan gives a
    single-dish step (singledish_config ``tp``), that cube baseline-subtracted and regridded
    first (:func:`hpcddf.phangs.singledish.process_singledish`, made once under a lock: a
    mosaic's parts may share the mosaic's cube)."""
    step = unit.get("singledish_step")
    if not step:
        return unit["singledish"]
    from hpcddf.phangs.singledish import SingleDishError, SingleDishRecipe, process_singledish

    def make() -> None:
        recipe = SingleDishRecipe(**step["recipe"])
        try:
            ctx.steps[f"singledish {unit['target']}"] = process_singledish(
                Path(step["source"]), Path(step["out"]), recipe,
                Path(step["plot"]) if step.get("plot") else None)
        except SingleDishError as exc:
            raise PhangsRunError(f"task {ctx.task.id}: {exc}",
                                 "fix the single-dish cube or the singledish_config 'tp'") from None
    if not step.get("source"):
        raise PhangsRunError(f"task {ctx.task.id} was planned without its single-dish cube",
                             "plan the project again (hpcddf phangs submit)")
    ctx.ensure([step["out"]], make)
    return step["out"]
