// A real OpenID Connect provider (the npm package oidc-provider, installed outside the repo by
// scripts/install-oidc-provider.sh) on loopback, for pulumid's tests; tests/oidc_provider.py
// starts and drives it.
//
// Usage: node provider.mjs ['{"port": 0, "redirect_uris": [...], ...}']
// The configuration is one JSON argument (or the env var OIDC_PROVIDER_CONFIG); every key is
// optional, see DEFAULTS. When listening, the first line on stdout is a JSON object:
//   {"issuer": "http://127.0.0.1:PORT", "port": PORT, "pid": PID, "version": "9.x.y"}
//
// Besides the provider's own endpoints, the same server answers test-only control requests,
// each a POST with a JSON body (and the header X-Test-Secret when test_secret is set):
//   /test/rotate  {"drop_old": false}          new signing keys, published first and used from now on
//   /test/mint    {"claims": {...}, "key": "current"|"foreign", "alg": "RS256", "kid": "..."}
//                 (or the claims as the whole body)                       -> {"token": "<JWT>"}
//   /test/disable {"login": "bob"}  /test/enable {"login": "bob"}        the account (dis)appears
//   /test/client  {"redirect_uris": [...]}     replace the client's redirect URIs
//   /test/jwks    (GET)             the published JWKS with the current signing kids

