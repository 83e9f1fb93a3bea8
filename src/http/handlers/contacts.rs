//! `POST /api/sessions/:userId/contacts/check`: which phone numbers have a WhatsApp
//! account.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use botvisor_actors::{Action, Done, NumberCheck};

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
}
