//! CORS: any origin by default, or only the `--cors-origin` list.

use hyper::header::{HeaderMap, HeaderValue};

/// Allowed origins (empty: any).
#[derive(Debug, Clone, Default)]
pub struct Cors {
    origins: Vec<String>,
}

/// Methods the API answers.
pub const ALLOWED_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, OPTIONS";
/// Headers a browser may send.
pub const ALLOWED_HEADERS: &str = "Content-Type, X-API-Key, Authorization";

impl Cors {
    /// From the configured list.
    pub fn new(origins: Vec<String>) -> Cors {
        Cors {
            origins: origins
                .into_iter()
                .map(|o| o.trim_end_matches('/').to_string())
                .collect(),
        }
    }

    /// The `Access-Control-Allow-Origin` value for a request's `Origin`, if allowed.
    pub fn allow(&self, origin: Option<&HeaderValue>) -> Option<HeaderValue> {
        if self.origins.is_empty() {
            return Some(HeaderValue::from_static("*"));
        }
        let origin = origin?;
        let text = origin.to_str().ok()?;
        self.origins
            .iter()
            .any(|o| o == text)
            .then(|| origin.clone())
    }

    /// Adds the CORS headers for a response.
    pub fn apply(&self, origin: Option<&HeaderValue>, headers: &mut HeaderMap, preflight: bool) {
        if !self.origins.is_empty() {
            headers.append(hyper::header::VARY, HeaderValue::from_static("Origin"));
        }
        let Some(allowed) = self.allow(origin) else {
            return;
        };
        headers.insert(hyper::header::ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
        if preflight {
            headers.insert(
                hyper::header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(ALLOWED_METHODS),
            );
            headers.insert(
                hyper::header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static(ALLOWED_HEADERS),
            );
            headers.insert(
                hyper::header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("600"),
            );
        }
    }

    /// True when the request's origin may use the API from a browser.
    pub fn permits(&self, origin: Option<&HeaderValue>) -> bool {
        origin.is_none() || self.allow(origin).is_some()
    }
}
