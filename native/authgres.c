/*
 * authgres.c: the native identity path, answering auth.session() and its
 * siblings from backend memory.
 *
 * The proxy calls auth.begin_session() on every fresh login and every
 * reset (the same PL/pgSQL function on both paths, see sql/auth.sql),
 * signs HMAC-SHA256(key, binding || '\n' || claims) for the binding it
 * returns, and stores claims and signature (hex) in the settings
 * authgres.claims and authgres.signature. The portable path checks that
 * pair in SQL; this library checks it in C and remembers what it
 * verified, so a call costs two setting lookups and two string
 * comparisons. See docs/security.md.
 *
 * How it holds against a client that can run any SQL:
 * - The generation is this backend's currval of auth.generation_seq, as on
 *   the portable path: only auth.begin_session() (SECURITY DEFINER) draws
 *   it, the login roles have no privilege on the sequence, and this code
 *   reads it as the sequence's owner. Both paths share it, so a database
 *   switches path in place, live sessions and pooled backends included.
 *   The value read is kept until begin_session says it drew another
 *   (auth.generation_drawn(), right after its nextval) or the catalog
 *   changes under it (any pg_proc invalidation, such as a switch of path,
 *   or one of the sequence): a stale generation could only let an older
 *   pair of this backend verify. No entry point here takes an argument: a
 *   client can hand it no generation and no key, and calling
 *   generation_drawn (owner-only) would only make the next call read it
 *   again.
 * - The keys are read from auth.claims_keys (owner-only) by this code,
 *   directly from the table, whenever a pair is not the one last verified:
 *   nothing caches keys. Any change to that table invalidates it in every
 *   backend's relation cache (a trigger re-grants it; see sql/auth.sql),
 *   and this library then forgets what it verified: a retired key's
 *   sessions fail closed at their next transaction.
 * - A pair is trusted without recomputing the MAC only when generation,
 *   session user, claims text and signature text all equal what was last
 *   verified in this backend. A pair captured earlier (an older
 *   generation), elsewhere (another backend's generation and pid) or for
 *   another role therefore goes through the full check and fails it.
 * - The MAC comparison does not exit early; anything that does not verify
 *   is NULL, so owner-only policies match no rows.
 * - The functions are PARALLEL UNSAFE (the default): a parallel worker
 *   would not have this backend's memory.
 *
 * Built with PGXS (native/Makefile) against one server major; init-db
 * falls back to the portable path where it cannot load.
 */
#include "postgres.h"

#include "access/table.h"
#include "access/tableam.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "common/cryptohash.h"
#include "common/sha2.h"
#include "executor/tuptable.h"
#include "fmgr.h"
#include "mb/pg_wchar.h"
#include "miscadmin.h"
#include "utils/builtins.h"
#include "utils/fmgrprotos.h"
#include "utils/guc.h"
#include "utils/inval.h"
#include "utils/jsonb.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/snapmgr.h"
#include "utils/syscache.h"
#include "utils/uuid.h"

PG_MODULE_MAGIC;

/* The settings the proxy attaches. */
#define CLAIMS_SETTING "authgres.claims"
#define SIGNATURE_SETTING "authgres.signature"
/* Every binding starts with this; the proxy checks it. */
#define BINDING_PREFIX "authgres-v1"
/* Length of a SHA-256 MAC and of its lowercase hex. */
#define MAC_LENGTH PG_SHA256_DIGEST_LENGTH
#define MAC_HEX_LENGTH (2 * MAC_LENGTH)
/* auth.claims_keys stores key xor ipad and key xor opad, one block each. */
#define PAD_LENGTH PG_SHA256_BLOCK_LENGTH

/* What was last verified, and the answers derived from it. */
typedef struct Verified
{
	bool		valid;
	int64		generation;
	Oid			role;
	char	   *claims;
	char		signature[MAC_HEX_LENGTH + 1];
	Jsonb	   *jsonb;
	/* `sub` and `iss` as `->>` gives them; NULL when absent or null. */
	text	   *sub;
	text	   *iss;
	bool		has_uid;
	pg_uuid_t	uid;
} Verified;

static Verified verified;
/* Holds verified's allocations; reset whenever it changes. */
static MemoryContext verified_context = NULL;
/* auth.claims_keys, as last looked up: its invalidation forgets. */
static Oid	keys_relid = InvalidOid;
/* auth.generation_seq and its owner, looked up again after invalidation. */
static Oid	generation_relid = InvalidOid;
static Oid	generation_owner = InvalidOid;
/* This backend's generation as last read, while known_generation_valid. */
static bool known_generation_valid = false;
static int64 known_generation;

