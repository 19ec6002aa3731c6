// A real OAuth 2.0 authorization server for tests/it/oidc_provider.rs: panva's oidc-provider
// (a certified OpenID Provider), with RFC 7662 introspection and RFC 7009 revocation enabled.
//
//   PORT=8080 STATE=/tmp/state.json node tests/oidc/server.js
//
// Prints `listening on http://127.0.0.1:PORT` on standard output once it accepts connections.
//
// Clients:
// - `homeserver`, confidential (client_secret_basic, secret $CLIENT_SECRET or the default below):
//   what the homeserver authenticates to the introspection endpoint with;
// - `matrix-client`, public (token_endpoint_auth_method none): the Matrix client the access
//   tokens are issued to, which revokes them itself (RFC 7009).
//
// Tokens are oidc-provider's own opaque AccessToken models, saved through its adapter, so the
// introspection and revocation endpoints find them as they find tokens from the authorization
// code flow. The `username` claim (the Matrix localpart) comes from the documented
// `extraTokenClaims` hook, which the introspection answer spreads at its top level.
//
// Test helper endpoints beside the provider's (not OAuth, for the tests only):
// - POST /test/mint {"account": "alice", "scope": "...", "expires_in": 60} -> {"access_token"}
// - GET /test/introspections -> {"count": N}: introspection requests received by this process
//
// The adapter keeps every model in memory and, with $STATE set, in that JSON file, so that a
// token minted before a restart is still active after it (the outage test stops this server).

import { readFileSync, writeFileSync, renameSync } from 'node:fs';
import Provider from 'oidc-provider';

const port = Number(process.env.PORT ?? 0);
const statePath = process.env.STATE;
const clientSecret = process.env.CLIENT_SECRET ?? 'homeserver-secret-for-the-tests';
const issuer = `http://127.0.0.1:${port}`;

// Every model of every kind, by `${kind}:${id}`: { payload, expiresAt (ms, or null) }.
const store = new Map();
if (statePath) {
  try {
    for (const [key, value] of Object.entries(JSON.parse(readFileSync(statePath, 'utf8')))) {
      store.set(key, value);
    }
  } catch (error) {
    if (error.code !== 'ENOENT') throw error;
  }
}

function persist() {
  if (!statePath) return;
  const temporary = `${statePath}.tmp`;
  writeFileSync(temporary, JSON.stringify(Object.fromEntries(store)));
  renameSync(temporary, statePath);
}

class FileAdapter {
  constructor(name) {
    this.name = name;
  }

  key(id) {
    return `${this.name}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    store.set(this.key(id), {
      payload,
      expiresAt: expiresIn ? Date.now() + expiresIn * 1000 : null,
    });
    persist();
  }

  async find(id) {
    const entry = store.get(this.key(id));
    if (!entry) return undefined;
    if (entry.expiresAt !== null && entry.expiresAt <= Date.now()) return undefined;
    return entry.payload;
  }

  async findByUserCode(userCode) {
    for (const [key, entry] of store) {
      if (key.startsWith(`${this.name}:`) && entry.payload.userCode === userCode) return entry.payload;
    }
    return undefined;
  }

  async findByUid(uid) {
    for (const [key, entry] of store) {
      if (key.startsWith(`${this.name}:`) && entry.payload.uid === uid) return entry.payload;
    }
    return undefined;
  }

  async consume(id) {
    const entry = store.get(this.key(id));
    if (entry) {
      entry.payload.consumed = Math.floor(Date.now() / 1000);
      persist();
    }
  }

  async destroy(id) {
    store.delete(this.key(id));
    persist();
  }

  async revokeByGrantId(grantId) {
    for (const [key, entry] of store) {
      if (entry.payload.grantId === grantId) store.delete(key);
    }
    persist();
  }
}

const provider = new Provider(issuer, {
  adapter: FileAdapter,
  cookies: { keys: ['tests only: no cookie of this server matters'] },
  clients: [
    {
      client_id: 'homeserver',
      client_secret: clientSecret,
      token_endpoint_auth_method: 'client_secret_basic',
      grant_types: ['client_credentials'],
      response_types: [],
      redirect_uris: [],
    },
    {
      client_id: 'matrix-client',
      token_endpoint_auth_method: 'none',
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      redirect_uris: ['http://127.0.0.1/callback'],
    },
  ],
  scopes: ['openid', 'offline_access', 'urn:matrix:client:api:*'],
  dynamicScopes: [/^urn:matrix:client:device:[A-Za-z0-9._~-]+$/],
  features: {
    devInteractions: { enabled: false },
    clientCredentials: { enabled: true },
    introspection: { enabled: true },
    revocation: { enabled: true },
  },
  // The Matrix localpart, as MAS answers it: the account id here is the localpart.
  async extraTokenClaims(ctx, token) {
    return token.accountId ? { username: token.accountId } : undefined;
  },
});

let introspections = 0;

async function readJson(ctx) {
  const chunks = [];
  for await (const chunk of ctx.req) chunks.push(chunk);
  return JSON.parse(Buffer.concat(chunks).toString('utf8') || '{}');
}

provider.use(async (ctx, next) => {
  if (ctx.path === '/token/introspection' && ctx.method === 'POST') {
    introspections += 1;
  }
  if (ctx.path === '/test/introspections' && ctx.method === 'GET') {
    ctx.body = { count: introspections };
    return;
  }
  if (ctx.path === '/test/mint' && ctx.method === 'POST') {
    const { account, scope, expires_in: expiresIn = 300 } = await readJson(ctx);
    const client = await provider.Client.find('matrix-client');
    const token = new provider.AccessToken({
      accountId: account,
      client,
      scope,
      expiresIn,
    });
    ctx.body = { access_token: await token.save(), expires_in: expiresIn };
    return;
  }
  await next();
});

const server = provider.listen(port, '127.0.0.1', () => {
  process.stdout.write(`listening on ${issuer}\n`);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
