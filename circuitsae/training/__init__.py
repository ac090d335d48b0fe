"""Training: many dictionaries in one pass over a store, and their evaluation.

- :mod:`~circuitsae.training.trainer` — :class:`TrainConfig`, :func:`train` and the :class:`Trainer` loop;
- :mod:`~circuitsae.training.evaluate` — L0, FVU, shrinkage γ, dead/dense features and loss recovered.
"""
