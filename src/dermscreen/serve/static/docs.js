// Renders this server's OpenAPI document as a readable page, so the API docs need no CDN.
"use strict";

function node(tag, text, cls) {
  const n = document.createElement(tag);
  if (text !== undefined) n.textContent = text;
  if (cls) n.className = cls;
  return n;
}

function schemaText(schema, spec) {
  if (!schema) return "";
  if (schema.$ref) return schema.$ref.split("/").pop();
  if (schema.anyOf) return schema.anyOf.map((s) => schemaText(s, spec)).join(" | ");
  if (schema.enum) return schema.enum.map((v) => JSON.stringify(v)).join(" | ");
  if (schema.type === "array") return `${schemaText(schema.items, spec)}[]`;
  return schema.format ? `${schema.type} (${schema.format})` : (schema.type || "object");
}

function parametersTable(params, spec) {
  const table = node("table", undefined, "logits");
  const head = node("tr");
  for (const h of ["Parameter", "In", "Type", "Description"]) head.append(node("th", h));
  table.append(head);
  for (const p of params) {
    const row = node("tr");
    row.append(node("td", p.name + (p.required ? " *" : "")), node("td", p.in),
      node("td", schemaText(p.schema, spec)), node("td", p.description || (p.schema && p.schema.description) || ""));
    table.append(row);
  }
  return table;
}

function operationSection(path, method, op, spec) {
  const section = node("section", undefined, "panel");
  section.append(node("h2", `${method.toUpperCase()} ${path}`), node("p", op.summary || ""));
  if (op.description) section.append(node("p", op.description, "hint"));
  if (op.parameters && op.parameters.length) section.append(parametersTable(op.parameters, spec));
  if (op.requestBody) {
    section.append(node("h3", "Request body"), node("p", op.requestBody.description || ""));
    const types = node("ul");
    for (const type of Object.keys(op.requestBody.content || {})) types.append(node("li", type));
    section.append(types);
  }
  section.append(node("h3", "Responses"));
  const list = node("ul");
  for (const [code, resp] of Object.entries(op.responses || {})) {
    const schema = resp.content && resp.content["application/json"] && resp.content["application/json"].schema;
    list.append(node("li", `${code}: ${resp.description || ""}${schema ? ` — ${schemaText(schema, spec)}` : ""}`));
  }
  section.append(list);
  return section;
}

function schemaSection(name, schema) {
  const section = node("section", undefined, "panel");
  section.append(node("h2", `Schema ${name}`));
  if (schema.description) section.append(node("p", schema.description, "hint"));
  const list = node("ul");
  for (const [field, s] of Object.entries(schema.properties || {})) {
    list.append(node("li", `${field}: ${schemaText(s)}${s.description ? " — " + s.description : ""}`));
  }
  section.append(list);
  return section;
}

async function render() {
  const root = document.getElementById("docs");
  try {
    const spec = await (await fetch("/openapi.json", { credentials: "omit" })).json();
    root.replaceChildren(node("p", spec.info.description || ""));
    for (const [path, ops] of Object.entries(spec.paths)) {
      for (const [method, op] of Object.entries(ops)) root.append(operationSection(path, method, op, spec));
    }
    for (const [name, schema] of Object.entries((spec.components || {}).schemas || {})) {
      root.append(schemaSection(name, schema));
    }
  } catch (err) {
    root.replaceChildren(node("p", `The API description could not be loaded: ${err.message}`, "status error"));
  }
}

// the curl examples name the address this page was served from, whatever port or host the server runs on
function fillOrigin() {
  for (const span of document.querySelectorAll(".origin")) span.textContent = location.origin;
}

fillOrigin();
render();
