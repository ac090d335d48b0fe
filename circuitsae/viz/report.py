"""One self-contained ``report.html`` from a demo's ``summary.json``.

Plots are embedded as base64 PNG and the circuit diagram as inline SVG, so the
file can be mailed or opened anywhere without the run folder. Every number in
it is read from the files the steps wrote; nothing is computed here.
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

from circuitsae.io import atomic_write
from circuitsae.viz.render import TARGET_FILL

SECTIONS = ("Run", "Sparse autoencoders", "IOI feature patching", "Feature", "Causal tree")

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; font-size: .9em; margin: .6em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
img, svg { max-width: 100%; height: auto; } .note { color: #555; font-size: .92em; }
code, .ctx { font-family: ui-monospace, monospace; font-size: .88em; } .ctx b { background: #ffe08a; }
a { color: #0b5cad; } ul.files { margin: .3em 0; padding-left: 1.4em; }
.tree { overflow: auto; border: 1px solid #ddd; cursor: grab; background: #fff; box-sizing: border-box; }
.tree.wide { width: calc(100vw - 3em); margin-left: calc(50% - 50vw + 1.5em); }  /* the window's width */
.tree svg { display: block; max-width: none; height: auto; margin: 0 auto; }
.tools { font-size: .9em; color: #555; margin: .4em 0; } .tools button { font: inherit; margin-left: .3em; }
"""

# The causal tree is drawn at its natural size (11 pt labels), too wide for the page when it has more than a
# dozen nodes: it scrolls inside its own box, which also pans by dragging and zooms with the buttons.
_TREE_JS = """
(function () {
  var box = document.getElementById('tree'), svg = box && box.querySelector('svg');
  if (!svg) return;
  var natural = svg.width.baseVal.value;
  if (natural > box.clientWidth) box.classList.add('wide');
  var target = svg.querySelector('g.node [fill="TARGET_FILL"]');  // render.py's fill for the tree's target
  function centre() {  // start with the target (the tree's root, at the bottom) in view
    if (!target) return;
    var t = target.getBoundingClientRect(), b = box.getBoundingClientRect();
    box.scrollLeft += t.left + t.width / 2 - (b.left + box.clientWidth / 2);
  }
  document.querySelectorAll('[data-zoom]').forEach(function (b) {
    b.addEventListener('click', function () {
      var z = b.getAttribute('data-zoom');
      svg.style.width = (z === 'fit' ? box.clientWidth - 2 : natural * parseFloat(z)) + 'px';
      centre();
    });
  });
  centre();
  var drag = null;
  box.addEventListener('mousedown', function (e) {
    drag = {x: e.clientX, y: e.clientY, left: box.scrollLeft, top: box.scrollTop};
    box.style.cursor = 'grabbing';
    e.preventDefault();
  });
  window.addEventListener('mouseup', function () { drag = null; box.style.cursor = ''; });
  window.addEventListener('mousemove', function (e) {
    if (!drag) return;
    box.scrollLeft = drag.left - (e.clientX - drag.x);
    box.scrollTop = drag.top - (e.clientY - drag.y);
  });
})();
""".replace("TARGET_FILL", TARGET_FILL)


def _img(path: "str | Path | None", alt: str) -> str:
    if not path or not Path(path).is_file():
        return f'<p class="note">({html.escape(alt)}: not produced)</p>'
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _svg(path: "str | Path | None", alt: str) -> str:
    if not path or not Path(path).is_file():
        return f'<p class="note">({html.escape(alt)}: not rendered — is graphviz installed?)</p>'
    text = Path(path).read_text()
    return text[text.find("<svg") :]  # drop the XML prologue and DOCTYPE


