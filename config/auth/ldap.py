"""LDAP logins (jupyterhub-ldapauthenticator; `ds01hub install` ships it, else
`pip install 'ds01hub[ldap]'`). Load it from /etc/ds01hub/jupyterhub_config.py, after the base:

    load_subconfig("/opt/ds01hub/share/auth/ldap.py")

and set the DS01HUB_LDAP_* values in /etc/ds01hub/ds01hub.env (or edit a copy of this file).

The mapping from a login to a Unix account: people type what they know (their e-mail style
name, `h.baker@lab.example`); the hub looks up the one entry whose `mail` is that name, binds
as that entry with the password, and the hub user is the entry's `uid` attribute (`hbaker`):
the same name the host's accounts have (sssd/nslcd from the same directory, or useradd), so
the browser user and the SSH user are one account with one workspace. Pick the attributes
with DS01HUB_LDAP_LOGIN_ATTRIBUTE (what people type) and DS01HUB_LDAP_ACCOUNT_ATTRIBUTE (the
Unix account name). Who may log in: members of DS01HUB_LDAP_ALLOWED_GROUPS (group DNs,
`;`-separated); hub admins: members of DS01HUB_LDAP_ADMIN_GROUP; each user's hub groups (which
pick their limits group in resource-limits.yaml) are the `cn` of their allowed LDAP groups.
Tested against a real slapd: tests/test_live_ldap.py.
"""

import os

from ldap3.utils.dn import parse_dn

c = get_config()  # noqa: F821
_env = os.environ.get

c.JupyterHub.authenticator_class = "ldapauthenticator.LDAPAuthenticator"
c.LDAPAuthenticator.server_address = _env("DS01HUB_LDAP_SERVER", "ldap.lab.example")
# "on_connect" (ldaps, port 636) or "before_bind" (StartTLS, port 389). "insecure" sends
# passwords in clear: only ever for a server on this host's loopback.
c.LDAPAuthenticator.tls_strategy = _env("DS01HUB_LDAP_TLS", "on_connect")
if _env("DS01HUB_LDAP_PORT"):
    c.LDAPAuthenticator.server_port = int(_env("DS01HUB_LDAP_PORT"))

# Find the entry by what people type, bind as it, name the hub user by its account attribute.
c.LDAPAuthenticator.lookup_dn = True
c.LDAPAuthenticator.user_search_base = _env("DS01HUB_LDAP_USER_BASE", "ou=people,dc=lab,dc=example")
c.LDAPAuthenticator.user_attribute = _env("DS01HUB_LDAP_LOGIN_ATTRIBUTE", "mail")
c.LDAPAuthenticator.lookup_dn_user_dn_attribute = _env("DS01HUB_LDAP_ACCOUNT_ATTRIBUTE", "uid")
c.LDAPAuthenticator.use_lookup_dn_username = True
# A read-only search account (anonymous search when empty); its password in a root-only file.
c.LDAPAuthenticator.lookup_dn_search_user = _env("DS01HUB_LDAP_SEARCH_DN", "")
if _env("DS01HUB_LDAP_SEARCH_PASSWORD_FILE"):
    with open(_env("DS01HUB_LDAP_SEARCH_PASSWORD_FILE")) as _file:
        c.LDAPAuthenticator.lookup_dn_search_password = _file.read().strip()
# Logins may be e-mail style names; the lookup escapes them (no LDAP injection).
c.LDAPAuthenticator.valid_username_regex = r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$"

_allowed = [dn for dn in _env("DS01HUB_LDAP_ALLOWED_GROUPS", "").split(";") if dn.strip()]
_admin_group = _env("DS01HUB_LDAP_ADMIN_GROUP", "")
c.LDAPAuthenticator.allowed_groups = _allowed + ([_admin_group] if _admin_group else [])
if not c.LDAPAuthenticator.allowed_groups:
    raise SystemExit(
        "config/auth/ldap.py: set DS01HUB_LDAP_ALLOWED_GROUPS to the group DN(s) whose members "
        "may log in (';'-separated); nobody is let in by default"
    )
c.Authenticator.manage_groups = True  # hub groups come from LDAP (the admin panel shows them)


def _ldap_groups(authenticator, handler, auth_model):
    """Hub groups = the cn of the user's allowed LDAP groups; admin = in the admin group."""
    groups = (auth_model.get("auth_state") or {}).get("ldap_groups", [])
    auth_model["groups"] = sorted(
        {value for dn in groups for kind, value, _ in parse_dn(dn)[:1] if kind.lower() == "cn"}
    )
    auth_model["admin"] = bool(_admin_group) and _admin_group in groups
    return auth_model


c.Authenticator.post_auth_hook = _ldap_groups
