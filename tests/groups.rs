//! Groups on the simulated network, through the API: create, list, metadata, subject and
//! description, participants (add, remove, promote, demote; each answered on its own),
//! the invite link (revoked for a new one), join by link, leave; what only an admin may
//! do; a message written in a group arrives with the group as `chat` and its `author`;
//! and every bad shape is a clear 400.

mod common;

use common::Server;
use serde_json::{json, Value};

fn online(s: &Server, id: &str, phone: &str) {
    assert_eq!(s.create(id, phone).status, 201);
    s.wait_state(id, "online");
}

fn post(s: &Server, path: &str, body: Value) -> common::Resp {
    s.post(path, Some(&body.to_string()))
}

fn jid(phone: &str) -> String {
    format!("{phone}@s.whatsapp.net")
}

#[test]
fn a_group_is_made_changed_joined_and_left() {
    let s = Server::start(&[]);
    online(&s, "g_a", "15550000001");
    online(&s, "g_b", "15550000002");
    let r = post(
        &s,
        "/api/sessions/g_a/groups",
        json!({"subject": "Support", "participants": ["15550000003", "+15550000003"]}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let v = r.json();
    let group = v["groupId"].as_str().unwrap().to_string();
    assert!(group.ends_with("@g.us"), "{v}");
    assert_eq!(v["group"]["subject"], "Support");
    assert_eq!(v["group"]["size"], 2, "the creator and one other: {v}");
    assert_eq!(v["group"]["owner"], jid("15550000001"));
    let creator = &v["group"]["participants"][0];
    assert_eq!(creator["superAdmin"], true, "{v}");
    // Listed for its members, not for others.
    let list = s.get("/api/sessions/g_a/groups").json();
    assert_eq!(list["count"], 1, "{list}");
    assert_eq!(s.get("/api/sessions/g_b/groups").json()["count"], 0);
    // Subject and description; a bare id (no @g.us) names the same group.
    let bare = group.trim_end_matches("@g.us");
    let r = s.req(
        "PATCH",
        &format!("/api/sessions/g_a/groups/{bare}"),
        Some(r#"{"subject":"Support (EU)","description":"Write here"}"#),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let info = s.get(&format!("/api/sessions/g_a/groups/{group}")).json();
    assert_eq!(info["group"]["subject"], "Support (EU)", "{info}");
    assert_eq!(info["group"]["description"], "Write here", "{info}");
    let r = s.req(
        "PATCH",
        &format!("/api/sessions/g_a/groups/{group}"),
        Some(r#"{"description":null}"#),
        &[],
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let info = s.get(&format!("/api/sessions/g_a/groups/{group}")).json();
    assert!(info["group"]["description"].is_null(), "{info}");
    // Participants, each answered on its own.
    let people = format!("/api/sessions/g_a/groups/{group}/participants");
    let r = post(
        &s,
        &people,
        json!({"action": "add", "participants": ["15550000002", "15550000003"]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let results = r.json()["results"].clone();
    assert_eq!(
        results[0],
        json!({"jid": jid("15550000002"), "ok": true}),
        "{results}"
    );
    assert_eq!(results[1]["ok"], false, "already in: {results}");
    assert_eq!(s.get("/api/sessions/g_b/groups").json()["count"], 1);
    let r = post(
        &s,
        &people,
        json!({"action": "promote", "participants": ["15550000002"]}),
    );
    assert_eq!(r.json()["results"][0]["ok"], true, "{}", r.body);
    let info = s.get(&format!("/api/sessions/g_b/groups/{group}")).json();
    let b = info["group"]["participants"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["jid"] == jid("15550000002"))
        .cloned()
        .unwrap();
    assert_eq!(b["admin"], true, "{info}");
    let r = post(
        &s,
        &people,
        json!({"action": "demote", "participants": ["15550000002"]}),
    );
    assert_eq!(r.json()["results"][0]["ok"], true, "{}", r.body);
    // A plain member may not change people or read the invite link: the network says no.
    let r = post(
        &s,
        &format!("/api/sessions/g_b/groups/{group}/participants"),
        json!({"action": "remove", "participants": ["15550000003"]}),
    );
    assert!(r.error(409).contains("not an admin"), "{}", r.body);
    let r = s.get(&format!("/api/sessions/g_b/groups/{group}/invite"));
    assert_eq!(r.status, 409, "{}", r.body);
    let r = post(
        &s,
        &people,
        json!({"action": "remove", "participants": ["15550000002"]}),
    );
    assert_eq!(r.json()["results"][0]["ok"], true, "{}", r.body);
    assert_eq!(s.get("/api/sessions/g_b/groups").json()["count"], 0);
    // The invite link: g_b joins by it; a revoked one no longer works.
    let invite = s
        .get(&format!("/api/sessions/g_a/groups/{group}/invite"))
        .json();
    let link = invite["inviteLink"].as_str().unwrap().to_string();
    assert!(link.starts_with("https://chat.whatsapp.com/"), "{invite}");
    let r = s.delete(&format!("/api/sessions/g_a/groups/{group}/invite"));
    assert_eq!(r.status, 200, "{}", r.body);
    let fresh = r.json()["inviteLink"].as_str().unwrap().to_string();
    assert_ne!(fresh, link);
    let r = post(&s, "/api/sessions/g_b/groups/join", json!({"code": link}));
    assert!(
        r.error(404).contains("invite code"),
        "a revoked link: {}",
        r.body
    );
    let r = post(&s, "/api/sessions/g_b/groups/join", json!({"code": fresh}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["groupId"], group.as_str());
    assert_eq!(s.get("/api/sessions/g_b/groups").json()["count"], 1);
    // Leaving.
    let r = s.post(&format!("/api/sessions/g_b/groups/{group}/leave"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(s.get("/api/sessions/g_b/groups").json()["count"], 0);
    let r = s.get(&format!("/api/sessions/g_b/groups/{group}"));
    assert!(
        r.error(404).contains("not in group"),
        "not a member any more: {}",
        r.body
    );
    // A stopped session cannot reach its groups.
    assert_eq!(s.post("/api/sessions/g_b/stop", None).status, 200);
    let r = s.get("/api/sessions/g_b/groups");
    assert!(r.error(409).contains("not online"), "{}", r.body);
    assert_eq!(s.get("/api/sessions/nobody/groups").status, 404);
}

#[test]
fn bad_group_requests_are_clear_400s() {
    let s = Server::start(&[]);
    online(&s, "g_c", "15550000011");
    let cases: [(&str, &str, Option<Value>, &str); 10] = [
        (
            "POST",
            "/api/sessions/g_c/groups",
            Some(json!({"participants": ["15550000012"]})),
            "subject",
        ),
        (
            "POST",
            "/api/sessions/g_c/groups",
            Some(json!({"subject": "   ", "participants": ["15550000012"]})),
            "subject",
        ),
        (
            "POST",
            "/api/sessions/g_c/groups",
            Some(json!({"subject": "x".repeat(101), "participants": ["15550000012"]})),
            "subject",
        ),
        (
            "POST",
            "/api/sessions/g_c/groups",
            Some(json!({"subject": "S", "participants": []})),
            "participants",
        ),
        (
            "POST",
            "/api/sessions/g_c/groups",
            Some(json!({"subject": "S", "participants": ["120363@g.us"]})),
            "participants",
        ),
        ("GET", "/api/sessions/g_c/groups/..%2Fetc", None, "groupId"),
        (
            "PATCH",
            "/api/sessions/g_c/groups/120363000000000001",
            Some(json!({})),
            "subject or description",
        ),
        (
            "POST",
            "/api/sessions/g_c/groups/120363000000000001/participants",
            Some(json!({"action": "ban", "participants": ["15550000012"]})),
            "action",
        ),
        (
            "POST",
            "/api/sessions/g_c/groups/join",
            Some(json!({"code": "https://evil.example/AbCdEf123456"})),
            "code",
        ),
        (
            "POST",
            "/api/sessions/g_c/groups/join",
            Some(json!({"code": "abc"})),
            "code",
        ),
    ];
    for (method, path, body, names) in cases {
        let body = body.map(|b| b.to_string());
        let r = s.req(method, path, body.as_deref(), &[]);
        let msg = r.error(400);
        assert!(msg.contains(names), "{method} {path}: {msg}");
    }
    // Nothing was made.
    assert_eq!(s.get("/api/sessions/g_c/groups").json()["count"], 0);
}

#[test]
fn a_message_written_in_a_group_names_the_group_and_its_author() {
    let (hook, got) = common::json_receiver();
    let s = Server::start(&[
        "--webhook-url",
        &hook,
        "--webhook-secret",
        "group-webhook-secret-0123456789",
    ]);
    online(&s, "g_d", "15550000021");
    let r = post(
        &s,
        "/api/sessions/g_d/groups",
        json!({"subject": "Orders", "participants": ["15550000022"]}),
    );
    let group = r.json()["groupId"].as_str().unwrap().to_string();
    let r = post(
        &s,
        "/api/sim/g_d/inbound",
        json!({"chat": group, "author": "15550000022", "text": "two pizzas"}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let id = r.json()["messageId"].as_str().unwrap().to_string();
    let event = common::event_for(&got, &id);
    let d = &event["data"];
    assert_eq!(d["chat"], group.as_str(), "{event}");
    assert_eq!(d["isGroup"], true, "{event}");
    assert_eq!(d["author"], jid("15550000022"), "{event}");
    assert_eq!(d["from"], jid("15550000022"), "{event}");
    // The bot answers in the group: a reply to it quotes its author there.
    let r = post(
        &s,
        "/api/sessions/g_d/messages",
        json!({"to": group, "text": "on its way", "replyTo": id}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    // A group without an author, or an author that is a group, is refused.
    let r = post(
        &s,
        "/api/sim/g_d/inbound",
        json!({"chat": group, "text": "?"}),
    );
    assert!(r.error(400).contains("author"), "{}", r.body);
    let r = post(
        &s,
        "/api/sim/g_d/inbound",
        json!({"chat": "15550000022", "from": "15550000022", "text": "?"}),
    );
    assert!(r.error(400).contains("chat must be a group"), "{}", r.body);
    // One-to-one messages say so.
    let r = post(
        &s,
        "/api/sim/g_d/inbound",
        json!({"from": "15550000022", "text": "hi"}),
    );
    let one = r.json()["messageId"].as_str().unwrap().to_string();
    let v = common::event_for(&got, &one);
    assert_eq!(v["data"]["isGroup"], false, "{v}");
    assert!(v["data"].get("author").is_none(), "{v}");
}
