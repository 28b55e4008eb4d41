"""`rayeff report PATH --output FILE.html`: one self-contained HTML page, its figures embedded as PNG data, and the
same PNGs written beside it (FILE-<figure>.png). PATH is a run folder (result.json), a sweep folder (sweep.json) or
the JSON of `rayeff bench compare`; the figures are rayeff/report/figures.py's."""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import yaml

from rayeff.errors import UserError
from rayeff.measure.energy import energy_axis_label
from rayeff.report import figures


def write_report(path: str, output: str) -> dict:
    """Write the page for `path` to `output` (and its PNGs beside it); returns {"kind", "html", "figures"}."""
    out = Path(output)
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--output: {output} is not an .html file; name the page, e.g. --output report.html")
    kind, sections = read_sections(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    body, written = [], []
    for title, content in sections:
        body.append(f"<h2>{html.escape(title)}</h2>")
        for item in content:
            if isinstance(item, tuple):   # (name, Figure)
                name, fig = item
                png = out.with_name(f"{out.stem}-{name}.png")
                data = save_png(fig, png)
                written.append(str(png))
                body.append(f'<img alt="{html.escape(name)}" src="data:image/png;base64,{data}">')
            else:
                body.append(item)
    page = PAGE.format(title=html.escape(f"rayeff report: {path}"), body="\n".join(body))
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return {"kind": kind, "html": str(out), "figures": written}


def save_png(fig, path: Path) -> str:
    """The figure as PNG bytes, written to `path`; returns them base64-encoded for the page."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    path.write_bytes(buffer.getvalue())
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def read_sections(path: str) -> tuple[str, list]:
    """What PATH is, and the page's sections: (title, [HTML strings and (name, Figure) pairs])."""
    source = Path(path)
    if source.is_file() and source.suffix == ".json":
        data = read_json(source)
        if {"results", "ratios_to_full"} <= set(data):
            return "compare", compare_sections(data)
        raise UserError(f"{path}: not a `rayeff bench compare` JSON (no results and ratios_to_full); give a run "
                        f"folder, a sweep folder or a comparison's JSON")
    if not source.is_dir():
        raise UserError(f"{path}: no such run folder, sweep folder or JSON file")
    if (source / "sweep.json").is_file():
        return "sweep", sweep_sections(read_json(source / "sweep.json"))
    if (source / "result.json").is_file():
        return "run", run_sections(read_json(source / "result.json"))
    raise UserError(f"{path}: holds neither result.json (a finished run) nor sweep.json (a finished sweep)")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path}: cannot be read as JSON ({err})") from err


def energy_label(results: list[dict]) -> str:
    watts = next((r["job"]["energy"]["watts_per_cpu"] for r in results if r.get("job")), 10.0)
    return energy_axis_label([r["energy"]["source"] for r in results if r.get("energy")], watts)


def run_sections(result: dict) -> list:
    name = result["method"]
    label = energy_label([result])
    return [
        ("Run", [summary_table({name: result})]),
        ("Training loss and dev metric", [("curves", figures.curves({name: result}, label))]),
        ("Memory", [("memory", figures.memory_bars({name: result["memory"]}))]),
        ("Settings", [settings(result.get("job"))]),
    ]


def compare_sections(report: dict) -> list:
    results = report["results"]
    label = energy_label(list(results.values()))
    same = ", ".join(f"{k} {v}" for k, v in report["same_for_all"].items())
    return [
        ("Methods compared", [f"<p>{html.escape(report['task'])} on {html.escape(report['model'])}; the same for "
                              f"all: {html.escape(same)}</p>", summary_table(results),
                              ratio_table(report["ratios_to_full"])]),
        ("Training loss and dev metric", [("curves", figures.curves(results, label))]),
        ("Memory", [("memory", figures.memory_bars({m: r["memory"] for m, r in results.items()}))]),
        ("Energy and time", [("cost", figures.cost_bars(results, label))]),
        ("Settings", [f"<h3>{html.escape(m)}</h3>{settings(r.get('job'))}" for m, r in results.items()]),
    ]


def sweep_sections(sweep: dict) -> list:
    trials = sweep["trials"]
    objectives = sweep["sweep"]["objective"]
    labels = sweep.get("objective_labels") or [f"{o['metric']}, {o['mode']}" for o in
                                                (objectives if isinstance(objectives, list) else [objectives])]
    front = sweep.get("pareto_front") or ([sweep["best"]["number"]] if sweep.get("best") else [])
    # (sweeps written before the label was recorded: their sources, without the estimate's formula)
    label = sweep["energy"].get("axis_label") or f"energy (J, {' + '.join(sweep['energy']['sources'])})"
    best = sweep.get("best")
    return [
        ("Sweep", [f"<p>{len(trials)} trials; best: "
                   f"{html.escape(json.dumps(best['params']) if best else 'none feasible')}; energy "
                   f"{sweep['energy']['total_j']:.1f} J in all ({html.escape(', '.join(sweep['energy']['sources']))})"
                   f"</p>"]),
        ("Trials", [("trials", figures.trial_scatter(trials, front, labels)),
                    ("trial-energy", figures.trial_energy(trials, label)), trial_table(trials)]),
        ("Settings", [f"<pre>{html.escape(yaml.safe_dump(sweep['sweep'], sort_keys=False))}</pre>",
                      f"<pre>{html.escape(yaml.safe_dump(sweep['search_space'], sort_keys=False))}</pre>"]),
    ]


def table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(cell(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {cell(v)}" for k, v in value.items())
    return "" if value is None else str(value)


def summary_table(results: dict[str, dict]) -> str:
    rows = []
    for name, r in results.items():
        energy = r["energy"]
        how = energy["source"] + (f" ({energy['formula']})" if energy.get("formula") else "")
        rows.append([name, r["status"], r["metrics"], r["time"]["steps"], r["time"]["train_seconds"],
                     energy["joules"], how, r["memory"]["trainable_params"], r["memory"]["tensor_account_bytes"] / 1e6,
                     r["memory"]["peak_device_bytes"] / 1e6])
    return table(["run", "status", "dev metrics", "steps", "train s", "joules", "energy source", "trainable params",
                  "tensor account MB", "device peak MB"], rows)


def ratio_table(ratios: dict[str, dict]) -> str:
    keys = sorted({k for q in ratios.values() for k in q})
    return table(["method (ratio to full)", *keys], [[m, *(q.get(k) for k in keys)] for m, q in ratios.items()])


def trial_table(trials: list[dict]) -> str:
    return table(["trial", "status", "feasible", "params", "objectives", "joules", "steps"],
                 [[t["number"], t["status"], t.get("feasible"), t.get("params"), t.get("objectives"),
                   (t.get("energy") or {}).get("joules"), (t.get("time") or {}).get("steps")] for t in trials])


def settings(job: dict | None) -> str:
    return f"<pre>{html.escape(yaml.safe_dump(job, sort_keys=False))}</pre>" if job else "<p>(not recorded)</p>"


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} img{{max-width:100%;display:block;margin:1em 0}}
table{{border-collapse:collapse;font-size:90%}} td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left}}
pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style></head>
<body><h1>{title}</h1>
{body}
</body></html>
"""
