//! The push names senders gave in the messages a session received since the process
//! started, for `GET /api/sessions/:userId/contacts/:contactId/profile` (WhatsApp has no
//! query for another account's push name: it only comes with what that account sends).

use std::collections::HashMap;
use std::sync::Mutex;

/// Names kept per session; past it the session's names start over (a sender's name
/// comes back with its next message).
pub const PER_SESSION_MAX: usize = 10_000;

/// One session's names: sender JID (phone JID and LID alike) → push name.
type Names = HashMap<Box<str>, Box<str>>;

/// Session id → its [`Names`]. Nothing is allocated for a session that never received a
/// named message, nor for a name already known.
#[derive(Default)]
pub struct PushNames(Mutex<HashMap<Box<str>, Names>>);

impl PushNames {
    /// `name` is what the sender known as each of `jids` calls itself.
    pub fn remember(&self, user_id: &str, jids: &[&str], name: &str) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let names = match all.get_mut(user_id) {
            Some(names) => names,
            None => all.entry(user_id.into()).or_default(),
        };
        for jid in jids {
            if names.get(*jid).is_some_and(|n| &**n == name) {
                continue;
            }
            if names.len() >= PER_SESSION_MAX {
                names.clear();
            }
            names.insert((*jid).into(), name.into());
        }
    }

    /// The push name of the sender known as `jid`, if one of its messages gave it.
    pub fn get(&self, user_id: &str, jid: &str) -> Option<String> {
        let all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.get(user_id)?.get(jid).map(|n| n.to_string())
    }

    /// A deleted session's names go with it.
    pub fn forget(&self, user_id: &str) {
        let mut all = self.0.lock().unwrap_or_else(|p| p.into_inner());
        all.remove(user_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_kept_per_session_and_sender_and_bounded() {
        let names = PushNames::default();
        names.remember("a", &["1@s.whatsapp.net", "9@lid"], "Ann");
        names.remember("b", &["1@s.whatsapp.net"], "Other");
        assert_eq!(names.get("a", "9@lid").as_deref(), Some("Ann"));
        assert_eq!(names.get("a", "1@s.whatsapp.net").as_deref(), Some("Ann"));
        assert_eq!(names.get("b", "1@s.whatsapp.net").as_deref(), Some("Other"));
        names.remember("a", &["1@s.whatsapp.net"], "Ann B.");
        assert_eq!(
            names.get("a", "1@s.whatsapp.net").as_deref(),
            Some("Ann B.")
        );
        names.forget("a");
        assert_eq!(names.get("a", "9@lid"), None);
        for i in 0..=PER_SESSION_MAX {
            names.remember("c", &[&format!("{i}@s.whatsapp.net")], "n");
        }
        let kept = names.0.lock().unwrap()["c"].len();
        assert!(kept <= PER_SESSION_MAX, "{kept}");
    }
}
