//! What `POST /api/sessions/:id/messages` sends: exactly one of `text`, `location`,
//! `contact`, `poll` or a media kind (`image`, `video`, `audio`, `document`, `sticker`),
//! checked here into an [`Outgoing`] with a clear 400 for every bad shape. Media comes as
//! `{"data": base64}` (decoded here) or `{"url"}` (fetched by `media.rs` before the send).
//! A key given as `null` counts as given (and is refused as the wrong type), as a text's
//! always was.

use std::sync::Arc;

use serde_json::{Map, Value};

use botvisor_actors::{Contact, Location, Media, MediaKind, MediaSource, Outgoing, Poll};

use super::messages::text_of;
use crate::http::errors::ApiError;
use crate::http::request::valid_phone;

/// The body keys that carry a message's content, in the order they are named in errors.
pub const KINDS: [&str; 9] = [
    "text", "location", "contact", "poll", "image", "video", "audio", "document", "sticker",
];

/// The kinds that carry a caption.
const MEDIA_CAPTIONED: [&str; 3] = ["image", "video", "document"];

/// Longest caption (characters) and file name.
const CAPTION_MAX: usize = 4_096;
const FILE_NAME_MAX: usize = 255;

/// WhatsApp's limits: a poll has 2 to 12 options.
const POLL_OPTIONS: std::ops::RangeInclusive<usize> = 2..=12;

/// Longest poll question, option, contact name and place name or address (characters).
const QUESTION_MAX: usize = 255;
const OPTION_MAX: usize = 100;
const NAME_MAX: usize = 256;
const ADDRESS_MAX: usize = 1_024;

/// The one content a send body carries. `body` is the whole JSON object.
pub fn outgoing_of(body: &Map<String, Value>) -> Result<Outgoing, ApiError> {
    let given = |key: &str| body.contains_key(key);
    let present: Vec<&str> = KINDS.iter().copied().filter(|k| given(k)).collect();
    if given("caption") && !matches!(present.as_slice(), [k] if MEDIA_CAPTIONED.contains(k)) {
        return Err(ApiError::bad_request(format!(
            "caption goes with one of {}",
            MEDIA_CAPTIONED.join(", ")
        )));
    }
    match present.as_slice() {
        // No content at all: the answer a text-only client always got.
        [] => text_of(None).map(Outgoing::Text),
        ["text"] => text_of(body.get("text").cloned()).map(Outgoing::Text),
        ["location"] => location_of(&body["location"]).map(Outgoing::Location),
        ["contact"] => contact_of(&body["contact"]).map(Outgoing::Contact),
        ["poll"] => poll_of(&body["poll"]).map(Outgoing::Poll),
        [kind] => media_of(kind, &body[*kind], body).map(Outgoing::Media),
        several => Err(ApiError::bad_request(format!(
            "give exactly one of {}; this body has {}",
            KINDS.join(", "),
            several.join(" and ")
        ))),
    }
}

/// Most people one text mentions.
pub const MENTIONS_MAX: usize = 256;

/// Who a text mentions (`mentions`: phone numbers or user JIDs, `@s.whatsapp.net` or
/// `@lid`), as JIDs, each once, in order; only a text mentions anyone.
pub fn mentions_of(body: &Map<String, Value>, content: &Outgoing) -> Result<Vec<String>, ApiError> {
    let Some(v) = body.get("mentions") else {
        return Ok(Vec::new());
    };
    if !matches!(content, Outgoing::Text(_)) {
        return Err(ApiError::bad_request("mentions go with a text"));
    }
    let bad = || {
        ApiError::bad_request(format!(
            "mentions must be a list of at most {MENTIONS_MAX} phone numbers (digits) or user JIDs (@s.whatsapp.net, @lid)"
        ))
    };
    let items = v
        .as_array()
        .filter(|a| a.len() <= MENTIONS_MAX)
        .ok_or_else(bad)?;
    let mut jids: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        let to = item
            .as_str()
            .filter(|t| super::messages::valid_recipient(t))
            .filter(|t| !t.ends_with("@g.us") && !t.ends_with("@newsletter"))
            .ok_or_else(bad)?;
        let jid = crate::link::chat_jid(to);
        if !jids.contains(&jid) {
            jids.push(jid);
        }
    }
    Ok(jids)
}

