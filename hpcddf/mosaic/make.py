"""One mosaic made on its node: the products of a :class:`~hpcddf.mosaic.jobs.MosaicTask` and its
done-marker (``python -m hpcddf.mosaic.make TASKFILE``).

The node job calls :func:`make_products` itself, or, on a site with a container image, runs
this module in the image (``hpcddf.engine.contained.run_in_image``) with the task pickled
beside the mosaic's state: the reprojection then uses the image's numpy, astropy and reproject,
as the reduction's commands use its DDFacet. The image probe checks first that it holds the same
hpcddf, so the pickle is read by the code that wrote it.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from hpcddf.engine.atomic import write_json_atomic
from hpcddf.engine.state import now_iso
from hpcddf.mosaic.combine import PRODUCTS, make_mosaic, output_header
from hpcddf.mosaic.products import write_catalogue, write_preview

# a task is hpcddf.mosaic.jobs.MosaicTask (not imported: jobs imports this module)
MosaicTask = Any


def cpus() -> int:
    """The CPUs this process may use (the job's allocation, inside an image too)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def make_products(t: MosaicTask) -> dict[str, Any]:
    """The mosaic, its weights, preview and catalogue as asked, then the done-marker (last)."""
    p = PRODUCTS[t.product]
    header = output_header(t.name, t.centre.ra, t.centre.dec, t.max_sep, p.cell_arcsec, p.resolution_arcsec)
    opts = replace(t.options, workers=t.options.workers or cpus(), noise_box=p.noise_box)
    Path(t.outdir).mkdir(parents=True, exist_ok=True)
    inputs = t.resolved_inputs()
    res = make_mosaic(inputs, header, t.path("mosaic"), t.path("weights"), opts)
    if t.preview:
        write_preview(t.path("mosaic"), t.path("preview"))
    if t.catalogue:
        write_catalogue(t.path("mosaic"), t.path("catalogue"))
    t.marker().parent.mkdir(parents=True, exist_ok=True)
    doc = {"mosaic": t.name, "inputs": t.input_names(), "recipe": t.recipe(inputs),
           "scales": {i.name: i.scale for i in inputs},
           "corrections": {i.name: i.corrections.summary() for i in inputs if i.corrections.summary()},
           "noise": res.noise, "warnings": res.warnings,
           "dropped": list(t.dropped), "products": [str(t.path(k)) for k in ("mosaic", "weights")],
           "finished": now_iso()}
    write_json_atomic(t.marker(), doc)
    return doc


def write_task(t: MosaicTask, path: Path) -> Path:
    """The task pickled for :func:`main` (temporary name, then renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(pickle.dumps(t))
    os.replace(tmp, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m hpcddf.mosaic.make TASKFILE", file=sys.stderr)
        return 2
    task = pickle.loads(Path(args[0]).read_bytes())
    print(json.dumps(make_products(task)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
