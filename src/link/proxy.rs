//! A proxy per session: `socks5://[user:pass@]host:port` (through tokio-socks; the proxy
//! resolves WhatsApp's name) or `http://[user:pass@]host:port` (HTTP `CONNECT`). The
//! WhatsApp socket goes through it: a TCP stream to the proxy, the tunnel, then the
//! same TLS and WebSocket handshake whatsapp-rust's own transport makes.
//!
//! A proxy's password is a credential: it is never shown, logged or put in an error
//! ([`ProxyUrl::redacted`] is what every message names).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long reaching the proxy and opening the tunnel may take.
const TUNNEL_TIMEOUT: Duration = Duration::from_secs(15);

/// The proxy protocols.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Scheme {
    /// SOCKS5 (RFC 1928), with RFC 1929 user and password when given.
    Socks5,
    /// An HTTP proxy's `CONNECT`, with Basic auth when given.
    Http,
}

/// A parsed proxy URL.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl {
    /// Which protocol.
    pub scheme: Scheme,
    /// The proxy's host (a name, an IPv4 or a bracketless IPv6 address).
    pub host: String,
    /// Its port.
    pub port: u16,
    /// User and password, if it needs them.
    auth: Option<(String, String)>,
}

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

/// Percent-decodes a URL's user or password.
fn decoded(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            out.push(u8::from_str_radix(s.get(i + 1..i + 3)?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl ProxyUrl {
    /// Parses `socks5://[user:pass@]host:port` or `http://[user:pass@]host:port`
    /// (`socks5h://` is taken as `socks5://`: the proxy always resolves names). The error
    /// never repeats the input (it may hold a password).
    pub fn parse(url: &str) -> Result<ProxyUrl, String> {
        let usage =
            "a proxy is socks5://[user:password@]host:port or http://[user:password@]host:port";
        let (scheme, rest) = match url.split_once("://") {
            Some(("socks5" | "socks5h", rest)) => (Scheme::Socks5, rest),
            Some(("http", rest)) => (Scheme::Http, rest),
            _ => return Err(usage.into()),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', ' ']) || rest.len() > 1024 {
            return Err(usage.into());
        }
        let (auth, hostport) = match rest.rsplit_once('@') {
            Some((auth, hostport)) => {
                let (user, pass) = auth.split_once(':').unwrap_or((auth, ""));
                let user = decoded(user).ok_or_else(|| usage.to_string())?;
                let pass = decoded(pass).ok_or_else(|| usage.to_string())?;
                if user.is_empty() || user.len() > 255 || pass.len() > 255 {
                    return Err(
                        "a proxy's user must be 1-255 bytes and its password at most 255".into(),
                    );
                }
                (Some((user, pass)), hostport)
            }
            None => (None, rest),
        };
        let (host, port) = hostport
            .rsplit_once(':')
            .ok_or("a proxy needs its port (host:port)")?;
        // An IPv6 address comes in brackets and must be one; a name or an IPv4 address
        // has no colon or bracket.
        let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => v6,
            Some(_) => return Err("a proxy's host in brackets must be an IPv6 address".into()),
            None if host.contains([':', '[', ']']) => {
                return Err("a proxy's host must be a name or an IP address".into())
            }
            None => host,
        };
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or("a proxy's port must be 1-65535")?;
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '_'));
        if !host_ok {
            return Err("a proxy's host must be a name or an IP address".into());
        }
        Ok(ProxyUrl {
            scheme,
            host: host.to_string(),
            port,
            auth,
        })
    }

    /// The HTTP client's proxy for the same route (media uploads and downloads go where
    /// the session's socket goes). A SOCKS5 proxy resolves names itself, as the socket's
    /// tunnel lets it.
    pub fn for_http(&self) -> Result<ureq::Proxy, String> {
        use ureq::ProxyProtocol;
        let protocol = match self.scheme {
            Scheme::Socks5 => ProxyProtocol::Socks5h,
            Scheme::Http => ProxyProtocol::Http,
        };
        let mut b = ureq::Proxy::builder(protocol)
            .host(&self.host)
            .port(self.port);
        if let Some((user, password)) = &self.auth {
            b = b.username(user).password(password);
        }
        b.build()
            .map_err(|e| format!("proxy {}: {e}", self.redacted()))
    }

    /// The URL as given, password and all: only for storing it.
    pub fn secret_url(&self) -> String {
        let scheme = match self.scheme {
            Scheme::Socks5 => "socks5",
            Scheme::Http => "http",
        };
        let host = self.host_for_url();
        match &self.auth {
            Some((u, p)) => format!(
                "{scheme}://{}:{}@{host}:{}",
                encoded(u),
                encoded(p),
                self.port
            ),
            None => format!("{scheme}://{host}:{}", self.port),
        }
    }

    fn host_for_url(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }

    /// The URL with the password masked: what messages, logs and the API show.
    pub fn redacted(&self) -> String {
        let scheme = match self.scheme {
            Scheme::Socks5 => "socks5",
            Scheme::Http => "http",
        };
        let host = self.host_for_url();
        match &self.auth {
            Some((u, _)) => format!("{scheme}://{}:***@{host}:{}", encoded(u), self.port),
            None => format!("{scheme}://{host}:{}", self.port),
        }
    }

    /// A TCP stream to `host:port` through the proxy, the tunnel open. The error names
    /// the proxy (without its password) and what went wrong.
    pub async fn tunnel(&self, host: &str, port: u16) -> Result<TcpStream, String> {
        let why = |e: &dyn std::fmt::Display| format!("proxy {}: {e}", self.redacted());
        let work = async {
            let socket = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|e| why(&e))?;
            let _ = socket.set_nodelay(true);
            match self.scheme {
                Scheme::Socks5 => {
                    let s = match &self.auth {
                        Some((u, p)) => {
                            tokio_socks::tcp::Socks5Stream::connect_with_password_and_socket(
                                socket,
                                (host, port),
                                u,
                                p,
                            )
                            .await
                        }
                        None => {
                            tokio_socks::tcp::Socks5Stream::connect_with_socket(
                                socket,
                                (host, port),
                            )
                            .await
                        }
                    };
                    s.map(|s| s.into_inner()).map_err(|e| why(&e))
                }
                Scheme::Http => self.connect_through_http(socket, host, port).await,
            }
        };
        match tokio::time::timeout(TUNNEL_TIMEOUT, work).await {
            Ok(r) => r,
            Err(_) => Err(why(&format!(
                "no tunnel within {} s",
                TUNNEL_TIMEOUT.as_secs()
            ))),
        }
    }

    /// `CONNECT host:port` on an HTTP proxy; the stream once it answered 2xx.
    async fn connect_through_http(
        &self,
        mut socket: TcpStream,
        host: &str,
        port: u16,
    ) -> Result<TcpStream, String> {
        use base64::Engine;
        let why = |e: &dyn std::fmt::Display| format!("proxy {}: {e}", self.redacted());
        let target = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some((u, p)) = &self.auth {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"));
            req.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
        }
        req.push_str("\r\n");
        socket
            .write_all(req.as_bytes())
            .await
            .map_err(|e| why(&e))?;
        // The answer's head, byte by byte: nothing of the tunnel may be read past it.
        let mut head = Vec::with_capacity(256);
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() > 8192 {
                return Err(why(&"its answer to CONNECT is too long"));
            }
            match socket.read(&mut byte).await {
                Ok(0) => return Err(why(&"it closed the connection during CONNECT")),
                Ok(_) => head.push(byte[0]),
                Err(e) => return Err(why(&e)),
            }
        }
        let line = String::from_utf8_lossy(&head);
        let status = line.lines().next().unwrap_or_default();
        match status.split_whitespace().nth(1) {
            Some(code) if code.starts_with('2') => Ok(socket),
            Some(_) => Err(why(&format!("CONNECT answered {}", status.trim()))),
            None => Err(why(&"it did not answer CONNECT with HTTP")),
        }
    }
}

