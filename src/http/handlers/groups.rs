//! A session's groups: `GET`/`POST /api/sessions/:userId/groups` (list, create),
//! `GET`/`PATCH …/groups/:groupId` (metadata; subject, description),
//! `POST …/groups/:groupId/participants` (add, remove, promote, demote),
//! `GET`/`DELETE …/groups/:groupId/invite` (the invite link; revoke it for a new one),
//! `POST …/groups/join` (by code or link) and `POST …/groups/:groupId/leave`. Each runs
//! on the network through the online session; what changes a group takes one token of
//! its `--send-rate`.

use hyper::{Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use botvisor_actors::{Action, Done, GroupInfo, GroupOp, ParticipantAction};

use super::messages::{over_send_rate, valid_recipient};
use super::{act, must_exist, wrong_answer};
use crate::http::errors::ApiError;
use crate::http::request::json_body;
use crate::http::response::{json_response, ok, Body, Success};
use crate::http::router::{Answer, Ctx};
use crate::http::App;
use crate::timefmt::iso;

/// WhatsApp's longest group subject, in characters.
pub const MAX_SUBJECT: usize = 100;
/// WhatsApp's longest group description, in characters.
pub const MAX_DESCRIPTION: usize = 2048;
/// People one request may add or change (WhatsApp's groups hold up to 1,024).
pub const MAX_PARTICIPANTS: usize = 256;
/// Where a group's invite code is a link.
const INVITE_LINK: &str = "https://chat.whatsapp.com/";

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct MemberView<'a> {
    jid: &'a str,
    admin: bool,
    super_admin: bool,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GroupView<'a> {
    /// Named as the path parameter is (as sessions carry `userId`).
    group_id: &'a str,
    subject: &'a str,
    description: Option<&'a str>,
    owner: Option<&'a str>,
    created_at: Option<String>,
    size: usize,
    participants: Vec<MemberView<'a>>,
}

impl<'a> GroupView<'a> {
    fn of(g: &'a GroupInfo) -> GroupView<'a> {
        GroupView {
            group_id: &g.id,
            subject: &g.subject,
            description: g.description.as_deref(),
            owner: g.owner.as_deref(),
            created_at: g.created_at_ms.map(iso),
            size: g.participants.len(),
            participants: g
                .participants
                .iter()
                .map(|p| MemberView {
                    jid: &p.jid,
                    admin: p.admin || p.super_admin,
                    super_admin: p.super_admin,
                })
                .collect(),
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Listed<'a> {
    user_id: &'a str,
    count: usize,
    groups: Vec<GroupView<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct OneGroup<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'static str>,
    user_id: &'a str,
    group_id: &'a str,
    group: GroupView<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Changed<'a> {
    message: &'static str,
    user_id: &'a str,
    group_id: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ParticipantResult {
    jid: String,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ParticipantsChanged<'a> {
    message: &'static str,
    user_id: &'a str,
    group_id: &'a str,
    action: &'static str,
    results: Vec<ParticipantResult>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Invite<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'static str>,
    user_id: &'a str,
    group_id: &'a str,
    code: &'a str,
    invite_link: String,
}

#[derive(Deserialize)]
struct CreateBody {
    subject: Option<Value>,
    participants: Option<Value>,
}

#[derive(Deserialize)]
struct UpdateBody {
    subject: Option<Value>,
    #[serde(default, with = "present")]
    description: Option<Value>,
}

/// `description` present (even `null`) vs absent.
mod present {
    use serde::{Deserialize, Deserializer};
    use serde_json::Value;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
        Value::deserialize(d).map(Some)
    }
}

#[derive(Deserialize)]
struct ParticipantsBody {
    action: Option<Value>,
    participants: Option<Value>,
}

#[derive(Deserialize)]
struct JoinBody {
    code: Option<Value>,
}

/// The group of the path, as a JID: `<digits>[-<digits>]`, `@g.us` optional.
fn group_id(c: &Ctx) -> Result<String, ApiError> {
    let raw = c.sub.strip_suffix("@g.us").unwrap_or(&c.sub);
    let valid =
        |part: &str| (1..=32).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit());
    let ok = match raw.split_once('-') {
        Some((a, b)) => valid(a) && valid(b),
        None => valid(raw),
    };
    if ok {
        Ok(format!("{raw}@g.us"))
    } else {
        Err(ApiError::bad_request(
            "groupId must be a group id (digits, or digits-digits, with or without @g.us)",
        ))
    }
}

/// A subject: 1 to [`MAX_SUBJECT`] characters, not blank, no control characters.
fn subject_of(v: Value) -> Result<String, ApiError> {
    match v {
        Value::String(s)
            if !s.trim().is_empty()
                && s.chars().count() <= MAX_SUBJECT
                && !s.chars().any(char::is_control) =>
        {
            Ok(s)
        }
        _ => Err(ApiError::bad_request(format!(
            "subject must be a name of 1 to {MAX_SUBJECT} characters (no control characters)"
        ))),
    }
}

/// People: 1 to [`MAX_PARTICIPANTS`] phone numbers or user JIDs (`…@s.whatsapp.net`,
/// `…@lid`), as JIDs, without repeats.
fn participants_of(v: Option<Value>) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::bad_request(format!(
            "participants must be a list of 1 to {MAX_PARTICIPANTS} phone numbers (digits, with \
             the country code) or user JIDs (…@s.whatsapp.net, …@lid)"
        ))
    };
    let list = match v {
        Some(Value::Array(list)) if (1..=MAX_PARTICIPANTS).contains(&list.len()) => list,
        _ => return Err(bad()),
    };
    let mut out: Vec<String> = Vec::with_capacity(list.len());
    for p in list {
        let Value::String(p) = p else {
            return Err(bad());
        };
        let p = p.trim_start_matches('+');
        if !valid_recipient(p) || p.ends_with("@g.us") || p.ends_with("@newsletter") {
            return Err(bad());
        }
        let jid = crate::link::chat_jid(p);
        if !out.contains(&jid) {
            out.push(jid);
        }
    }
    Ok(out)
}