fn object<'a>(v: &'a Value, what: &str, shape: &str) -> Result<&'a Map<String, Value>, ApiError> {
    v.as_object()
        .ok_or_else(|| ApiError::bad_request(format!("{what} must be an object: {shape}")))
}

/// A non-empty string of at most `max` characters at `key`, or `None` when absent and
/// not `required`.
fn string_at(
    o: &Map<String, Value>,
    what: &str,
    key: &str,
    max: usize,
    required: bool,
) -> Result<Option<String>, ApiError> {
    match o.get(key) {
        None | Some(Value::Null) if !required => Ok(None),
        Some(Value::String(s)) if !s.trim().is_empty() && s.chars().count() <= max => {
            Ok(Some(s.clone()))
        }
        _ => Err(ApiError::bad_request(format!(
            "{what}.{key} must be a non-empty string of at most {max} characters"
        ))),
    }
}

fn degrees(o: &Map<String, Value>, key: &str, limit: f64) -> Result<f64, ApiError> {
    match o.get(key).and_then(Value::as_f64) {
        Some(d) if d.is_finite() && (-limit..=limit).contains(&d) => Ok(d),
        _ => Err(ApiError::bad_request(format!(
            "location.{key} must be a number of degrees from -{limit} to {limit}"
        ))),
    }
}

/// A media object: `{"url": "https://…"}` or `{"data": "<base64 or a data: URL>"}`,
/// with `mimetype`, `filename` (a document's name), `caption` (also taken from the body's
/// top level) and, for an audio, `voice`.
fn media_of(name: &str, v: &Value, body: &Map<String, Value>) -> Result<Media, ApiError> {
    let o = object(
        v,
        name,
        r#"{"url": "https://…"} or {"data": "<base64>"}, with "mimetype"?, "filename"?, "caption"?"#,
    )?;
    let (mimetype, source) = match (o.get("url"), o.get("data")) {
        (Some(Value::String(url)), None) => {
            super::media::check_url(url)
                .map_err(|e| ApiError::bad_request(format!("{name}.url: {e}")))?;
            (None, MediaSource::Url(url.clone()))
        }
        (None, Some(Value::String(data))) => {
            let (declared, bytes) = decode_data(data).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "{name}.data must be base64 (or a data: URL) of a non-empty file"
                ))
            })?;
            (declared, MediaSource::Bytes(Arc::new(bytes)))
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(format!(
                "{name} takes url or data, not both"
            )))
        }
        _ => {
            return Err(ApiError::bad_request(format!(
                "{name} needs url (a string) or data (base64)"
            )))
        }
    };
    media_with(name, o, body, mimetype, source)
}

/// A media uploaded as the request's body (`POST …/messages?kind=…`, streamed into a
/// file): its details (`caption`, `filename`, `voice`) from the query's `params`, its MIME
/// type the body's `Content-Type`.
pub fn uploaded_media(
    name: &str,
    params: &Map<String, Value>,
    mimetype: Option<String>,
    file: botvisor_actors::MediaFile,
) -> Result<Media, ApiError> {
    media_with(name, params, &Map::new(), mimetype, MediaSource::File(file))
}

