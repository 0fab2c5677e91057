-- authgres: the in-database half of the identity check.
--
-- Installed (and re-installed, idempotently) by `authgres init-db` as the
-- database owner or a superuser: the schema, the owner-only state, and the
-- identity functions of the portable path (core SQL only, at the end).
-- Where init-db can load the native library it then applies
-- sql/identity_native.sql, which replaces those functions with C ones of
-- the same names and results; CREATE OR REPLACE keeps their OIDs, so
-- policies keep working when a database switches path in place, either
-- way. Nothing here is readable or writable by the login roles except
-- through those functions.
--
-- How it holds against a client that can run any SQL:
-- * The proxy stores the verified claims in the setting `authgres.claims` and
--   an HMAC-SHA256 over (binding, claims) in `authgres.signature`.
-- * The binding names this backend (pid), its login role and a generation
--   number that `auth.begin_session()` draws fresh for every session from
--   the owner-only sequence `auth.generation_seq`: unique across backends
--   and time. A pair captured elsewhere, or earlier, does not verify.
-- * The HMAC key lives in `auth.claims_keys` as precomputed pads, readable
--   only by the owner.
-- * Anything that does not verify yields NULL, so owner-only policies match
--   no rows. The portable section below and native/authgres.c say how each
--   path keeps these.

create schema if not exists auth;
comment on schema auth is 'authgres identity functions';
revoke all on schema auth from public;
grant usage on schema auth to public;

-- Which version of this file is installed; `authgres init-db` records it.
create table if not exists auth.schema_version (
    singleton boolean primary key default true check (singleton),
    version integer not null,
    installed_at timestamptz not null default now()
);
revoke all on table auth.schema_version from public;

-- HMAC key(s) as (key xor ipad, key xor opad), 64 bytes each.
create table if not exists auth.claims_keys (
    id integer generated always as identity primary key,
    ipad bytea not null check (octet_length(ipad) = 64),
    opad bytea not null check (octet_length(opad) = 64),
    created_at timestamptz not null default now(),
    unique (ipad, opad)
);
revoke all on table auth.claims_keys from public;

-- The keys' epoch: bumped by every change to them, and part of the portable
-- path's verified mark, so a retired key's sessions are checked again (and
-- fail) at their next call. init-db bumps it once more after it commits, so
-- no mark made while its change was not yet visible survives.
create sequence if not exists auth.keys_epoch_seq;
revoke all on sequence auth.keys_epoch_seq from public;

-- Every change to the keys: a new epoch, and a re-grant of the table, which
-- rewrites its pg_class row and so invalidates it in every backend's
-- relation cache at commit: the native path forgets what it verified then.
create or replace function auth.claims_keys_changed() returns trigger
language plpgsql
set search_path = pg_catalog, pg_temp
as $$
begin
    perform pg_catalog.nextval('auth.keys_epoch_seq');
    revoke all on table auth.claims_keys from public;
    return null;
end
$$;
revoke all on function auth.claims_keys_changed() from public;
create or replace trigger claims_keys_changed
    after insert or update or delete or truncate on auth.claims_keys
    for each statement execute function auth.claims_keys_changed();

-- Schema v3 kept each backend's generation in a table; from v4 the
-- generation is this backend's `currval` of the sequence below (portable
-- path) or held in backend memory (native path).
drop table if exists auth.session_generations;

-- Identity generations: each `auth.begin_session()` takes the next value.
-- The login roles have no privilege on it: they can neither draw, set nor
-- read it.
create sequence if not exists auth.generation_seq;
revoke all on sequence auth.generation_seq from public;

-- The portable path's verified mark: this backend's `currval` says which
-- claims were last verified for its generation (see the portable path
-- below). Only its value in this session matters; any
-- bigint is a valid mark. Owner-only like the generation.
create sequence if not exists auth.verified_seq
    minvalue -9223372036854775808 maxvalue 9223372036854775807 start 0 no cycle;
revoke all on sequence auth.verified_seq from public;

