"""The planner of the ``derived`` stage: chains, broad masks, moments, velocity field, flat
masks and the shuffled cube.

Builds one task per whole target, line product and config: its chain and those of its linked
mask configs (:mod:`hpcddf.phangs.plan_chain`), the broad mask, the moments of every round
(:mod:`hpcddf.phangs.plan_moments`), and the velocity field and flat masks the moments need,
with the flat masks' velocity window taken from the window key, the derived key or the default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpcddf.errors import ConfigError
from hpcddf.phangs.plan_casa import _line_key, postprocess_cube
from hpcddf.phangs.plan_chain import (
    _chain,
    _chain_products,
    _derived_name,
    _finest_first,
    linked_mask_configs,
)
from hpcddf.phangs.plan_common import (
    BROADMASK_KW,
    FLAT_MASKS,
    Task,
    _key_files,
    _mapped_kw,
    _Selection,
    _task,
    whole_target_configs,
)
from hpcddf.phangs.plan_moments import _moments, _other_config_priors
from hpcddf.phangs.project import Project

FLATMASK_KW = {"window": "window"}
DEFAULT_FLAT_WINDOW_KMS = 50.0


def _external_vfield(project: Project, whole: str) -> tuple[str | None, str | None]:
    """The window key's velocity field file of the target (in vfield_root), or a note."""
    win = project.window(whole)
    if win is None or not win.vfield_file:
        return None, None
    root = project.roots.get("vfield_root")
    if root is None:
        return None, (f"the window key names the velocity field {win.vfield_file} for {whole}, "
                      f"but the master key sets no vfield_root: not used")
    path = Path(root) / win.vfield_file
    if not path.is_file():
        return None, f"the window key's velocity field {path} does not exist: not used"
    return str(path), None


def _flat_window(project: Project, whole: str, config: str, product: str, kind: str
                 ) -> tuple[float, str]:
    """The velocity window (km/s) of a flat mask, and where it came from.

    Reference quirk: PHANGS' task passes the window key's width as ``v_window`` while its
    recipe reads ``window``, so 50 km/s was used whatever the window key said (unless the
    derived key set ``window``). Fixed here because the window key is where a target's window
    is meant to come from: its width is used; the derived key's ``<kind>_kw`` ``window``
    serves targets without a window-key entry; 50 km/s otherwise.
    """
    from hpcddf.phangs.masks import window_kms

    dp = project.derived_params(config, product)
    kw = _mapped_kw(project, getattr(dp, f"{kind}_kw"), FLATMASK_KW, f"{kind}_kw", config,
                    product)
    win = project.window(whole)
    if win is not None:
        return float(win.width_kms), f"window key {win.source}"
    if "window" in kw:
        try:
            return window_kms(kw["window"]), f"derived key {kind}_kw"
        except ConfigError:
            raise ConfigError(f"{kind}_kw window {kw['window']!r} of config {config} product "
                              f"{product} is not a velocity "
                              f"({_key_files(project, 'derived_key')})",
                              "write e.g. {'window':'50km/s'}") from None
    return DEFAULT_FLAT_WINDOW_KMS, "default"


def _vfield_and_flat_masks(project: Project, whole: str, product: str, config: str,
                           levels: list[dict[str, Any]], moments: list[dict[str, Any]],
                           skipped: list[dict[str, str]], shuffle: bool = False
                           ) -> tuple[list[dict[str, Any]], dict[str, Any] | None,
                                      list[dict[str, Any]], list[str]]:
    """The velocity field and the flat masks the moments need.

    The field (``<stem>_vfield.fits``) takes, pixel by pixel, the first finite value of the
    config's mom1wprior maps from the finest level to the coarsest, then of the window key's
    velocity field (PHANGS' hierarchy, first finite wins). It is made when there is a
    mom1wprior map or a flat moment to feed. Flat masks (per level for flatstrictmask, one
    per config for flatbroadmask) are made only where a moment uses them; without any
    velocity field those moments move to ``skipped``. A shuffled cube (``shuffle``) needs the
    field too. Returns (moments, vfield, flat masks, notes)."""
    distance = project.distance_mpc(whole)
    wp = [s for s in moments if s["algorithm"] == "mom1wprior"]
    flat = [s for s in moments if s.get("mask_kind") in FLAT_MASKS]
    if not wp and not flat and not shuffle:
        return moments, None, [], []
    external, note = _external_vfield(project, whole)
    notes = [note] if note else []
    order = [lvl["tag"] for lvl in _finest_first(levels, distance)]
    layers = [s["out"] for tag in order for s in wp if s["tag"] == tag]
    if not layers and external is None:
        for name in dict.fromkeys(s["moment"] for s in flat):
            skipped.append({"moment": name, "reason": f"flat masks need a velocity field: "
                                                      f"config {config} has no mom1wprior "
                                                      f"moment and the window key no usable "
                                                      f"vfield for {whole}"})
        return [s for s in moments if s not in flat], None, [], notes
    vfield = {"out": _derived_name(project, whole, config, product, "vfield"),
              "layers": layers, "external": external, "template": levels[0]["cube"],
              "after_round": max((s["round"] for s in wp), default=2)}
    by_tag = {lvl["tag"]: lvl for lvl in levels}
    wanted = dict.fromkeys((s["mask_kind"], s["tag"] if s["mask_kind"] == "flatstrictmask"
                            else levels[0]["tag"], s["mask"]) for s in flat)
    flatmasks = []
    for kind, tag, out in wanted:
        width, source = _flat_window(project, whole, config, product, kind)
        base = (by_tag[tag]["strictmask"] if kind == "flatstrictmask"
                else _derived_name(project, whole, config, product, "broadmask"))
        flatmasks.append({"kind": kind, "tag": tag, "cube": by_tag[tag]["cube"], "mask": base,
                          "vfield": vfield["out"], "out": out, "window_kms": width,
                          "window_from": source})
    return moments, vfield, flatmasks, notes