import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { createRequire } from 'node:module';
import { homedir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';

const DEFAULTS = {
  host: '127.0.0.1',
  port: 0,
  client_id: 'pulumid',
  client_secret: 'secret',
  redirect_uris: ['http://127.0.0.1/callback'],
  post_logout_redirect_uris: [],
  // Registered method; oidc-provider accepts client_secret_basic and client_secret_post for a
  // client registered with either of them.
  token_endpoint_auth_method: 'client_secret_basic',
  users: [
    { login: 'alice', email: 'alice@example.com', name: 'Alice Example', groups: ['platform'] },
    { login: 'bob', email: 'bob@example.com', name: 'Bob Example', groups: ['readers'] },
  ],
  id_token_ttl: 300,
  access_token_ttl: 300,
  refresh_token_ttl: 86400,
  authorization_code_ttl: 60,
  signing_algs: ['RS256', 'ES256'],
  refresh_tokens: 'always',
  test_secret: '',
  watch_stdin: false,
  // Directory holding node_modules/oidc-provider; by default the cache entry that
  // scripts/install-oidc-provider.sh makes for the package-lock.json next to this file.
  modules: '',
};

const here = dirname(fileURLToPath(import.meta.url));

function loadConfig() {
  const raw = process.argv[2] ?? process.env.OIDC_PROVIDER_CONFIG ?? '{}';
  const config = { ...DEFAULTS, ...JSON.parse(raw) };
  if (!Array.isArray(config.redirect_uris) || config.redirect_uris.length === 0) {
    throw new Error('redirect_uris must be a non-empty list');
  }
  for (const user of config.users) {
    if (typeof user.login !== 'string' || !user.login) throw new Error('every user needs a login');
  }
  return config;
}

// Same key as scripts/install-oidc-provider.sh: the first 16 hex digits of the lockfile's sha256.
function defaultModulesDir() {
  const lock = readFileSync(join(here, 'package-lock.json'));
  const hash = createHash('sha256').update(lock).digest('hex').slice(0, 16);
  const cache = process.env.PULUMID_CACHE || join(homedir(), '.cache', 'pulumid');
  return join(cache, 'oidc-provider', hash);
}

// ESM ignores NODE_PATH, and the packages live outside the repo: resolve them from the cache
// directory with a require anchored there, then import the resolved file.
async function importFrom(dir, name) {
  const req = createRequire(join(dir, 'node_modules', '.resolve-anchor.js'));
  return import(pathToFileURL(req.resolve(name)).href);
}

const config = loadConfig();
const modulesDir = config.modules || defaultModulesDir();
if (!existsSync(join(modulesDir, 'node_modules', 'oidc-provider'))) {
  console.error(`oidc-provider is not installed in ${modulesDir}: run scripts/install-oidc-provider.sh`);
  process.exit(2);
}
const { default: Provider } = await importFrom(modulesDir, 'oidc-provider');
const jose = await importFrom(modulesDir, 'jose');
const { version } = JSON.parse(
  readFileSync(join(modulesDir, 'node_modules', 'oidc-provider', 'package.json'), 'utf8'),
);

const users = new Map(config.users.map((u) => [u.login, u]));
const disabled = new Set();

let keySerial = 0;
async function newKey(alg, prefix = 'k') {
  const { privateKey } = await jose.generateKeyPair(alg, { extractable: true });
  const jwk = await jose.exportJWK(privateKey);
  keySerial += 1;
  return { ...jwk, alg, use: 'sig', kid: `${prefix}-${alg.toLowerCase()}-${keySerial}-${randomBytes(4).toString('hex')}` };
}

async function newKeySet() {
  const keys = [];
  for (const alg of config.signing_algs) keys.push(await newKey(alg));
  return keys;
}

// Private JWKs, newest first: oidc-provider signs with the first key that fits the algorithm,
// and publishes all of them.
let signingKeys = await newKeySet();
// Keys never published, for tokens a relying party must reject.
const foreignKeys = new Map();

function currentKey(alg) {
  const key = signingKeys.find((k) => k.alg === alg);
  if (!key) throw new Error(`no signing key for ${alg}; signing_algs is ${config.signing_algs}`);
  return key;
}

async function foreignKey(alg) {
  if (!foreignKeys.has(alg)) foreignKeys.set(alg, await newKey(alg, 'foreign'));
  return foreignKeys.get(alg);
}

function publicJwks() {
  return {
    keys: signingKeys.map(({ kty, kid, alg, use, n, e, crv, x, y }) => (
      Object.fromEntries(Object.entries({ kty, kid, alg, use, n, e, crv, x, y })
        .filter(([, v]) => v !== undefined))
    )),
  };
}

// Cookie signing keys stay the same across key rotations so browser sessions survive them.
const cookieKeys = [randomBytes(32).toString('hex')];

function account(login) {
  const user = users.get(login);
  if (!user || disabled.has(login)) return undefined;
  return {
    accountId: login,
    // oidc-provider filters these by the granted scopes (email, profile, groups).
    async claims() {
      return {
        sub: login,
        email: user.email ?? `${login}@example.com`,
        email_verified: user.email_verified ?? true,
        name: user.name ?? login,
        preferred_username: login,
        groups: user.groups ?? [],
        // Google Workspace's hosted domain, for accounts that have one.
        ...(user.hd ? { hd: user.hd } : {}),
      };
    },
  };
}

// oidc-provider's built-in memory adapter keeps a separate store per Provider instance, so
// sessions, grants and refresh tokens would be lost whenever /test/rotate or /test/client makes
// a new instance. This adapter keeps them in one store for the whole process (and warns
// nothing, never evicts: a test run is small).
const store = new Map();
const grantMembers = new Map();

function storeGet(key) {
  const entry = store.get(key);
  if (entry === undefined) return undefined;
  if (entry.expiresAt !== undefined && entry.expiresAt <= Date.now()) {
    store.delete(key);
    return undefined;
  }
  return entry.value;
}

function storeSet(key, value, expiresIn) {
  // A minute beyond the token's life, so oidc-provider reports "expired" rather than "not found".
  const expiresAt = typeof expiresIn === 'number' ? Date.now() + (expiresIn + 60) * 1000 : undefined;
  store.set(key, { value, expiresAt });
}

class SharedMemoryAdapter {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  async upsert(id, payload, expiresIn) {
    const key = this.key(id);
    storeSet(key, payload, expiresIn);
    if (this.model === 'Session' && payload.uid) storeSet(`sessionUid:${payload.uid}`, id, expiresIn);
    if (payload.userCode) storeSet(`userCode:${payload.userCode}`, id, expiresIn);
    if (payload.grantId) {
      if (!grantMembers.has(payload.grantId)) grantMembers.set(payload.grantId, new Set());
      grantMembers.get(payload.grantId).add(key);
    }
  }

  async find(id) {
    return storeGet(this.key(id));
  }

  async findByUid(uid) {
    const id = storeGet(`sessionUid:${uid}`);
    return id === undefined ? undefined : this.find(id);
  }

  async findByUserCode(userCode) {
    const id = storeGet(`userCode:${userCode}`);
    return id === undefined ? undefined : this.find(id);
  }

  async consume(id) {
    const payload = storeGet(this.key(id));
    if (payload) payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    store.delete(this.key(id));
  }

  async revokeByGrantId(grantId) {
    for (const key of grantMembers.get(grantId) ?? []) store.delete(key);
    grantMembers.delete(grantId);
  }
}

function makeProvider(issuer) {
  const ttl = (seconds) => () => seconds;
  const provider = new Provider(issuer, {
    clients: [{
      client_id: config.client_id,
      client_secret: config.client_secret,
      redirect_uris: config.redirect_uris,
      post_logout_redirect_uris: config.post_logout_redirect_uris,
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
      token_endpoint_auth_method: config.token_endpoint_auth_method,
    }],
    adapter: SharedMemoryAdapter,
    jwks: { keys: signingKeys },
    cookies: { keys: cookieKeys },
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name', 'preferred_username', 'hd'],
      groups: ['groups'],
    },
    scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
    // Put the scope claims (groups, email, name) into the ID token of the code flow too, not
    // only at the userinfo endpoint: the relying party under test reads the ID token.
    conformIdTokenClaims: false,
    async findAccount(_ctx, id) {
      return account(id);
    },
    // oidc-provider drops a requested offline_access scope unless the request also says
    // prompt=consent (OpenID Connect Core 11), and by default issues refresh tokens only with
    // offline_access. refresh_tokens "always" gives this client one on every code exchange;
    // "offline_access" keeps the strict rule.
    async issueRefreshToken(_ctx, client, code) {
      if (!client.grantTypeAllowed('refresh_token')) return false;
      return config.refresh_tokens === 'always' || code.scopes.has('offline_access');
    },
    pkce: { required: () => true },
    features: {
      devInteractions: { enabled: true },
      revocation: { enabled: true },
      userinfo: { enabled: true },
      rpInitiatedLogout: { enabled: true },
    },
    ttl: {
      AccessToken: ttl(config.access_token_ttl),
      AuthorizationCode: ttl(config.authorization_code_ttl),
      IdToken: ttl(config.id_token_ttl),
      RefreshToken: ttl(config.refresh_token_ttl),
      Grant: ttl(config.refresh_token_ttl),
      Session: ttl(config.refresh_token_ttl),
      Interaction: ttl(3600),
    },
  });
  return provider.callback();
}