/// An invite code, or a link that ends in one: 6 to 64 letters and digits.
fn code_of(v: Option<Value>) -> Result<String, ApiError> {
    let bad = || {
        ApiError::bad_request(format!(
            "code must be a group invite code or link ({INVITE_LINK}<code>)"
        ))
    };
    let Some(Value::String(s)) = v else {
        return Err(bad());
    };
    let code = s.strip_prefix(INVITE_LINK).unwrap_or(&s);
    if (6..=64).contains(&code.len()) && code.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(code.to_string())
    } else {
        Err(bad())
    }
}

/// Runs `op` on the session's network; the groups it answers.
async fn groups_of(app: &App, id: &str, op: GroupOp) -> Result<Vec<GroupInfo>, ApiError> {
    match act(app, id, Action::Group(op)).await? {
        Done::Groups(g) => Ok(g),
        other => Err(wrong_answer("group", &other)),
    }
}

/// 404 unless the session exists; a 429 answer when the change may not go now
/// (`--send-rate`).
fn may_change(app: &App, id: &str) -> Result<Option<Response<Body>>, ApiError> {
    must_exist(app, id)?;
    Ok(over_send_rate(app, id))
}

pub async fn list(c: Ctx) -> Answer {
    must_exist(&c.app, &c.id)?;
    // In id order, whatever order the link gives them in.
    let mut groups = groups_of(&c.app, &c.id, GroupOp::List).await?;
    groups.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(ok(&Listed {
        user_id: &c.id,
        count: groups.len(),
        groups: groups.iter().map(GroupView::of).collect(),
    }))
}

pub async fn create(c: Ctx) -> Answer {
    let body: CreateBody = json_body(c.req, false, c.app.request_timeout)
        .await?
        .ok_or_else(|| ApiError::bad_request("subject and participants are required"))?;
    let subject = subject_of(body.subject.unwrap_or(Value::Null))?;
    let participants = participants_of(body.participants)?;
    if let Some(refused) = may_change(&c.app, &c.id)? {
        return Ok(refused);
    }
    let made = groups_of(
        &c.app,
        &c.id,
        GroupOp::Create {
            subject,
            participants,
        },
    )
    .await?;
    let group = made
        .first()
        .ok_or_else(|| wrong_answer("group create", &Done::Taken))?;
    Ok(json_response(
        StatusCode::CREATED,
        &Success::new(&OneGroup {
            message: Some("Group created"),
            user_id: &c.id,
            group_id: &group.id,
            group: GroupView::of(group),
        }),
    ))
}

pub async fn info(c: Ctx) -> Answer {
    let group = group_id(&c)?;
    must_exist(&c.app, &c.id)?;
    let found = groups_of(&c.app, &c.id, GroupOp::Info { group }).await?;
    let group = found
        .first()
        .ok_or_else(|| wrong_answer("group info", &Done::Taken))?;
    Ok(ok(&OneGroup {
        message: None,
        user_id: &c.id,
        group_id: &group.id,
        group: GroupView::of(group),
    }))
}

pub async fn update(c: Ctx) -> Answer {
    let group = group_id(&c)?;
    let body: UpdateBody = json_body(c.req, false, c.app.request_timeout)
        .await?
        .ok_or_else(|| ApiError::bad_request("subject or description is required"))?;
    let subject = body.subject.map(subject_of).transpose()?;
    let description = match body.description {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(d)) if d.chars().count() <= MAX_DESCRIPTION => {
            Some((!d.is_empty()).then_some(d))
        }
        Some(_) => {
            return Err(ApiError::bad_request(format!(
                "description must be a text of at most {MAX_DESCRIPTION} characters, or null to clear it"
            )))
        }
    };
    if subject.is_none() && description.is_none() {
        return Err(ApiError::bad_request("subject or description is required"));
    }
    if let Some(refused) = may_change(&c.app, &c.id)? {
        return Ok(refused);
    }
    match act(
        &c.app,
        &c.id,
        Action::Group(GroupOp::Update {
            group: group.clone(),
            subject,
            description,
        }),
    )
    .await?
    {
        Done::Taken => {}
        other => return Err(wrong_answer("group update", &other)),
    }
    Ok(ok(&Changed {
        message: "Group updated",
        user_id: &c.id,
        group_id: &group,
    }))
}

