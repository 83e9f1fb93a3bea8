//! Property tests (proptest at scale, as a stand-in for cargo-fuzz, which needs nightly):
//! the JSON body parser never panics and answers only 400/415 or a typed value; user ids
//! and phone numbers are accepted exactly by their rule, and an accepted id can never
//! lead a file path out of the data directory.

use std::path::Path;

use botvisor::http::request::{parse_json_object, valid_phone, valid_user_id};
use proptest::prelude::*;
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
#[allow(dead_code)]
struct Body {
    user_id: Option<Value>,
    phone_number: Option<Value>,
}

fn content_types() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(Some("application/json".to_string())),
        Just(None),
        ".{0,30}".prop_map(Some),
    ]
}

/// Any JSON value, nested a few levels.
fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        "\\PC{0,20}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::hash_map(
                prop_oneof![
                    Just("userId".to_string()),
                    Just("phoneNumber".to_string()),
                    "\\PC{0,8}"
                ],
                inner,
                0..8
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Bytes that are often JSON-ish: objects with odd members, and raw garbage.
fn bodies() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        json().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        (".{0,80}", ".{0,40}").prop_map(|(a, b)| {
            format!(
                r#"{{"userId":{},"phoneNumber":"{}"}}"#,
                serde_json::json!(a),
                b.replace('"', "")
            )
            .into_bytes()
        }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn the_body_parser_never_panics_and_only_refuses_with_400_or_415(
        bytes in bodies(), ct in content_types(), optional in any::<bool>()
    ) {
        match parse_json_object::<Body>(&bytes, ct.as_deref(), optional) {
            Ok(Some(_)) => {
                prop_assert_eq!(ct.as_deref(), Some("application/json"));
                let v: Value = serde_json::from_slice(&bytes).unwrap();
                prop_assert!(v.is_object());
            }
            Ok(None) => prop_assert!(optional && bytes.iter().all(|b| b.is_ascii_whitespace())),
            Err(e) => {
                prop_assert!([400, 415].contains(&e.status.as_u16()), "{}", e.status);
                prop_assert!(!e.message.is_empty());
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(20_000))]

    #[test]
    fn user_ids_are_accepted_exactly_by_their_rule_and_stay_in_the_data_dir(id in "\\PC{0,70}|[A-Za-z0-9_.-]{0,70}") {
        let rule = (1..=64).contains(&id.chars().count())
            && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        prop_assert_eq!(valid_user_id(&id), rule, "{:?}", id);
        if valid_user_id(&id) {
            let data = Path::new("/data");
            let file = botvisor::paths::credentials(data, &id);
            let sessions = data.join("sessions");
            prop_assert_eq!(file.parent(), Some(sessions.as_path()));
            prop_assert!(!id.contains(".."));
        }
    }

    #[test]
    fn phone_numbers_are_7_to_15_ascii_digits(p in "\\PC{0,20}|[0-9]{0,20}") {
        let rule = (7..=15).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit());
        prop_assert_eq!(valid_phone(&p), rule, "{:?}", p);
    }
}
