"""Circuits: which features matter, and how they connect.

- :mod:`~circuitsae.circuits.acdc` — ACDC and attribution orders of a dictionary's features on a task;
- :mod:`~circuitsae.circuits.curves` — KL-vs-features and KL-vs-edit curves, halving points, held-out transfer;
- :mod:`~circuitsae.circuits.features` — what one feature reads and writes;
- :mod:`~circuitsae.circuits.trees` — ablation-based causal trees of one feature.
"""
