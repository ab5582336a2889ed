"""OpenID Connect logins (oauthenticator's GenericOAuthenticator; `ds01hub install` ships it,
else `pip install 'ds01hub[oauth]'`): a university's Keycloak, Entra ID, Google Workspace, ...
Load it from /etc/ds01hub/jupyterhub_config.py, after the base:

    load_subconfig("/opt/ds01hub/share/auth/oidc.py")

and set the DS01HUB_OIDC_* values in /etc/ds01hub/ds01hub.env (or edit a copy of this file).
Register the hub at the identity provider with the redirect URL
`https://<your hub>/hub/oauth_callback`; put the client secret in a root-only file.

Mapping to Unix accounts: the hub user is the token's DS01HUB_OIDC_USERNAME_CLAIM (default
`preferred_username`), which must be the user's Unix account name on this host so the
browser user and the SSH user are one account (ask the IdP for a claim that carries it, or
map names with c.Authenticator.username_map). Who may log in: members of
DS01HUB_OIDC_ALLOWED_GROUPS (`;`-separated, from the DS01HUB_OIDC_GROUPS_CLAIM claim); admins:
members of DS01HUB_OIDC_ADMIN_GROUPS; the hub groups (limits groups) follow the claim.
Its loading is tested: tests/test_live_auth.py.
"""

import os

c = get_config()  # noqa: F821
_env = os.environ.get
_issuer = _env("DS01HUB_OIDC_ISSUER", "https://login.lab.example/realms/lab").rstrip("/")

c.JupyterHub.authenticator_class = "generic-oauth"
c.GenericOAuthenticator.login_service = _env("DS01HUB_OIDC_NAME", "university login")
c.GenericOAuthenticator.client_id = _env("DS01HUB_OIDC_CLIENT_ID", "ds01hub")
if _env("DS01HUB_OIDC_CLIENT_SECRET_FILE"):
    with open(_env("DS01HUB_OIDC_CLIENT_SECRET_FILE")) as _file:
        c.GenericOAuthenticator.client_secret = _file.read().strip()
c.GenericOAuthenticator.oauth_callback_url = _env(
    "DS01HUB_OIDC_CALLBACK_URL", "https://hub.lab.example/hub/oauth_callback"
)
# The endpoints of a Keycloak-style issuer; others: see the IdP's .well-known/openid-configuration
c.GenericOAuthenticator.authorize_url = _env(
    "DS01HUB_OIDC_AUTHORIZE_URL", f"{_issuer}/protocol/openid-connect/auth"
)
c.GenericOAuthenticator.token_url = _env(
    "DS01HUB_OIDC_TOKEN_URL", f"{_issuer}/protocol/openid-connect/token"
)
c.GenericOAuthenticator.userdata_url = _env(
    "DS01HUB_OIDC_USERINFO_URL", f"{_issuer}/protocol/openid-connect/userinfo"
)
c.GenericOAuthenticator.scope = ["openid", "profile", "email"]
c.GenericOAuthenticator.username_claim = _env("DS01HUB_OIDC_USERNAME_CLAIM", "preferred_username")

c.GenericOAuthenticator.manage_groups = True
c.GenericOAuthenticator.auth_state_groups_key = "oauth_user." + _env(
    "DS01HUB_OIDC_GROUPS_CLAIM", "groups"
)
c.GenericOAuthenticator.allowed_groups = {
    g for g in _env("DS01HUB_OIDC_ALLOWED_GROUPS", "ds01-users").split(";") if g.strip()
}
c.GenericOAuthenticator.admin_groups = {
    g for g in _env("DS01HUB_OIDC_ADMIN_GROUPS", "ds01-admin").split(";") if g.strip()
}
