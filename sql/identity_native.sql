-- authgres: the in-database half of the identity check, part two, native:
-- the identity functions from the authgres library (native/authgres.c),
-- which answers from backend memory. Applied by `authgres init-db` after
-- sql/auth.sql when it runs as a superuser and the server can load the
-- library; sql/auth.sql defines the same functions in SQL.
--
-- 'authgres' is searched on `dynamic_library_path` (by default `$libdir`,
-- where `make install` in native/ puts it). `auth.begin_session()` stays
-- the PL/pgSQL one of sql/auth.sql: both paths draw the generation the
-- same way, so a database switches path in place with its live sessions.
-- begin_session tells the library of each new generation
-- (`auth.generation_drawn()`, owner-only). These run as the caller; the
-- library reads the generation as the sequence's owner and the keys
-- straight from their table (see native/authgres.c for how it holds). None
-- takes an argument, so a client can hand them no generation and no key.

set search_path = pg_catalog, pg_temp;

create or replace function auth.generation_drawn() returns void
language c volatile security invoker
as 'authgres', 'authgres_generation_drawn';

create or replace function auth.session_claims() returns text
language c stable security invoker
as 'authgres', 'authgres_claims';

create or replace function auth.session() returns jsonb
language c stable security invoker
as 'authgres', 'authgres_session';

create or replace function auth.jwt() returns jsonb
language c stable security invoker
as 'authgres', 'authgres_session';

create or replace function auth.user_id() returns text
language c stable security invoker
as 'authgres', 'authgres_user_id';

create or replace function auth.uid() returns uuid
language c stable security invoker
as 'authgres', 'authgres_uid';

create or replace function auth.issuer() returns text
language c stable security invoker
as 'authgres', 'authgres_issuer';

-- The portable path's internals, if it was installed before.
drop function if exists auth.verify_session();
drop function if exists auth.claims_mark(bigint, text, text);

revoke all on function auth.generation_drawn() from public;
revoke all on function auth.session_claims(), auth.session(), auth.jwt(), auth.user_id(),
    auth.uid(), auth.issuer() from public;
grant execute on function auth.session_claims(), auth.session(), auth.jwt(), auth.user_id(),
    auth.uid(), auth.issuer() to public;

reset search_path;
