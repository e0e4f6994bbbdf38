"""Pictures of an :class:`~orthofx.graph.result.AnalysisReport`: its producer → meta-layer chains as
a networkx graph, Graphviz DOT text and a PNG (networkx + matplotlib). The report's
``to_networkx`` / ``to_dot`` / ``to_png`` methods call these."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from orthofx.graph.result import AnalysisReport, ChainStep

__all__ = ["to_networkx", "to_dot", "to_png"]

_ROLE_COLORS = {
    "producer": "#ffd27f",
    "covariance": "#9fd5ff",
    "meta": "#c7a4ff",
    "stop": "#ff9f9f",
}


def _key(tag: str, step: "ChainStep") -> str:
    return f"{tag}:{step.graph + '/' if step.graph else ''}{step.node}"


def _step_label(step: "ChainStep") -> str:
    label = f"{step.node}\n{step.target}"
    if step.role not in ("producer", "meta"):
        label += f"\n[{step.role}]"
    if step.shape is not None:
        label += "\n" + "x".join(map(str, step.shape))
    return label


def _dot_str(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_networkx(report: "AnalysisReport") -> Any:
    """A ``networkx.DiGraph`` of every chain: nodes ``"<entry>:<node>"`` with attributes
    ``label``, ``role``, ``entry``, ``row``, ``column``, ``ok``; edges producer → … → meta-layer."""
    import networkx as nx

    g = nx.DiGraph()
    chains: list[tuple[str, Sequence[ChainStep], bool]] = [
        (f"e{i}", e.chain, True) for i, e in enumerate(report.entries)
    ] + [(f"s{i}", s.chain, False) for i, s in enumerate(report.skipped)]
    for row, (tag, chain, ok) in enumerate(chains):
        prev = None
        for col, step in enumerate(chain):
            key = _key(tag, step)
            g.add_node(key, label=_step_label(step), role=step.role, entry=tag, row=row, column=col, ok=ok)
            if prev is not None:
                g.add_edge(prev, key)
            prev = key
    return g


def to_dot(report: "AnalysisReport") -> str:
    """Graphviz DOT text: one cluster per entry (producer → … → meta-layer) and per skipped
    meta-layer (stop node → … → meta-layer, in red)."""
    out = ["digraph orthofx {", "  rankdir=LR;", '  node [shape=box, fontname="Helvetica", fontsize=10];']
    blocks = [(f"e{i}", f"[{i}] {e.name}: {e.kind} / {e.usage} (node {e.node})", e.chain, True)
              for i, e in enumerate(report.entries)]
    blocks += [(f"s{i}", f"skipped {s.name}: {s.reason}", s.chain, False)
               for i, s in enumerate(report.skipped)]
    for tag, label, chain, ok in blocks:
        out.append(f"  subgraph cluster_{tag} {{")
        out.append(f"    label={_dot_str(label)};")
        out.append(f"    color={'black' if ok else 'red'};")
        keys = []
        for step in chain:
            key = _key(tag, step)
            keys.append(key)
            color = _ROLE_COLORS.get(step.role, "#ffffff")
            out.append(f"    {_dot_str(key)} [label={_dot_str(_step_label(step))}, "
                       f'style=filled, fillcolor="{color}"];')
        for a, b in zip(keys, keys[1:]):
            out.append(f"    {_dot_str(a)} -> {_dot_str(b)};")
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"


def to_png(report: "AnalysisReport", path: str, *, dpi: int = 120) -> str:
    """Draw the chains into ``path`` with networkx + matplotlib (a ``Figure`` with an Agg
    canvas, no ``pyplot``); returns ``path``. Needs the ``plot`` extra."""
    import networkx as nx

    from orthofx._optional import require

    mfig = require("matplotlib.figure", "plot", purpose="Report.to_png")
    g = to_networkx(report)
    n_rows = max((d["row"] for _, d in g.nodes(data=True)), default=0) + 1
    n_cols = max((d["column"] for _, d in g.nodes(data=True)), default=0) + 1
    fig = mfig.Figure(figsize=(max(4.0, 1.9 * n_cols), max(2.0, 1.3 * n_rows)))
    ax = fig.subplots()
    pos = {k: (d["column"], -d["row"]) for k, d in g.nodes(data=True)}
    colors = [_ROLE_COLORS.get(d["role"], "#ffffff") for _, d in g.nodes(data=True)]
    edge_colors = ["black" if g.nodes[u]["ok"] else "red" for u, _ in g.edges()]
    if g.number_of_nodes():
        nx.draw_networkx_nodes(g, pos, ax=ax, node_color=colors, node_shape="s", node_size=1800,
                               edgecolors="black")
        nx.draw_networkx_edges(g, pos, ax=ax, edge_color=edge_colors, arrows=True, node_size=1800)
        labels = {k: d["label"] for k, d in g.nodes(data=True)}
        nx.draw_networkx_labels(g, pos, labels=labels, ax=ax, font_size=6)
    else:
        ax.text(0.5, 0.5, "no meta-layers found", ha="center", va="center")
    ax.set_title(f"orthofx: {report.model}", fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path
