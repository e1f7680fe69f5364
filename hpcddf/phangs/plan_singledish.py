"""What the plan gives the single-dish step of a feather task (:mod:`hpcddf.phangs.singledish`).

PHANGS processes single-dish data with the options of the ``singledish_config`` named ``tp``
(its single-dish handler reads no other; a config of another name is refused when the keys are
read). With that config, every line product's single-dish cube is baseline-subtracted (and
regridded) by the postprocess task that feathers it, before the CASA feather stage, into
``imaging_root/<target dir>/<target>_<product>_singledish.fits``; the feather then takes that
cube. Without it the cube is feathered as the key gives it. A continuum image is never
baseline-subtracted (that would remove the continuum): it is feathered as given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpcddf.phangs.plan_common import _parts, line_restfreq_ghz
from hpcddf.phangs.project import Project

SINGLEDISH_CONFIG = "tp"


def singledish_step(project: Project, owner: str, product: str, source: Path | None
                    ) -> dict[str, Any] | None:
    """The step's parameters for the single-dish cube of (owner, product), or None when the
    cube is feathered as given (no ``tp`` singledish_config, or a continuum product)."""
    sd = project.configs.singledish_config.get(SINGLEDISH_CONFIG)
    if sd is None or product not in project.line_products:
        return None
    # a mosaic without its own target line: the window of its first part
    t = project.target_defs.get(owner) or project.target_defs[_parts(project, owner)[0]]
    d = project.imaging_dir(owner)
    out = d / f"{owner}_{product}_singledish.fits"
    return {"source": str(source) if source else None, "out": str(out),
            "plot": str(out.with_suffix(".png")) if sd.do_plots else None,
            "recipe": {"bl_order": sd.bl_order, "chan_dv_kms": sd.chan_dv_kms,
                       "do_plots": sd.do_plots,
                       "line_lo_kms": t.vsys_kms - t.vwidth_kms / 2.0,
                       "line_hi_kms": t.vsys_kms + t.vwidth_kms / 2.0,
                       "restfreq_hz": line_restfreq_ghz(project, product) * 1e9}}
