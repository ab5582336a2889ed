"""Real logins other than the demo's: LDAP against a real slapd (Debian's) that the test starts
on loopback, with an e-mail style login mapped to its Unix account, and the OpenID Connect
example (config/auth/oidc.py) loaded by a real hub that sends the browser to the provider.
Both load the example files as shipped; only the addresses come from the environment."""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import requests
from harness import free_port

from ds01hub.host import bootstrap

pytestmark = [pytest.mark.e2e, pytest.mark.docker]
REPO = Path(__file__).resolve().parent.parent
BASE = "dc=lab,dc=example"
LOGIN = "h.baker@lab.example"
PASSWORD = "correct horse battery"

SLAPD_CONF = """\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include /etc/ldap/schema/nis.schema
include /etc/ldap/schema/inetorgperson.schema
pidfile {dir}/slapd.pid
modulepath /usr/lib/ldap
moduleload back_mdb
database mdb
maxsize 10485760
suffix "{base}"
rootdn "cn=admin,{base}"
rootpw {rootpw}
directory {dir}/db
access to attrs=userPassword by anonymous auth by * none
access to * by * read
"""


def person(uid: str, mail: str, password: str) -> str:
    return f"""\
dn: uid={uid},ou=people,{BASE}
objectClass: inetOrgPerson
uid: {uid}
cn: {uid}
sn: {uid}
mail: {mail}
userPassword: {password}
"""


def group(name: str, *uids: str) -> str:
    members = "".join(f"member: uid={uid},ou=people,{BASE}\n" for uid in uids)
    return f"dn: cn={name},ou=groups,{BASE}\nobjectClass: groupOfNames\ncn: {name}\n{members}"


@pytest.fixture
def slapd(tmp_path):
    """Debian's slapd on 127.0.0.1 with people and groups; yields (port, people by role)."""
    bootstrap.ensure_packages(bootstrap.TEST_SERVICE_PACKAGES, start_services=False)
    directory = tmp_path / "slapd"
    (directory / "db").mkdir(parents=True)
    conf = directory / "slapd.conf"
    conf.write_text(SLAPD_CONF.format(dir=directory, base=BASE, rootpw=secrets.token_hex(8)))
    suffix = secrets.token_hex(2)
    people = {"member": f"hbaker{suffix}", "outsider": f"oside{suffix}"}
    entries = [
        f"dn: {BASE}\nobjectClass: dcObject\nobjectClass: organization\ndc: lab\no: Lab\n",
        f"dn: ou=people,{BASE}\nobjectClass: organizationalUnit\nou: people\n",
        f"dn: ou=groups,{BASE}\nobjectClass: organizationalUnit\nou: groups\n",
        person(people["member"], LOGIN, PASSWORD),
        person(people["outsider"], "o.side@lab.example", PASSWORD),
        group("ds01-users", people["member"]),
        group("ds01-admin", people["member"]),
        group("students", people["outsider"]),
    ]
    (directory / "data.ldif").write_text("\n".join(entries))
    subprocess.run(
        ["slapadd", "-f", str(conf), "-l", str(directory / "data.ldif")],
        check=True,
        capture_output=True,
    )
    port = free_port()
    process = subprocess.Popen(
        ["slapd", "-f", str(conf), "-h", f"ldap://127.0.0.1:{port}/", "-d", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"slapd did not start: {process.stderr.read()}") from None
                time.sleep(0.1)
        yield port, people
    finally:
        process.terminate()
        process.wait(10)


LDAP_CONFIG = f"""
load_subconfig({str(REPO / "config/auth/ldap.py")!r})  # noqa: F821
c.Authenticator.allow_all = False  # the harness allows all; the example must decide
"""


@pytest.mark.root
def test_an_ldap_login_by_mail_maps_to_the_unix_account(hub_factory, slapd):
    """`h.baker@lab.example` logs in with the directory's password; the hub user is the
    entry's uid, which is the host's Unix account; LDAP groups make the hub groups and the
    admin flag; a directory user outside the allowed groups and a wrong password are refused."""
    port, people = slapd
    env = {
        "DS01HUB_LDAP_SERVER": "127.0.0.1",
        "DS01HUB_LDAP_PORT": str(port),
        "DS01HUB_LDAP_TLS": "insecure",  # loopback only: see the example's comment
        "DS01HUB_LDAP_USER_BASE": f"ou=people,{BASE}",
        "DS01HUB_LDAP_ALLOWED_GROUPS": f"cn=ds01-users,ou=groups,{BASE}",
        "DS01HUB_LDAP_ADMIN_GROUP": f"cn=ds01-admin,ou=groups,{BASE}",
    }
    account = people["member"]
    subprocess.run(["useradd", "--no-create-home", account], check=True)
    try:
        with hub_factory(LDAP_CONFIG, env=env) as hub:
            session = hub.login(LOGIN, PASSWORD)
            me = session.get(f"{hub.hub_url}api/user", timeout=30)
            assert me.status_code == 200, me.text
            # the hub user is the Unix account (the spawner's passwd lookup finds it)
            assert me.json()["name"] == account == pwd.getpwnam(account).pw_name
            model = hub.user(account)
            assert model["admin"] is True
            assert sorted(model["groups"]) == ["ds01-admin", "ds01-users"]
            for login, password in ((LOGIN, "wrong"), ("o.side@lab.example", PASSWORD)):
                with pytest.raises(AssertionError, match="login of .* failed: 403"):
                    hub.login(login, password)
            assert hub.api("GET", f"/users/{people['outsider']}").status_code == 404
    finally:
        subprocess.run(["userdel", account], check=False)


def test_the_openid_connect_example_loads_and_sends_logins_to_the_provider(hub_factory, tmp_path):
    """A real hub with config/auth/oidc.py: its login button goes to the provider's
    authorization endpoint with the configured client, callback and scopes."""
    secret = tmp_path / "client-secret"
    secret.write_text("s3cret\n")
    env = {
        "DS01HUB_OIDC_ISSUER": "https://login.lab.example/realms/lab",
        "DS01HUB_OIDC_CLIENT_ID": "ds01hub-test",
        "DS01HUB_OIDC_CLIENT_SECRET_FILE": str(secret),
        "DS01HUB_OIDC_CALLBACK_URL": "https://hub.lab.example/hub/oauth_callback",
    }
    config = f"load_subconfig({str(REPO / 'config/auth/oidc.py')!r})  # noqa: F821\n"
    with hub_factory(config, env=env) as hub:
        page = requests.get(f"{hub.hub_url}login", timeout=30)
        assert "university login" in page.text
        answer = requests.get(f"{hub.hub_url}oauth_login", allow_redirects=False, timeout=30)
        assert answer.status_code == 302
        target = urlparse(answer.headers["Location"])
        assert f"{target.scheme}://{target.netloc}{target.path}" == (
            "https://login.lab.example/realms/lab/protocol/openid-connect/auth"
        )
        query = parse_qs(target.query)
        assert query["client_id"] == ["ds01hub-test"]
        assert query["redirect_uri"] == ["https://hub.lab.example/hub/oauth_callback"]
        assert query["scope"] == ["openid profile email"]
        assert "Address already in use" not in hub.log()


if not shutil.which("useradd") or os.geteuid() != 0:  # pragma: no cover
    pytestmark.append(pytest.mark.skip(reason="needs root and useradd"))