void		_PG_init(void);

PG_FUNCTION_INFO_V1(authgres_generation_drawn);
PG_FUNCTION_INFO_V1(authgres_claims);
PG_FUNCTION_INFO_V1(authgres_session);
PG_FUNCTION_INFO_V1(authgres_user_id);
PG_FUNCTION_INFO_V1(authgres_uid);
PG_FUNCTION_INFO_V1(authgres_issuer);

/* Forgets what was verified. */
static void
forget(void)
{
	verified.valid = false;
	if (verified_context != NULL)
		MemoryContextReset(verified_context);
	verified.claims = NULL;
	verified.jsonb = NULL;
	verified.sub = NULL;
	verified.iss = NULL;
	verified.has_uid = false;
}

/* A relation cache invalidation: the keys may have changed. */
static void
keys_changed(Datum arg, Oid relid)
{
	if (relid == InvalidOid || relid == keys_relid)
		forget();
	if (relid == InvalidOid || relid == generation_relid)
	{
		generation_relid = InvalidOid;
		known_generation_valid = false;
	}
}

/* A pg_proc invalidation: begin_session may have changed (a path switch). */
static void
functions_changed(Datum arg, int cacheid, uint32 hashvalue)
{
	known_generation_valid = false;
}

void
_PG_init(void)
{
	CacheRegisterRelcacheCallback(keys_changed, (Datum) 0);
	CacheRegisterSyscacheCallback(PROCOID, functions_changed, (Datum) 0);
}

/* auth.generation_drawn(): begin_session drew a new generation. */
Datum
authgres_generation_drawn(PG_FUNCTION_ARGS)
{
	known_generation_valid = false;
	PG_RETURN_VOID();
}

/*
 * This backend's generation: its currval of auth.generation_seq, read as
 * the sequence's owner (the caller has no privilege on it). Raises, as
 * currval does, when this backend has none.
 */
static int64
current_generation(void)
{
	Oid			saved_user;
	int			saved_context;
	Datum		value;

	if (known_generation_valid)
		return known_generation;
	if (!OidIsValid(generation_relid))
	{
		Oid			namespace = get_namespace_oid("auth", false);
		Oid			relid = get_relname_relid("generation_seq", namespace);
		HeapTuple	tuple;

		if (!OidIsValid(relid))
			ereport(ERROR,
					(errcode(ERRCODE_UNDEFINED_OBJECT),
					 errmsg("authgres: auth.generation_seq does not exist; run authgres init-db")));
		tuple = SearchSysCache1(RELOID, ObjectIdGetDatum(relid));
		if (!HeapTupleIsValid(tuple))
			elog(ERROR, "authgres: cache lookup failed for relation %u", relid);
		generation_owner = ((Form_pg_class) GETSTRUCT(tuple))->relowner;
		ReleaseSysCache(tuple);
		generation_relid = relid;
	}
	GetUserIdAndSecContext(&saved_user, &saved_context);
	SetUserIdAndSecContext(generation_owner, saved_context | SECURITY_LOCAL_USERID_CHANGE);
	/* An error here is rethrown; aborting restores the user. */
	value = DirectFunctionCall1(currval_oid, ObjectIdGetDatum(generation_relid));
	SetUserIdAndSecContext(saved_user, saved_context);
	known_generation = DatumGetInt64(value);
	known_generation_valid = true;
	return known_generation;
}

/* SHA-256 of a || b. */
static void
sha256_of(const uint8 *a, size_t a_length, const uint8 *b, size_t b_length, uint8 *out)
{
	pg_cryptohash_ctx *context = pg_cryptohash_create(PG_SHA256);

	if (context == NULL ||
		pg_cryptohash_init(context) < 0 ||
		pg_cryptohash_update(context, a, a_length) < 0 ||
		pg_cryptohash_update(context, b, b_length) < 0 ||
		pg_cryptohash_final(context, out, MAC_LENGTH) < 0)
	{
		pg_cryptohash_free(context);
		elog(ERROR, "authgres: SHA-256 failed");
	}
	pg_cryptohash_free(context);
}

/* Whether a and b are equal, in time that does not depend on where they differ. */
static bool
equal_in_constant_time(const uint8 *a, const uint8 *b)
{
	uint8		difference = 0;

	for (int i = 0; i < MAC_LENGTH; i++)
		difference |= a[i] ^ b[i];
	return difference == 0;
}

