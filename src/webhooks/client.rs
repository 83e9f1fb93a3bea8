//! The HTTPS client of the deliveries (hyper-util over rustls, the public roots plus
//! `--webhook-ca-file`), and one signed attempt.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use botvisor_actors::now_ms;

use super::signing::signature;
use super::WebhookSettings;
use crate::db::OutboxHead;

/// The most of a receiver's answer body that is read (then the connection is dropped).
const ANSWER_BODY_MAX: usize = 64 * 1024;

pub(super) type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// The certificates of `--webhook-ca-file`, checked.
pub fn load_ca_file(
    path: &std::path::Path,
) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, String> {
    crate::tls::load_ca_file(path, &format!("--webhook-ca-file {}", path.display()))
}

/// hyper-util's pooled client, http and https (rustls with ring, Mozilla's roots plus
/// `--webhook-ca-file`'s).
pub(super) fn http_client(settings: &WebhookSettings) -> Result<HttpClient, String> {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(settings.timeout));
    let tls = crate::tls::client_config(&settings.ca_certs)?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(http);
    Ok(Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(settings.max_inflight.max(1))
        .build(https))
}

/// One signed POST of `head` to `url`; `Err` says why it failed.
pub(super) async fn attempt(
    client: &HttpClient,
    url: &str,
    head: &OutboxHead,
    secret: &str,
    timeout: Duration,
) -> Result<(), String> {
    let uri: hyper::Uri = url
        .parse()
        .map_err(|e| format!("the URL {url} is not usable: {e}"))?;
    let timestamp = now_ms() / 1000;
    let request = hyper::Request::post(uri)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("botvisor/", env!("CARGO_PKG_VERSION")),
        )
        .header("X-Botvisor-Event-Id", &head.event_id)
        .header("X-Botvisor-Event", &head.kind)
        .header("X-Botvisor-Timestamp", timestamp.to_string())
        .header(
            "X-Botvisor-Signature",
            signature(secret, timestamp, &head.body),
        )
        .body(Full::new(Bytes::from(head.body.clone())))
        .map_err(|e| format!("cannot build the request: {e}"))?;
    let deadline = tokio::time::Instant::now() + timeout;
    let answer = match tokio::time::timeout_at(deadline, client.request(request)).await {
        Err(_) => {
            return Err(format!(
                "timed out: no answer within {} (--webhook-timeout)",
                humantime::format_duration(timeout)
            ))
        }
        Ok(Err(e)) => return Err(crate::logging::error_chain(&e)),
        Ok(Ok(answer)) => answer,
    };
    let status = answer.status();
    // Read (a bounded part of) the body, so the connection can serve the next request;
    // the status alone decides.
    let _ = tokio::time::timeout_at(
        deadline,
        Limited::new(answer.into_body(), ANSWER_BODY_MAX).collect(),
    )
    .await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the receiver answered {status}"))
    }
}
