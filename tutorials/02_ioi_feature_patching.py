# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 02 — Which features carry the answer? Feature patching on IOI, ordered by ACDC
#
# Cunningham et al. (2023, §4) ask whether a sparse dictionary localises the
# computation of a task better than other bases. The task is indirect-object
# identification (IOI): "Then, Alice and Bob went to the store. Bob gave a
# snack to" → " Alice". We patch dictionary features from a *counterfactual*
# prompt (Alice replaced by another name) into the original one, and ask how
# few features — and how small an edit — make the model behave as on the
# counterfactual.
#
# Run it as a script (`python tutorials/02_ioi_feature_patching.py`, a few
# minutes on a 2-core CPU: a small harvest and SAE at `resid.27`, then ACDC on
# 10 prompts and 12 thresholds — the paper uses 50 and 50, which takes far
# longer on a CPU) or open it as a notebook with jupytext.
# `CIRCUITSAE_TUTORIAL_SMALL=1` runs it on a tiny random model in seconds.

# %%
import os

import numpy as np
import torch

import circuitsae
from circuitsae import sites
from circuitsae.viz.plots import plot_curves

SMALL = os.environ.get("CIRCUITSAE_TUTORIAL_SMALL") == "1"
OUT = os.environ.get("CIRCUITSAE_TUTORIAL_OUT", "runs/tutorial02")
MODEL = "tiny-llama" if SMALL else "smollm2-135m"
SITE = "resid.2" if SMALL else "resid.27"  # late: ACDC reruns only the 2 blocks after it (SmolLM2 has 30)
TOKENS = 4_000 if SMALL else 60_000  # the harvest runs 28 blocks per token: ~2 min on 2 CPU cores
PROMPTS = 6 if SMALL else 10
THRESHOLDS = 6 if SMALL else 12

# %% [markdown]
# ## 1. A sparse dictionary at a late site
# A baseline SAE (α = 2, 4× expansion) trained briefly on 60k tokens. The
# harvest stops after the site, so a late site costs more per token (that is
# why this tutorial stores few tokens), but every ACDC evaluation reruns only
# the blocks after the site, so a late site makes ACDC cheap. It is a rough dictionary, good enough to
# show the method; `make demo` and `benchmarks/` train on more.

# %%
lm = circuitsae.load_model(MODEL)
store = circuitsae.harvest(model=lm, sites=[SITE], tokens=TOKENS, out=f"{OUT}/activations")
circuitsae.train(store=str(store.root), out=f"{OUT}/saes", arch=("relu",), coefficients=(2.0,), expansion=4,
                 lr=1e-3, batch_size=256 if SMALL else 1024, epochs=3)  # fmt: skip
sae = circuitsae.load_dictionary(f"{OUT}/saes/{SITE}-relu-c2")
print(sae)

# %% [markdown]
# ## 2. IOI prompts and their counterfactuals
# Each base prompt has a target prompt that is identical except that the
# indirect object IO is replaced by a third name T (same token length, one
# position differs). The model's IOI skill is the logit difference
# logit[IO] − logit[S] at the final token (the tiny random model of the small
# mode has none).

# %%
ds = circuitsae.make_ioi(lm, n=PROMPTS, seed=0)
print(ds.texts[0], "→ IO", repr(lm.tokenizer.decode(ds.io_token[0])))
print(ds.target_texts[0], "→", repr(lm.tokenizer.decode(ds.target_token[0])))
print("IOI performance:", circuitsae.ioi_performance(lm, ds))

# %% [markdown]
# ## 3. Patch a few features by hand
# Run the target prompt, keep its final-token logits y and its codes c̄ at
# the site; run the base prompt, encode it to c, and at every position i set
#
#     x'_i = x_i + Σ_{j∈F} (c̄_ij − c_ij) f_j
#
# (f_j the feature's decoder direction). x' starts from x, so the base run's
# reconstruction error is kept: patching nothing gives the base run back. The
# rest of the forward pass gives logits z; the metric is D_KL(z ‖ y) at the
# final token, averaged over prompts, with the edit size ‖x' − x‖₂ beside it.
#
# A naive choice of F: the features whose code changes most at the final
# token. We read the site's activations with an nnsight trace.


