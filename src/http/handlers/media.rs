//! Media to send: bytes given in the body, or fetched from a URL with bounds. The fetch
//! follows at most [`REDIRECTS_MAX`] redirects, stops past `--media-max-bytes` (by
//! `Content-Length` before reading, or while reading), ends at `--media-fetch-timeout`,
//! and never connects to a private, loopback, link-local or otherwise internal address
//! unless `--media-allow-private` (the addresses are checked after resolution and the
//! connection goes to the checked addresses, so a name cannot re-resolve elsewhere).

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::StatusCode;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use botvisor_actors::{Media, MediaFile, MediaKind, MediaSource, Outgoing};

use crate::http::errors::ApiError;
use crate::http::spool::spool;

/// Redirects followed at most.
pub const REDIRECTS_MAX: usize = 3;
/// Longest media URL.
const URL_MAX: usize = 2_048;

/// How media is taken in.
#[derive(Debug, Clone)]
pub struct MediaSettings {
    /// The largest media (bytes), given or fetched.
    pub max_bytes: usize,
    /// How long a fetch may take, redirects included.
    pub fetch_timeout: Duration,
    /// Fetch from private and loopback addresses too.
    pub allow_private: bool,
}

impl Default for MediaSettings {
    fn default() -> Self {
        MediaSettings {
            max_bytes: 16 * 1024 * 1024,
            fetch_timeout: Duration::from_secs(30),
            allow_private: false,
        }
    }
}

/// Whether an address is one a fetch must not reach from a server (SSRF): loopback,
/// private, link-local, carrier-grade NAT, unspecified, multicast, broadcast,
/// documentation and benchmarking ranges, IPv6 unique-local and the IPv4 ones mapped.
pub fn internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1]))
                || (o[0] == 198 && (o[1] == 18 || o[1] == 19))
                || o[0] >= 240
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return internal(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || s[0] == 0x2001 && s[1] == 0x0db8
                || (s[0] == 0x64 && s[1] == 0xff9b)
        }
    }
}

/// The shape of a media URL: `http(s)://host[:port]/…`, at most 2,048 characters.
pub fn check_url(url: &str) -> Result<hyper::Uri, String> {
    if url.len() > URL_MAX {
        return Err(format!("a URL of at most {URL_MAX} characters"));
    }
    let uri: hyper::Uri = url
        .parse()
        .map_err(|_| "not a URL: use http(s)://host/path".to_string())?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("only http:// and https:// URLs are fetched".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("the URL has no host".into());
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Err("a URL with a user or password is not fetched".into());
    }
    Ok(uri)
}

/// The resolver of the fetches: the system's, then every address checked.
#[derive(Clone)]
struct Guarded {
    allow_private: bool,
}

impl tower_service::Service<Name> for Guarded {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow_private = self.allow_private;
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            if !allow_private {
                if let Some(bad) = addrs.iter().find(|a| internal(a.ip())) {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::PermissionDenied,
                        format!(
                            "{} resolves to {}, an internal address (--media-allow-private allows it)",
                            name.as_str(),
                            bad.ip()
                        ),
                    ));
                }
            }
            Ok(addrs.into_iter())
        })
    }
}

type FetchClient = Client<hyper_rustls::HttpsConnector<HttpConnector<Guarded>>, Empty<Bytes>>;

/// Fetches media for sends.
pub struct Fetcher {
    client: FetchClient,
    /// Its bounds.
    pub settings: MediaSettings,
}

