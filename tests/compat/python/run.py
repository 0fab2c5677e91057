"""psycopg 3 and asyncpg through authgres.

Each driver connects with a token as its password, over TLS and in the
clear, and runs the compatibility checks. Started by tests/compat.rs;
prints "N passed, N failed".
"""

import asyncio
import io
import ssl
import threading
import time

import asyncpg
import psycopg

from checks import CA, DATABASE, HOST, PORT, TOKEN_A, TOKEN_B, check, run_all


# ---- psycopg 3 ---------------------------------------------------------------


def pg_connect(token, tls=False, **kwargs):
    tls_args = {"sslmode": "verify-full", "sslrootcert": CA} if tls else {"sslmode": "disable"}
    return psycopg.connect(
        host=HOST, port=PORT, dbname=DATABASE, user="authenticated", password=token,
        **tls_args, **kwargs,
    )


for tls in (False, True):

    @check(f"psycopg {'TLS' if tls else 'plaintext'}: token as password; queries; RLS")
    def _(tls=tls):
        with pg_connect(TOKEN_A, tls) as conn:
            assert conn.execute("select auth.user_id()").fetchone()[0] == "user_alice"
            assert conn.execute("select %s::int + 1", (41,)).fetchone()[0] == 42
            conn.execute("insert into todos (task) values (%s)", (f"psycopg tls={tls}",))
            conn.commit()
            owners = conn.execute("select distinct user_id from todos").fetchall()
            assert owners == [("user_alice",)], owners
            if tls:
                assert conn.info.pgconn.ssl_in_use


@check("psycopg: direct TLS (sslnegotiation=direct, PostgreSQL 17 libpq)")
def _():
    if psycopg.pq.version() < 170000:
        print(f"     (libpq {psycopg.pq.version()} has no sslnegotiation=direct; checked with TLS above)")
        return
    with pg_connect(TOKEN_A, True, sslnegotiation="direct") as conn:
        assert conn.info.pgconn.ssl_in_use
        assert conn.execute("select auth.user_id()").fetchone()[0] == "user_alice"


@check("psycopg: a bad token is an authentication error with a readable message")
def _():
    try:
        pg_connect("not-a-token")
    except psycopg.OperationalError as error:
        assert "token" in str(error), str(error)
    else:
        raise AssertionError("a bad token logged in")


@check("psycopg: a prepared statement reused 200 times; a transaction rolled back")
def _():
    with pg_connect(TOKEN_A, autocommit=True) as conn:
        for i in range(200):
            assert conn.execute("select %s::int", (i,), prepare=True).fetchone()[0] == i
        before = conn.execute("select count(*) from todos").fetchone()[0]
        try:
            with conn.transaction():
                conn.execute("insert into todos (task) values ('rolled back')")
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        assert conn.execute("select count(*) from todos").fetchone()[0] == before


@check("psycopg: COPY FROM STDIN and COPY TO STDOUT")
def _():
    with pg_connect(TOKEN_A, autocommit=True) as conn:
        cur = conn.cursor()
        with cur.copy("copy copy_target (task) from stdin") as copy:
            for i in range(1000):
                copy.write_row((f"psycopg {i}",))
        with cur.copy("copy (select task from copy_target where task like 'psycopg %') to stdout") as copy:
            rows = list(copy.rows())
        assert len(rows) == 1000, len(rows)


@check("psycopg: LISTEN/NOTIFY across two connections")
def _():
    with pg_connect(TOKEN_A, autocommit=True) as listener, pg_connect(TOKEN_B, autocommit=True) as notifier:
        listener.execute("listen psycopg_channel")
        notifier.execute("select pg_notify('psycopg_channel', 'hello')")
        got = next(listener.notifies(timeout=5), None)
        assert got is not None and got.payload == "hello", got


