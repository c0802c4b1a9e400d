"""The users service: accounts, roles and password authentication.

Other services import ``services.users.exceptions`` and ``services.users.schemas``
(the published contract) and nothing else from here. Kept free of imports so that
importing the contract does not pull in the service and its dependencies.
"""
