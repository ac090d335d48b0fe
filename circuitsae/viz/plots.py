"""Plots (matplotlib, loaded when first drawn): the IOI curves and transfer, one feature's histogram and logit
effect, and circuits' faithfulness and completeness curves.

:func:`write_feature_report` writes a :class:`~circuitsae.circuits.features.FeatureReport` as JSON with its two
PNGs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from circuitsae.circuits.circuit import Faithfulness
    from circuitsae.circuits.features import FeatureReport
    from circuitsae.commands.ioi import IOIRun


def _figure_legend(fig: Any, axes: Any) -> None:
    """One legend below all panels of a constrained-layout figure: every label once, readable size."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, lab in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(lab, handle)
    if entries:
        fig.legend(list(entries.values()), list(entries), loc="outside lower center", fontsize=10,
                   ncol=min(4, len(entries)), frameon=False)  # fmt: skip


CUT = 1e-3  # the curve plots' y axis starts at CUT × KL(nothing patched)


def _ioi_report(report: "IOIRun | dict") -> dict:
    """An :class:`~circuitsae.commands.ioi.IOIRun` as its JSON object; a dict (``model``, ``prompts``,
    ``results``, optionally ``heldout_prompts``) as it is."""
    return report if isinstance(report, dict) else report.to_json()


