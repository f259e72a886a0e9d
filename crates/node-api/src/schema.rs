//! A checker of the subset of JSON Schema that `openapi/node-api.json` uses (types, enums,
//! `format: uuid`, minimum, required, additionalProperties, prefixItems/items, min/maxItems,
//! local `$ref`s). Tests of the client, the simulator and the agent validate answers with it.

use serde_json::Value;

/// The OpenAPI document, parsed.
///
/// # Panics
/// Never: the document is checked in by tests.
pub fn document() -> Value {
    serde_json::from_str(crate::OPENAPI).expect("openapi/node-api.json is JSON")
}

/// Follows a local `$ref` (recursively); `v` itself when it is not a reference.
///
/// # Panics
/// A dangling or non-local `$ref`.
pub fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let ptr = r.strip_prefix('#').expect("local $ref");
            resolve(
                doc,
                doc.pointer(ptr)
                    .unwrap_or_else(|| panic!("dangling $ref {r}")),
            )
        }
        None => v,
    }
}

/// Checks `v` against the subset of JSON Schema the document uses; returns every violation.
///
/// # Panics
/// A schema type the document does not use.
pub fn check(doc: &Value, schema: &Value, v: &Value, at: &str, out: &mut Vec<String>) {
    let s = resolve(doc, schema);
    if let Some(t) = s.get("type").and_then(Value::as_str) {
        let ok = match t {
            "object" => v.is_object(),
            "array" => v.is_array(),
            "string" => v.is_string(),
            "integer" => v.is_u64() || v.is_i64(),
            other => panic!("schema type {other} not handled"),
        };
        if !ok {
            out.push(format!("{at}: expected {t}, got {v}"));
            return;
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            out.push(format!("{at}: {v} not in {e:?}"));
        }
    }
    if s.get("format").and_then(Value::as_str) == Some("uuid")
        && uuid::Uuid::try_parse(v.as_str().unwrap_or_default()).is_err()
    {
        out.push(format!("{at}: {v} is not a uuid"));
    }
    if let (Some(min), Some(n)) = (s.get("minimum").and_then(Value::as_i64), v.as_i64()) {
        if n < min {
            out.push(format!("{at}: {n} < {min}"));
        }
    }
    if let Some(obj) = v.as_object() {
        for r in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !obj.contains_key(r.as_str().unwrap()) {
                out.push(format!("{at}: missing {r}"));
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        for (k, val) in obj {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => check(doc, ps, val, &format!("{at}.{k}"), out),
                None if s.get("additionalProperties") == Some(&Value::Bool(false)) => {
                    out.push(format!("{at}: unexpected property {k}"))
                }
                None => {}
            }
        }
    }
    if let Some(arr) = v.as_array() {
        let len = arr.len() as u64;
        if s.get("minItems")
            .and_then(Value::as_u64)
            .is_some_and(|m| len < m)
            || s.get("maxItems")
                .and_then(Value::as_u64)
                .is_some_and(|m| len > m)
        {
            out.push(format!("{at}: {len} items out of bounds"));
        }
        let prefix = s.get("prefixItems").and_then(Value::as_array);
        for (i, item) in arr.iter().enumerate() {
            let sch = prefix.and_then(|p| p.get(i)).or_else(|| s.get("items"));
            if let Some(sch) = sch {
                check(doc, sch, item, &format!("{at}[{i}]"), out);
            }
        }
    }
}

/// The operation object of `op` in `doc`.
///
/// # Panics
/// The document lacks the operation.
pub fn operation(doc: &Value, op: crate::Operation) -> &Value {
    let path = crate::wire::path_template(op);
    let method = crate::wire::method(op).to_ascii_lowercase();
    doc["paths"][path]
        .get(&method)
        .unwrap_or_else(|| panic!("{method} {path} missing from the document"))
}
