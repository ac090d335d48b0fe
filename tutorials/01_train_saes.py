# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 01 — Training a baseline SAE and a Gated SAE, and measuring them
#
# A sparse autoencoder (SAE) rewrites an activation vector x ∈ R^d as a sparse,
# non-negative combination of many learned unit directions f_i (the
# *features*): x ≈ x̂ = Σ_i c_i f_i + b_dec, with few c_i non-zero. This
# tutorial trains the two architectures the library implements on real
# SmolLM2-135M activations, in a single pass over the data, then measures how
# sparse and how faithful each one is, and splices one into the model.
#
# Run it as a script (`python tutorials/01_train_saes.py`, a few minutes on a
# 2-core CPU) or open it as a notebook with jupytext.
# `CIRCUITSAE_TUTORIAL_SMALL=1` runs it on a tiny random model in seconds (the
# test suite does this so the tutorial cannot rot).

# %%
import os

import torch

import circuitsae
from circuitsae.training.evaluate import format_table

SMALL = os.environ.get("CIRCUITSAE_TUTORIAL_SMALL") == "1"
OUT = os.environ.get("CIRCUITSAE_TUTORIAL_OUT", "runs/tutorial01")
MODEL = "tiny-llama" if SMALL else "smollm2-135m"
SITE = "resid.1" if SMALL else "resid.6"  # resid.6: the site of benchmarks/results/pareto.json
TOKENS = 4_000 if SMALL else 150_000  # full mode: ~1 min of harvesting on 2 CPU cores
EPOCHS = 2
BATCH = 256 if SMALL else 1024

# %% [markdown]
# ## 1. Harvest activations
# The residual stream after block 6 (`resid.6`), for every token of
# 128-token contexts of real text; the forward pass stops right after the
# site. See tutorial 00 for what the store holds.

# %%
lm = circuitsae.load_model(MODEL)
store = circuitsae.harvest(model=lm, sites=[SITE], tokens=TOKENS, out=f"{OUT}/activations")
print(store)

# %% [markdown]
# ## 2. Train both architectures in one pass
# **Baseline SAE** (Cunningham et al. 2023): c = ReLU(W_enc(x − b_dec) + b_enc),
# x̂ = W_decᵀc + b_dec, loss ||x − x̂||² + α||c||₁. The L1 penalty buys
# sparsity but also pulls every active code towards zero: *shrinkage*.
#
# **Gated SAE** (Rajamanoharan et al. 2024) separates the two jobs: a gate
# path decides *which* features fire (1[π_gate > 0], the only path the
# sparsity penalty λ||ReLU(π_gate)||₁ sees), a magnitude path with tied
# weights decides *how much*. The magnitudes are never penalised, so there is
# no shrinkage.
#
# Both share one data pass: every batch feeds every run. Activations are first
# scaled by one scalar so that E||x||² = d, which makes a coefficient mean the
# same at any site; the scale is folded back into the saved weights. The
# coefficients left unset take each architecture's default (α = 1, λ = 2,
# chosen mid-frontier in `benchmarks/pareto.py`); `coefficients=(0.5, 1, 2)`
# would train a sweep instead. Re-running this cell resumes from the
# checkpoint or returns at once.

# %%
saes = circuitsae.train(
    store=str(store.root),
    out=f"{OUT}/saes",
    arch=("relu", "gated"),
    expansion=4,  # d_sae = 4·d features per SAE
    lr=1e-3,  # for short runs 1e-3 suits both (the Gated paper used 3e-4 over far more steps)
    batch_size=BATCH,
    epochs=EPOCHS,
)
for name, sae in saes.items():
    print(name, sae)

# %% [markdown]
# ## 3. Evaluate
# On held-out text (documents training never saw):
#
# * **L0** — mean number of non-zero codes per token (sparsity).
# * **FVU** — fraction of variance unexplained, Σ||x − x̂||² / Σ||x − mean(x)||²
#   (0 is perfect; 1 − FVU is the explained variance).
# * **γ** — relative reconstruction bias E||x̂||² / E[x·x̂]: γ < 1 means x̂ is
#   systematically too short (shrinkage); the Gated SAE should sit at γ ≈ 1.
# * **loss recovered** — splice x̂ in place of x at every position and compare
#   next-token cross-entropy: (CE_zero − CE_sae) / (CE_zero − CE_clean), where
#   CE_zero has the site zero-ablated. 1 means the model does not notice the
#   swap. ΔCE and KL(clean ‖ spliced) are reported beside it.
#
# The Gated paper's headline is a Pareto improvement: more loss recovered at
# the same L0. With one coefficient per architecture the two land at
# different L0s, so compare them along a sweep (see docs/measured/architectures.md for
# resid.6 at 1M tokens).

# %%
report = circuitsae.evaluate(dictionaries=(f"{OUT}/saes",), out=f"{OUT}/eval.json", model=lm)
results = report.results
print(format_table(report))
for name, r in results.items():
    print(f"{name}: L0 {r.l0:.1f}, FVU {r.fvu:.3f}, gamma {r.gamma:.3f}, loss recovered {r.loss_recovered:.3f}")
print("written to", report.path)

# %% [markdown]
# ## 4. Load a saved SAE and splice it into the model
# A saved dictionary is a folder (`sae.safetensors` + `cfg.json` with the
# model, site and training settings). `run_spliced` runs the model with the
# site's activation replaced by the reconstruction (from position 1 on: the
# start token's huge residual was never in the training data).

# %%
sae = circuitsae.load_dictionary(f"{OUT}/saes/{SITE}-gated-c2")
ids = store.tokens("heldout")[:4]
clean = circuitsae.run_spliced(lm, ids, {})
spliced = circuitsae.run_spliced(lm, ids, {SITE: sae})
ce = torch.nn.functional.cross_entropy
targets = ids[:, 2:].flatten().to(clean.device)  # the logits are where the model runs (a GPU, if there is one)
ce_clean = float(ce(clean[:, 1:-1].flatten(0, 1).float(), targets))
ce_sae = float(ce(spliced[:, 1:-1].flatten(0, 1).float(), targets))
print(f"next-token CE on 4 held-out contexts: clean {ce_clean:.3f}, with the gated SAE spliced at {SITE} {ce_sae:.3f}")

x = store[SITE].heldout()[:1000]
codes = sae.encode(x.to(sae.W_dec.device))  # run_spliced put the SAE on the model's device
print(f"the gated SAE's codes: {int((codes > 0).sum(1).float().mean())} of {sae.d_dict} features active per token")
