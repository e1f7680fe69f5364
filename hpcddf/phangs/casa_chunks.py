"""The gather of chunked imaging, run INSIDE the separate CASA environment.

A large cube is imaged in channel chunks, each by the ordinary imaging stages (``dirty``,
``clean_mask``, ``multiscale``, ``singlescale`` with ``--chunk K,N``: tclean's start/nchan
select the chunk's slice of the cube's channels) in its own directory. ``gather_chunks`` then
concatenates the chunks' images along the spectral axis into the cube the single tclean call
would have made, under the same names (``BASE.image``, ``BASE.pb``, ``BASE.residual``,
``BASE.model``, ``BASE.psf`` and the ``BASE_singlescale.*`` snapshot postprocess looks for), so
everything downstream is the same whether a cube was chunked or not.

Beams: each chunk restores with the common beam of ITS channels ('common' in the recipe), so
chunks may differ slightly; the concatenated image then carries per-plane beams, and is
convolved to the common beam of all planes (imsmooth 'commonbeam'), which is the beam the
single call's 'common' restores with. Standard library only at the top, as everything
:mod:`hpcddf.phangs.casa_tasks` runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from hpcddf.phangs.casa_common import (
    StageError,
    beam_of,
    casa,
    log,
    need,
    publish,
    remove,
    skip_existing,
    tmp_name,
)
from hpcddf.phangs.casa_imaging import snapshot

# gathered in this order; the image last, as it marks a finished imaging run
GATHERED = ("pb", "psf", "residual", "model", "image")


def spectral_axis(image: Path) -> int:
    tools, _ = casa()
    ia = tools.image()
    ia.open(str(image))
    try:
        spec = ia.coordsys().findcoordinate("spectral")
        if not spec["return"]:
            raise StageError(f"{image} has no spectral axis to gather chunks along")
        return int(spec["pixel"][0])
    finally:
        ia.close()


def has_per_plane_beams(image: Path) -> bool:
    tools, _ = casa()
    ia = tools.image()
    ia.open(str(image))
    try:
        return "beams" in ia.restoringbeam()
    finally:
        ia.close()


def concat_images(parts: list[Path], out: Path, axis: int, common_beam: bool) -> Path:
    """The parts side by side along ``axis`` (in the order given), published atomically;
    with ``common_beam`` per-plane beams are convolved to the one common beam."""
    tools, tasks = casa()
    tmp = tmp_name(out)
    remove(tmp)
    ia = tools.image()
    joined = ia.imageconcat(outfile=str(tmp), infiles=[str(p) for p in parts], axis=axis,
                            relax=True, overwrite=True)
    joined.close()
    ia.close()
    if common_beam and has_per_plane_beams(tmp):
        smooth = tmp.with_name(tmp.name + ".common")
        remove(smooth)
        tasks.imsmooth(imagename=str(tmp), kernel="commonbeam", outfile=str(smooth),
                       overwrite=True)
        remove(tmp)
        smooth.rename(tmp)
    return publish(tmp, out)


def stage_gather_chunks(a: argparse.Namespace) -> dict[str, Any]:
    """The chunks' images (``--chunk-imagename``, in channel order) into BASE.*."""
    base = str(Path(a.imagename).resolve())
    if skip_existing(Path(f"{base}_singlescale.image"), a.overwrite):
        return {"imagename": base, "skipped": True}
    chunks = [str(Path(c).resolve()) for c in a.chunk_imagename]
    if len(chunks) < 2:
        raise StageError("gather_chunks needs the images of at least two chunks")
    for c in chunks:
        for ext in GATHERED:
            need(Path(f"{c}.{ext}"), f"chunk {ext} image")
    Path(base).parent.mkdir(parents=True, exist_ok=True)
    axis = spectral_axis(Path(f"{chunks[0]}.image"))
    for ext in GATHERED:
        concat_images([Path(f"{c}.{ext}") for c in chunks], Path(f"{base}.{ext}"), axis,
                      common_beam=ext == "image")
    snapshot(base, "singlescale")  # what postprocess and a rerun look for
    tools, _ = casa()
    ia = tools.image()
    ia.open(f"{base}.image")
    try:
        nchan = int(ia.shape()[axis])
    finally:
        ia.close()
    log(f"gathered {len(chunks)} chunks into {base}.image ({nchan} channels)")
    return {"imagename": base, "chunks": chunks, "nchan": nchan,
            **beam_of(Path(f"{base}.image"))}
