"""A user clean mask (a FITS file of the cleanmask_key) put onto the dirty cube's grid, in CASA.

PHANGS supplies clean masks made outside the pipeline (often from another data set at another
resolution, channel width, or even another line) and aligns them to each cube by sky position
and by velocity (algorithms.md B2, step 5). The mask is read with ``importfits`` (which turns
any FITS spectral axis into CASA's frequency axis with its rest frequency), and every voxel of
the dirty cube takes the value of the nearest mask voxel: nearest, not interpolated, because a
mask is a yes/no map and interpolating would blur its edge into fractions. The spatial and
spectral axes of these images are separable, so the mapping is a 2-D pixel map times a 1-D
channel map, each computed with casatools' coordinate systems. A 2-D mask applies to every
channel; a cube mask to a continuum image (one plane) is collapsed (any channel counts), as
PHANGS collapses it. Run INSIDE the CASA environment: standard library only at the top.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpcddf.phangs.casa_common import C_M_S, StageError, casa, log, remove, tmp_name

# Frames whose difference (tens of milliarcseconds) is far below any pixel of these images.
_SAME_SKY_FRAMES = ({"J2000", "ICRS"},)


def _axes(csys: Any) -> dict[str, list[int]]:
    """Pixel axes by coordinate type ('Direction' has two)."""
    out: dict[str, list[int]] = {}
    for axis, kind in enumerate(csys.axiscoordinatetypes()):
        out.setdefault(kind, []).append(axis)
    return out


def _same_frame(a: str, b: str) -> bool:
    return a == b or any(a in group and b in group for group in _SAME_SKY_FRAMES)


def _read_fits_mask(fits_path: Path, scratch: Path) -> tuple[Any, Any]:
    """(voxels as bool with axes (x, y, chan), coordinate system) of a FITS mask; values above
    0.5 are in the mask (NaN is out), Stokes and other extra axes collapsed with 'any'."""
    import numpy as np

    tools, tasks = casa()
    remove(scratch)
    try:
        tasks.importfits(fitsimage=str(fits_path), imagename=str(scratch), overwrite=True)
    except Exception as exc:  # CASA raises bare RuntimeErrors for unreadable files
        raise StageError(f"clean mask {fits_path} cannot be read as a FITS image: {exc}") from exc
    ia = tools.image()
    ia.open(str(scratch))
    try:
        data = np.array(ia.getchunk(), dtype=float)
        csys = ia.coordsys()
    finally:
        ia.close()
        remove(scratch)
    axes = _axes(csys)
    if len(axes.get("Direction", [])) != 2:
        raise StageError(f"clean mask {fits_path} has no sky (RA/Dec) axes")
    keep = axes["Direction"] + axes.get("Spectral", [])
    mask = np.nan_to_num(data) > 0.5
    other = tuple(a for a in range(mask.ndim) if a not in keep)
    if other:
        mask = mask.any(axis=other)
    if "Spectral" not in axes:
        mask = mask[:, :, None]
    return mask, csys


def _sky_map(tcs: Any, tshape: Any, mcs: Any, mshape: tuple[int, ...], fits_path: Path
             ) -> tuple[Any, Any]:
    """Nearest mask pixel (ix, iy) of every template (x, y); -1 where it falls off the mask."""
    import numpy as np

    t_axes, m_axes = _axes(tcs), _axes(mcs)
    tframe, mframe = tcs.referencecode("direction")[0], mcs.referencecode("direction")[0]
    if not _same_frame(tframe, mframe):
        raise StageError(f"clean mask {fits_path} is in the {mframe} frame, the cube in "
                         f"{tframe}: make the mask in {tframe}")
    tx, ty = t_axes["Direction"]
    nx, ny = int(tshape[tx]), int(tshape[ty])
    xx, yy = np.meshgrid(np.arange(nx, dtype=float), np.arange(ny, dtype=float), indexing="ij")
    pix = np.zeros((len(tshape), nx * ny))
    pix[tx], pix[ty] = xx.ravel(), yy.ravel()
    world = np.asarray(tcs.toworldmany(pix)["numeric"])
    tunits, munits = tcs.units(), mcs.units()
    mx, my = m_axes["Direction"]
    mworld = np.tile(np.asarray(mcs.referencevalue()["numeric"], dtype=float)[:, None],
                     (1, nx * ny))
    qa = casa()[0].quanta()
    for t_axis, m_axis in ((tx, mx), (ty, my)):
        scale = qa.convert(f"1{tunits[t_axis]}", munits[m_axis])["value"]
        mworld[m_axis] = world[t_axis] * scale
    mpix = np.asarray(mcs.topixelmany(mworld)["numeric"])
    out = []
    for row, n in ((mpix[mx], mshape[0]), (mpix[my], mshape[1])):
        index = np.rint(np.nan_to_num(row, nan=-1.0)).astype(int)
        index[(index < 0) | (index >= n)] = -1
        out.append(index.reshape(nx, ny))
    return out[0], out[1]


def _radio_velocity_ms(csys: Any, nchan: int, what: str) -> Any:
    """Radio velocity (m/s) of each channel about the image's own rest frequency."""
    import numpy as np

    axis = _axes(csys)["Spectral"][0]
    pix = np.zeros((len(csys.axiscoordinatetypes()), nchan))
    pix[axis] = np.arange(nchan)
    freq = np.asarray(csys.toworldmany(pix)["numeric"][axis], dtype=float)
    freq *= casa()[0].quanta().convert(f"1{csys.units()[axis]}", "Hz")["value"]
    rest = float(np.atleast_1d(casa()[0].quanta().convert(csys.restfrequency(), "Hz")["value"])[0])
    if not rest > 0:
        raise StageError(f"{what} has a spectral axis but no rest frequency: give its FITS "
                         "header RESTFRQ")
    return C_M_S * (1.0 - freq / rest)


