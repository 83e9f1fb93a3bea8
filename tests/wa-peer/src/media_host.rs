//! The peer's media host: what `mmg.whatsapp.net` is to a real client, on 127.0.0.1 over
//! HTTPS with a self-signed certificate (test material, in this directory; only a
//! `test-peer` build of botvisor skips the check). The peer's `media_conn` answer names
//! it. It keeps what clients upload (encrypted, as WhatsApp's host does) under a direct
//! path of its own, answers with the `url` and `direct_path` whatsapp-rust expects, and
//! serves the bytes back on `GET`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::rustls;

/// The certificate and key (PKCS#8) of `127.0.0.1`, made once with openssl; valid for
/// 100 years. Test material: never trusted by anything but a test build.
const CERT: &[u8] = include_bytes!("media-host-cert.der");
const KEY: &[u8] = include_bytes!("media-host-key.der");

/// A request body larger than this is refused (WhatsApp's own limit is 2 GiB; tests
/// send kilobytes).
const MAX_BODY: usize = 64 * 1024 * 1024;

/// The files the host keeps, by direct path.
#[derive(Default)]
pub struct Files {
    by_path: Mutex<HashMap<String, Vec<u8>>>,
    /// Uploads received, in order: (direct path, encrypted length).
    uploads: Mutex<Vec<(String, usize)>>,
}

impl Files {
    /// The encrypted bytes kept under `path`.
    pub fn get(&self, path: &str) -> Option<Vec<u8>> {
        self.by_path.lock().ok()?.get(path).cloned()
    }

    /// Keeps `bytes` under a new direct path and returns it.
    pub fn put(&self, bytes: Vec<u8>) -> String {
        let mut files = self.by_path.lock().unwrap_or_else(|p| p.into_inner());
        let path = format!("/v/peer/{}", files.len() + 1);
        files.insert(path.clone(), bytes);
        path
    }

    /// As [`Files::put`], for a client's upload (counted in [`Files::uploads`]).
    fn upload(&self, bytes: Vec<u8>) -> String {
        let len = bytes.len();
        let path = self.put(bytes);
        if let Ok(mut u) = self.uploads.lock() {
            u.push((path.clone(), len));
        }
        path
    }

    /// The uploads so far: (direct path, encrypted length).
    pub fn uploads(&self) -> Vec<(String, usize)> {
        self.uploads.lock().map(|u| u.clone()).unwrap_or_default()
    }
}

/// Binds the host on 127.0.0.1 and serves it on the current runtime; returns its address.
pub async fn start(files: Arc<Files>) -> SocketAddr {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![rustls::pki_types::CertificateDer::from(CERT.to_vec())],
            rustls::pki_types::PrivateKeyDer::Pkcs8(KEY.to_vec().into()),
        )
        .expect("media host certificate");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("media host bind");
    let addr = listener.local_addr().expect("media host addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, files) = (acceptor.clone(), files.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    serve(tls, &files, addr).await;
                }
            });
        }
    });
    addr
}

/// Answers requests on one connection until it closes (or asks to).
async fn serve<S: AsyncReadExt + AsyncWriteExt + Unpin>(mut s: S, files: &Files, addr: SocketAddr) {
    let mut buf = Vec::new();
    loop {
        // The head.
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 8192];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            if buf.len() > 64 * 1024 {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        buf.drain(..end);
        let mut lines = head.split("\r\n");
        let mut first = lines.next().unwrap_or_default().split(' ');
        let (method, target) = (
            first.next().unwrap_or_default(),
            first.next().unwrap_or_default(),
        );
        let mut length = 0usize;
        let mut close = false;
        for line in lines {
            if let Some((name, value)) = line.split_once(':') {
                let value = value.trim();
                match name.trim().to_ascii_lowercase().as_str() {
                    "content-length" => length = value.parse().unwrap_or(usize::MAX),
                    "connection" => close = value.eq_ignore_ascii_case("close"),
                    _ => {}
                }
            }
        }
        if length > MAX_BODY {
            let _ = respond(&mut s, "413 Payload Too Large", "text/plain", b"too large").await;
            return;
        }
        while buf.len() < length {
            let mut chunk = vec![0u8; 64 * 1024];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body: Vec<u8> = buf.drain(..length).collect();
        let path = target.split('?').next().unwrap_or_default();
        let ok = match method {
            // An upload: `/mms/<type>/<token>?auth=…&token=…`; a resume check (`resume=1`)
            // finds nothing, so the whole file comes.
            "POST" if path.starts_with("/mms/") && target.contains("resume=1") => {
                respond(&mut s, "200 OK", "application/json", b"{}").await
            }
            "POST" if path.starts_with("/mms/") => {
                let direct = files.upload(body);
                let json =
                    format!(r#"{{"url":"https://{addr}{direct}","direct_path":"{direct}"}}"#);
                respond(&mut s, "200 OK", "application/json", json.as_bytes()).await
            }
            "GET" => match files.get(path) {
                Some(bytes) => respond(&mut s, "200 OK", "application/octet-stream", &bytes).await,
                None => respond(&mut s, "404 Not Found", "text/plain", b"no such file").await,
            },
            _ => respond(&mut s, "404 Not Found", "text/plain", b"not here").await,
        };
        if !ok || close {
            return;
        }
    }
}

async fn respond<S: AsyncWriteExt + Unpin>(
    s: &mut S,
    status: &str,
    kind: &str,
    body: &[u8],
) -> bool {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.is_ok()
        && s.write_all(body).await.is_ok()
        && s.flush().await.is_ok()
}