/* Exactly 64 lowercase hex digits, as the proxy writes them, into out. */
static bool
parse_signature(const char *signature, uint8 *out)
{
	for (int i = 0; i < MAC_HEX_LENGTH; i += 2)
	{
		int			high,
					low;

#define HEX_VALUE(c) ((c) >= '0' && (c) <= '9' ? (c) - '0' : (c) >= 'a' && (c) <= 'f' ? (c) - 'a' + 10 : -1)
		high = HEX_VALUE(signature[i]);
		low = high < 0 ? -1 : HEX_VALUE(signature[i + 1]);
#undef HEX_VALUE
		if (high < 0 || low < 0)
			return false;
		out[i / 2] = (uint8) (high << 4 | low);
	}
	return signature[MAC_HEX_LENGTH] == '\0';
}

/*
 * Whether any key in auth.claims_keys gives mac for message. Read straight
 * from the table: the caller need not (and must not) have privileges on it.
 */
static bool
any_key_signs(const char *message, size_t length, const uint8 *mac)
{
	Oid			namespace = get_namespace_oid("auth", true);
	Oid			relid = OidIsValid(namespace) ? get_relname_relid("claims_keys", namespace) : InvalidOid;
	AttrNumber	ipad_attribute,
				opad_attribute;
	Relation	relation;
	TableScanDesc scan;
	TupleTableSlot *slot;
	Snapshot	snapshot;
	bool		found = false;

	if (!OidIsValid(relid))
		return false;
	keys_relid = relid;
	ipad_attribute = get_attnum(relid, "ipad");
	opad_attribute = get_attnum(relid, "opad");
	if (ipad_attribute == InvalidAttrNumber || opad_attribute == InvalidAttrNumber)
		return false;
	relation = table_open(relid, AccessShareLock);
	snapshot = RegisterSnapshot(ActiveSnapshotSet() ? GetActiveSnapshot() : GetTransactionSnapshot());
	scan = table_beginscan(relation, snapshot, 0, NULL);
	slot = table_slot_create(relation, NULL);
	while (!found && table_scan_getnextslot(scan, ForwardScanDirection, slot))
	{
		bool		ipad_null,
					opad_null;
		Datum		ipad_datum = slot_getattr(slot, ipad_attribute, &ipad_null);
		Datum		opad_datum = slot_getattr(slot, opad_attribute, &opad_null);
		bytea	   *ipad,
				   *opad;
		uint8		inner[MAC_LENGTH],
					outer[MAC_LENGTH];

		if (ipad_null || opad_null)
			continue;
		ipad = DatumGetByteaPP(ipad_datum);
		opad = DatumGetByteaPP(opad_datum);
		if (VARSIZE_ANY_EXHDR(ipad) != PAD_LENGTH || VARSIZE_ANY_EXHDR(opad) != PAD_LENGTH)
			continue;
		sha256_of((uint8 *) VARDATA_ANY(ipad), PAD_LENGTH, (const uint8 *) message, length, inner);
		sha256_of((uint8 *) VARDATA_ANY(opad), PAD_LENGTH, inner, MAC_LENGTH, outer);
		found = equal_in_constant_time(outer, mac);
	}
	ExecDropSingleTupleTableSlot(slot);
	table_endscan(scan);
	UnregisterSnapshot(snapshot);
	table_close(relation, AccessShareLock);
	return found;
}

/* jsonb ->> key, or NULL. */
static text *
field_text(Jsonb *jsonb, const char *key)
{
	LOCAL_FCINFO(fcinfo, 2);
	Datum		result;

	InitFunctionCallInfoData(*fcinfo, NULL, 2, InvalidOid, NULL, NULL);
	fcinfo->args[0].value = JsonbPGetDatum(jsonb);
	fcinfo->args[0].isnull = false;
	fcinfo->args[1].value = CStringGetTextDatum(key);
	fcinfo->args[1].isnull = false;
	result = jsonb_object_field_text(fcinfo);
	return fcinfo->isnull ? NULL : DatumGetTextPP(result);
}

/* Whether text is a uuid in the 8-4-4-4-12 form, hex digits of either case. */
static bool
looks_like_uuid(const char *text, size_t length)
{
	if (length != 36)
		return false;
	for (size_t i = 0; i < length; i++)
	{
		char		c = text[i];

		if (i == 8 || i == 13 || i == 18 || i == 23)
		{
			if (c != '-')
				return false;
		}
		else if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F')))
			return false;
	}
	return true;
}

/* A copy of t in the current memory context, or NULL. */
static text *
copy_text(const text *t)
{
	return t == NULL ? NULL : (text *) PG_DETOAST_DATUM_COPY(PointerGetDatum(t));
}

