//! V2JSON, read by rewriting it as V2 binary so that one parser serves both.

use super::*;
/// Decodes base64 in either alphabet, padded or not.
pub(super) fn decode_flexible(text: &str) -> Result<Vec<u8>, FormatError> {
    let engine = if text.contains(['-', '_']) {
        &URL_SAFE
    } else {
        &STANDARD
    };
    engine.decode(text).map_err(|_| FormatError::Json)
}

/// Reads a field given either as text (`name`) or as base64 (`name64`), not both.
pub(super) fn json_field(
    object: &serde_json::Map<String, serde_json::Value>,
    name: &str,
) -> Result<Option<Vec<u8>>, FormatError> {
    // The `macaroon` crate writes absent fields as `null`.
    let present = |key: &str| object.get(key).filter(|v| !v.is_null());
    let plain = present(name);
    let encoded = present(&format!("{name}64"));
    match (plain, encoded) {
        (Some(_), Some(_)) => Err(FormatError::Json),
        (Some(v), None) => Ok(Some(
            v.as_str().ok_or(FormatError::Json)?.as_bytes().to_vec(),
        )),
        (None, Some(v)) => Ok(Some(decode_flexible(v.as_str().ok_or(FormatError::Json)?)?)),
        (None, None) => Ok(None),
    }
}

/// Rewrites a V2JSON token as V2 binary so one parser serves both.
pub(super) fn v2json_to_binary(token: &[u8]) -> Result<Vec<u8>, FormatError> {
    let value: serde_json::Value = serde_json::from_slice(token).map_err(|_| FormatError::Json)?;
    let object = value.as_object().ok_or(FormatError::Json)?;
    // pymacaroons leaves the version out; libmacaroons and the `macaroon` crate write `"v": 2`.
    if let Some(version) = object.get("v") {
        if version.as_u64() != Some(2) {
            return Err(FormatError::UnknownVersion);
        }
    }
    let identifier = json_field(object, "i")?.ok_or(FormatError::MissingIdentifier)?;
    let signature = json_field(object, "s")?.ok_or(FormatError::BadSignature)?;
    let mut fields = MacaroonFields {
        location: json_field(object, "l")?,
        identifier,
        caveats: Vec::new(),
        signature: signature
            .try_into()
            .map_err(|_| FormatError::BadSignature)?,
    };
    if let Some(caveats) = object.get("c") {
        for caveat in caveats.as_array().ok_or(FormatError::Json)? {
            let caveat = caveat.as_object().ok_or(FormatError::Json)?;
            let id = json_field(caveat, "i")?.ok_or(FormatError::UnexpectedField)?;
            let location = json_field(caveat, "l")?;
            let vid = json_field(caveat, "v")?;
            if location.is_some() != vid.is_some() {
                return Err(FormatError::UnexpectedField);
            }
            fields.caveats.push(OwnedCaveat { id, location, vid });
        }
    }
    Ok(fields.to_v2())
}
