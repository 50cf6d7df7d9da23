"""One HTML page per experiment: where it stands, and how it got there.

The page is self-contained (plotly.js inline, nothing fetched), so it opens the same from the admin
API (`GET /admin/tenants/{tenant}/experiments/{name}/page`) or from a file the CLI wrote
(`loragate experiments page NAME`). Its chart has one panel per question, each arm one colour:
- positive rate by arm, cumulative, with its 95% interval as a band;
- each arm's difference from control, with the always-valid interval the verdict uses, around 0;
- requests by arm (is the split what was asked?).
Below it: the verdict, the arms, the current figures and the audit log. Building it is CPU work (a few
ms, plus plotly's import the first time): callers on an event loop run `render` in a thread.
"""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from typing import TYPE_CHECKING, Any

from gateway.experiments import Change, Experiment

if TYPE_CHECKING:
    from plotly.graph_objects import Figure

PANELS = (
    "Positive rate by arm (cumulative, 95% interval)",
    "Difference from control (always-valid interval)",
    "Requests by arm",
)


def _rgba(hex_colour: str, alpha: float) -> str:
    red, green, blue = (int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({red},{green},{blue},{alpha})"


def _band(figure: Figure, x: list[datetime], bounds: list[list[float | None]], colour: str, row: int) -> None:
    """An interval as a filled band: the upper edge, then the lower one filled up to it."""
    import plotly.graph_objects as go

    for edge, fill in ((1, None), (0, "tonexty")):
        figure.add_trace(
            go.Scatter(
                x=x,
                y=[b[edge] for b in bounds],
                mode="lines",
                line={"width": 0},
                fill=fill,
                fillcolor=_rgba(colour, 0.2),
                hoverinfo="skip",
                showlegend=False,
            ),  # fmt: skip
            row=row,
            col=1,
        )


def _line(figure: Figure, x: list[datetime], y: list[Any], name: str, colour: str, row: int, legend: bool) -> None:
    import plotly.graph_objects as go

    figure.add_trace(
        go.Scatter(
            x=x,
            y=y,
            name=name,
            legendgroup=name,
            showlegend=legend,
            mode="lines+markers",
            line={"color": colour, "width": 3},
            marker={"size": 5},
        ),  # fmt: skip
        row=row,
        col=1,
    )


def figure(experiment: Experiment, history: list[dict[str, Any]]) -> Figure:
    """The chart of an experiment's history (gateway.experiment_history points)."""
    import plotly.colors
    from plotly.subplots import make_subplots

    chart = make_subplots(rows=3, cols=1, shared_xaxes=True, subplot_titles=PANELS, vertical_spacing=0.08)
    x = [datetime.fromtimestamp(p["at"], UTC) for p in history]
    palette = plotly.colors.qualitative.Plotly
    for index, arm in enumerate(experiment.arms):
        colour = palette[index % len(palette)]
        figures = [p["arms"].get(arm.name, {}) for p in history]
        _band(chart, x, [f.get("interval") or [None, None] for f in figures], colour, 1)
        _line(chart, x, [f.get("positive_rate") for f in figures], arm.name, colour, 1, True)
        if arm.name != experiment.control:
            diffs = [p["differences"].get(arm.name, {}) for p in history]
            _band(chart, x, [d.get("always_valid") or [None, None] for d in diffs], colour, 2)
            _line(chart, x, [d.get("diff") for d in diffs], arm.name, colour, 2, False)
        _line(chart, x, [f.get("requests") for f in figures], arm.name, colour, 3, False)
    chart.add_hline(y=0, line={"color": "#444", "dash": "dash", "width": 1}, row=2, col=1)
    chart.update_yaxes(range=[0, 1], row=1, col=1)
    chart.update_layout(height=900, template="plotly_white", legend_title_text="arm", margin={"t": 60})
    return chart


def _table(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _figures(results: dict[str, Any]) -> str:
    rows = [
        [name, str(a["requests"]), str(a["users"]), _share(a["error_rate"]), str(a["rated"]),
         _share(a["positive_rate"]), _share(a["corrected_share"])]
        for name, a in results["arms"].items()
    ]  # fmt: skip
    head = ["arm", "requests", "users", "errors", "rated", "positive", "corrected"]
    return _table(head, rows)


def _audit(changes: list[Change]) -> str:
    rows = [
        [datetime.fromtimestamp(c.at, UTC).strftime("%Y-%m-%d %H:%M:%S"), c.by, c.action, c.detail] for c in changes
    ]
    return _table(["when (UTC)", "who", "action", "detail"], rows)


STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}"
    "td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}th{background:#f4f4f4}"
    ".verdict{font-size:1.3em;font-weight:600}"
)


def render(experiment: Experiment, results: dict[str, Any], history: list[dict[str, Any]], audit: list[Change]) -> str:
    """The whole page, as one HTML document."""
    verdict = results["verdict"] + (f": {results['winner']}" if results["winner"] else "")
    arms = _table(
        ["arm", "target", "weight"],
        [[a.name + (" (control)" if a.name == experiment.control else ""), a.target, f"{a.weight:g}"]
         for a in experiment.arms],
    )  # fmt: skip
    chart = figure(experiment, history).to_html(full_html=False, include_plotlyjs=True, div_id="experiment-chart")
    title = escape(f"{experiment.tenant} / {experiment.name}")
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>Experiment {title}</title>"
        f"<style>{STYLE}</style></head><body><h1>Experiment {title}</h1>"
        f"<p>alias <b>{escape(experiment.alias)}</b> · status <b>{escape(experiment.status)}</b> · "
        f"{len(history)} points in the chart</p>"
        f"<p class='verdict' id='verdict'>Verdict: {escape(verdict)}</p>"
        f"<p>sample ratio mismatch p = {results['sample_ratio_p']:.4f} (flagged below 0.001)</p>"
        f"{chart}<h2>Arms</h2>{arms}<h2>Now</h2>{_figures(results)}<h2>Changes</h2>{_audit(audit)}</body></html>"
    )