def plot_curves(report: "IOIRun | dict", path: "str | Path", sites: "list[str] | None" = None) -> Path:
    """KL vs features patched (left) and KL vs edit magnitude (right), one row per site."""
    report = _ioi_report(report)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    sites = sites or sorted({r["site"] for r in results}, key=lambda s: int(s.split(".")[1]))
    # one legend for the whole figure, below the plots, in the axis labels' size (inside a panel it hid curves)
    fig, axes = plt.subplots(len(sites), 2, figsize=(12, 4.2 * len(sites) + 0.8), squeeze=False, layout="constrained")
    labels = list(dict.fromkeys(r["label"] for r in results))
    colours = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    for row, site in zip(axes, sites):
        floor = None
        for r in (r for r in results if r["site"] == site):
            recs = [r["start"]["all"]] + r["records"] if r["method"] == "acdc" else r["records"]
            n = np.array([x["n_features"] for x in recs], float)
            kl = np.array([x["kl"] for x in recs])
            edit = np.array([x["edit_magnitude"] for x in recs])
            style = dict(color=colours[r["label"]], lw=1.6 if r["method"] == "acdc" else 1.0)
            style["ls"] = "-" if r["method"] == "acdc" else ":"
            name = r["label"] if r["method"] == "acdc" else f"{r['label']} (attribution)"
            ok = n > 0
            row[0].plot(n[ok], kl[ok], marker="." if r["method"] == "acdc" else None, label=name, **style)
            row[1].plot(edit[ok], kl[ok], marker="." if r["method"] == "acdc" else None, **style)
            floor = r["start"]["none"]["kl"]
        for ax in row:
            ax.set_yscale("log")
            if floor is not None:
                ax.axhline(floor, color="grey", ls="--", lw=0.8)
                # a lossless dictionary with every candidate patched reaches ~1e-8: cut there, the floors stay
                ax.set_ylim(bottom=max(ax.get_ylim()[0], CUT * floor))
            ax.set_xscale("log")
            ax.set_ylabel("KL(patched ‖ target), mean over prompts")
            ax.grid(alpha=0.3, which="both")
        row[0].set_xlabel("features patched")
        row[1].set_xlabel("mean edit magnitude ‖x' − x‖")
        row[0].set_title(f"{site}: KL vs number of features patched (grey: nothing patched)")
        row[1].set_title(f"{site}: KL vs edit magnitude")
    _figure_legend(fig, axes[:, 0])
    methods = {r["method"] for r in results}
    key = ", ".join(
        k for m, k in (("acdc", "solid: ACDC order"), ("attribution", "dotted: attribution order")) if m in methods
    )
    fig.suptitle(
        f"IOI feature patching, {report['model']}, {report['prompts']} prompts ({key}; "
        f"KL below {CUT:g} × unpatched not shown)"
    )
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_transfer(report: "IOIRun | dict", path: "str | Path", sites: "list[str] | None" = None) -> Path:
    """Fraction of the unpatched KL left vs features patched: on the selection prompts (solid) and the same
    feature sets on the held-out prompts (dashed), one panel per site and ordering."""
    report = _ioi_report(report)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in report["results"] if "records" in r.get("heldout", {})]
    sites = sites or sorted({r["site"] for r in results}, key=lambda s: int(s.split(".")[1]))
    methods = [m for m in ("acdc", "attribution") if any(r["method"] == m for r in results)]
    fig, axes = plt.subplots(len(sites), len(methods), figsize=(6.5 * len(methods), 4.2 * len(sites) + 1.0),
                             squeeze=False, layout="constrained")  # fmt: skip
    labels = list(dict.fromkeys(r["label"] for r in report["results"]))
    colours = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    for row, site in zip(axes, sites):
        for ax, method in zip(row, methods):
            top = 1.2
            mine = [r for r in results if r["site"] == site and r["method"] == method]
            if not mine:  # e.g. exact ACDC run at some sites only
                ax.text(0.5, 0.5, f"{site}: no {method} curve", ha="center", va="center", transform=ax.transAxes)
                ax.set_axis_off()
                continue
            for r in mine:
                for recs, none, ls, tag in (
                    (r["records"], r["start"]["none"]["kl"], "-", "selection"),
                    (r["heldout"]["records"], r["heldout"]["start"]["none"]["kl"], "--", "held-out"),
                ):
                    n = np.array([x["n_features"] for x in recs], float)
                    frac = np.array([x["kl"] for x in recs]) / none
                    ok = n > 0
                    ax.plot(n[ok], frac[ok], ls=ls, marker=("." if ls == "-" else "x") if method == "acdc" else None,
                            color=colours[r["label"]], label=f"{r['label']} ({tag})")  # fmt: skip
                    top = max(top, 1.05 * float(frac[ok].max(initial=0)))
            ax.axhline(0.5, color="grey", ls=":", lw=0.8)
            ax.axhline(1.0, color="grey", ls="--", lw=0.8)
            ax.set_xscale("log")
            ax.set_ylim(0, top)
            ax.set_xlabel("features patched (chosen on the selection prompts)")
            ax.set_ylabel("KL / KL(nothing patched)")
            ax.set_title(f"{site}, {method} order: selection (solid) vs held-out prompts (dashed)", fontsize=9)
            ax.grid(alpha=0.3, which="both")
    _figure_legend(fig, axes.ravel())
    n_sel, n_held = report["prompts"], report.get("heldout_prompts")
    fig.suptitle(f"IOI: do the features chosen on {n_sel} prompts carry over\nto {n_held} prompts with other "
                 "names and templates? (grey: all and half of the unpatched KL)", fontsize=10)  # fmt: skip
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_histogram(report: "FeatureReport", path: "str | Path") -> Path:
    """Fig. 4 left: firing rows per activation range, stacked by token."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = report.histogram
    edges = h["edges"]
    width = edges[1] - edges[0]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    bottom = [0] * (len(edges) - 1)
    for name, counts in zip(h["tokens"], h["counts"]):
        color = "lightgrey" if name == "other" else None
        ax.bar(edges[:-1], counts, width=width * 0.95, bottom=bottom, align="edge", label=name, color=color)
        bottom = [a + b for a, b in zip(bottom, counts)]
    ax.set_xlabel(f"activation of {report.site}:{report.feature}")
    ax.set_ylabel("firing tokens")
    ax.set_title(f"{report.site}:{report.feature}: tokens by activation (density {report.density:.1e})")
    ax.legend(fontsize=8, title="token", loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_logit_effect(report: "FeatureReport", path: "str | Path") -> Path:
    """Fig. 4 right: the next-token log-probs that fall and rise most when the feature is ablated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    down, up = report.logit_effect["down"], report.logit_effect["up"][::-1]
    rows = down + up
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [v for _, v in rows], color=["tab:red"] * len(down) + ["tab:blue"] * len(up))
    ax.set_yticks(range(len(rows)), [repr(t) for t, _ in rows], fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlabel("mean Δ log p(next token) when ablated\nred: the feature promotes them; blue: it suppresses them")
    ax.set_title(
        f"{report.site}:{report.feature} ablated (x ← x − c f where c > 0), "
        f"{report.logit_effect['positions']} positions",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def write_feature_report(report: "FeatureReport", folder: "str | Path") -> dict[str, str]:
    """Write ``SITE-ID.json``, ``SITE-ID-histogram.png`` and ``SITE-ID-logit_effect.png`` into ``folder``.

    Returns the paths (also kept in ``report.paths``).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{report.site}-{report.feature}"
    report.paths = {
        "histogram": str(plot_histogram(report, folder / f"{stem}-histogram.png")),
        "logit_effect": str(plot_logit_effect(report, folder / f"{stem}-logit_effect.png")),
        "json": str(folder / f"{stem}.json"),
    }
    report.write_json(report.paths["json"])
    return report.paths


__all__ = ["CUT", "plot_curves", "plot_histogram", "plot_logit_effect", "plot_transfer", "write_feature_report"]


def plot_faithfulness(curves: "dict[str, Faithfulness]", path: "str | Path", title: str = "") -> Path:
    """Faithfulness (left) and completeness (right) against the nodes kept, one line per labelled curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), layout="constrained")
    for label, f in curves.items():
        axes[0].plot(f.n, f.faithfulness, marker="o", ms=3, label=label)
        axes[1].plot(f.n, f.completeness, marker="o", ms=3, label=label)
    for ax, name in zip(axes, ("faithfulness F(C)", "completeness F(M \\ C)")):
        ax.set_xscale("log")
        ax.set_xlabel("nodes in the circuit (top n by |estimated effect|)")
        ax.set_ylabel(name)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=11)
    _figure_legend(fig, axes)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
