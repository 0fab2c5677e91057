-- authgres: the in-database half of the identity check.
--
-- Installed (and re-installed, idempotently) by `authgres init-db` as the
-- database owner or a superuser. Nothing here is readable or writable by the
-- login roles except through the functions at the end.
--
-- How it holds against a client that can run any SQL:
-- * The proxy stores the verified claims in the setting `authgres.claims` and
--   an HMAC-SHA256 over (binding, claims) in `authgres.signature`.
-- * The binding names this backend (pid), its login role and a generation
--   number that `auth.begin_session()` draws fresh for every session, kept in
--   an owner-only table. A pair captured elsewhere, or earlier, does not verify.
-- * The HMAC key lives in `auth.claims_keys` as precomputed pads, readable
--   only by the owner; `auth.session()` is SECURITY DEFINER with a fixed
--   search_path and recomputes the MAC with core `sha256()`.
-- * Anything that does not verify yields NULL, so owner-only policies match
--   no rows.

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

-- The current identity generation of each backend. Unlogged: it describes
-- live backends only, so it need not survive a crash or reach replicas.
create unlogged table if not exists auth.session_generations (
    pid integer primary key,
    login_role name not null,
    generation bigint not null
);
revoke all on table auth.session_generations from public;

create sequence if not exists auth.generation_seq;
revoke all on sequence auth.generation_seq from public;

-- Starts a new identity generation for this backend and returns the binding
-- the proxy signs. Any earlier claims of this backend stop verifying. A
-- client calling it can only invalidate its own identity.
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
    binding text;
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
    insert into auth.session_generations as g (pid, login_role, generation)
    values (pg_backend_pid(), session_user, nextval('auth.generation_seq'))
    on conflict (pid) do update
        set login_role = excluded.login_role, generation = excluded.generation
    returning 'authgres-v1:' || g.pid || ':' || g.generation || ':' || g.login_role
      into binding;
    return binding;
end
$$;
revoke all on function auth.begin_session() from public;
grant execute on function auth.begin_session() to public;

-- The verified claims of this session, or NULL.
create or replace function auth.session() returns jsonb
language plpgsql stable security definer
set search_path = pg_catalog, pg_temp
as $$
declare
    claims text := current_setting('authgres.claims', true);
    signature text := current_setting('authgres.signature', true);
    binding text;
    message bytea;
    given bytea;
    k record;
begin
    if claims is null or claims = '' or signature is null
       or signature !~ '^[0-9a-f]{64}$' then
        return null;
    end if;
    select 'authgres-v1:' || g.pid || ':' || g.generation || ':' || g.login_role
      into binding
      from auth.session_generations g
     where g.pid = pg_backend_pid() and g.login_role = session_user;
    if binding is null then
        return null;
    end if;
    message := convert_to(binding || E'\n' || claims, 'UTF8');
    -- Compare hashes of the MACs, not the MACs: no early-exit timing leak.
    given := sha256(decode(signature, 'hex'));
    for k in select ipad, opad from auth.claims_keys loop
        if sha256(sha256(k.opad || sha256(k.ipad || message))) = given then
            return claims::jsonb;
        end if;
    end loop;
    return null;
end
$$;

-- Same as auth.session(); the name pg_session_jwt and Supabase use.
create or replace function auth.jwt() returns jsonb
language sql stable
set search_path = pg_catalog, pg_temp
as $$ select auth.session() $$;

-- The verified user id, or NULL: the token's `sub` (Clerk: the user id),
-- with the provider's `user_id_prefix` in front when it has one. The proxy
-- signs the prefixed value as the claims' `sub`, so nothing here changes
-- with it: a `sub` is unique only within its issuer, and the prefix keeps
-- two providers' users apart.
create or replace function auth.user_id() returns text
language sql stable
set search_path = pg_catalog, pg_temp
as $$ select auth.session() ->> 'sub' $$;

-- The verified `sub` as a uuid, or NULL when it is not a uuid (always NULL
-- for a provider with a `user_id_prefix`: a bare uuid would not carry it).
create or replace function auth.uid() returns uuid
language sql stable
set search_path = pg_catalog, pg_temp
as $$
    select case
        when s ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
        then s::uuid
    end
    from (select auth.session() ->> 'sub' as s) as claims
$$;

-- The verified `iss` claim: which provider issued this session's token, or
-- NULL. The proxy chose the provider by this exact value.
create or replace function auth.issuer() returns text
language sql stable
set search_path = pg_catalog, pg_temp
as $$ select auth.session() ->> 'iss' $$;

revoke all on function auth.session(), auth.jwt(), auth.user_id(), auth.uid(), auth.issuer()
    from public;
grant execute on function auth.session(), auth.jwt(), auth.user_id(), auth.uid(), auth.issuer()
    to public;
