//! Merging queued (asynchronous) PATCH requests on a keyed list: all requests for one object are
//! applied in arrival order as one change, each succeeding or failing alone. The cost is one
//! pass over the list plus one hash lookup per entry of each request, whatever their number.

use std::collections::HashMap;

use fulcrum_schema::{Kind, ListKey, ObjectSchema, Registry, entry_key_with, normalize_value};
use serde_json::{Map, Value};

use crate::{Op, PatchError, invalid, key_fallbacks};

/// One queued request: add or delete these entries (in stored form) of the list.
#[derive(Debug, Clone)]
pub struct Queued<'a> {
    pub op: Op,
    pub entries: &'a [Value],
}

/// Applies `requests` to list `field` of `object` in order. Returns each request's outcome; a
/// failed request changes nothing. The list keeps the order of its surviving entries, new ones
/// appended in the order they were first added.
pub fn merge_requests(
    schema: &ObjectSchema,
    object: &mut Map<String, Value>,
    field: &str,
    requests: &[Queued<'_>],
) -> Result<Vec<Result<(), PatchError>>, PatchError> {
    let reg = Registry::get();
    let spec = match schema.field(field).map(|f| &f.kind) {
        Some(Kind::List(spec)) if spec.key != ListKey::None => spec,
        _ => return Err(invalid(format!("field '{field}' is not a list with keyed entries"))),
    };
    let fallbacks = key_fallbacks(spec, schema, object);
    let key_of = |entry: &Value| {
        entry_key_with(&spec.key, entry, &|p| fallbacks.iter().find(|(k, _)| *k == p).map(|(_, v)| v.clone()))
            .unwrap_or_default()
    };
    // Taken in place, so the field keeps its position in the object.
    let existing = match object.get_mut(field) {
        Some(Value::Array(items)) => std::mem::take(items),
        _ => vec![],
    };
    // Removed entries become holes, so positions in the index stay valid.
    let mut slots: Vec<Option<Value>> = existing.into_iter().map(Some).collect();
    let mut index: HashMap<String, usize> =
        slots.iter().enumerate().filter_map(|(i, e)| Some((key_of(e.as_ref()?), i))).collect();
    let mut live = slots.len();
    let mut outcomes = Vec::with_capacity(requests.len());
    for (n, request) in requests.iter().enumerate() {
        let at = |i: usize| format!("{field}[{i}]");
        let outcome = match request.op {
            Op::Add => {
                let keys: Vec<String> = request.entries.iter().map(&key_of).collect();
                let mut fresh: Vec<&String> =
                    keys.iter().filter(|k| index.get(*k).is_none_or(|&i| slots[i].is_none())).collect();
                fresh.sort();
                fresh.dedup();
                match spec.max {
                    Some(max) if live + fresh.len() > max => Err(invalid(format!(
                        "field '{field}': would have {} entries; at most {max} are allowed",
                        live + fresh.len()
                    ))),
                    _ => {
                        let checked: Result<Vec<Value>, PatchError> = request
                            .entries
                            .iter()
                            .enumerate()
                            .map(|(i, e)| normalize_value(reg, &spec.item, e, &at(i)).map_err(PatchError::from))
                            .collect();
                        checked.map(|entries| {
                            for ((entry, key), given) in entries.into_iter().zip(keys).zip(request.entries) {
                                match index.get(&key).copied().filter(|&i| slots[i].is_some()) {
                                    Some(i) => {
                                        // Update the entry with the fields the request gave.
                                        if let (Some(Value::Object(current)), Value::Object(given)) =
                                            (&mut slots[i], given)
                                        {
                                            for (k, v) in given {
                                                current.insert(
                                                    k.clone(),
                                                    entry.get(k).cloned().unwrap_or_else(|| v.clone()),
                                                );
                                            }
                                        }
                                    }
                                    None => {
                                        index.insert(key, slots.len());
                                        slots.push(Some(entry));
                                        live += 1;
                                    }
                                }
                            }
                        })
                    }
                }
            }
            Op::Delete => {
                for entry in request.entries {
                    if let Some(i) = index.get(&key_of(entry)).copied()
                        && slots[i].take().is_some()
                    {
                        live -= 1;
                    }
                }
                Ok(())
            }
            Op::Replace => Err(invalid(format!("request {n}: a queued request may only add or delete"))),
        };
        outcomes.push(outcome);
    }
    object.insert(field.to_string(), Value::Array(slots.into_iter().flatten().collect()));
    if let Some(hook) = schema.hook {
        hook(object).map_err(invalid)?;
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fulcrum_schema::normalize;
    use serde_json::json;

    fn server(addr: &str) -> Value {
        json!({"ip": {"addr": addr, "type": "V4"}})
    }

    /// Requests in stored form, and their borrowed view.
    fn requests(specs: &[(Op, &[&str])]) -> Vec<(Op, Vec<Value>)> {
        specs.iter().map(|(op, addrs)| (*op, addrs.iter().map(|a| server(a)).collect())).collect()
    }

    fn view(owned: &[(Op, Vec<Value>)]) -> Vec<Queued<'_>> {
        owned.iter().map(|(op, entries)| Queued { op: *op, entries }).collect()
    }

    fn addrs(pool: &Map<String, Value>) -> Vec<String> {
        pool["servers"].as_array().unwrap().iter().map(|s| s["ip"]["addr"].as_str().unwrap().to_string()).collect()
    }

    #[test]
    fn requests_apply_in_order_and_cancel_out() {
        let reg = Registry::get();
        let schema = reg.schema("Pool");
        let mut pool = normalize(reg, schema, &json!({"name": "p", "servers": [server("1.1.1.1")]})).unwrap();
        let owned = requests(&[
            (Op::Add, &["2.2.2.2", "3.3.3.3"]),
            (Op::Delete, &["2.2.2.2"]),
            (Op::Delete, &["1.1.1.1"]),
            (Op::Add, &["1.1.1.1"]),
        ]);
        let outcomes = merge_requests(schema, &mut pool, "servers", &view(&owned)).unwrap();
        assert!(outcomes.iter().all(Result::is_ok));
        assert_eq!(addrs(&pool), ["3.3.3.3", "1.1.1.1"]);
        assert_eq!(pool["servers"][0]["port"], 80, "the pool's hook fills the port");
        let whole = normalize(reg, schema, &Value::Object(pool.clone())).unwrap();
        assert_eq!(whole, pool, "the merged pool is valid as a whole");
    }

    #[test]
    fn a_request_that_would_overflow_fails_alone() {
        let reg = Registry::get();
        let schema = reg.schema("Pool");
        let full: Vec<Value> = (0..4999).map(|i| server(&format!("10.0.{}.{}", i / 256, i % 256))).collect();
        let mut pool = normalize(reg, schema, &json!({"name": "p", "servers": full})).unwrap();
        let owned = requests(&[
            (Op::Add, &["9.9.9.1", "9.9.9.2"]),
            (Op::Add, &["9.9.9.3"]),
            (Op::Add, &["9.9.9.4"]),
            (Op::Add, &["9.9.9.3"]),
        ]);
        let outcomes = merge_requests(schema, &mut pool, "servers", &view(&owned)).unwrap();
        assert!(outcomes[0].as_ref().unwrap_err().to_string().contains("at most 5000"));
        assert!(outcomes[1].is_ok());
        assert!(outcomes[2].is_err());
        assert!(outcomes[3].is_ok(), "re-adding a present server adds nothing");
        assert_eq!(pool["servers"].as_array().unwrap().len(), 5000);
    }
}
