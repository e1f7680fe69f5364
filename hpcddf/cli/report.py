"""Human-readable views (rich tables) of plans, sites, configs and field states.

Only presentation lives here: every function takes plain data and returns something printable.
"""

from __future__ import annotations

from typing import Any, Sequence

from rich.markup import escape
from rich.table import Table

from hpcddf.engine.sites import Site
from hpcddf.lofar.config import PipelineConfig, format_value
from hpcddf.lofar.options import SECTIONS


def plan_table(doc: dict[str, Any]) -> Table:
    t = Table(title=f"plan on site {doc['site']} ({doc['scheduler']}): "
                    f"{len(doc['fields'])} field(s), {doc['chains']} chain(s)")
    for col in ("chain", "stage", "fields", "steps", "node", "walltime", "after"):
        t.add_column(col, overflow="fold")
    for s in doc["stages"]:
        r = s["resources"]
        fields = ", ".join(s["fields"]) if len(s["fields"]) <= 3 else f"{len(s['fields'])} fields (array)"
        t.add_row(str(s["chain"]), s["name"], fields, "\n".join(s["steps"]),
                  f"{r['cpus']} cpu, {r['mem_gb']} GB" + (", exclusive" if r["exclusive"] else ""),
                  minutes(r["walltime_min"]), ", ".join(s["depends_on"]) or "-")
    return t


def minutes(m: float | int | None) -> str:
    if m is None:
        return "-"
    m = int(m)
    d, rem = divmod(m, 1440)
    return (f"{d}-" if d else "") + f"{rem // 60:02d}:{rem % 60:02d}"


def seconds(s: float | int | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def config_table(cfg: PipelineConfig) -> Table:
    t = Table(title="effective configuration" + (f" ({', '.join(cfg.files)})" if cfg.files else " (defaults)"))
    for col in ("section", "option", "value", "from"):
        t.add_column(col, overflow="fold")
    for section in SECTIONS:
        for opt, value in cfg.items():
            if opt.section == section:
                t.add_row(section, opt.name, format_value(value),
                          cfg.origins.get((section, opt.name), "default"))
    return t


def sites_table(sites: dict[str, Site | Exception]) -> Table:
    t = Table(title="sites")
    for col in ("name", "scheduler", "node", "walltime", "container", "file"):
        t.add_column(col, overflow="fold")
    for name, site in sites.items():
        if isinstance(site, Exception):
            t.add_row(name, "[red]invalid[/red]", str(site), "", "", "")
            continue
        t.add_row(name, site.scheduler, f"{site.node.cpus} cpu, {site.node.mem_gb} GB",
                  site.slurm.max_walltime, site.container.runtime, site.path)
    return t


def site_text(site: Site) -> str:
    lines = [f"# site {site.name}: {site.path}"]
    for key, value in site.to_dict().items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            lines.extend(f"{k} = {_toml(v)}" for k, v in value.items())
        elif key not in ("name", "path"):
            lines.append(f"{key} = {_toml(value)}")
    return "\n".join(ln for ln in lines if ln != "") + "\n"


def _toml(v: Any) -> str:
    if v is None or v == "":
        return '""  # not set'
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return str(v)


RECORD_COLUMNS = ("job", "state", "attempts", "elapsed", "node-hours", "note")
EFFICIENCY_COLUMNS = ("cpu eff", "peak mem")


def records_table(title: str, keys: Sequence[str],
                  rows: Sequence[tuple[Sequence[str], dict[str, Any]]],
                  efficiency: bool = False) -> Table:
    """The one status table of every pipeline: each unit's identifying columns (``keys``),
    then what its record says (job, state and the scheduler's word for it, attempts, time),
    and with ``efficiency`` its CPU efficiency and peak memory (``status --efficiency``)."""
    t = Table(title=title)
    extra = EFFICIENCY_COLUMNS if efficiency else ()
    for col in (*keys, *RECORD_COLUMNS[:-1], *extra, RECORD_COLUMNS[-1]):
        t.add_column(col, overflow="fold")
    for ids, record in rows:
        cells = _record_cells(record)
        t.add_row(*ids, *cells[:-1], *(efficiency_cells(record) if efficiency else ()), cells[-1])
    return t


def efficiency_cells(s: dict[str, Any]) -> tuple[str, str]:
    """CPU efficiency (flagged under 50 %) and peak memory of a record's job, or "-"."""
    eff = s.get("efficiency") or {}
    cpu = eff.get("cpu_efficiency")
    cpu_text = "-" if cpu is None else f"{cpu * 100:.0f} %" + (" [red]LOW[/red]" if eff.get("low_efficiency") else "")
    return cpu_text, size(eff.get("max_rss_bytes"))


def size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1024 ** 3), ("MB", 1024 ** 2), ("kB", 1024)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _record_cells(s: dict[str, Any]) -> tuple[str, ...]:
    live = f" ({s['slurm_state']})" if s.get("slurm_state") else ""
    hours = f"{s['node_hours']:.2f}" if s.get("node_hours") is not None else "-"
    attempts = s.get("attempts_total") or s.get("attempts", "-")  # every submission's attempts
    return (str(s.get("job_id") or "-"), str(s.get("state", "?")) + live, str(attempts),
            seconds(s.get("elapsed_s")), hours, _note(s))


