"""The ``framework`` command line: ``run``, ``shell``, ``show-config``, ``db`` and
``dead-letters`` (see ``main``)."""
