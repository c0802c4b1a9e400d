"""The web service: the admin panel and the JSON API, a thin edge over the others."""
