//! JSON objects whose keys keep the order they are written in (what a reader of
//! `cachefs status --json` sees first comes first), with every value and key written by
//! serde_json: one escaping and number format for all of cachefs's JSON output.
//! (`serde_json::Value` objects sort their keys unless serde_json's `preserve_order`
//! feature is on, which would also reorder `cachefs ctl`'s replies.)
//! This module uses no other module of cachefs.

use serde_json::Value;

/// A JSON object being written; [`Object::finish`] gives its text.
pub struct Object(String);

impl Default for Object {
    fn default() -> Self {
        Object::new()
    }
}

impl Object {
    /// An empty object.
    pub fn new() -> Object {
        Object(String::from("{"))
    }

    /// Adds `key: value` (a string, number, bool, `None` for null, a `Vec` of them...).
    pub fn field(&mut self, key: &str, value: impl Into<Value>) -> &mut Object {
        self.raw(key, &value.into().to_string())
    }

    /// Adds `key` with `json`, text that already is JSON (an [`Object`] or [`array`]).
    pub fn raw(&mut self, key: &str, json: &str) -> &mut Object {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        self.0.push_str(&Value::from(key).to_string());
        self.0.push(':');
        self.0.push_str(json);
        self
    }

    /// The object's text.
    pub fn finish(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

/// A JSON array of items that already are JSON.
pub fn array(items: impl IntoIterator<Item = String>) -> String {
    format!("[{}]", items.into_iter().collect::<Vec<_>>().join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_keep_their_order_and_values_are_escaped() {
        let mut inner = Object::new();
        inner.field("z", 1u64).field("a", None::<u64>);
        let mut o = Object::new();
        o.field("b", "q\"\\\u{1}")
            .field("a", true)
            .raw("o", &inner.finish())
            .raw("l", &array(["1".to_string(), "{}".to_string()]));
        let text = o.finish();
        assert_eq!(
            text,
            "{\"b\":\"q\\\"\\\\\\u0001\",\"a\":true,\"o\":{\"z\":1,\"a\":null},\"l\":[1,{}]}"
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["b"], "q\"\\\u{1}");
        assert_eq!(Object::new().finish(), "{}");
        assert_eq!(array(Vec::new()), "[]");
    }
}