function send(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'cache-control': 'no-store' });
  res.end(data);
}

async function readJson(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  const text = Buffer.concat(chunks).toString('utf8');
  return text ? JSON.parse(text) : {};
}

function authorized(req) {
  if (!config.test_secret) return true;
  const given = Buffer.from(String(req.headers['x-test-secret'] ?? ''));
  const want = Buffer.from(config.test_secret);
  return given.length === want.length && timingSafeEqual(given, want);
}

async function mint(body, issuer) {
  const claims = body.claims ?? Object.fromEntries(
    Object.entries(body).filter(([k]) => !['key', 'alg', 'kid', 'secret', 'header'].includes(k)),
  );
  const payload = { iss: issuer, ...claims };
  const alg = body.alg ?? 'RS256';
  if (alg === 'none') {
    return new jose.UnsecuredJWT(payload).encode();
  }
  let key;
  let kid;
  if (alg.startsWith('HS')) {
    // For algorithm-confusion tests: an HMAC with a secret the test chooses.
    key = new TextEncoder().encode(body.secret ?? '');
    kid = body.kid;
  } else {
    const jwk = body.key === 'foreign' ? await foreignKey(alg) : currentKey(alg);
    key = await jose.importJWK(jwk, alg);
    kid = body.kid ?? jwk.kid;
  }
  const header = { alg, typ: 'JWT', ...(kid === undefined ? {} : { kid }), ...(body.header ?? {}) };
  return new jose.SignJWT(payload).setProtectedHeader(header).sign(key);
}

async function control(req, res, path, state) {
  if (!authorized(req)) return send(res, 403, { error: 'bad X-Test-Secret' });
  if (path === '/test/jwks' && req.method === 'GET') {
    return send(res, 200, { ...publicJwks(), current: config.signing_algs.map((a) => currentKey(a).kid) });
  }
  if (req.method !== 'POST') return send(res, 405, { error: 'POST only' });
  const body = await readJson(req);
  switch (path) {
    case '/test/rotate': {
      const fresh = await newKeySet();
      signingKeys = body.drop_old ? fresh : [...fresh, ...signingKeys];
      // The keystore is fixed when a Provider is made: make a new one. Its memory adapter keeps
      // sessions, grants and tokens in module-level storage, so they outlive the swap.
      state.handler = makeProvider(state.issuer);
      return send(res, 200, { kids: fresh.map((k) => k.kid), jwks: publicJwks() });
    }
    case '/test/client': {
      // Point the client at other redirect URIs (e.g. a daemon started after the provider).
      if (!Array.isArray(body.redirect_uris) || body.redirect_uris.length === 0) {
        return send(res, 400, { error: 'redirect_uris must be a non-empty list' });
      }
      config.redirect_uris = body.redirect_uris;
      state.handler = makeProvider(state.issuer);
      return send(res, 200, { redirect_uris: config.redirect_uris });
    }
    case '/test/mint':
      return send(res, 200, { token: await mint(body, state.issuer) });
    case '/test/disable':
    case '/test/enable': {
      if (!users.has(body.login)) return send(res, 404, { error: `no user ${body.login}` });
      if (path === '/test/disable') disabled.add(body.login);
      else disabled.delete(body.login);
      return send(res, 200, { login: body.login, disabled: disabled.has(body.login) });
    }
    default:
      return send(res, 404, { error: `no control endpoint ${path}` });
  }
}

const state = { issuer: '', handler: null };
const server = createServer((req, res) => {
  const path = new URL(req.url, 'http://x').pathname;
  if (path.startsWith('/test/')) {
    control(req, res, path, state).catch((err) => {
      if (!res.headersSent) send(res, 500, { error: String(err?.stack ?? err) });
    });
    return;
  }
  state.handler(req, res);
});

server.listen(config.port, config.host, () => {
  const { port } = server.address();
  state.issuer = `http://${config.host}:${port}`;
  state.handler = makeProvider(state.issuer);
  process.stdout.write(`${JSON.stringify({ issuer: state.issuer, port, pid: process.pid, version })}\n`);
});

function stop() {
  server.close();
  server.closeAllConnections();
  process.exit(0);
}
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, stop);
// With watch_stdin the harness holds our stdin open: its end (the test process exiting, even
// killed) stops us too, so no provider outlives its tests.
if (config.watch_stdin) {
  process.stdin.on('end', stop);
  process.stdin.resume();
}
