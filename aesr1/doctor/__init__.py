"""``aesr1 doctor``: what a GPU user runs first. Checks this machine and the params, plans the run's memory, or
runs a smoke test.

Its parts: :mod:`~aesr1.doctor.checks` (the environment checks), :mod:`~aesr1.doctor.memory` (the memory
model), :mod:`~aesr1.doctor.plan` (``--plan``: the memory model applied to a recipe on given GPUs),
:mod:`~aesr1.doctor.smoke` (the GPU smoke test) and :mod:`~aesr1.doctor.cli` (the command line).
"""

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "main", "run"]


def __getattr__(name: str):
    """The command line's names, imported when first asked for: ``python -m aesr1.doctor.plan`` then runs a
    module the package has not imported already."""
    if name in __all__:
        from aesr1.doctor import cli

        return getattr(cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