/// A media's details around its source: `mimetype` (overriding what a `data:` URL
/// declared), `caption` (in `o`, or the body's top level), `filename`, `voice`.
fn media_with(
    name: &str,
    o: &Map<String, Value>,
    body: &Map<String, Value>,
    mut mimetype: Option<String>,
    source: MediaSource,
) -> Result<Media, ApiError> {
    let kind = MediaKind::ALL
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, k)| *k)
        .ok_or_else(|| ApiError::bad_request(format!("unknown kind {name}")))?;
    if let Some(m) = o.get("mimetype") {
        match m {
            Value::String(m) if valid_mimetype(m) => mimetype = Some(m.to_ascii_lowercase()),
            Value::Null => {}
            _ => {
                return Err(ApiError::bad_request(format!(
                    "{name}.mimetype must be a MIME type such as image/jpeg"
                )))
            }
        }
    }
    let caption = match (o.get("caption"), body.get("caption")) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(format!(
                "give the caption once: {name}.caption or caption"
            )))
        }
        (Some(_), None) => string_at(o, name, "caption", CAPTION_MAX, false)?,
        (None, Some(_)) => string_at(body, "the body", "caption", CAPTION_MAX, false)?,
        (None, None) => None,
    };
    if caption.is_some() && matches!(kind, MediaKind::Audio | MediaKind::Sticker) {
        return Err(ApiError::bad_request(format!(
            "{name} messages have no caption"
        )));
    }
    let file_name = string_at(o, name, "filename", FILE_NAME_MAX, false)?;
    if file_name
        .as_deref()
        .is_some_and(|f| f.contains(['/', '\\', '\0']))
    {
        return Err(ApiError::bad_request(format!(
            "{name}.filename must be a file name, not a path"
        )));
    }
    let voice = match o.get("voice").or_else(|| body.get("voice")) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) if kind == MediaKind::Audio => true,
        Some(Value::Bool(true)) => {
            return Err(ApiError::bad_request("voice goes with an audio"));
        }
        Some(_) => return Err(ApiError::bad_request("voice must be true or false")),
    };
    Ok(Media {
        kind,
        mimetype: mimetype.unwrap_or_default(),
        source,
        file_name,
        caption,
        voice,
    })
}

/// `type/subtype` of token characters (parameters such as `; codecs=opus` allowed).
pub fn valid_mimetype(m: &str) -> bool {
    let essence = m.split(';').next().unwrap_or("").trim();
    let token = |s: &str| {
        !s.is_empty()
            && s.len() <= 127
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    m.len() <= 255
        && m.is_ascii()
        && !m.contains(['\r', '\n'])
        && essence
            .split_once('/')
            .is_some_and(|(t, s)| token(t) && token(s))
}

/// Base64 (standard or URL-safe, padded or not, whitespace ignored), or a `data:` URL
/// (its MIME type too); `None` if it is neither, or empty.
fn decode_data(data: &str) -> Option<(Option<String>, Vec<u8>)> {
    use base64::Engine;
    let (declared, payload) = match data.strip_prefix("data:") {
        Some(rest) => {
            let (head, payload) = rest.split_once(',')?;
            let mime = head.strip_suffix(";base64")?;
            (
                Some(mime.to_ascii_lowercase()).filter(|m| valid_mimetype(m)),
                payload,
            )
        }
        None => (None, data),
    };
    let clean: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    // Lenient as most encoders' peers are: padding or not, stray low bits in the last
    // character ignored.
    let config = GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true);
    let alphabet = if clean.contains(['-', '_']) {
        &base64::alphabet::URL_SAFE
    } else {
        &base64::alphabet::STANDARD
    };
    let bytes = GeneralPurpose::new(alphabet, config).decode(&clean).ok()?;
    (!bytes.is_empty()).then_some((declared, bytes))
}

fn location_of(v: &Value) -> Result<Location, ApiError> {
    let o = object(
        v,
        "location",
        r#"{"latitude": 52.52, "longitude": 13.40, "name"?: "...", "address"?: "..."}"#,
    )?;
    Ok(Location {
        latitude: degrees(o, "latitude", 90.0)?,
        longitude: degrees(o, "longitude", 180.0)?,
        name: string_at(o, "location", "name", NAME_MAX, false)?,
        address: string_at(o, "location", "address", ADDRESS_MAX, false)?,
    })
}

