//! Reading requests: the body limit, the content type, JSON into typed structs, and the
//! checks on ids and phone numbers.

use std::time::Duration;

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::header::CONTENT_TYPE;
use hyper::{Request, StatusCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::errors::ApiError;

/// Largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// `[A-Za-z0-9_-]{1,64}`: also keeps ids safe as file names.
pub fn valid_user_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Digits only, 7 to 15 of them (E.164 without `+`).
pub fn valid_phone(p: &str) -> bool {
    (7..=15).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit())
}

/// 413 with the limit.
pub fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("Request body too large (limit {} KiB)", limit / 1024),
    )
}

/// Refuses a declared body over `limit` bytes before reading it.
pub fn check_length(req: &Request<Incoming>, limit: usize) -> Result<(), ApiError> {
    let declared = req
        .headers()
        .get(hyper::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok());
    match declared {
        Some(len) if len.trim().parse::<u64>().map_or(true, |n| n > limit as u64) => {
            Err(too_large(limit))
        }
        _ => Ok(()),
    }
}

/// Reads a JSON object body into `T`: `None` when the body is empty and `optional`. A
/// body that has not fully arrived within `timeout` is a 408 (a client trickling bytes
/// must not hold a connection forever).
pub async fn json_body<T: DeserializeOwned>(
    req: Request<Incoming>,
    optional: bool,
    timeout: Duration,
) -> Result<Option<T>, ApiError> {
    json_body_up_to(req, optional, timeout, MAX_BODY).await
}

/// [`json_body`] with a body limit of `limit` bytes (sends that carry media).
pub async fn json_body_up_to<T: DeserializeOwned>(
    req: Request<Incoming>,
    optional: bool,
    timeout: Duration,
    limit: usize,
) -> Result<Option<T>, ApiError> {
    let content_type = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let bytes = tokio::time::timeout(timeout, Limited::new(req.into_body(), limit).collect())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "The request body did not arrive within {} s",
                    timeout.as_secs_f64()
                ),
            )
        })?
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                too_large(limit)
            } else {
                ApiError::bad_request("Could not read the request body")
            }
        })?
        .to_bytes();
    parse_json_object(&bytes, content_type.as_deref(), optional)
}

/// The checks on a body once it is in: content type, blank, JSON, an object, the fields.
/// Pure, so it can be fuzzed; never panics on any input.
pub fn parse_json_object<T: DeserializeOwned>(
    bytes: &[u8],
    content_type: Option<&str>,
    optional: bool,
) -> Result<Option<T>, ApiError> {
    let blank = bytes.iter().all(|b| b.is_ascii_whitespace());
    if blank && optional && content_type.is_none() {
        return Ok(None);
    }
    if content_type != Some("application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Content-Type must be application/json",
        ));
    }
    if blank {
        if optional {
            return Ok(None);
        }
        return Err(ApiError::bad_request(
            "Request body is empty; send a JSON object",
        ));
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("Request body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::bad_request("Request body must be a JSON object"));
    }
    serde_json::from_value(value)
        .map(Some)
        .map_err(|e| ApiError::bad_request(format!("Request body has a wrong field: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids() {
        for good in ["bot_1234567890", "a", "A-b_9", &"x".repeat(64)] {
            assert!(valid_user_id(good), "{good}");
        }
        for bad in ["", "..", "a/b", "a.b", "ü", "a b", "%2e", &"x".repeat(65)] {
            assert!(!valid_user_id(bad), "{bad}");
        }
    }

    #[test]
    fn phones() {
        assert!(valid_phone("1234567"));
        assert!(valid_phone("123456789012345"));
        for bad in [
            "123456",
            "1234567890123456",
            "+1234567890",
            "123 4567",
            "١٢٣٤٥٦٧٨",
        ] {
            assert!(!valid_phone(bad), "{bad}");
        }
    }
}