/*
 * Checks the pair against this backend's generation; on success remembers
 * it with its answers. NULL when it does not verify.
 */
static const Verified *
verify(const char *claims, const char *signature, int64 generation, Oid role)
{
	uint8		given[MAC_LENGTH];
	char	   *binding;
	char	   *message;
	size_t		length;
	Jsonb	   *jsonb;
	text	   *sub;
	text	   *iss;
	MemoryContext previous;

	if (!parse_signature(signature, given))
		return NULL;
	binding = psprintf(BINDING_PREFIX ":%d:" INT64_FORMAT ":%s\n%s", MyProcPid, generation,
					   GetUserNameFromId(role, false), claims);
	/* The proxy signs UTF-8, whatever the database's encoding. */
	message = pg_server_to_any(binding, strlen(binding), PG_UTF8);
	length = strlen(message);
	if (!any_key_signs(message, length, given))
		return NULL;
	/* Everything that can fail happens before the cache changes. */
	jsonb = DatumGetJsonbP(DirectFunctionCall1(jsonb_in, CStringGetDatum(claims)));
	sub = field_text(jsonb, "sub");
	iss = field_text(jsonb, "iss");

	if (verified_context == NULL)
		verified_context = AllocSetContextCreate(TopMemoryContext, "authgres identity",
												 ALLOCSET_SMALL_SIZES);
	forget();
	previous = MemoryContextSwitchTo(verified_context);
	verified.claims = pstrdup(claims);
	strlcpy(verified.signature, signature, sizeof(verified.signature));
	verified.jsonb = (Jsonb *) PG_DETOAST_DATUM_COPY(JsonbPGetDatum(jsonb));
	verified.sub = copy_text(sub);
	verified.iss = copy_text(iss);
	MemoryContextSwitchTo(previous);
	if (sub != NULL && looks_like_uuid(VARDATA_ANY(sub), VARSIZE_ANY_EXHDR(sub)))
	{
		char	   *s = text_to_cstring(sub);

		verified.uid = *DatumGetUUIDP(DirectFunctionCall1(uuid_in, CStringGetDatum(s)));
		verified.has_uid = true;
	}
	verified.generation = generation;
	verified.role = role;
	verified.valid = true;
	return &verified;
}

/* This session's verified identity, or NULL. */
static const Verified *
current(void)
{
	const char *claims = GetConfigOption(CLAIMS_SETTING, true, false);
	const char *signature;
	int64		generation;
	Oid			role;

	if (claims == NULL || claims[0] == '\0')
		return NULL;
	signature = GetConfigOption(SIGNATURE_SETTING, true, false);
	if (signature == NULL)
		return NULL;
	generation = current_generation();
	role = GetSessionUserId();
	if (verified.valid &&
		verified.generation == generation &&
		verified.role == role &&
		strcmp(verified.signature, signature) == 0 &&
		strcmp(verified.claims, claims) == 0)
		return &verified;
	return verify(claims, signature, generation, role);
}

/* auth.session_claims(): the verified claims as text. */
Datum
authgres_claims(PG_FUNCTION_ARGS)
{
	const Verified *v = current();

	if (v == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(cstring_to_text(v->claims));
}

/* auth.session() and auth.jwt(): the verified claims. */
Datum
authgres_session(PG_FUNCTION_ARGS)
{
	const Verified *v = current();

	if (v == NULL)
		PG_RETURN_NULL();
	PG_RETURN_JSONB_P((Jsonb *) PG_DETOAST_DATUM_COPY(JsonbPGetDatum(v->jsonb)));
}

/* auth.user_id(): the verified `sub`. */
Datum
authgres_user_id(PG_FUNCTION_ARGS)
{
	const Verified *v = current();

	if (v == NULL || v->sub == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(copy_text(v->sub));
}

/* auth.uid(): the verified `sub` as a uuid, NULL when it is not one. */
Datum
authgres_uid(PG_FUNCTION_ARGS)
{
	const Verified *v = current();
	pg_uuid_t  *uid;

	if (v == NULL || !v->has_uid)
		PG_RETURN_NULL();
	uid = palloc(sizeof(pg_uuid_t));
	*uid = v->uid;
	PG_RETURN_UUID_P(uid);
}

/* auth.issuer(): the verified `iss`. */
Datum
authgres_issuer(PG_FUNCTION_ARGS)
{
	const Verified *v = current();

	if (v == NULL || v->iss == NULL)
		PG_RETURN_NULL();
	PG_RETURN_TEXT_P(copy_text(v->iss));
}
