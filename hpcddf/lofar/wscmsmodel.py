"""Mask a WSCMS DicoModel: DDFacet 0.9.1's MaskDicoModel.py only masks SSD and HMP models (its
WSCMS model machine has no ``CleanMaskedComponants``), and ddf-pipeline masks every image's
model after MakeMask, whatever the clean mode (``mask_dicomodel``).

    python -m hpcddf.lofar.wscmsmodel --mask M.fits --in X.DicoModel --out X_masked.DicoModel

A WSCMS model holds its components per scale, ``Comp[scale][(x, y)]``, with a per-scale count
``NumComps``; a component stays if the mask is set at its pixel. The mask is read exactly as
the SSD model machine reads it (casacore, first channel and polarisation, transposed and
flipped), so both kinds of model are masked at the same pixels. The output is written under a
temporary name and renamed.
"""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path
from typing import Any, Sequence

from hpcddf.engine.atomic import atomic_path


def mask_array(mask: str) -> Any:
    """The mask indexed ``[x, y]`` as DDFacet's model machines index it."""
    from casacore.images import image
    return image(str(Path(mask).resolve())).getdata()[0, 0].T[::-1]


def mask_components(dico: dict, keep: Any) -> tuple[int, int]:
    """Drop the components outside ``keep`` in place; (components before, after)."""
    before = after = 0
    for comps in dico["Comp"].values():
        pixels = [k for k in comps if k != "NumComps"]
        before += len(pixels)
        for x, y in pixels:
            if not keep[x, y]:
                del comps[(x, y)]
        comps["NumComps"][...] = len(comps) - 1
        after += len(comps) - 1
    return before, after


def mask_wscms_model(mask: str, dico_in: str, dico_out: str) -> tuple[int, int]:
    with open(dico_in, "rb") as fh:
        dico = pickle.load(fh)
    if dico.get("Type") != "WSCMS":
        raise SystemExit(f"error: {dico_in} is a {dico.get('Type')} model, not WSCMS (mask it with MaskDicoModel.py)")
    counts = mask_components(dico, mask_array(mask) != 0)
    with atomic_path(Path(dico_out)) as tmp, open(tmp, "wb") as fh:
        pickle.dump(dico, fh, 2)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hpcddf.lofar.wscmsmodel", description=__doc__.splitlines()[0])
    ap.add_argument("--mask", required=True)
    ap.add_argument("--in", dest="dico_in", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    before, after = mask_wscms_model(a.mask, a.dico_in, a.out)
    print(f"{a.dico_in}: {before} components, {after} inside {a.mask} -> {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
