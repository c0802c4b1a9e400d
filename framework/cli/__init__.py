"""The ``framework`` command line: ``run``, ``shell``, ``show-config`` (see ``main``)."""
