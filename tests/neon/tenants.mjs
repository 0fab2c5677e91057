// The Neon serverless driver over /sql and over WebSocket (/v2) against a
// proxy routing by tenant. Started by tests/claims.rs; prints one JSON
// object: for each token and transport, the database the query landed in
// and the role it ran as.
import ws from 'ws';
import { neon, neonConfig, Pool } from '@neondatabase/serverless';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const HTTP_URL = env('AUTHGRES_HTTP_URL');
const PG_HOSTPORT = env('AUTHGRES_PG_HOSTPORT');
const DATABASES = env('AUTHGRES_DATABASES').split(',');
const TOKENS = JSON.parse(env('AUTHGRES_TOKENS'));

neonConfig.fetchEndpoint = HTTP_URL;
neonConfig.webSocketConstructor = ws;
neonConfig.wsProxy = () => `${new URL(HTTP_URL).host}/v2`;
neonConfig.useSecureWebSocket = false;
neonConfig.pipelineTLS = false;
neonConfig.pipelineConnect = 'password';

const QUERY = 'select current_database() as db, current_user as role, (select name from tenant_info) as tenant';
const out = {};
for (const database of DATABASES) {
  const url = `postgresql://authenticated@${PG_HOSTPORT}/${database}`;
  for (const [who, token] of Object.entries(TOKENS)) {
    const key = `${database}/${who}`;
    try {
      const sql = neon(url, { authToken: async () => token });
      const [row] = await sql.query(QUERY);
      out[`http:${key}`] = row;
    } catch (e) {
      out[`http:${key}`] = { error: e.code ?? String(e.message) };
    }
    const pool = new Pool({ connectionString: url.replace('authenticated@', `authenticated:${token}@`) });
    try {
      const { rows: [row] } = await pool.query(QUERY);
      out[`ws:${key}`] = row;
    } catch (e) {
      out[`ws:${key}`] = { error: e.code ?? String(e.message) };
    } finally {
      await pool.end().catch(() => {});
    }
  }
}
console.log(JSON.stringify(out));