def _stale_title(title: str, records: Sequence[dict[str, Any]]) -> str:
    stale = next((r["stale"] for r in records if r.get("stale")), None)
    return title + (f" — {stale}" if stale else "")


def status_table(states: Sequence[dict[str, Any]], title: str = "fields",
                 efficiency: bool = False) -> Table:
    """Fields (a row per stage) or mosaics (a row per product)."""
    keys = ("field", "stage") if title == "fields" else ("centre", "product")
    rows: list[tuple[Sequence[str], dict[str, Any]]] = []
    for st in states:
        stages = st.get("stages") or {}
        if not stages:
            rows.append(((st["field"], "-"), {"state": "not submitted"}))
            continue
        order = [p["name"] for p in (st.get("plan") or {}).get("stages", [])]
        ranked = sorted(stages.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99)
        rows += [((st["field"] if i == 0 else "", name), s) for i, (name, s) in enumerate(ranked)]
        if st.get("quality"):
            rows.append((("", "quality"), {"state": "done", "note": st["quality"]["summary"]}))
    return records_table(_stale_title(title, states), keys, rows, efficiency)


def phangs_table(rows: Sequence[dict[str, Any]]) -> Table:
    """PHANGS tasks (a row per task), from ``hpcddf.phangs.submit.phangs_status``."""
    body = [((r["task"],), r) for r in rows] or [(("(no task submitted)",), {"state": "-"})]
    return records_table(_stale_title("phangs tasks", rows), ("task",), body)


def _note(stage: dict[str, Any]) -> str:
    """Why the unit ended (its class, reason and fix) when it has a class, else its note."""
    cls = stage.get("class")
    if isinstance(cls, dict) and cls.get("name"):
        return class_text(cls)
    err = stage.get("error")
    if isinstance(err, dict):
        return str(err.get("message", ""))
    return str(err or stage.get("note") or "")


def survey_summary(doc: dict[str, Any]) -> str:
    """The lines above the tables of ``hpcddf survey status`` (too long for a table title)."""
    eta = doc["eta"] or "- (nothing done in the last week)"
    return (f"survey {doc['survey'].get('name', '?')} ({doc['database']}): {doc['fields']} fields, "
            f"{doc['node_hours']:.1f} node-hours\n"
            f"{doc['rate_per_day']:.1f} fields/day, {doc['remaining']} to go, ETA {eta}")


def survey_tables(doc: dict[str, Any]) -> list[Table]:
    """``hpcddf survey status``: fields per state, done per day (UTC), the failed fields."""
    t = Table(title="fields per state")
    t.add_column("state")
    t.add_column("fields", justify="right")
    for state, n in doc["states"].items():
        t.add_row(state, str(n))
    days = Table(title="done per day (UTC)")
    for day in doc["done_per_day"]:
        days.add_column(day[5:], justify="right")
    days.add_row(*(str(n) for n in doc["done_per_day"].values()))
    tables = [t, days]
    if doc["failed"]:
        f = Table(title=f"failed fields ({len(doc['failed'])})")
        for col in ("field", "attempts", "since", "error"):
            f.add_column(col, overflow="fold")
        for r in doc["failed"]:
            f.add_row(r["field"], str(r["attempts"]), r["since"], r["error"] or "-")
        tables.append(f)
    return tables


def class_text(cls: dict[str, Any]) -> str:
    """``class (transient): reason [nodes]; fix: ...`` — one line a person can act on."""
    head = f"{cls['name']} (transient)" if cls.get("transient") else cls["name"]
    nodes = f" [nodes {', '.join(cls['nodes'])}]" if cls.get("nodes") and cls["name"] in _NODE_CLASSES else ""
    return escape(f"{head}: {cls.get('reason', '')}{nodes}; fix: {cls.get('fix', '')}")  # "[node] mem_gb" is text


_NODE_CLASSES = ("node_fail", "boot_fail", "out_of_memory", "killed_by_signal")