def _table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """``cols``: (key, header, format)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in cols)
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("<td>–</td>" if v is None else f"<td>{html.escape(fmt.format(v))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _run(s: dict) -> str:
    steps = [{"step": k, "seconds": v} for k, v in s["seconds"].items()]
    facts = [
        ("model", s["model"]),
        ("corpus", s["corpus"]),
        ("sites", ", ".join(s["sites"])),
        ("activations", f"{s['train_tokens']:,} training and {s['heldout_tokens']:,} held-out tokens"),
        ("machine", s["machine"]),
        ("scale", s["scale"]),
    ]
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>" for k, v in facts)
    return f"<table>{rows}</table>" + _table(steps, [("step", "step", "{}"), ("seconds", "wall time (s)", "{:.0f}")])


def _saes(s: dict) -> str:
    rows = [{"name": k, **v} for k, v in s["saes"].items()]
    cols = [
        ("name", "dictionary", "{}"),
        ("l0", "L0", "{:.1f}"),
        ("fvu", "FVU", "{:.3f}"),
        ("gamma", "γ (shrinkage)", "{:.3f}"),
        ("loss_recovered", "loss recovered", "{:.3f}"),
        ("delta_ce", "ΔCE (nats)", "{:.3f}"),
        ("dead_fraction", "dead", "{:.2f}"),
    ]
    return (
        '<p class="note">Held-out activations. L0: active features per token; FVU: fraction of variance '
        "unexplained; γ: the scale that best fits x̂ to x (γ &lt; 1 means shrinkage); loss recovered: "
        "(CE<sub>zero-ablated</sub> − CE<sub>spliced</sub>) / (CE<sub>zero-ablated</sub> − CE<sub>clean</sub>) "
        "with the SAE spliced into the model. The relu run with c0 is the α = 0 (non-sparse) dictionary.</p>"
        + _table(rows, cols)
    )


def _ioi(s: dict) -> str:
    ioi = s.get("ioi")
    if not ioi:
        return '<p class="note">(not run)</p>'
    perf = ioi["performance"]
    cols = [
        ("label", "dictionary", "{}"),
        ("method", "order", "{}"),
        ("n_candidates", "candidates", "{:d}"),
        ("kl_all", "KL, all patched", "{:.3g}"),
        ("kl_none", "KL, none patched", "{:.3g}"),
        ("evaluations", "evaluations", "{:d}"),
        ("seconds", "seconds", "{:.0f}"),
    ]
    return (
        f"<p>{ioi['prompts']} IOI prompt pairs at <code>{html.escape(ioi['site'])}</code>, "
        f"{ioi['thresholds']} ACDC thresholds. The model does the task: mean logit difference IO − S "
        f"{perf['logit_diff']:.2f}, accuracy {perf['accuracy']:.2f}. The target prompt swaps the indirect "
        "object for another name; patching features of the target run into the base run moves the base "
        "output towards the target's. Curves lower and further left are better: fewer features and "
        "smaller edits for the same KL.</p>"
        + (
            '<p class="note">The dense baselines (α = 0, PCA) are ordered by attribution only here: with every '
            "feature a candidate, exact ACDC over them takes hours on a CPU (<code>--ioi-dense-acdc</code> runs it; "
            "<code>benchmarks/kl_vs_patches.py</code> has the full comparison).</p>"
            if not any(r["method"] == "acdc" and r["label"] == "PCA" for r in ioi["rows"])
            else ""
        )
        + _img(ioi.get("png"), "KL vs features patched and vs edit magnitude")
        + _table(ioi["rows"], cols)
        + f'<p class="note">{html.escape(ioi.get("finding", ""))}</p>'
        + "".join(
            f'<p class="note">{html.escape(k["label"])}: skipped, {html.escape(k["reason"])}.</p>'
            for k in ioi.get("skipped", [])
        )
    )


def _feature(s: dict) -> str:
    f = s.get("feature")
    if not f:
        return '<p class="note">(not run)</p>'
    ctx = "".join(f'<div class="ctx">{c}</div>' for c in f["contexts_html"])
    return (
        f"<p>Feature <code>{html.escape(f['site'])}:{f['feature']}</code> of "
        f"<code>{html.escape(f['dictionary'])}</code>, chosen as the feature that best picks out the token "
        f"{html.escape(repr(f['token']))} (precision {f['precision']:.2f}, recall {f['recall']:.2f}); "
        f"density {f['density']:.2e}, max activation {f['max_activation']:.3g}.</p>"
        f"<p>Top-activating contexts (firing token in bold):</p>{ctx}"
        + _img(f.get("histogram"), "token histogram by activation range")
        + _img(f.get("logit_effect"), "logit effect of ablating the feature")
        + f"<p>Its decoder direction, read through the unembedding: {html.escape(', '.join(map(repr, f['unembed'])))}.</p>"
    )


def _link(path: "str | Path", here: Path) -> str:
    """An ``<a>`` to a file the run wrote, relative to the report's folder (so it works when the folder moves)."""
    try:
        rel = Path(os.path.relpath(Path(path).resolve(), here.resolve())).as_posix()
    except ValueError:  # another drive
        rel = Path(path).as_posix()
    return f'<a href="{html.escape(quote(rel))}"><code>{html.escape(rel)}</code></a>'


def _tree(s: dict, here: Path) -> str:
    t = s.get("tree")
    if not t:
        return '<p class="note">(not run)</p>'
    svg = _svg(t.get("svg"), "causal tree")
    if svg.startswith("<svg"):
        svg = (
            '<div class="tools">Drawn at full size: when wider than the window, scroll or drag it sideways. Zoom '
            '<button type="button" data-zoom="fit">fit width</button><button type="button" data-zoom="1">100%'
            '</button><button type="button" data-zoom="1.5">150%</button></div>'
            f'<div class="tree" id="tree">{svg}</div><script>{_TREE_JS}</script>'
        )
    files = [(k, t[k]) for k in ("svg", "dot", "json") if t.get(k)]
    names = {"svg": "diagram (SVG)", "dot": "graphviz DOT", "json": "networkx node-link JSON"}
    return (
        f"<p>{html.escape(t['caption'])}</p>"
        + svg
        + (
            '<p class="note">The tree as files: '
            + ", ".join(f"{names[k]} {_link(p, here)}" for k, p in files)
            + ".</p>"
            if files
            else ""
        )
    )


_FILES = {"summary": "every number on this page, as JSON", "report": "this page"}


def _files(files: dict[str, str], here: Path) -> str:
    if not files:
        return ""
    items = "".join(
        f"<li>{_link(p, here)}: {html.escape(_FILES.get(k, k))}</li>" for k, p in files.items() if p is not None
    )
    return (
        '<p class="note">Every figure above is read from the files the run wrote, beside this page:</p>'
        f'<ul class="note files">{items}</ul>'
    )


def write_report(summary: dict[str, Any], path: "str | Path") -> Path:
    """Write ``report.html`` (every section of :data:`SECTIONS`) from a demo summary."""
    path = Path(path)
    here = path.parent
    parts = [_run(summary), _saes(summary), _ioi(summary), _feature(summary), _tree(summary, here)]
    body = "".join(f"<h2>{html.escape(t)}</h2>{p}" for t, p in zip(SECTIONS, parts))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>circuitsae demo</title><style>{_CSS}</style>"
        f"</head><body><h1>circuitsae demo: {html.escape(summary['model'])}</h1>{body}"
        f"{_files(summary.get('files', {}), here)}</body></html>"
    )
    atomic_write(path, page.encode())
    return path
