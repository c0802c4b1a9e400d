"""Code that runs in the nameko 2.14.1 venv only: services for ``nameko run``, and
small client scripts printing JSON. pytest never imports these modules."""
