# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 03 — What a feature reads and writes, and the features upstream that cause it
#
# Cunningham et al. (2023, §5) study single dictionary features from both
# sides: the *input side* (which tokens and contexts make it fire) and the
# *output side* (what the model predicts less when it is removed), and then
# trace a feature back through earlier layers as a *causal tree*: which
# features at the previous site, when ablated, lower it most — and recursively
# upstream.
#
# Run it as a script (`python tutorials/03_causal_trees.py`, a few minutes on a
# 2-core CPU: a harvest at resid.3–5, three SAEs, one feature report and one
# tree over 20 contexts) or open it as a notebook with jupytext.
# `CIRCUITSAE_TUTORIAL_SMALL=1` runs it on a tiny random model in seconds.

# %%
import os
from pathlib import Path

import circuitsae
from circuitsae.circuits.features import find_token_feature
from circuitsae.viz.plots import write_feature_report

SMALL = os.environ.get("CIRCUITSAE_TUTORIAL_SMALL") == "1"
OUT = Path(os.environ.get("CIRCUITSAE_TUTORIAL_OUT", "runs/tutorial03"))
MODEL = "tiny-llama" if SMALL else "smollm2-135m"
SITES = ["resid.0", "resid.1", "resid.2"] if SMALL else ["resid.3", "resid.4", "resid.5"]
TOKENS = 6_000 if SMALL else 100_000  # full mode: ~30 s of harvesting, ~1 min of training on 2 CPU cores

# %% [markdown]
# ## 1. One SAE at each of three successive residual sites
# A causal tree needs dictionaries at consecutive sites: the parents of a
# feature at `resid.5` are features at `resid.4`, theirs at `resid.3`. One
# harvest records all three sites; one training pass trains a baseline SAE
# (α = 2, 4× expansion) at each.

# %%
lm = circuitsae.load_model(MODEL)
store = circuitsae.harvest(model=lm, sites=SITES, tokens=TOKENS, out=str(OUT / "activations"))
circuitsae.train(store=str(store.root), out=str(OUT / "saes"), arch=("relu",), coefficients=(2.0,), expansion=4,
                 lr=1e-3, batch_size=256 if SMALL else 1024, epochs=2)  # fmt: skip
saes = {s: circuitsae.load_dictionary(OUT / "saes" / f"{s}-relu-c2") for s in SITES}
site = SITES[-1]

# %% [markdown]
# ## 2. Pick a feature
# The paper's examples fire on a closing parenthesis, an apostrophe, a period
# and " the". `find_token_feature` scores every feature of the last site by
# the F1 of "the feature fires" against "the token is one of these" and
# returns the best match.

# %%
try:
    pick = find_token_feature(saes[site], store, site, lm.tokenizer)
except circuitsae.CircuitSAEError as e:  # no feature fires on any example token: take the densest feature instead
    print("no token feature:", e)
    codes = saes[site].encode(store[site].heldout().float())
    pick = {"feature": int((codes > 0).float().mean(0).argmax()), "token": None}
feature = pick["feature"]
print(f"feature {site}:{feature}", {k: v for k, v in pick.items() if k != "feature"})

# %% [markdown]
# ## 3. Input side and output side
# *Input side*: c_i over every stored token; the contexts where it is largest
# and some at random; and the histogram of its activations split by token
# (paper Fig. 4 left) — a monosemantic feature is one token, or one kind of
# token, across its whole range.
#
# *Output side*: ablate the feature *less than rank one* — x ← x − c_i f_i
# only where c_i > 0, i.e. lower x along f_i just until the feature is off,
# nothing else changes — and see which next-token log-probabilities fall and
# rise (Fig. 4 right). Beside it, the tokens the decoder direction itself
# promotes once pushed through the final norm and the unembedding.

# %%
report = circuitsae.analyse_feature(lm, saes[site], store, feature, site)
print(report.summary())
paths = write_feature_report(report, OUT / "feature")
for kind, path in paths.items():
    print(f"{kind}: {path}")

# %% [markdown]
# ## 4. The causal tree
# Find the feature's maximum activation M over the store and sample 20
# contexts where it reaches [M/2, M]. For every feature i at the previous site
# that is active in those contexts, ablate it there (x ← x − c_i f_i where
# c_i > 0), rerun the model up to the target's site and measure the mean drop
# of the target's activation. Keep the `branching` largest positive drops as
# parents, and recurse from each parent into the site before it. Edge width is
# the causal effect. (Only the blocks between two sites rerun, and each
# candidate only on the contexts where it fires.) The result is a `CausalTree`:
# the graph (`tree.graph`, a networkx DiGraph; `tree.nodes` and `tree.edges`
# read it) and the run's settings as fields (`tree.target`, `tree.contexts`,
# `tree.seconds`, ...).

# %%
tree = circuitsae.causal_tree(lm, saes, (site, feature), depth=len(SITES) - 1, branching=3, contexts=20)
print(f"{tree.number_of_nodes()} nodes, {tree.number_of_edges()} edges in {tree.seconds:.1f} s")
for parent, child, e in sorted(tree.edges(data=True), key=lambda t: -t[2]["effect"]):
    label = tree.nodes[parent].get("label", "")
    print(f"  {parent:>14} -> {child:<14} effect {e['effect']:.3g}   (parent fires on {label})")

# %% [markdown]
# ## 5. Draw it
# `render_tree` writes the graphviz source (`.dot`), the drawings (`.svg`,
# `.png`; these need the graphviz `dot` program) and the graph itself as
# networkx node-link JSON. One rank per site, the target highlighted.

# %%
files = circuitsae.render_tree(tree, OUT / "tree" / "causal_tree")
for kind, path in files.items():
    print(f"{kind}: {path}")
