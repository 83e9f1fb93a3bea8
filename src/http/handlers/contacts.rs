//! `POST /api/sessions/:userId/contacts/check`: which phone numbers have a WhatsApp
//! account; `GET /api/sessions/:userId/contacts/:contactId/profile`: what WhatsApp says
//! of one (LID, "about", profile picture) and the push name its messages gave.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use botvisor_actors::{Action, Done, NumberCheck, Profile};

use super::{act, must_exist, wrong_answer};
use crate::http::errors::ApiError;
use crate::http::handlers::messages::over_send_rate;
use crate::http::request::{json_body, valid_phone};
use crate::http::response::ok;
use crate::http::router::{Answer, Ctx};

/// Numbers one request may check. WhatsApp bans accounts that probe many numbers; a
/// request also takes one from the session's `--send-rate` bucket.
pub const MAX_PHONES: usize = 50;

#[derive(Deserialize)]
struct CheckBody {
    phones: Option<Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Checked<'a> {
    user_id: &'a str,
    results: Vec<Result_>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Result_ {
    phone: String,
    #[serde(rename = "onWhatsApp")]
    on_whatsapp: bool,
    jid: Option<String>,
    lid: Option<String>,
}

impl From<NumberCheck> for Result_ {
    fn from(c: NumberCheck) -> Result_ {
        Result_ {
            phone: c.phone,
            on_whatsapp: c.on_whatsapp,
            jid: c.jid,
            lid: c.lid,
        }
    }
}

/// The numbers asked: 1 to [`MAX_PHONES`] strings of digits with the country code (a
/// leading `+` is allowed and dropped).
fn phones(v: Option<Value>) -> Result<Vec<String>, ApiError> {
    let shape = || {
        ApiError::bad_request(format!(
            "phones must be an array of 1 to {MAX_PHONES} phone numbers with the country code \
             (digits, e.g. \"15551234567\")"
        ))
    };
    let Some(Value::Array(items)) = v else {
        return Err(shape());
    };
    if items.is_empty() || items.len() > MAX_PHONES {
        return Err(shape());
    }
    items
        .iter()
        .map(|item| {
            let raw = item.as_str().ok_or_else(shape)?;
            let digits = raw.strip_prefix('+').unwrap_or(raw);
            if valid_phone(digits) {
                Ok(digits.to_string())
            } else {
                Err(ApiError::bad_request(format!(
                    "'{}' is not a phone number with the country code (7 to 15 digits)",
                    raw.chars().take(40).collect::<String>()
                )))
            }
        })
        .collect()
}

pub async fn check(c: Ctx) -> Answer {
    let body: CheckBody = json_body(c.req, false, c.app.request_timeout)
        .await?
        .ok_or_else(|| ApiError::bad_request("phones is required"))?;
    let phones = phones(body.phones)?;
    must_exist(&c.app, &c.id)?;
    if let Some(refused) = over_send_rate(&c.app, &c.id) {
        return Ok(refused);
    }
    let results = match act(&c.app, &c.id, Action::CheckNumbers { phones }).await? {
        Done::Checked(results) => results.into_iter().map(Result_::from).collect(),
        other => return Err(wrong_answer("number check", &other)),
    };
    Ok(ok(&Checked {
        user_id: &c.id,
        results,
    }))
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProfileOf<'a> {
    user_id: &'a str,
    profile: ProfileFields,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ProfileFields {
    jid: String,
    lid: Option<String>,
    push_name: Option<String>,
    about: Option<String>,
    picture_id: Option<String>,
    picture_url: Option<String>,
    is_business: bool,
}

/// The contact of the path as a user JID: phone digits (with the country code), a phone
/// JID or a LID; never a group, a channel or a device.
fn contact_of(raw: &str) -> Result<String, ApiError> {
    let digits = raw.strip_prefix('+').unwrap_or(raw);
    if valid_phone(digits) {
        return Ok(format!("{digits}@s.whatsapp.net"));
    }
    match raw.split_once('@') {
        Some((user, "s.whatsapp.net" | "lid"))
            if (1..=64).contains(&user.len()) && user.bytes().all(|b| b.is_ascii_digit()) =>
        {
            Ok(raw.to_string())
        }
        _ => Err(ApiError::bad_request(
            "contactId must be a phone number with the country code (digits) or a user JID \
             (…@s.whatsapp.net, …@lid)",
        )),
    }
}

/// `GET /api/sessions/:userId/contacts/:contactId/profile`. Two queries to WhatsApp: it
/// takes one from the session's `--send-rate` bucket, as a number check does.
pub async fn profile(c: Ctx) -> Answer {
    let contact = contact_of(&c.sub)?;
    must_exist(&c.app, &c.id)?;
    if let Some(refused) = over_send_rate(&c.app, &c.id) {
        return Ok(refused);
    }
    let p: Profile = match act(&c.app, &c.id, Action::Profile { contact }).await? {
        Done::Profile(p) => *p,
        other => return Err(wrong_answer("profile query", &other)),
    };
    // WhatsApp has no query for another account's push name: its messages carry it.
    let push_name = [Some(&p.jid), p.lid.as_ref()]
        .into_iter()
        .flatten()
        .find_map(|jid| c.app.store.push_name(&c.id, jid));
    Ok(ok(&ProfileOf {
        user_id: &c.id,
        profile: ProfileFields {
            jid: p.jid,
            lid: p.lid,
            push_name,
            about: p.about,
            picture_id: p.picture_id,
            picture_url: p.picture_url,
            is_business: p.business,
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_are_digits_with_the_country_code_and_bounded() {
        let ok = phones(Some(serde_json::json!(["+15551234567", "4915112345678"]))).unwrap();
        assert_eq!(ok, ["15551234567", "4915112345678"]);
        for bad in [
            serde_json::json!([]),
            serde_json::json!("15551234567"),
            serde_json::json!([15551234567u64]),
            serde_json::json!(["555-1234"]),
            serde_json::json!(["../etc"]),
            serde_json::json!(vec!["15551234567"; MAX_PHONES + 1]),
        ] {
            assert!(phones(Some(bad.clone())).is_err(), "{bad}");
        }
        assert!(phones(None).is_err());
    }

    #[test]
    fn a_profile_is_asked_of_a_user_never_a_group_or_a_path() {
        assert_eq!(
            contact_of("+15551234567").unwrap(),
            "15551234567@s.whatsapp.net"
        );
        assert_eq!(contact_of("42@lid").unwrap(), "42@lid");
        for bad in [
            "1203@g.us",
            "1555:2@s.whatsapp.net",
            "..%2F..",
            "abc",
            "",
            "1@newsletter",
        ] {
            assert!(contact_of(bad).is_err(), "{bad}");
        }
    }
}