def _shuffled_cube(project: Project, whole: str, product: str, config: str,
                   levels: list[dict[str, Any]], vfield: dict[str, Any] | None
                   ) -> dict[str, Any] | None:
    """The ``_shuffled`` cube of the native-resolution cube about the velocity field, when the
    derived key sets shuffle_kw for (config, product) (PHANGS shuffles the native cube only).
    The fft method keeps the channel width: a shuffle_kw channel_kms that differs from the
    line product's is an error here, before anything runs."""
    kw = project.derived_params(config, product).shuffle_kw
    if kw is None or vfield is None:
        return None
    channel = project.configs.line_product[product].channel_kms
    wanted = kw.get("channel_kms")
    if (kw.get("method", "fft") == "fft" and wanted is not None
            and abs(float(wanted) - channel) > 1e-6 * channel):
        raise ConfigError(f"shuffle_kw of config {config} product {product}: channel_kms "
                          f"{wanted:g} differs from the product's {channel:g} km/s, which the "
                          f"fft shuffle keeps ({_key_files(project, 'derived_key')})",
                          "leave channel_kms out, or add 'method':'linear'")
    return {"cube": levels[0]["cube"], "vfield": vfield["out"], "kw": dict(kw),
            "out": _derived_name(project, whole, config, product, "shuffled")}


def _derived_rounds(project: Project, whole: str, product: str, config: str,
                    chain: dict[str, Any]) -> dict[str, Any]:
    """Moments of every round, the velocity field and flat masks of one derived task, the
    priors it makes for other configs, and the outputs all of that adds."""
    moments, skipped = _moments(project, whole, product, config, chain["levels"],
                                project.distance_mpc(whole))
    priors, notes = _other_config_priors(project, whole, product, config, moments)
    wants_shuffle = project.derived_params(config, product).shuffle_kw is not None
    moments, vfield, flatmasks, vnotes = _vfield_and_flat_masks(
        project, whole, product, config, chain["levels"], moments, skipped, wants_shuffle)
    shuffled = _shuffled_cube(project, whole, product, config, chain["levels"], vfield)
    if wants_shuffle and shuffled is None:
        vnotes.append(f"shuffled cube not made: no velocity field (config {config} has no "
                      f"mom1wprior moment and the window key no usable vfield for {whole})")
    outputs = [p for m in moments for p in (m["out"], m["err"]) if p]
    outputs += ([vfield["out"]] if vfield else []) + [f["out"] for f in flatmasks]
    outputs += [shuffled["out"]] if shuffled else []
    notes += list(dict.fromkeys(
        f"moment {m['moment']}: kwargs {', '.join(m['ignored_kwargs'])} not used by "
        f"{m['algorithm']}: ignored" for m in moments if m.get("ignored_kwargs")))
    return {"moments": moments, "skipped_moments": skipped, "priors": priors,
            "vfield": vfield, "flatmasks": flatmasks, "shuffle": shuffled,
            "notes": notes + vnotes,
            "outputs": list(dict.fromkeys(outputs))}


def _build_derived(project: Project, sel: _Selection, detailed: bool) -> list[Task]:
    tasks = []
    for whole in sel.whole:
        # noise cubes, masks and moments are spectral-cube products: a continuum product ends
        # at its postprocessed 2-D image (PHANGS' derived loop is over line products too)
        for product in project.line_products:
            for config in whole_target_configs(project, whole, product):
                linked = linked_mask_configs(project, whole, product, config)
                chains = {c: _chain(project, whole, product, c, detailed)
                          for c in [config, *linked]}
                broad = _derived_name(project, whole, config, product, "broadmask")
                outputs = _chain_products(chains[config]) + [broad]
                sources = [config, *linked]
                params: dict[str, Any] = {"outputs": outputs}
                if detailed:
                    dp = project.derived_params(config, product)
                    rounds = _derived_rounds(project, whole, product, config, chains[config])
                    # a prior made here from another config needs that config's cube too
                    sources += [p["config"] for p in rounds["priors"].values()
                                if p["config"] not in sources]
                    params["outputs"] = outputs + rounds.pop("outputs")
                    params.update({
                        "target": whole, "product": product, "config": config,
                        "linked": linked, "chains": chains,
                        "distance_mpc": project.distance_mpc(whole),
                        "broadmask": {"out": broad, "kw": _mapped_kw(
                            project, dp.broadmask_kw, BROADMASK_KW, "broadmask_kw", config,
                            product)},
                        **rounds})
                params["inputs"] = [postprocess_cube(project, whole, product, c)
                                    for c in dict.fromkeys(sources)]
                deps = [Task("postprocess", _line_key(whole, product, c)).id
                        for c in dict.fromkeys(sources)]
                tasks.append(_task("derived", _line_key(whole, product, config), deps, params))
    return tasks
