//! The OpenAPI document (`src/http/openapi.json`) against the route table: every route is
//! documented, nothing else is, the key routes (and only they) declare security, and the
//! server serves the document as it is in the tree.

mod common;

use std::collections::BTreeSet;

use botvisor::http::router::ROUTES;
use common::Server;
use serde_json::Value;

const DOC_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/http/openapi.json");

/// Methods an OpenAPI path item can hold.
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

fn document() -> Value {
    let text =
        std::fs::read_to_string(DOC_PATH).unwrap_or_else(|e| panic!("cannot read {DOC_PATH}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DOC_PATH} is not JSON: {e}"))
}

/// A route's path as the document writes it.
fn openapi_path(path: &str) -> String {
    path.replace(":id", "{userId}")
        .replace(":eventId", "{eventId}")
        .replace(":chatId", "{chatId}")
        .replace(":contactId", "{contactId}")
        .replace(":messageId", "{messageId}")
        .replace(":keyId", "{keyId}")
        .replace(":groupId", "{groupId}")
        .replace(":nodeId", "{nodeId}")
}

/// (method, path) of every operation in the document.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("`paths` is an object");
    let mut ops = BTreeSet::new();
    for (path, item) in paths {
        let item = item.as_object().expect("a path item is an object");
        for method in item.keys().filter(|k| METHODS.contains(&k.as_str())) {
            ops.insert((method.clone(), path.clone()));
        }
    }
    ops
}

fn operation<'a>(doc: &'a Value, method: &str, path: &str) -> &'a Value {
    &doc["paths"][path][method]
}

#[test]
fn the_document_is_openapi_3_1() {
    let doc = document();
    let version = doc["openapi"].as_str().expect("`openapi` is a string");
    assert!(version.starts_with("3.1"), "openapi is {version}, not 3.1");
    let schemes = &doc["components"]["securitySchemes"];
    assert_eq!(schemes["ApiKeyHeader"]["type"], "apiKey");
    assert_eq!(schemes["ApiKeyHeader"]["in"], "header");
    assert_eq!(schemes["ApiKeyHeader"]["name"], "X-API-Key");
    assert_eq!(schemes["BearerAuth"]["type"], "http");
    assert_eq!(schemes["BearerAuth"]["scheme"], "bearer");
}

#[test]
fn every_route_is_documented_and_every_operation_is_a_route() {
    let doc = document();
    let documented = operations(&doc);
    let routes: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.as_str().to_ascii_lowercase(), openapi_path(r.path)))
        .collect();
    let undocumented: Vec<_> = routes.difference(&documented).collect();
    assert!(
        undocumented.is_empty(),
        "routes missing from {DOC_PATH}: {undocumented:?}"
    );
    let unrouted: Vec<_> = documented.difference(&routes).collect();
    assert!(
        unrouted.is_empty(),
        "operations in {DOC_PATH} that no route answers: {unrouted:?}"
    );
    // Every path parameter is declared under the name the path gives it (a session's
    // `userId`, a dead letter's `eventId`), with the server's own rule for ids.
    for (method, path) in &documented {
        let names: Vec<&str> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        if names.is_empty() {
            continue;
        }
        let op = operation(&doc, method, path);
        let params = op["parameters"].as_array().unwrap_or_else(|| {
            panic!("{method} {path} declares no parameters");
        });
        let resolved: Vec<&Value> = params
            .iter()
            .map(|p| match p["$ref"].as_str() {
                Some(r) => {
                    let name = r
                        .strip_prefix("#/components/parameters/")
                        .unwrap_or_else(|| panic!("{method} {path}: unexpected $ref {r}"));
                    &doc["components"]["parameters"][name]
                }
                None => p,
            })
            .collect();
        let in_path: Vec<&str> = resolved
            .iter()
            .filter(|p| p["in"] == "path")
            .filter_map(|p| p["name"].as_str())
            .collect();
        assert_eq!(in_path, names, "{method} {path}: path parameters");
        for name in names {
            let param = resolved
                .iter()
                .find(|p| p["in"] == "path" && p["name"] == name)
                .unwrap();
            assert_eq!(param["required"], true, "{method} {path}");
            // Ids share one alphabet; a chat is a phone number or a JID; a message id is
            // WhatsApp's (letters and digits).
            let pattern = match name {
                "chatId" => {
                    r"^([0-9]{7,15}|[0-9:.-]{1,64}(@|%40)(s\.whatsapp\.net|g\.us|lid|newsletter))$"
                }
                "contactId" => r"^([0-9]{7,15}|[0-9]{1,64}(@|%40)(s\.whatsapp\.net|lid))$",
                "messageId" => "^[A-Za-z0-9]{1,128}$",
                "groupId" => r"^[0-9]{1,32}(-[0-9]{1,32})?((@|%40)g\.us)?$",
                _ => "^[A-Za-z0-9_-]{1,64}$",
            };
            assert_eq!(param["schema"]["pattern"], pattern, "{method} {path}");
        }
    }
}

