"""Interventions on a forward pass.

- :mod:`~circuitsae.interventions.splice` — dictionaries inside a forward pass (nnsight), with or without the
  error term;
- :mod:`~circuitsae.interventions.patching` — feature-level activation patching between base and target runs;
- :mod:`~circuitsae.interventions.replay` — re-running the blocks after a site with an edited activation (exact
  ACDC, the causal trees' fast path).
"""