fn contact_of(v: &Value) -> Result<Contact, ApiError> {
    let o = object(v, "contact", r#"{"name": "Ada", "phone": "15551234567"}"#)?;
    let name = string_at(o, "contact", "name", NAME_MAX, true)?.unwrap_or_default();
    let phone = match o.get("phone") {
        Some(Value::String(p)) if valid_phone(p) => p.clone(),
        _ => {
            return Err(ApiError::bad_request(
                "contact.phone must be a phone number with the country code (digits only, e.g. 15551234567)",
            ))
        }
    };
    Ok(Contact { name, phone })
}

fn poll_of(v: &Value) -> Result<Poll, ApiError> {
    let o = object(
        v,
        "poll",
        r#"{"question": "...", "options": ["a", "b"], "selectable"?: 1}"#,
    )?;
    let question = string_at(o, "poll", "question", QUESTION_MAX, true)?.unwrap_or_default();
    let bad_options = || {
        ApiError::bad_request(format!(
            "poll.options must be {} to {} distinct non-empty strings of at most {OPTION_MAX} characters",
            POLL_OPTIONS.start(),
            POLL_OPTIONS.end()
        ))
    };
    let items = o
        .get("options")
        .and_then(Value::as_array)
        .ok_or_else(bad_options)?;
    let mut options: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        match item.as_str() {
            Some(s)
                if !s.trim().is_empty()
                    && s.chars().count() <= OPTION_MAX
                    && !options.iter().any(|o| o == s) =>
            {
                options.push(s.to_string())
            }
            _ => return Err(bad_options()),
        }
    }
    if !POLL_OPTIONS.contains(&options.len()) {
        return Err(bad_options());
    }
    let selectable = match o.get("selectable") {
        None | Some(Value::Null) => 1,
        // JSON has one number type: 2.0 is a whole number too.
        Some(n) => match n.as_u64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && *f >= 1.0 && *f <= 12.0)
                .map(|f| f as u64)
        }) {
            Some(k) if (1..=options.len() as u64).contains(&k) => k as u32,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "poll.selectable must be a whole number from 1 to {} (the number of options)",
                    options.len()
                )))
            }
        },
    };
    Ok(Poll {
        question,
        options,
        selectable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::StatusCode;
    use serde_json::json;

    fn parse(v: Value) -> Result<Outgoing, (StatusCode, String)> {
        outgoing_of(v.as_object().unwrap()).map_err(|e| (e.status, e.message))
    }

    #[test]
    fn each_kind_parses() {
        assert_eq!(
            parse(json!({"text": "hi"})),
            Ok(Outgoing::Text("hi".into()))
        );
        assert_eq!(
            parse(json!({"location": {"latitude": -33.9, "longitude": 151.2, "name": "Quay"}})),
            Ok(Outgoing::Location(Location {
                latitude: -33.9,
                longitude: 151.2,
                name: Some("Quay".into()),
                address: None
            }))
        );
        assert_eq!(
            parse(json!({"contact": {"name": "Ada", "phone": "15551234567"}})),
            Ok(Outgoing::Contact(Contact {
                name: "Ada".into(),
                phone: "15551234567".into()
            }))
        );
        assert_eq!(
            parse(
                json!({"poll": {"question": "Lunch?", "options": ["pizza", "soup"], "selectable": 2}})
            ),
            Ok(Outgoing::Poll(Poll {
                question: "Lunch?".into(),
                options: vec!["pizza".into(), "soup".into()],
                selectable: 2
            }))
        );
        // null is given, and the wrong type
        assert!(parse(json!({"text": "hi", "poll": null})).is_err());
        assert!(parse(json!({"text": null})).is_err());
    }

    #[test]
    fn bad_shapes_are_told_apart() {
        let bad = |v: Value, needle: &str| {
            let (status, message) = parse(v.clone()).unwrap_err();
            assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
            assert!(message.contains(needle), "{v}: {message}");
        };
        bad(json!({}), "text must be a non-empty string");
        bad(json!({"text": "a", "poll": {}}), "exactly one of");
        bad(json!({"location": [1, 2]}), "location must be an object");
        bad(
            json!({"location": {"latitude": 91, "longitude": 0}}),
            "location.latitude",
        );
        bad(
            json!({"location": {"latitude": 0, "longitude": "1"}}),
            "location.longitude",
        );
        bad(
            json!({"location": {"latitude": 0, "longitude": 0, "name": ""}}),
            "location.name",
        );
        bad(
            json!({"contact": {"name": "A", "phone": "+1555"}}),
            "contact.phone",
        );
        bad(json!({"contact": {"phone": "15551234567"}}), "contact.name");
        bad(
            json!({"poll": {"question": "Q", "options": ["a"]}}),
            "poll.options",
        );
        bad(
            json!({"poll": {"question": "Q", "options": ["a", "a"]}}),
            "poll.options",
        );
        bad(
            json!({"poll": {"question": "Q", "options": ["a", 1]}}),
            "poll.options",
        );
        let thirteen: Vec<String> = (0..13).map(|i| i.to_string()).collect();
        bad(
            json!({"poll": {"question": "Q", "options": thirteen}}),
            "poll.options",
        );
        bad(
            json!({"poll": {"question": "Q", "options": ["a", "b"], "selectable": 3}}),
            "poll.selectable",
        );
        bad(json!({"poll": {"options": ["a", "b"]}}), "poll.question");
    }

    #[test]
    fn mentions_are_jids_of_a_text() {
        let body = json!({"text": "hi @15551234567", "mentions": ["15551234567", "42@lid", "15551234567@s.whatsapp.net"]});
        let body = body.as_object().unwrap();
        let content = outgoing_of(body).unwrap();
        assert_eq!(
            mentions_of(body, &content).unwrap(),
            ["15551234567@s.whatsapp.net", "42@lid"]
        );
        let poll =
            json!({"poll": {"question": "Q", "options": ["a", "b"]}, "mentions": ["15551234567"]});
        let poll = poll.as_object().unwrap();
        let content = outgoing_of(poll).unwrap();
        assert!(mentions_of(poll, &content).is_err());
        for bad in [
            json!("15551234567"),
            json!(["1@g.us"]),
            json!(["+1"]),
            json!([1]),
        ] {
            let body = json!({"text": "x", "mentions": bad});
            let body = body.as_object().unwrap();
            assert!(
                mentions_of(body, &Outgoing::Text("x".into())).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn media_parses_from_data_or_url() {
        let Ok(Outgoing::Media(m)) = parse(json!({"image": {"data": "aGVsbG8=", "caption": "hi"}}))
        else {
            panic!("an image")
        };
        assert_eq!(m.kind, MediaKind::Image);
        assert_eq!(m.bytes().map(|b| b.as_slice()), Some(&b"hello"[..]));
        assert_eq!(m.caption.as_deref(), Some("hi"));
        let Ok(Outgoing::Media(m)) = parse(
            json!({"document": {"data": "data:application/pdf;base64,aGVsbG8", "filename": "a.pdf"}, "caption": "c"}),
        ) else {
            panic!("a document")
        };
        assert_eq!(
            (m.mimetype.as_str(), m.file_name.as_deref()),
            ("application/pdf", Some("a.pdf"))
        );
        assert_eq!(m.caption.as_deref(), Some("c"));
        let Ok(Outgoing::Media(m)) =
            parse(json!({"audio": {"url": "https://example.com/a.ogg", "voice": true}}))
        else {
            panic!("an audio")
        };
        assert!(m.voice);
        assert_eq!(
            m.source,
            MediaSource::Url("https://example.com/a.ogg".into())
        );
    }

    #[test]
    fn bad_media_shapes_are_told_apart() {
        let bad = |v: Value, needle: &str| {
            let (status, message) = parse(v.clone()).unwrap_err();
            assert_eq!(status, StatusCode::BAD_REQUEST, "{v}");
            assert!(message.contains(needle), "{v}: {message}");
        };
        bad(json!({"image": "x"}), "image must be an object");
        bad(json!({"image": {}}), "url (a string) or data");
        bad(
            json!({"image": {"url": "https://a/b", "data": "aGk="}}),
            "not both",
        );
        bad(json!({"image": {"data": "!!"}}), "image.data");
        bad(json!({"image": {"data": ""}}), "image.data");
        bad(json!({"image": {"url": "ftp://a/b"}}), "image.url");
        bad(
            json!({"image": {"url": "https://a/b", "mimetype": "x"}}),
            "image.mimetype",
        );
        bad(
            json!({"audio": {"url": "https://a/b", "caption": "c"}}),
            "no caption",
        );
        bad(
            json!({"image": {"url": "https://a/b", "voice": true}}),
            "voice goes with an audio",
        );
        bad(
            json!({"document": {"url": "https://a/b", "filename": "../x"}}),
            "not a path",
        );
        bad(
            json!({"image": {"url": "https://a/b"}, "text": "x"}),
            "exactly one of",
        );
        bad(
            json!({"image": {"url": "https://a/b", "caption": "a"}, "caption": "b"}),
            "once",
        );
    }
}