#[test]
fn the_replay_route_names_its_parameter_the_event_id() {
    let doc = document();
    assert!(doc["paths"]["/api/webhooks/dead/{eventId}/replay"]["post"].is_object());
    assert!(doc["paths"]["/api/webhooks/dead/{userId}/replay"].is_null());
}

#[test]
fn the_key_routes_and_only_they_declare_security() {
    let doc = document();
    assert!(
        doc.get("security").is_none(),
        "no document-wide security: it would cover the open routes too"
    );
    for r in ROUTES.iter() {
        let method = r.method.as_str().to_ascii_lowercase();
        let path = openapi_path(r.path);
        let op = operation(&doc, &method, &path);
        let security = op.get("security");
        if r.key {
            let schemes: BTreeSet<&str> = security
                .and_then(Value::as_array)
                .unwrap_or_else(|| panic!("{method} {path} needs the key but declares no security"))
                .iter()
                .flat_map(|req| req.as_object().into_iter().flat_map(|o| o.keys()))
                .map(String::as_str)
                .collect();
            assert_eq!(
                schemes,
                BTreeSet::from(["ApiKeyHeader", "BearerAuth"]),
                "{method} {path}: the key goes in X-API-Key or as a bearer token"
            );
            let unauthorized = &op["responses"]["401"];
            assert!(
                unauthorized.is_object(),
                "{method} {path} needs the key but documents no 401"
            );
        } else {
            assert!(
                security.is_none_or(|s| s.as_array().is_some_and(Vec::is_empty)),
                "{method} {path} is open but declares security: {security:?}"
            );
        }
        if r.public {
            assert!(
                ["/healthz", "/readyz"].contains(&r.path),
                "{} is public but is not a health probe",
                r.path
            );
            assert!(
                op["responses"].get("401").is_none(),
                "{method} {path} is open even with --protect-reads: no 401"
            );
        }
    }
}

#[test]
fn every_response_is_in_the_spec_shape() {
    let doc = document();
    let error = &doc["components"]["schemas"]["Error"];
    assert_eq!(error["properties"]["success"]["const"], false);
    assert_eq!(error["properties"]["message"]["type"], "string");
    for (method, path) in operations(&doc) {
        let responses = operation(&doc, &method, &path)["responses"]
            .as_object()
            .unwrap_or_else(|| panic!("{method} {path} has no responses"));
        assert!(
            responses.keys().any(|s| s.starts_with('2')),
            "{method} {path} documents no success"
        );
        for (status, resp) in responses {
            let resp = match resp["$ref"].as_str() {
                Some(r) => {
                    let name = r.strip_prefix("#/components/responses/").unwrap();
                    &doc["components"]["responses"][name]
                }
                None => resp,
            };
            assert!(
                resp["description"].is_string(),
                "{method} {path} {status}: no description"
            );
            if status.starts_with('4') || status.starts_with('5') {
                let json = &resp["content"]["application/json"];
                let Some(schema) = json["schema"]["$ref"].as_str() else {
                    // /readyz's 503 carries its probe fields next to the message.
                    assert_eq!(
                        (method.as_str(), path.as_str(), status.as_str()),
                        ("get", "/readyz", "503")
                    );
                    continue;
                };
                if schema == "#/components/schemas/NotReady" {
                    continue;
                }
                assert_eq!(
                    schema, "#/components/schemas/Error",
                    "{method} {path} {status}: errors are {{success: false, message}}"
                );
                let has_example = json["example"]["message"].is_string()
                    || json["examples"]
                        .as_object()
                        .is_some_and(|e| e.values().all(|x| x["value"]["message"].is_string()));
                assert!(has_example, "{method} {path} {status}: no example message");
            }
        }
    }
}

#[test]
fn the_server_serves_the_document_from_the_tree() {
    let expected = document();
    let s = Server::start(&[]);
    let r = s.get("/openapi.json");
    assert_eq!(r.status, 200, "{}", r.body);
    let content_type = r.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "content-type {content_type:?}"
    );
    assert_eq!(
        r.json(),
        expected,
        "GET /openapi.json differs from {DOC_PATH}"
    );
}
