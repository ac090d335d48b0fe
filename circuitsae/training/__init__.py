"""Training: many dictionaries in one pass over a store, and their evaluation.

- :mod:`~circuitsae.training.trainer` — :class:`TrainConfig`, :func:`train` and the :class:`Trainer` loop
  (step, all-reduce, fit, finish), re-exporting the public names of the modules below;
- :mod:`~circuitsae.training.config` — :class:`TrainConfig`, the flags of ``circuitsae train``;
- :mod:`~circuitsae.training.runs` — which (site, architecture, coefficient) runs train, the input scale, and
  each run built from the registry;
- :mod:`~circuitsae.training.schedule` — warm-up factors and the resampling schedule, pure functions of the step;
- :mod:`~circuitsae.training.resampling` — dead-feature resampling;
- :mod:`~circuitsae.training.checkpoints` — checkpoint, log and ``train.json`` files, save/load, resume;
- :mod:`~circuitsae.training.evaluate` — L0, FVU, shrinkage γ, dead/dense features and loss recovered.
"""