-- ---- The portable identity path ------------------------------------------
--
-- The identity functions in core SQL. init-db keeps them where it cannot
-- load the native library (managed services: no superuser) or is told
-- `--portable`; elsewhere sql/identity_native.sql replaces them, in the same
-- transaction, with the same names, results and OIDs.
--
-- How it keeps the guarantees above, and why a call is cheap:
-- * `auth.begin_session()` draws the generation with nextval, so this
--   backend's `currval('auth.generation_seq')` is its generation. Clients
--   have no privilege on the sequence, and the proxy's reset runs DISCARD
--   SEQUENCES before the next begin_session draws again.
-- * The first call after an attach verifies the pair in full
--   (`auth.verify_session()`): HMAC-SHA256 with core `sha256()` under every
--   key in `auth.claims_keys`, comparing hashes of the MACs, not the MACs,
--   so no early exit leaks timing. It then records a mark, 64 bits of
--   SHA-256 over (generation, the keys' epoch, signature, claims), as this
--   backend's `currval('auth.verified_seq')`. Later calls recompute the
--   mark for the current pair and compare: one sha256, no table, no MAC.
-- * Only these owner functions can set that sequence (setval), and only
--   after a full check; begin_session sets it to 0, so a mark never
--   outlives its generation, nor a change of keys. A pair a client writes
--   matches the mark only if it is the verified pair (or a second preimage
--   of SHA-256 cut to 64 bits); anything else goes through the full check
--   and fails it.
-- * In a read-only transaction (a standby, a read-only default) the mark
--   cannot be written: every call then verifies in full. Correct, slower.
-- * No function a call runs carries a `SET search_path` (it costs a GUC
--   nest level per call). The SQL bodies are SQL-standard (`BEGIN ATOMIC`),
--   parsed once, when init-db creates them under search_path = pg_catalog,
--   pg_temp, so every name and operator is bound to its OID then and
--   nothing a client puts on its search_path later applies. The one
--   PL/pgSQL body on the way (`auth.session_claims()`) qualifies every
--   name, type and operator. The wrappers are plain (not SECURITY DEFINER)
--   SQL, inlined into the caller's query.
-- * A client that runs DISCARD SEQUENCES (or DISCARD ALL, which also clears
--   the claims) leaves its backend without a generation: the functions
--   then raise, or return NULL, until the proxy attaches again. Fail closed.

set search_path = pg_catalog, pg_temp;

-- Told of every new generation of this backend. Nothing to do on the
-- portable path; the native path replaces it with the library's function,
-- which then reads the generation again instead of on every call.
create or replace function auth.generation_drawn() returns void
language sql volatile
begin atomic
    select;
end;
revoke all on function auth.generation_drawn() from public;

-- Starts a new identity generation for this backend and returns the
-- binding the proxy signs. Any earlier claims of this backend stop
-- verifying. A client calling it can only invalidate its own identity.
--
-- It refuses (SQLSTATE AG001) while the login role carries session
-- defaults of its own (`ALTER ROLE ... SET`, in any database or this one):
-- any role may set those for itself, so a client could otherwise change
-- every later session of the role for every user (a read-only default,
-- `row_security = off`, truncated floats). The proxy clears them
-- (`ALTER ROLE SESSION_USER RESET ALL`, which a role may run for itself)
-- and never hands such a backend to a client. Session defaults for the
-- login roles belong in proxy.toml (`[roles.NAME] settings`), where no
-- client can reach them.
create or replace function auth.begin_session() returns text
language plpgsql volatile security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    generation bigint;
begin
    if exists (
        select 1 from pg_catalog.pg_db_role_setting s
         where s.setrole = (select r.oid from pg_catalog.pg_roles r where r.rolname = session_user)
           and s.setdatabase in (0, (select d.oid from pg_catalog.pg_database d
                                      where d.datname = pg_catalog.current_database()))
    ) then
        raise exception 'authgres: login role % has session defaults of its own (ALTER ROLE ... SET)', session_user
            using errcode = 'AG001',
                  hint = 'authgres clears them; set session defaults in proxy.toml [roles.NAME] settings';
    end if;
    generation := pg_catalog.nextval('auth.generation_seq');
    perform pg_catalog.setval('auth.verified_seq', 0);
    perform auth.generation_drawn();
    return 'authgres-v1:' || pg_catalog.pg_backend_pid() || ':' || generation || ':' || session_user;
end
$$;
revoke all on function auth.begin_session() from public;
grant execute on function auth.begin_session() to public;

-- The mark of the pair (`claims`, `signature`) verified in `generation`
-- under the keys of the current epoch: 64 bits of SHA-256. Volatile as the
-- epoch is, so that it is inlined where it is called.
create or replace function auth.claims_mark(generation bigint, claims text, signature text)
returns bigint
language sql volatile
begin atomic
    select ('x' || pg_catalog.encode(pg_catalog.substring(pg_catalog.sha256(pg_catalog.convert_to(
        generation::text || ':'
            || coalesce(pg_catalog.pg_sequence_last_value('auth.keys_epoch_seq'::regclass), 0)::text
            || ':' || signature || E'\n' || claims, 'UTF8')), 1, 8), 'hex'))::bit(64)::bigint;
end;

-- The full check of this session's pair against its generation and every
-- key; on success records the mark (outside read-only transactions) and
-- returns the claims. Takes nothing from its caller.
create or replace function auth.verify_session() returns text
language sql volatile security definer
begin atomic
    select case
        when not s.verified then null
        when pg_catalog.current_setting('transaction_read_only') = 'on' then s.claims
        when pg_catalog.setval('auth.verified_seq'::regclass, auth.claims_mark(s.generation, s.claims, s.signature))
             is not null then s.claims
    end
    from (
        select c.claims, c.signature, g.generation,
               exists (
                   select from auth.claims_keys k
                    where pg_catalog.sha256(pg_catalog.convert_to(pg_catalog.encode(pg_catalog.sha256(k.opad
                              || pg_catalog.sha256(k.ipad || pg_catalog.convert_to('authgres-v1:'
                                  || pg_catalog.pg_backend_pid() || ':' || g.generation || ':' || session_user
                                  || E'\n' || c.claims, 'UTF8'))), 'hex'), 'UTF8'))
                        = pg_catalog.sha256(pg_catalog.convert_to(c.signature, 'UTF8'))) as verified
          from (select pg_catalog.current_setting('authgres.claims', true) as claims,
                       pg_catalog.current_setting('authgres.signature', true) as signature) as c,
               (select pg_catalog.currval('auth.generation_seq'::regclass) as generation) as g
    ) as s;
end;
revoke all on function auth.claims_mark(bigint, text, text), auth.verify_session() from public;

-- The verified claims of this session as text, or NULL: the mark's
-- comparison when it holds, the full check otherwise. PL/pgSQL, not SQL:
-- its expressions are planned once per session and then evaluated without
-- starting an executor, which a SQL function does on every call. With no
-- `SET search_path`, every function, type, relation and operator in it is
-- schema-qualified, so it means the same under any search_path a client
-- sets (and functions and operators are never looked up in pg_temp).
create or replace function auth.session_claims() returns text
language plpgsql stable security definer
as $$
declare
    claims pg_catalog.text := pg_catalog.current_setting('authgres.claims', true);
begin
    if claims is null or claims operator(pg_catalog.=) '' then
        return null;
    end if;
    if pg_catalog.currval('auth.verified_seq'::pg_catalog.regclass) operator(pg_catalog.=)
       auth.claims_mark(pg_catalog.currval('auth.generation_seq'::pg_catalog.regclass), claims,
                        pg_catalog.current_setting('authgres.signature', true)) then
        return claims;
    end if;
    return auth.verify_session();
end
$$;

-- The verified claims of this session, or NULL.
create or replace function auth.session() returns jsonb
language sql stable security invoker
begin atomic
    select auth.session_claims()::jsonb;
end;

-- Same as auth.session(); the name pg_session_jwt and Supabase use.
create or replace function auth.jwt() returns jsonb
language sql stable security invoker
begin atomic
    select auth.session_claims()::jsonb;
end;

-- The verified user id, or NULL: the token's `sub` (Clerk: the user id),
-- with the provider's `user_id_prefix` in front when it has one. The proxy
-- signs the prefixed value as the claims' `sub`, so nothing here changes
-- with it: a `sub` is unique only within its issuer, and the prefix keeps
-- two providers' users apart. (`json`, not `jsonb`: it reads one key
-- without building the whole document.)
create or replace function auth.user_id() returns text
language sql stable security invoker
begin atomic
    select auth.session_claims()::json ->> 'sub';
end;

-- The verified `sub` as a uuid, or NULL when it is not a uuid (always NULL
-- for a provider with a `user_id_prefix`: a bare uuid would not carry it).
create or replace function auth.uid() returns uuid
language sql stable security invoker
begin atomic
    select case
        when claims.s ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
        then claims.s::uuid
    end
    from (select auth.session_claims()::json ->> 'sub' as s) as claims;
end;

-- The verified `iss` claim: which provider issued this session's token, or
-- NULL. The proxy chose the provider by this exact value.
create or replace function auth.issuer() returns text
language sql stable security invoker
begin atomic
    select auth.session_claims()::json ->> 'iss';
end;

revoke all on function auth.session_claims(), auth.session(), auth.jwt(), auth.user_id(),
    auth.uid(), auth.issuer() from public;
grant execute on function auth.session_claims(), auth.session(), auth.jwt(), auth.user_id(),
    auth.uid(), auth.issuer() to public;

reset search_path;