impl Fetcher {
    /// A client with the public roots, over the guarded resolver.
    pub fn new(settings: MediaSettings) -> Result<Fetcher, String> {
        let mut http = HttpConnector::new_with_resolver(Guarded {
            allow_private: settings.allow_private,
        });
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(10)));
        let tls = crate::tls::client_config(&[])?;
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(4)
            .build(https);
        Ok(Fetcher { client, settings })
    }

    /// The bytes at `url` and their content type (bounded as the module says).
    pub async fn fetch(&self, url: &str) -> Result<(Option<String>, MediaFile), ApiError> {
        match tokio::time::timeout(self.settings.fetch_timeout, self.fetch_inner(url)).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!(
                    "the media URL did not answer within --media-fetch-timeout ({} s)",
                    self.settings.fetch_timeout.as_secs()
                ),
            )),
        }
    }

    async fn fetch_inner(&self, url: &str) -> Result<(Option<String>, MediaFile), ApiError> {
        let bad = |m: String| ApiError::bad_request(format!("media url: {m}"));
        // A refusal of policy, not of shape: 403.
        let inside = |m: String| ApiError::new(StatusCode::FORBIDDEN, format!("media url: {m}"));
        let gateway = |m: String| ApiError::new(StatusCode::BAD_GATEWAY, format!("media url: {m}"));
        let mut uri = check_url(url).map_err(bad)?;
        for _ in 0..=REDIRECTS_MAX {
            // An address in the URL itself never goes through the resolver: checked here.
            let host = uri.host().unwrap_or_default();
            let literal = host.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = literal.parse::<IpAddr>() {
                if internal(ip) && !self.settings.allow_private {
                    return Err(inside(format!(
                        "{ip} is an internal address (--media-allow-private allows it)"
                    )));
                }
            }
            let request = hyper::Request::get(uri.clone())
                .header(
                    hyper::header::USER_AGENT,
                    concat!("botvisor/", env!("CARGO_PKG_VERSION")),
                )
                .body(Empty::new())
                .map_err(|e| bad(e.to_string()))?;
            let answer = self.client.request(request).await.map_err(|e| {
                let mut cause = String::new();
                let mut source: Option<&dyn std::error::Error> = Some(&e);
                while let Some(s) = source {
                    cause = s.to_string();
                    source = s.source();
                }
                if cause.contains("internal address") {
                    inside(cause)
                } else {
                    gateway(format!("cannot fetch it: {cause}"))
                }
            })?;
            let status = answer.status();
            if status.is_redirection() {
                let location = answer
                    .headers()
                    .get(hyper::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| gateway(format!("{status} without a Location")))?;
                let next = resolve_location(&uri, location).map_err(gateway)?;
                uri =
                    check_url(&next.to_string()).map_err(|e| gateway(format!("redirect: {e}")))?;
                continue;
            }
            if !status.is_success() {
                return Err(gateway(format!("it answered {status}")));
            }
            let content_type = answer
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .map(|s| s.trim().to_ascii_lowercase());
            let max = self.settings.max_bytes;
            let declared = answer
                .headers()
                .get(hyper::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            if declared.is_some_and(|n| n > max as u64) {
                return Err(too_big(max));
            }
            // Streamed into a temporary file as it comes, never whole in memory.
            let file = spool(answer.into_body(), max)
                .await
                .map_err(|e| e.answer(max, |e| gateway(format!("reading it failed: {e}"))))?;
            if file.len == 0 {
                return Err(bad("it answered an empty body".into()));
            }
            return Ok((content_type, file));
        }
        Err(gateway(format!("more than {REDIRECTS_MAX} redirects")))
    }
}

/// A `Location` against the URI it answered.
fn resolve_location(base: &hyper::Uri, location: &str) -> Result<hyper::Uri, String> {
    if location.starts_with("http://") || location.starts_with("https://") {
        return location
            .parse()
            .map_err(|_| "a redirect to a bad URL".to_string());
    }
    if !location.starts_with('/') {
        return Err("a relative redirect botvisor does not follow".into());
    }
    let scheme = base.scheme_str().unwrap_or("https");
    let authority = base.authority().map(|a| a.as_str()).unwrap_or_default();
    format!("{scheme}://{authority}{location}")
        .parse()
        .map_err(|_| "a redirect to a bad URL".to_string())
}

/// 413 past `--media-max-bytes`.
pub fn too_big(max: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the media is larger than --media-max-bytes ({} bytes)", max),
    )
}

/// What a kind's MIME type must look like (`None`: anything).
fn family(kind: MediaKind) -> Option<&'static str> {
    match kind {
        MediaKind::Image | MediaKind::Sticker => Some("image/"),
        MediaKind::Video => Some("video/"),
        MediaKind::Audio => Some("audio/"),
        MediaKind::Document => None,
    }
}

/// A MIME type from the first bytes, for the common kinds.
fn sniff(bytes: &[u8]) -> Option<&'static str> {
    let starts = |p: &[u8]| bytes.starts_with(p);
    if starts(b"\xff\xd8\xff") {
        Some("image/jpeg")
    } else if starts(b"\x89PNG\r\n\x1a\n") {
        Some("image/png")
    } else if starts(b"GIF8") {
        Some("image/gif")
    } else if starts(b"RIFF") && bytes.get(8..12) == Some(b"WEBP") {
        Some("image/webp")
    } else if bytes.get(4..8) == Some(b"ftyp") {
        Some("video/mp4")
    } else if starts(b"OggS") {
        Some("audio/ogg")
    } else if starts(b"ID3") || starts(b"\xff\xfb") {
        Some("audio/mpeg")
    } else if starts(b"%PDF-") {
        Some("application/pdf")
    } else {
        None
    }
}

