"""Postgres 18's libpq through authgres (psycopg 3.3's binary wheel bundles it).

- protocol: libpq asking for 3.0, 3.2 and `latest` connects (the proxy
  answers 3.2 with NegotiateProtocolVersion for 3.0), with and without TLS;
  insisting on 3.2 (min_protocol_version) fails cleanly;
- cancel: PQcancelCreate (psycopg's cancel_safe) stops a running query;
- OAuth: the role `person` logs in with SASL OAUTHBEARER. The token comes
  from libpq's authdata hook (PQAUTHDATA_OAUTH_BEARER_TOKEN), which is what
  an application without a browser uses; libpq first asks the proxy where
  to get a token (the discovery challenge), then connects again.

Started by tests/compat.rs; prints "N passed, N failed".
"""

import ctypes
import glob
import os
import threading
import time

import psycopg
import psycopg_binary

from checks import CA, DATABASE, HOST, PORT, TOKEN_A, TOKEN_B, check, run_all

ISSUER = os.environ["AUTHGRES_ISSUER"]


def connect(token, tls=False, user="authenticated", **kwargs):
    tls_args = {"sslmode": "verify-full", "sslrootcert": CA} if tls else {"sslmode": "disable"}
    return psycopg.connect(
        host=HOST, port=PORT, dbname=DATABASE, user=user, password=token,
        connect_timeout=10, **tls_args, **kwargs,
    )


@check("the bundled libpq is 18")
def libpq_version():
    assert psycopg.pq.version() >= 180000, psycopg.pq.version()


for tls in (False, True):
    for version in ("3.0", "3.2", "latest"):

        @check(f"max_protocol_version={version} {'TLS' if tls else 'plaintext'}: connects at 3.0")
        def protocol(version=version, tls=tls):
            with connect(TOKEN_A, tls=tls, max_protocol_version=version) as conn:
                assert conn.info.pgconn.full_protocol_version == 30000, (
                    conn.info.pgconn.full_protocol_version
                )
                row = conn.execute("select auth.user_id()").fetchone()
                assert row == ("user_alice",), row


@check("min_protocol_version=3.2 is refused cleanly, not hung")
def insist_on_3_2():
    started = time.monotonic()
    try:
        connect(TOKEN_A, min_protocol_version="3.2", max_protocol_version="latest")
    except psycopg.OperationalError as error:
        assert "protocol" in str(error), error
    else:
        raise AssertionError("connected below min_protocol_version")
    assert time.monotonic() - started < 5


@check("cancel_safe stops a running query")
def cancel():
    with connect(TOKEN_B, max_protocol_version="latest") as conn:
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        started = time.monotonic()
        try:
            conn.execute("select pg_sleep(30)")
        except psycopg.errors.QueryCanceled:
            pass
        else:
            raise AssertionError("the query was not cancelled")
        finally:
            timer.cancel()
        assert time.monotonic() - started < 5
        conn.rollback()
        assert conn.execute("select auth.user_id()").fetchone() == ("user_bob",)


# ---- OAUTHBEARER through libpq's authdata hook ------------------------------


class OAuthBearerRequest(ctypes.Structure):
    """PGoauthBearerRequest from libpq-fe.h (Postgres 18)."""

    _fields_ = [
        ("openid_configuration", ctypes.c_char_p),
        ("scope", ctypes.c_char_p),
        ("async_", ctypes.c_void_p),
        ("cleanup", ctypes.c_void_p),
        ("token", ctypes.c_char_p),
        ("user", ctypes.c_void_p),
    ]


PQAUTHDATA_OAUTH_BEARER_TOKEN = 1
AUTH_DATA_HOOK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)


def load_libpq():
    """The libpq psycopg itself runs on (the wheel's copy, already loaded)."""
    libs = os.path.join(os.path.dirname(psycopg_binary.__file__), os.pardir, "psycopg_binary.libs")
    (path,) = glob.glob(os.path.join(libs, "libpq*.so*"))
    libpq = ctypes.CDLL(path)
    libpq.PQsetAuthDataHook.argtypes = [AUTH_DATA_HOOK]
    return libpq


class TokenSource:
    """Hands out one token per request and records what libpq asked."""

    def __init__(self):
        self.requests = []
        self.token = None
        self.hook = AUTH_DATA_HOOK(self.answer)

    def answer(self, kind, _conn, data):
        if kind != PQAUTHDATA_OAUTH_BEARER_TOKEN:
            return 0
        request = ctypes.cast(data, ctypes.POINTER(OAuthBearerRequest)).contents
        self.requests.append(
            (
                (request.openid_configuration or b"").decode(),
                (request.scope or b"").decode(),
            )
        )
        if self.token is None:
            return 0
        # libpq reads the token until the connection is done with it; the
        # bytes object lives on in self.token.
        request.token = self.token
        return 1


source = TokenSource()
libpq = load_libpq()
libpq.PQsetAuthDataHook(source.hook)
DISCOVERY = ISSUER + "/.well-known/openid-configuration"
# libpq insists on an https discovery URL; the sandbox's issuer serves http
# on loopback. This switch (libpq's own, for testing) lifts only that check.
os.environ["PGOAUTHDEBUG"] = "UNSAFE"


def oauth_connect(tls, **kwargs):
    return connect(
        None, tls=tls, user="person", oauth_issuer=ISSUER, oauth_client_id="authgres-tests",
        **kwargs,
    )


for tls in (False, True):

    @check(f"OAUTHBEARER {'TLS' if tls else 'plaintext'}: discovery, then the hook's token logs in")
    def oauth(tls=tls):
        source.requests.clear()
        source.token = os.environ["AUTHGRES_TOKEN_OAUTH"].encode()
        with oauth_connect(tls) as conn:
            row = conn.execute("select auth.user_id(), current_user").fetchone()
            assert row == ("user_oauth", "person"), row
        # libpq asked for a token for the proxy's discovery URL and scope.
        assert source.requests == [(DISCOVERY, "openid")], source.requests


@check("OAUTHBEARER: a token that does not verify fails the login")
def oauth_bad_token():
    source.requests.clear()
    source.token = TOKEN_A[:-8].encode() + b"AAAAAAAA"
    try:
        oauth_connect(False)
    except psycopg.OperationalError as error:
        # The proxy answers a bad token with the discovery challenge, as
        # Postgres does, then refuses it; libpq reports both steps.
        assert "token signature is invalid" in str(error), error
    else:
        raise AssertionError("a bad token logged in")
    assert source.requests == [(DISCOVERY, "openid")], source.requests


@check("OAUTHBEARER: without oauth_issuer libpq refuses the offer")
def oauth_unconfigured():
    try:
        connect(TOKEN_A, user="person")
    except psycopg.OperationalError as error:
        assert "OAUTHBEARER" in str(error) or "oauth" in str(error).lower(), error
    else:
        raise AssertionError("logged in without OAuth settings")


run_all()
