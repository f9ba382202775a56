"""``python -m vtvc_pyro ...`` is the ``vtvc`` command."""

from vtvc_pyro.cli import entry_point

entry_point()