/// The content ready for the link: media fetched (a URL) or checked (bytes), its MIME
/// type settled (given, else the server's, else sniffed, else the kind's usual one) and
/// of the kind's family. Anything but media goes through as it is.
pub async fn fetched(fetcher: &Fetcher, content: Outgoing) -> Result<Outgoing, ApiError> {
    let Outgoing::Media(media) = content else {
        return Ok(content);
    };
    let max = fetcher.settings.max_bytes;
    let (served, source) = match &media.source {
        MediaSource::Url(url) => {
            let (served, file) = fetcher.fetch(url).await?;
            (served, MediaSource::File(file))
        }
        MediaSource::Bytes(b) if b.len() > max => return Err(too_big(max)),
        MediaSource::File(f) if f.len > max as u64 => return Err(too_big(max)),
        other => (None, other.clone()),
    };
    let head = match &source {
        MediaSource::Bytes(b) => b[..b.len().min(16)].to_vec(),
        MediaSource::File(f) => crate::http::spool::head(f),
        MediaSource::Url(_) => Vec::new(),
    };
    let served =
        served.filter(|s| !s.starts_with("application/octet-stream") && !s.starts_with("binary/"));
    let mimetype = if !media.mimetype.is_empty() {
        media.mimetype.clone()
    } else if let Some(s) = served.clone() {
        s
    } else if let Some(s) = sniff(&head) {
        s.to_string()
    } else {
        match media.kind {
            MediaKind::Image => "image/jpeg",
            MediaKind::Sticker => "image/webp",
            MediaKind::Video => "video/mp4",
            MediaKind::Audio if media.voice => "audio/ogg; codecs=opus",
            MediaKind::Audio => "audio/mpeg",
            MediaKind::Document => "application/octet-stream",
        }
        .to_string()
    };
    let kind = media.kind.name();
    if let Some(family) = family(media.kind) {
        // What the server said counts too: a URL that answers a web page is not an image.
        for (what, m) in [("is", Some(&mimetype)), ("was served as", served.as_ref())] {
            if let Some(m) = m.filter(|m| !m.starts_with(family)) {
                return Err(ApiError::bad_request(format!(
                    "the {kind} {what} {m}, not {family}*"
                )));
            }
        }
    }
    Ok(Outgoing::Media(Media {
        source,
        mimetype,
        ..media
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_refused() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
        ] {
            assert!(internal(ip.parse().unwrap()), "{ip}");
        }
        for ip in [
            "93.184.216.34",
            "2606:2800:220:1:248:1893:25c8:1946",
            "8.8.8.8",
        ] {
            assert!(!internal(ip.parse().unwrap()), "{ip}");
        }
    }

    #[test]
    fn urls_are_checked() {
        assert!(check_url("https://example.com/a.png").is_ok());
        for bad in [
            "ftp://x/y",
            "https://",
            "example.com/a",
            "https://u:p@example.com/",
        ] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
        assert!(check_url(&format!("https://e.com/{}", "a".repeat(3000))).is_err());
    }

    #[test]
    fn redirects_resolve_against_their_origin() {
        let base: hyper::Uri = "https://a.example/x/y".parse().unwrap();
        assert_eq!(
            resolve_location(&base, "/z").unwrap().to_string(),
            "https://a.example/z"
        );
        assert_eq!(
            resolve_location(&base, "http://b.example/q")
                .unwrap()
                .to_string(),
            "http://b.example/q"
        );
        assert!(resolve_location(&base, "z").is_err());
    }

    #[test]
    fn types_are_sniffed() {
        assert_eq!(sniff(b"\x89PNG\r\n\x1a\n...."), Some("image/png"));
        assert_eq!(sniff(b"RIFF\0\0\0\0WEBPVP8"), Some("image/webp"));
        assert_eq!(sniff(b"%PDF-1.7"), Some("application/pdf"));
        assert_eq!(sniff(b"hello"), None);
    }
}
