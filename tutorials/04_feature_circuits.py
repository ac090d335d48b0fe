# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 04 — The IOI circuit across the whole model, with error nodes and error bars
#
# Marks et al. (2024, "Sparse Feature Circuits") put a dictionary at every residual, attention and MLP site
# and ask which features, at which layers, carry a task from the input to the logits. Each site's activation
# is x = x̂(c) + ε: the features c *and* the error ε (what the SAE misses) are nodes, so the spliced model is
# the model and nothing is hidden. Node effects are estimated by attribution patching (one backward pass) or
# integrated gradients; circuitsae also measures them **exactly** on a sample, so the circuit comes with the
# estimator's error.
#
# Run it as a script (`python tutorials/04_feature_circuits.py`: about 15 minutes on 2 CPU cores, most of it
# training TopK SAEs at all 90 sites of SmolLM2 from 100k tokens; set `DICTS` to a folder of the full-stack
# set that `benchmarks/every_layer.py` builds to skip that) or open it as a notebook with jupytext.
# `CIRCUITSAE_TUTORIAL_SMALL=1` runs it on a tiny random model in a minute.

# %%
import os
from pathlib import Path

import circuitsae
from circuitsae.circuits.circuit import faithfulness, feature_circuit
from circuitsae.circuits.effects import node_effects
from circuitsae.circuits.estimator_error import check_circuit
from circuitsae.dictionaries import IdentityDictionary
from circuitsae.dictionaries.folders import select_dictionaries
from circuitsae.tasks.ioi import make_ioi
from circuitsae.viz.circuit import render
from circuitsae.viz.plots import plot_faithfulness

SMALL = os.environ.get("CIRCUITSAE_TUTORIAL_SMALL") == "1"
OUT = Path(os.environ.get("CIRCUITSAE_TUTORIAL_OUT", "runs/tutorial04"))
MODEL = "tiny-llama" if SMALL else "smollm2-135m"
DICTS = os.environ.get("CIRCUITSAE_TUTORIAL_DICTS")  # a full-stack set already built, if any
PROMPTS = 6 if SMALL else 30

# %% [markdown]
# ## 1. A TopK SAE at every site, trained straight from the model
# `sites=("all",)` expands to every `resid.L`, `attn.L` and `mlp.L`; the trainer takes its batches from the
# model's forward passes (no activation store is written) and trains every SAE in the same pass.

# %%
lm = circuitsae.load_model(MODEL, dtype="float32")
if DICTS is None:
    DICTS = str(OUT / "saes")
    circuitsae.train(model=lm, sites=("all",), out=DICTS, arch=("topk",), coefficients=(16.0 if SMALL else 32.0,),
                     expansion=2, tokens=4_000 if SMALL else 100_000, batch_size=256 if SMALL else 2048, lr=1e-3,
                     eval_rows=512 if SMALL else 8192, progress=not SMALL)  # fmt: skip
saes = select_dictionaries([DICTS], arch="topk")
print(f"{len(saes)} dictionaries, at {', '.join(list(saes)[:4])}, ...")

# %% [markdown]
# ## 2. The circuit
# IOI prompt pairs: the base names IO and S; the target replaces IO by another name. The metric is the logit
# difference IO − S at the last token. Every node's effect is estimated by attribution patching; the 30 with
# the largest |effect| are kept and joined by edges ∇_d m · ∂d/∂u · Δu between successive sites.

# %%
pairs = make_ioi(lm, n=PROMPTS, seed=0)
circuit, effects, acts = feature_circuit(lm, saes, pairs, max_nodes=30)
errors = [v for v in circuit.graph if circuit.nodes[v].get("error")]
print(f"{circuit.number_of_nodes() - 1} nodes ({len(errors)} error nodes), {circuit.number_of_edges()} edges; "
      f"logit difference on the base prompts {circuit.base_metric:.3f}")  # fmt: skip
for node, value in effects.top(8):
    print(f"  {str(node):>14s}  {value:+.4f}")
paths = render(circuit, OUT / "circuit", max_nodes=30)
print("drawn:", ", ".join(paths))

# %% [markdown]
# How much of the effect flows through what the SAEs do not explain? Summed over positions and averaged over
# prompts, each site's features and its error node split the site's total estimated effect.

# %%
totals = effects.site_totals()
share = sum(abs(e) for _, e in totals.values()) / max(1e-12, sum(abs(f) + abs(e) for f, e in totals.values()))
print(f"error nodes carry {100 * share:.0f}% of the summed |effect| over {len(totals)} sites")

# %% [markdown]
# ## 3. Is the estimate right? Exact patches of the circuit's nodes and a sample of the rest
# Every node in the circuit, plus a sample stratified by |estimate| (nodes estimated ≈ 0 included, to catch false
# negatives), is patched alone and the metric re-measured; so is a sample of edges.

# %%
report = check_circuit(circuit, lm, saes, pairs, {"atp": effects}, acts, n_nodes=10 if SMALL else 100,
                       n_edges=5 if SMALL else 50)  # fmt: skip
s = report.nodes["atp"]["all"]
print(f"atp vs exact on {s.count} nodes: Spearman {s.spearman:.2f}, median relative error "
      f"{s.median_relative_error:.2f}, sign agreement {s.sign_agreement:.2f}, false negatives "
      f"{s.false_negative_rate:.2f}")  # fmt: skip

# %% [markdown]
# ## 4. Faithfulness: SAE features against neurons
# Keep the top-n nodes, mean-ablate the rest, and compare the metric with the model's: F = 1 is the whole
# model, 0 the model with every node ablated. Marks et al. find feature circuits get there with far fewer nodes
# than neuron circuits (the neuron basis is the identity dictionary, which has no error term).

# %%
sizes = (1, 4, 16, 64, 256)
curves = {"SAE features + errors": faithfulness(lm, saes, pairs, effects.node_scores(), acts, sizes=sizes)}
neurons = {s: IdentityDictionary(d.d) for s, d in saes.items()}
for s, d in neurons.items():
    d.meta = {"site": s, "first_position": saes[s].meta.get("first_position", 0)}
n_effects, n_acts = node_effects(lm, neurons, pairs)
curves["neurons"] = faithfulness(lm, neurons, pairs, n_effects.node_scores(), n_acts, sizes=sizes)
for label, f in curves.items():
    print(f"{label}: " + ", ".join(f"n={n}: F={x:.2f}" for n, x in zip(f.n, f.faithfulness)))
plot_faithfulness(curves, OUT / "faithfulness.png", f"{MODEL}: IOI circuits")