/// Percent-encodes a user or password for a URL.
fn encoded(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Which proxy each session uses: its own, or the default (`--proxy`).
#[derive(Default)]
pub struct Proxies {
    default: Option<ProxyUrl>,
    own: RwLock<HashMap<String, ProxyUrl>>,
    /// Sessions whose create (with a proxy) is under way: one at a time per id, so a
    /// second create's proxy never replaces the first's before it connects.
    creating: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// A create's hold on its session id (see [`Proxies::hold_for_create`]); let go on drop.
pub struct CreateHold {
    proxies: Arc<Proxies>,
    user_id: String,
}

impl Drop for CreateHold {
    fn drop(&mut self) {
        self.proxies
            .creating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.user_id);
    }
}

impl Proxies {
    /// With `default` for the sessions that have none of their own.
    pub fn new(default: Option<ProxyUrl>) -> Arc<Proxies> {
        Arc::new(Proxies {
            default,
            own: RwLock::default(),
            creating: std::sync::Mutex::default(),
        })
    }

    /// Holds `user_id` for a create that brings its own proxy; `None` when another
    /// create of that id holds it.
    pub fn hold_for_create(self: &Arc<Self>, user_id: &str) -> Option<CreateHold> {
        let fresh = self
            .creating
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(user_id.to_string());
        fresh.then(|| CreateHold {
            proxies: self.clone(),
            user_id: user_id.to_string(),
        })
    }

    /// The proxy session `user_id` connects through, if any.
    pub fn for_session(&self, user_id: &str) -> Option<ProxyUrl> {
        self.own_of(user_id).or_else(|| self.default.clone())
    }

    /// The session's own proxy, if it has one.
    pub fn own_of(&self, user_id: &str) -> Option<ProxyUrl> {
        self.own
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(user_id)
            .cloned()
    }

    /// The default proxy.
    pub fn default_proxy(&self) -> Option<&ProxyUrl> {
        self.default.as_ref()
    }

    /// Sets (or with `None` clears) a session's own proxy; what it had.
    pub fn set(&self, user_id: &str, proxy: Option<ProxyUrl>) -> Option<ProxyUrl> {
        let mut own = self.own.write().unwrap_or_else(|p| p.into_inner());
        match proxy {
            Some(p) => own.insert(user_id.to_string(), p),
            None => own.remove(user_id),
        }
    }

    /// Every session's own proxy, as stored (`user_id` → URL with its password).
    pub fn stored(&self) -> HashMap<String, String> {
        self.own
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.secret_url()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_parse_and_never_show_their_password() {
        let p = ProxyUrl::parse("socks5://bot:pa%3Ass@127.0.0.1:1080").unwrap();
        assert_eq!(p.scheme, Scheme::Socks5);
        assert_eq!((p.host.as_str(), p.port), ("127.0.0.1", 1080));
        assert_eq!(p.redacted(), "socks5://bot:***@127.0.0.1:1080");
        assert_eq!(format!("{p:?}"), "socks5://bot:***@127.0.0.1:1080");
        assert_eq!(p.secret_url(), "socks5://bot:pa%3Ass@127.0.0.1:1080");
        assert_eq!(ProxyUrl::parse(&p.secret_url()).unwrap(), p);
        let h = ProxyUrl::parse("http://proxy.example:3128/").unwrap();
        assert_eq!(h.scheme, Scheme::Http);
        assert_eq!(h.redacted(), "http://proxy.example:3128");
        let v6 = ProxyUrl::parse("socks5://[::1]:1080").unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.redacted().as_str()),
            ("::1", "socks5://[::1]:1080")
        );
        for bad in [
            "ftp://h:1",
            "socks5://[:dBfc3]:1080",
            "socks5://a:b:1080",
            "socks5://h",
            "socks5://h:0",
            "socks5://h:99999",
            "socks5://:1080",
            "http://h:1/path",
            "socks5://u:p@h o:1",
            "h:1080",
        ] {
            let e = ProxyUrl::parse(bad).unwrap_err();
            assert!(!e.contains(bad), "{bad}: the error repeats the input: {e}");
        }
        let e = ProxyUrl::parse("socks5://user:hunter2@h").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn a_session_uses_its_own_proxy_or_the_default() {
        let d = ProxyUrl::parse("socks5://127.0.0.1:1").unwrap();
        let own = ProxyUrl::parse("http://127.0.0.1:2").unwrap();
        let p = Proxies::new(Some(d.clone()));
        assert_eq!(p.for_session("a"), Some(d.clone()));
        p.set("a", Some(own.clone()));
        assert_eq!(p.for_session("a"), Some(own));
        assert_eq!(p.for_session("b"), Some(d.clone()));
        p.set("a", None);
        assert_eq!(p.for_session("a"), Some(d));
        assert!(Proxies::new(None).for_session("a").is_none());
    }
}
