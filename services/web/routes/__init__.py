"""The web service's routes, one module per area; each is a mixin of ``WebService``.

A module holds the panel pages and the JSON API routes of its area side by side,
so that both call the other services the same way and authorize the same way.
"""
