//! `GET /`: the dashboard. The server renders the table (so it reads without JavaScript,
//! refreshing every 5 s); the embedded script then keeps it live from `/api/events` and
//! adds the key field, the create form with the pairing code and its countdown, filters and
//! actions.

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

/// The page's script (live updates, actions); plain JS, no build step, no CDN.
const JS: &str = include_str!("dashboard.js");

const CSS: &str = "body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}\
header{display:flex;gap:1em;align-items:baseline}#live{font-size:.8em;color:#777}\
form{margin:.5em 0}input{margin:0 .5em 0 .2em}table{border-collapse:collapse;margin-top:.5em}\
td,th{border:1px solid #ccc;padding:3px 6px;text-align:left;font-size:.9em}\
tr.online td{background:#e8f8e8}tr.failed td,tr.logged_out td{background:#fde8e8}\
tr.restarting td,tr.disconnected td{background:#fff6dd}td button{font-size:.8em;margin-right:2px}\
#pairing{border:2px solid #2a7;padding:.5em 1em;display:inline-block}#pairing.expired{border-color:#c33}\
#pairing-code{font:bold 2.4em monospace;letter-spacing:.1em;margin:.2em 0}\
#status.bad{color:#b00}#status.good{color:#070}[hidden]{display:none!important}";

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
             <td>{state}</td><td>{desired}</td><td>{restarts}</td><td>{disconnects}</td><td>{err}</td>\
             <td title=\"updated {updated}\"></td><td></td></tr>\n",
            id = escape(&s.user_id),
            phone = escape(&s.phone_number),
            name = escape(s.name.as_deref().unwrap_or("")),
            status = if s.state == SessionState::Online { "online" } else { "offline" },
            state = s.state.as_str(),
            desired = s.desired.as_str(),
            restarts = s.restarts,
            disconnects = s.disconnects,
            err = escape(s.last_error.as_deref().unwrap_or("")),
            updated = iso(s.updated_at_ms),
        ));
    }
    if sessions.is_empty() {
        rows.push_str("<tr><td colspan=\"11\">No sessions yet. Create one with POST /api/sessions.</td></tr>\n");
    }
    let states: String = [
        "starting",
        "pairing",
        "connecting",
        "online",
        "disconnected",
        "restarting",
        "stopped",
        "failed",
        "logged_out",
    ]
    .iter()
    .map(|s| format!("<option>{s}</option>"))
    .collect();
    let html = format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <noscript><meta http-equiv=\"refresh\" content=\"5\"></noscript>\
         <title>botvisor</title><link rel=\"icon\" href=\"data:,\"><style>{css}</style></head>\n<body><header><h1>botvisor</h1>\
         <span id=\"live\">static</span><p id=\"summary\">{total} sessions, {online} online</p></header>\n\
         <form id=\"key-form\"><label>API key <input id=\"key\" type=\"password\" autocomplete=\"off\"></label>\
         <button>use key</button></form>\n\
         <form id=\"create-form\"><label>userId <input id=\"new-user\" required pattern=\"[A-Za-z0-9_\\-]{{1,64}}\"></label>\
         <label>phoneNumber <input id=\"new-phone\" required inputmode=\"numeric\"></label><button id=\"create\">create</button></form>\n\
         <section id=\"pairing\" hidden><p>Pairing code for <b id=\"pairing-user\"></b>: enter it on the phone under \
         Linked Devices &gt; Link with phone number</p><p id=\"pairing-code\"></p><p id=\"pairing-expiry\"></p></section>\n\
         <p id=\"status\"></p>\n<label>state <select id=\"filter\"><option value=\"\">all</option>{states}</select></label>\n\
         <table id=\"sessions\"><thead><tr><th>userId</th><th>phoneNumber</th><th>name</th><th>status</th>\
         <th>state</th><th>desired</th><th>restarts</th><th>disconnects</th><th>lastError</th><th>uptime</th><th></th>\
         </tr></thead><tbody id=\"rows\">\n{rows}</tbody></table>\n<script>{js}</script></body></html>\n",
        total = sessions.len(),
        css = CSS,
        js = JS,
    );
    super::response::typed("text/html; charset=utf-8", html)
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
