//! What `POST /api/sessions/:id/messages` sends: exactly one of `text`, `location`,
//! `contact` or `poll`, checked here into an [`Outgoing`] with a clear 400 for every bad
//! shape. Media kinds are named and refused (400) until botvisor sends media. A key given
//! as `null` counts as given (and is refused as the wrong type), as a text's always was.

use serde_json::{Map, Value};

use botvisor_actors::{Contact, Location, Outgoing, Poll};

use super::messages::text_of;
use crate::http::errors::ApiError;
use crate::http::request::valid_phone;

/// The body keys that carry a message's content, in the order they are named in errors.
pub const KINDS: [&str; 4] = ["text", "location", "contact", "poll"];

/// Media kinds of the API, not sent yet.
pub const MEDIA_KINDS: [&str; 5] = ["image", "video", "audio", "document", "sticker"];

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
    if let Some(media) = MEDIA_KINDS.iter().find(|k| given(k)) {
        return Err(ApiError::bad_request(format!(
            "Sending {media} messages is not supported yet; send one of: {}",
            KINDS.join(", ")
        )));
    }
    let present: Vec<&str> = KINDS.iter().copied().filter(|k| given(k)).collect();
    match present.as_slice() {
        // No content at all: the answer a text-only client always got.
        [] => text_of(None).map(Outgoing::Text),
        ["text"] => text_of(body.get("text").cloned()).map(Outgoing::Text),
        ["location"] => location_of(&body["location"]).map(Outgoing::Location),
        ["contact"] => contact_of(&body["contact"]).map(Outgoing::Contact),
        ["poll"] => poll_of(&body["poll"]).map(Outgoing::Poll),
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
    fn media_is_refused_by_name() {
        let (status, message) = parse(json!({"image": {"url": "https://x/y.png"}})).unwrap_err();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(message.contains("image"), "{message}");
    }
}