@check("psycopg: a 100k-row result; query cancel; an error with its SQLSTATE")
def _():
    with pg_connect(TOKEN_A, autocommit=True) as conn:
        rows = conn.execute("select i, md5(i::text) from generate_series(1, 100000) i").fetchall()
        assert len(rows) == 100000
        threading.Timer(0.3, conn.cancel).start()
        started = time.monotonic()
        try:
            conn.execute("select pg_sleep(30)")
        except psycopg.errors.QueryCanceled as error:
            assert error.sqlstate == "57014"
        else:
            raise AssertionError("not cancelled")
        assert time.monotonic() - started < 10
        try:
            conn.execute("select 1/0")
        except psycopg.errors.DivisionByZero as error:
            assert error.sqlstate == "22012"
        else:
            raise AssertionError("no error")


# ---- asyncpg -----------------------------------------------------------------


def tls_context():
    context = ssl.create_default_context(cafile=CA)
    return context


async def apg_connect(token, tls=False):
    return await asyncpg.connect(
        host=HOST, port=PORT, database=DATABASE, user="authenticated", password=token,
        ssl=tls_context() if tls else False, server_settings={"application_name": "asyncpg"},
    )


def run_async(coroutine_fn):
    def runner():
        asyncio.run(coroutine_fn())

    return runner


for tls in (False, True):

    async def plain_checks(tls=tls):
        conn = await apg_connect(TOKEN_B, tls)
        try:
            assert await conn.fetchval("select auth.user_id()") == "user_bob"
            assert await conn.fetchval("select $1::int + 1", 41) == 42
            await conn.execute("insert into todos (task) values ($1)", f"asyncpg tls={tls}")
            owners = await conn.fetch("select distinct user_id from todos")
            assert [r[0] for r in owners] == ["user_bob"], owners
        finally:
            await conn.close()

    check(f"asyncpg {'TLS' if tls else 'plaintext'}: token as password; queries; RLS")(run_async(plain_checks))


@check("asyncpg: a bad token is InvalidPasswordError")
@run_async
async def _():
    try:
        await apg_connect("not-a-token")
    except asyncpg.exceptions.InvalidPasswordError as error:
        assert error.sqlstate == "28P01" and "token" in str(error), str(error)
    else:
        raise AssertionError("a bad token logged in")


@check("asyncpg: prepared statements, a rolled-back transaction, COPY both ways")
@run_async
async def _():
    conn = await apg_connect(TOKEN_B)
    try:
        statement = await conn.prepare("select $1::int")
        for i in range(200):
            assert await statement.fetchval(i) == i
        before = await conn.fetchval("select count(*) from todos")
        try:
            async with conn.transaction():
                await conn.execute("insert into todos (task) values ('rolled back')")
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        assert await conn.fetchval("select count(*) from todos") == before
        await conn.copy_records_to_table(
            "copy_target", records=[(f"asyncpg {i}",) for i in range(1000)], columns=["task"]
        )
        out = io.BytesIO()
        await conn.copy_from_query("select task from copy_target where task like 'asyncpg %'", output=out)
        assert len(out.getvalue().splitlines()) == 1000
    finally:
        await conn.close()


@check("asyncpg: LISTEN/NOTIFY, 100k rows, cancel, SQLSTATE")
@run_async
async def _():
    listener = await apg_connect(TOKEN_A)
    notifier = await apg_connect(TOKEN_B)
    try:
        got = asyncio.get_running_loop().create_future()
        await listener.add_listener("asyncpg_channel", lambda *args: got.set_result(args[3]))
        await notifier.execute("select pg_notify('asyncpg_channel', 'hi')")
        assert await asyncio.wait_for(got, 5) == "hi"
        rows = await listener.fetch("select i from generate_series(1, 100000) i")
        assert len(rows) == 100000
        started = time.monotonic()
        try:
            await asyncio.wait_for(listener.fetch("select pg_sleep(30)"), timeout=0.3)
        except asyncio.TimeoutError:
            pass
        # The cancel reached the backend: the connection answers at once.
        assert await listener.fetchval("select 1") == 1
        assert time.monotonic() - started < 10
        try:
            await listener.fetchval("select 1/0")
        except asyncpg.exceptions.DivisionByZeroError as error:
            assert error.sqlstate == "22012"
        else:
            raise AssertionError("no error")
    finally:
        await listener.close()
        await notifier.close()


run_all()
