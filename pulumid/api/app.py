"""The Pulumi Cloud HTTP API, as the pulumi CLI's httpstate backend speaks it.

One class per area, all routing on the one Klein app of pulumid.api.base. Unknown routes:
werkzeug's NotFound reaches the shared error handler and becomes a JSON 404.
"""

from __future__ import annotations

from pulumid.api.admin import AdminRoutes
from pulumid.api.identity import IdentityRoutes
from pulumid.api.login import LoginRoutes
from pulumid.api.orgs import OrgRoutes
from pulumid.api.secrets import SecretRoutes
from pulumid.api.stacks import StackRoutes
from pulumid.api.tokens import TokenRoutes
from pulumid.api.updates import UpdateRoutes


class API(
    IdentityRoutes,
    StackRoutes,
    SecretRoutes,
    UpdateRoutes,
    TokenRoutes,
    OrgRoutes,
    LoginRoutes,
    AdminRoutes,
):
    """Every route of the API, over one Backend."""
