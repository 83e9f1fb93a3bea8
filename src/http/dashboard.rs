//! `GET /`: a plain page listing the sessions (refreshes itself every 5 s).

use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;

use botvisor_actors::{SessionRecord, SessionState};

use super::response::Body;
use crate::timefmt::iso;

/// Escapes text for HTML element and attribute content.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// The page.
pub fn page(sessions: &[SessionRecord]) -> Response<Body> {
    let online = sessions
        .iter()
        .filter(|s| s.state == SessionState::Online)
        .count();
    let mut rows = String::new();
    for s in sessions {
        rows.push_str(&format!(
            "<tr class=\"{state}\"><td>{id}</td><td>{phone}</td><td>{name}</td><td>{status}</td>\
             <td>{state}</td><td>{desired}</td><td>{restarts}</td><td>{err}</td><td>{updated}</td></tr>\n",
            id = escape(&s.user_id),
            phone = escape(&s.phone_number),
            name = escape(s.name.as_deref().unwrap_or("")),
            status = if s.state == SessionState::Online { "online" } else { "offline" },
            state = s.state.as_str(),
            desired = s.desired.as_str(),
            restarts = s.restarts,
            err = escape(s.last_error.as_deref().unwrap_or("")),
            updated = iso(s.updated_at_ms),
        ));
    }
    if sessions.is_empty() {
        rows.push_str("<tr><td colspan=\"9\">No sessions yet. Create one with POST /api/sessions.</td></tr>\n");
    }
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\"><title>botvisor</title>\
         <style>body{{font-family:system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}tr.online td{{background:#e8f8e8}}\
         tr.failed td,tr.logged_out td{{background:#fde8e8}}</style></head>\n<body><h1>botvisor</h1>\
         <p id=\"summary\">{total} sessions, {online} online</p>\n<table id=\"sessions\"><thead><tr><th>userId</th>\
         <th>phoneNumber</th><th>name</th><th>status</th><th>state</th><th>desired</th><th>restarts</th>\
         <th>lastError</th><th>updatedAt</th></tr></thead><tbody>\n{rows}</tbody></table></body></html>\n",
        total = sessions.len(),
    );
    let mut resp = Response::new(super::response::full(html));
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_markup() {
        assert_eq!(
            super::escape("<b a='1'>&\"</b>"),
            "&lt;b a=&#39;1&#39;&gt;&amp;&quot;&lt;/b&gt;"
        );
    }
}