pub async fn participants(c: Ctx) -> Answer {
    let group = group_id(&c)?;
    let body: ParticipantsBody = json_body(c.req, false, c.app.request_timeout)
        .await?
        .ok_or_else(|| ApiError::bad_request("action and participants are required"))?;
    let action = match body.action {
        Some(Value::String(a)) => match a.as_str() {
            "add" => ParticipantAction::Add,
            "remove" => ParticipantAction::Remove,
            "promote" => ParticipantAction::Promote,
            "demote" => ParticipantAction::Demote,
            _ => return Err(bad_action()),
        },
        _ => return Err(bad_action()),
    };
    let people = participants_of(body.participants)?;
    if let Some(refused) = may_change(&c.app, &c.id)? {
        return Ok(refused);
    }
    let op = GroupOp::Participants {
        group: group.clone(),
        action,
        participants: people,
    };
    let changes = match act(&c.app, &c.id, Action::Group(op)).await? {
        Done::Participants(c) => c,
        other => return Err(wrong_answer("group participants", &other)),
    };
    Ok(ok(&ParticipantsChanged {
        message: "Participants changed",
        user_id: &c.id,
        group_id: &group,
        action: action.as_str(),
        results: changes
            .into_iter()
            .map(|ch| ParticipantResult {
                ok: ch.error.is_none(),
                jid: ch.jid,
                error: ch.error,
            })
            .collect(),
    }))
}

fn bad_action() -> ApiError {
    ApiError::bad_request("action must be one of add, remove, promote, demote")
}

async fn invite_answer(c: Ctx, reset: bool) -> Answer {
    let group = group_id(&c)?;
    let refused = if reset {
        may_change(&c.app, &c.id)?
    } else {
        must_exist(&c.app, &c.id)?;
        None
    };
    if let Some(refused) = refused {
        return Ok(refused);
    }
    let op = GroupOp::Invite {
        group: group.clone(),
        reset,
    };
    let code = match act(&c.app, &c.id, Action::Group(op)).await? {
        Done::Invite(code) => code,
        other => return Err(wrong_answer("group invite", &other)),
    };
    Ok(ok(&Invite {
        message: reset.then_some("Invite link revoked; this is the new one"),
        user_id: &c.id,
        group_id: &group,
        invite_link: format!("{INVITE_LINK}{code}"),
        code: &code,
    }))
}

pub async fn invite(c: Ctx) -> Answer {
    invite_answer(c, false).await
}

pub async fn revoke_invite(c: Ctx) -> Answer {
    invite_answer(c, true).await
}

pub async fn join(c: Ctx) -> Answer {
    let body: JoinBody = json_body(c.req, false, c.app.request_timeout)
        .await?
        .ok_or_else(|| ApiError::bad_request("code is required"))?;
    let code = code_of(body.code)?;
    if let Some(refused) = may_change(&c.app, &c.id)? {
        return Ok(refused);
    }
    let joined = groups_of(&c.app, &c.id, GroupOp::Join { code }).await?;
    let group = joined
        .first()
        .ok_or_else(|| wrong_answer("group join", &Done::Taken))?;
    Ok(ok(&OneGroup {
        message: Some("Joined the group"),
        user_id: &c.id,
        group_id: &group.id,
        group: GroupView::of(group),
    }))
}

pub async fn leave(c: Ctx) -> Answer {
    let group = group_id(&c)?;
    if let Some(refused) = may_change(&c.app, &c.id)? {
        return Ok(refused);
    }
    match act(
        &c.app,
        &c.id,
        Action::Group(GroupOp::Leave {
            group: group.clone(),
        }),
    )
    .await?
    {
        Done::Taken => {}
        other => return Err(wrong_answer("group leave", &other)),
    }
    Ok(ok(&Changed {
        message: "Left the group",
        user_id: &c.id,
        group_id: &group,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn participants_are_phones_or_user_jids_without_repeats() {
        let ok = participants_of(Some(json!(["+15551234567", "15551234567", "123@lid"]))).unwrap();
        assert_eq!(ok, ["15551234567@s.whatsapp.net", "123@lid"]);
        for bad in [
            json!([]),
            json!("15551234567"),
            json!(["120363@g.us"]),
            json!(["../x"]),
            json!([15551234567u64]),
            json!(vec!["15551234567"; MAX_PARTICIPANTS + 1]),
        ] {
            assert!(participants_of(Some(bad.clone())).is_err(), "{bad}");
        }
    }

    #[test]
    fn codes_are_taken_bare_or_as_links() {
        assert_eq!(
            code_of(Some(json!("AbCdEf123456"))).unwrap(),
            "AbCdEf123456"
        );
        assert_eq!(
            code_of(Some(json!("https://chat.whatsapp.com/AbCdEf123456"))).unwrap(),
            "AbCdEf123456"
        );
        for bad in [
            json!("abc"),
            json!("https://evil.example/AbCdEf123456"),
            json!(5),
        ] {
            assert!(code_of(Some(bad.clone())).is_err(), "{bad}");
        }
    }
}