# %%
def codes_at_end(ids):
    with lm.trace(ids):
        x = sites.read(lm, SITE).save()
    x = x.detach()[torch.arange(len(ds)), ds.end_position]
    return sae.encode(x.to(sae.W_dec.device, torch.float32))  # the SAE's device and dtype, whatever the model's


change = (codes_at_end(ds.target) - codes_at_end(ds.base)).abs().sum(0)
naive = change.argsort(descending=True)[:5].tolist()
none = circuitsae.patch_features(lm, sae, SITE, ds.base, ds.target, [], lengths=ds.lengths)
few = circuitsae.patch_features(lm, sae, SITE, ds.base, ds.target, naive, lengths=ds.lengths)
every = circuitsae.patch_features(lm, sae, SITE, ds.base, ds.target, "all", lengths=ds.lengths)
for name, r in (("nothing patched", none), (f"features {naive}", few), ("every feature", every)):
    print(f"{name:40s} KL(z‖y) {r.kl:.4f}  KL(y‖z) {r.kl_reverse:.4f}  edit {r.edit_magnitude:.3f}")

# %% [markdown]
# With every feature patched x' = x + x̂_target − x̂_base, which is the target
# activation up to the difference of the two reconstruction errors, so the KL
# drops close to (not exactly to) zero. A lossless basis — PCA, all
# components, i.e. a rotation — reaches the target run exactly:

# %%
pca = circuitsae.PCADictionary.fit(store, site=SITE)
pca_all = circuitsae.patch_features(lm, pca, SITE, ds.base, ds.target, "all", lengths=ds.lengths)
print(f"PCA, every component patched: KL(z‖y) = {pca_all.kl:.2e} (the target run)")

# %% [markdown]
# ## 4. Order the features by ACDC
# ACDC (Conmy et al. 2023) on a flat graph whose nodes are the features: start
# with F = every candidate (a feature whose patch is non-zero on some prompt).
# For each threshold τ, from small to large, visit the features of F in one
# fixed random order and drop j when KL(F ∖ {j}) − KL(F) < τ, i.e. when
# un-patching it costs less than τ. Recording (|F|, KL, edit) after each τ
# draws the curves; features dropped later matter more. The cheaper
# alternative ranks features by a linear estimate of each one's effect from
# one backward pass (`order="attribution"`). Here the thresholds are
# logspace(−5, 0, 12) instead of the paper's 50, to keep the run short.

# %%
taus = np.logspace(-5, 0, THRESHOLDS)
res = circuitsae.acdc(lm, sae, SITE, ds, thresholds=taus)
attr = circuitsae.acdc(lm, sae, SITE, ds, order="attribution")
pca_attr = circuitsae.acdc(lm, pca, SITE, ds, order="attribution")
print(f"{res.n_candidates} candidate features, {res.evaluations} subsets evaluated in {res.seconds:.1f} s")
print("     tau  features        KL    edit")
for r in res.records:
    print(f"{r['tau']:8.1e}  {r['n_features']:8d}  {r['kl']:8.4f}  {r['edit_magnitude']:6.3f}")
top = res.order[:5]
best = circuitsae.patch_features(lm, sae, SITE, ds.base, ds.target, top, lengths=ds.lengths)
print(f"the 5 features ACDC ranks first, {top}: KL {best.kl:.4f} (naive pick {few.kl:.4f}, none {none.kl:.4f})")

# %% [markdown]
# ## 5. The curves
# KL against the number of features patched (left) and against the edit size
# (right); the grey line is the unpatched KL. The paper's claim (Fig. 3): a
# sparse dictionary reaches a given KL with fewer features and smaller edits
# than PCA. `circuitsae ioi` (or `run_ioi`) runs the full comparison, with the
# α = 0 dictionary and ACDC on PCA too.

# %%
rows = []
for r, label in ((res, "baseline SAE α=2"), (attr, "baseline SAE α=2"), (pca_attr, "PCA")):
    rows.append({**r.to_json(), "label": label})
png = plot_curves({"model": MODEL, "prompts": PROMPTS, "results": rows}, f"{OUT}/kl_vs_patches.png")
print("curves written to", png)
