"""The ``circuitsae`` command line: one module per command, and :mod:`~circuitsae.commands.cli` on top.

Nothing in the library imports this package.
"""
