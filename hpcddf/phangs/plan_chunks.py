"""Chunked imaging: a large cube's channels imaged as N chunk tasks, then gathered.

The PHANGS team images large cubes in channel chunks as separate jobs plus a gather step, each
chunk in its own temporary directory because CASA's temporary products of parallel jobs
collided (phangs_imaging_scripts PR #228, #246). Here a chunked cube is, per chunk, the
``imaging`` tasks ``(target, product, config, dirtyK)``, ``(..., multiscaleK)`` and
``(..., singlescaleK)``: the single call's recipe and steps on the chunk's slice of the
channels, in the chunk's own directory, in three phases (:func:`chunk_tasks` says why), and
the cube's ordinary ``imaging`` task, which waits for the last phase and gathers the chunks'
images into the cube with the names and layout of the single call (``casa_tasks
gather_chunks``). On Slurm each phase of a cube is ONE job array (:func:`array_groups`); a
chunk killed by its walltime is requeued alone and a resubmission reruns only the chunk tasks
whose product (a snapshot, or the last phase's done-marker) is missing.

How many chunks (line products only; a continuum image is one plane):

* the line product's ``chunksize`` in config_definitions (channels per chunk, as PHANGS's
  ImagingChunkedHandler ``chunksize``): ``ceil(nchan / chunksize)`` chunks;
* ``chunksize`` 0 (the default): from the memory of the site's node when the imaging recipe
  fixes ``imsize``: the cube's working images (:data:`BYTES_PER_VOXEL` per voxel) must fit in
  :data:`MEMORY_FRACTION` of it; with dynamic sizing (no ``imsize`` in the recipe) the image
  size is only known once the staged data exist, so the cube is imaged whole: give
  ``chunksize`` for a cube too large for one node.

``nchan`` is the nominal channel count of the line window (vsys +- vwidth/2 + statwt_edge_kms
on each side, in channel_kms channels), the cube extract_line makes when the data cover the
window; each chunk takes its slice of the staged MS's actual channels at run time
(:func:`hpcddf.phangs.casa_imaging.chunk_range`), so a cube with fewer channels is still
covered exactly once.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from hpcddf.errors import ConfigError
from hpcddf.phangs.plan_common import Task, _key_files, _task
from hpcddf.phangs.project import Project

BYTES_PER_VOXEL = 64  # image, residual, model, psf, pb, weight, mask, sumwt (float32) x2 for
#                       the FFT grids and the numpy copies the mask steps read
MEMORY_FRACTION = 0.5
CHANNEL_SELECTION = ("start", "nchan", "width")  # what the chunks set; a recipe must not
MARKER = "chunk.done.json"


def nominal_nchan(project: Project, target: str, product: str) -> int:
    """The channels extract_line makes for a line product when the data cover its window."""
    t = project.target_defs[target]
    line = project.configs.line_product[product]
    return max(1, math.floor((t.vwidth_kms + 2.0 * line.statwt_edge_kms) / line.channel_kms
                             + 1e-6))


def chunk_count(project: Project, target: str, product: str, recipes: dict[str, Any],
                node_mem_gb: float | None) -> int:
    """How many chunks the cube of (target, product) is imaged in (1: whole)."""
    line = project.configs.line_product[product]
    nchan = nominal_nchan(project, target, product)
    if line.chunksize < 0:
        raise ConfigError(f"line_product {product}: chunksize {line.chunksize} is negative "
                          f"({_key_files(project, 'config_key')})",
                          "give the channels per chunk, or 0 to size chunks from the node's "
                          "memory")
    if line.chunksize > 0:
        return math.ceil(nchan / line.chunksize)
    imsize = recipes.get("dirty", {}).get("imsize")
    if not imsize or not node_mem_gb:
        return 1
    nx, ny = (imsize, imsize) if isinstance(imsize, int) else (imsize[0], imsize[-1])
    need = nchan * int(nx) * int(ny) * BYTES_PER_VOXEL
    return max(1, math.ceil(need / (MEMORY_FRACTION * node_mem_gb * 1e9)))


def _check_recipes(project: Project, params: dict[str, Any]) -> None:
    for stage, recipe in params["recipes"].items():
        owned = [k for k in CHANNEL_SELECTION if k in recipe]
        if owned:
            path = project.imaging_recipes(params["config"], params["product"], stage)
            raise ConfigError(f"{path}: {owned[0]} is set, but the cube of {params['target']} "
                              f"{params['product']} is imaged in chunks, which choose the "
                              f"channels themselves",
                              "leave start/nchan/width out of the recipe (the line product's "
                              "channel_kms sets the channels), or set chunksize 0 in the "
                              "line product")


def chunk_base(base: str, index: int, count: int) -> str:
    """A chunk's imagename, in a directory of its own beside the cube's products."""
    stem = Path(base).name
    return str(Path(f"{base}_chunks") / f"chunk{index}of{count}" / f"{stem}_chunk{index}")


PHASES = ("dirty", "multiscale", "singlescale")


def chunk_tasks(project: Project, key: tuple[str, ...], params: dict[str, Any],
                depends: Sequence[str], node_mem_gb: float | None) -> list[list[Task]]:
    """The chunk tasks of one cube's imaging, one list per phase (:data:`PHASES`); none when
    the cube is imaged whole.

    A chunk's imaging steps run in three phases, each phase of a cube one array whose tasks
    wait for every task of the phase before: ``dirtyK`` makes the chunk's dirty cube,
    ``multiscaleK`` its clean mask and multiscale clean, ``singlescaleK`` the single-scale
    clean and the done-marker. Their thresholds and masks are in units of the noise of the
    WHOLE cube, measured over every chunk's dirty (multiscale) residual as the single call
    measures it over its own (:func:`hpcddf.phangs.casa_imaging.whole_cube_noise`): a chunk's
    own noise would leave a chunk of bright channels, whose residual is mostly sidelobes,
    cleaned far less deeply than the single call cleans it."""
    if params.get("kind") != "line":
        return []
    count = chunk_count(project, params["target"], params["product"], params["recipes"],
                        node_mem_gb)
    if count < 2:
        return []
    _check_recipes(project, params)
    bases = [chunk_base(params["imagename"], k, count) for k in range(count)]
    phases: list[list[Task]] = []
    before, inputs = list(depends), list(params["inputs"])
    for phase in PHASES:
        tasks = []
        for k, base in enumerate(bases):
            last = phase == PHASES[-1]
            out = str(Path(base).parent / MARKER) if last else f"{base}_{phase}.image"
            extra = {"marker": out} if last else {}
            tasks.append(_task("imaging", (*key, f"{phase}{k}"), before, {
                **params, "imagename": base, "chunk": [k, count], "chunk_phase": phase,
                "noise_from": bases, "inputs": inputs, "outputs": [out], **extra}))
        phases.append(tasks)
        before, inputs = [t.id for t in tasks], [t.outputs[0] for t in tasks]
    return phases


def gather_params(params: dict[str, Any], chunks: Sequence[Task]) -> dict[str, Any]:
    """The cube's imaging task as the gather of its chunks: same products as the single call."""
    return {**params, "inputs": [t.params["marker"] for t in chunks],
            "gather": [t.params["imagename"] for t in chunks]}


def array_groups(tasks: Sequence[Task]) -> list[list[Task]]:
    """A stage's tasks split into the arrays they are submitted as, keeping their order: each
    cube's dirty chunks one array, its cleaning chunks another, and the runs of other tasks
    between them one array each."""
    groups: list[list[Task]] = []
    last: object = object()
    for t in tasks:
        tag = (t.key[:-1], t.params["chunk_phase"]) if "chunk" in t.params else None
        if not groups or tag != last:
            groups.append([])
        groups[-1].append(t)
        last = tag
    return groups