def _channel_map(tcs: Any, nchan: int, mcs: Any, mchan: int, fits_path: Path) -> Any:
    """Nearest mask channel of every cube channel, by radio velocity (-1: outside the mask's
    velocity range, so not in the mask). The spectral frames must agree."""
    import numpy as np

    tframe, mframe = tcs.referencecode("spectral")[0], mcs.referencecode("spectral")[0]
    if tframe != mframe:
        raise StageError(f"clean mask {fits_path} has a {mframe} spectral axis, the cube "
                         f"{tframe}: make the mask in {tframe}")
    v_cube = _radio_velocity_ms(tcs, nchan, "the dirty cube")
    v_mask = _radio_velocity_ms(mcs, mchan, f"clean mask {fits_path}")
    step = v_mask[1] - v_mask[0]
    index = np.rint((v_cube - v_mask[0]) / step).astype(int)
    index[(index < 0) | (index >= mchan)] = -1
    return index


def aligned_clean_mask(fits_path: Path, template: Path) -> Any:
    """The FITS mask on ``template``'s grid: a bool array with the template's axes as stored
    (x, y, stokes, chan); voxels off the mask's sky area or velocity range are out."""
    import numpy as np

    tools, _ = casa()
    ia = tools.image()
    ia.open(str(template))
    try:
        tshape, tcs = ia.shape(), ia.coordsys()
    finally:
        ia.close()
    mask, mcs = _read_fits_mask(fits_path, tmp_name(Path(f"{template}.usermask")))
    ix, iy = _sky_map(tcs, tshape, mcs, mask.shape, fits_path)
    t_axes = _axes(tcs)
    t_spec = t_axes.get("Spectral", [])
    nchan = int(tshape[t_spec[0]]) if t_spec else 1
    if mask.shape[2] == 1:
        sky = mask[:, :, 0][ix, iy] & (ix >= 0) & (iy >= 0)
        planes = np.repeat(sky[:, :, None], nchan, axis=2)
        log(f"clean mask {fits_path}: a sky map, applied to all {nchan} channels")
    elif nchan == 1:
        sky = mask.any(axis=2)[ix, iy] & (ix >= 0) & (iy >= 0)
        planes = sky[:, :, None]
        log(f"clean mask {fits_path}: a cube, collapsed onto the one-plane image")
    else:
        iz = _channel_map(tcs, nchan, mcs, mask.shape[2], fits_path)
        planes = mask[ix[:, :, None], iy[:, :, None], np.clip(iz, 0, None)[None, None, :]]
        planes &= ((ix >= 0) & (iy >= 0))[:, :, None] & (iz >= 0)[None, None, :]
    # back into the template's axis order, Stokes (and any other axis) broadcast
    order = [*t_axes["Direction"], *(t_spec or [])]
    shaped = planes if t_spec else planes[:, :, 0]
    out = np.zeros(tuple(int(n) for n in tshape), dtype=bool)
    view = np.moveaxis(out, order, range(len(order)))
    view[...] = shaped.reshape(shaped.shape + (1,) * (view.ndim - shaped.ndim))
    return out
