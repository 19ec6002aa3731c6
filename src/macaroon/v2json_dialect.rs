//! The V2JSON spellings we read on purpose and the `macaroon` crate does not, for the
//! differential tests (`src/macaroon/differential_tests.rs`) and the `differential` fuzz target, so that
//! both hold the crate to the same documented exceptions.

/// The V2JSON the crate refuses but we accept on purpose, rewritten the way the crate wants it.
/// Returns the rewritten token and which exceptions applied (none: no excuse for disagreeing).
///
/// - No `"v"`, or no `"c"` when there are no caveats: pymacaroons writes neither. The crate
///   requires both.
/// - `i64`/`v64` in the URL-safe alphabet, as libmacaroons and pymacaroons write them: the crate
///   decodes those two fields with the standard alphabet only. Conversely it decodes `s64`/`l64`
///   with the URL-safe alphabet only. The rewrite translates characters, it does not decode.
/// - A key given twice (`key_given_twice`: the caller knows it from the crate's error, or from
///   looking): the crate refuses, we (through `serde_json::Value`) take the last one.
pub fn crate_dialect(input: &[u8], key_given_twice: bool) -> (String, Vec<&'static str>) {
    fn translate(object: &mut serde_json::Map<String, serde_json::Value>, key: &str) -> bool {
        let Some(serde_json::Value::String(text)) = object.get_mut(key) else {
            return false;
        };
        let to_standard = matches!(key, "i64" | "v64");
        let translated: String = text
            .chars()
            .map(|ch| match (ch, to_standard) {
                ('-', true) => '+',
                ('_', true) => '/',
                ('+', false) => '-',
                ('/', false) => '_',
                (ch, _) => ch,
            })
            .collect();
        let changed = translated != *text;
        *text = translated;
        changed
    }
    let mut reasons = Vec::new();
    let mut object = match serde_json::from_slice(input) {
        Ok(serde_json::Value::Object(object)) => object,
        _ => return (String::new(), reasons),
    };
    if key_given_twice {
        reasons.push("a key given twice (we take the last)");
    }
    if !object.contains_key("v") {
        object.insert("v".into(), 2.into());
        reasons.push("no \"v\" (pymacaroons)");
    }
    if !object.contains_key("c") {
        object.insert("c".into(), serde_json::Value::Array(Vec::new()));
        reasons.push("no \"c\" (pymacaroons, no caveats)");
    }
    let mut alphabet = false;
    for key in ["i64", "l64", "s64"] {
        alphabet |= translate(&mut object, key);
    }
    if let Some(serde_json::Value::Array(caveats)) = object.get_mut("c") {
        for caveat in caveats {
            if let serde_json::Value::Object(caveat) = caveat {
                for key in ["i64", "l64", "v64"] {
                    alphabet |= translate(caveat, key);
                }
            }
        }
    }
    if alphabet {
        reasons.push("base64 alphabet the crate refuses in that field");
    }
    (serde_json::Value::Object(object).to_string(), reasons)
}
