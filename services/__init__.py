"""The deployable services, one package each (``services/<name>/``).

A service may import another service's published contract (its ``exceptions`` and
``schemas`` modules), never its internals.
"""
