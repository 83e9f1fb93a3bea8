//! Several botvisor processes on one PostgreSQL (`--node-id`), each a real binary on
//! 127.0.0.1 with the real WhatsApp link against the loopback peer, which counts the live
//! connections of every device and records each overlap (two sockets for one device).
//! Needs `--features test-peer`, and PostgreSQL (skipped without it unless
//! `BOTVISOR_REQUIRE_POSTGRES` is set).
#![cfg(feature = "test-peer")]

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use botvisor_wa_peer::Peer;
use common::{pg, Server};
use serde_json::Value;

/// The lease in these tests (short, so the faults play out in seconds; the claims wait a
/// fifth of it past an owner's lease).
const TTL: &str = "3s";
/// The account every session is a device of.
const PHONE: &str = "15551234567";

/// Nodes `n0`, `n1`, ... on one database, each on a data dir of its own.
struct Fleet {
    peer: Peer,
    url: String,
    dirs: Vec<tempfile::TempDir>,
    nodes: Vec<Option<Server>>,
    extra: Vec<String>,
}

impl Fleet {
    fn start(test: &str, n: usize, extra: &[&str]) -> Option<Fleet> {
        let pg = pg::server_or_skip(test)?;
        let url = pg.fresh_database_url("fleet").expect("a test database");
        let mut fleet = Fleet {
            peer: Peer::start(),
            url,
            dirs: (0..n).map(|_| tempfile::tempdir().unwrap()).collect(),
            nodes: (0..n).map(|_| None).collect(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        for i in 0..n {
            fleet.launch(i);
        }
        Some(fleet)
    }

    /// Starts node `i` (again).
    fn launch(&mut self, i: usize) {
        let peer_url = self.peer.url();
        let id = format!("n{i}");
        let mut args = vec![
            "--link",
            "whatsapp",
            "--wa-url",
            &peer_url,
            "--keys",
            "database",
            "--create-timeout",
            "20s",
            "--database-url",
            &self.url,
            "--node-id",
            &id,
            "--lease-ttl",
            TTL,
        ];
        args.extend(self.extra.iter().map(String::as_str));
        self.nodes[i] = Some(Server::start_in(self.dirs[i].path(), &args));
    }

    fn node(&self, i: usize) -> &Server {
        self.nodes[i].as_ref().expect("node running")
    }

    fn node_mut(&mut self, i: usize) -> &mut Server {
        self.nodes[i].as_mut().expect("node running")
    }

    /// A session created through node `via`, made to look paired as device `device` and
    /// started: online on whichever node it was placed.
    fn paired(&self, via: usize, id: &str, device: u16) {
        let s = self.node(via);
        let r = s.create(id, PHONE);
        assert_eq!(r.status, 201, "{}", r.body);
        let r = s.post(&format!("/api/sessions/{id}/stop"), None);
        assert_eq!(r.status, 200, "{}", r.body);
        common::seed_paired_in_database_as(&self.url, id, "Fleet", device);
        let r = s.post(&format!("/api/sessions/{id}/start"), None);
        assert_eq!(r.status, 200, "{}", r.body);
        s.wait_state(id, "online");
    }

    /// The fleet's sessions as node `via` lists them: id → (state, node).
    fn sessions(&self, via: usize) -> BTreeMap<String, (String, String)> {
        let r = self.node(via).get("/api/sessions");
        assert_eq!(r.status, 200, "{}", r.body);
        r.json()["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["userId"].as_str().unwrap().to_string(),
                    (
                        s["state"].as_str().unwrap().to_string(),
                        s["node"].as_str().unwrap_or("").to_string(),
                    ),
                )
            })
            .collect()
    }

    /// Rows of the shared database.
    fn rows(&self, sql: &str) -> Vec<Vec<Option<String>>> {
        pg::shared().unwrap().rows(&self.url, sql).unwrap()
    }

    /// Each session's owner, from the database.
    fn owners(&self) -> BTreeMap<String, String> {
        self.rows("SELECT user_id, owner FROM bv_sessions")
            .into_iter()
            .map(|r| (r[0].clone().unwrap(), r[1].clone().unwrap_or_default()))
            .collect()
    }
}

fn wait_until(secs: u64, what: &str, mut pred: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !pred() {
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "{what} within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

/// Creates `n` paired sessions `f_0..` through node 0 (each placed on the least-loaded
/// node), all online.
fn populate(fleet: &Fleet, n: usize) -> Vec<String> {
    let ids: Vec<String> = (0..n).map(|i| format!("f_{i}")).collect();
    for (i, id) in ids.iter().enumerate() {
        fleet.paired(0, id, 10 + i as u16);
    }
    assert_eq!(fleet.peer.live(PHONE), n);
    ids
}

#[test]
fn sessions_spread_over_the_nodes_and_any_node_answers_for_any_session() {
    let Some(fleet) = Fleet::start(
        "sessions_spread_over_the_nodes_and_any_node_answers_for_any_session",
        3,
        &[],
    ) else {
        return;
    };
    let ids = populate(&fleet, 6);
    // Placed on the least-loaded node each time: two each.
    let owners = fleet.owners();
    for n in ["n0", "n1", "n2"] {
        assert_eq!(owners.values().filter(|o| *o == n).count(), 2, "{owners:?}");
    }
    // Every node lists the whole fleet, each session with its node.
    for via in 0..3 {
        let listed = fleet.sessions(via);
        assert_eq!(listed.len(), 6);
        for id in &ids {
            assert_eq!(
                listed[id],
                ("online".into(), owners[id].clone()),
                "{listed:?}"
            );
        }
        let stats = fleet.node(via).get("/api/stats").json();
        assert_eq!(stats["totalUsers"], 6);
        assert_eq!(stats["onlineSessions"], 6);
    }
    // A command through a node that does not own the session reaches its owner.
    let (id, owner) = owners.iter().find(|(_, o)| *o != "n0").unwrap();
    let r = fleet.node(0).post(
        &format!("/api/sessions/{id}/messages"),
        Some(r#"{"to":"15550001111","text":"through n0"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    wait_until(10, "the peer decrypts the forwarded send", || {
        fleet
            .peer
            .stats()
            .decrypted
            .iter()
            .any(|d| d.text.as_deref() == Some("through n0"))
    });
    let v = fleet.node(0).session(id);
    assert_eq!(v["node"], owner.as_str(), "{v}");
    // A request that was already forwarded once is not forwarded again: 421.
    let forwarded_to_wrong_node = fleet.node(0).req(
        "GET",
        &format!("/api/sessions/{id}"),
        None,
        &[("X-Botvisor-Hop", "n9")],
    );
    assert_eq!(
        forwarded_to_wrong_node.status, 421,
        "{}",
        forwarded_to_wrong_node.body
    );
    assert_eq!(forwarded_to_wrong_node.json()["success"], false);
    // An id the fleet has cannot be created again through any node.
    for via in 0..3 {
        assert_eq!(fleet.node(via).create(id, PHONE).status, 409);
    }
    // A stop through one node, a start through another.
    assert_eq!(
        fleet
            .node(1)
            .post(&format!("/api/sessions/{id}/stop"), None)
            .status,
        200
    );
    assert_eq!(fleet.node(2).session(id)["state"], "stopped");
    assert_eq!(
        fleet
            .node(2)
            .post(&format!("/api/sessions/{id}/start"), None)
            .status,
        200
    );
    fleet.node(0).wait_state(id, "online");
    // Nodes list themselves.
    let nodes = fleet.node(1).get("/api/nodes").json();
    assert_eq!(nodes["node"], "n1");
    assert_eq!(nodes["count"], 3);
    for n in nodes["nodes"].as_array().unwrap() {
        assert_eq!(n["state"], "live", "{nodes}");
        assert_eq!(n["sessions"], 2, "{nodes}");
    }
    assert!(
        fleet.peer.stats().overlaps.is_empty(),
        "{:?}",
        fleet.peer.stats().overlaps
    );
}

#[test]
fn a_killed_node_s_sessions_come_back_on_the_others_and_never_twice() {
    let Some(mut fleet) = Fleet::start(
        "a_killed_node_s_sessions_come_back_on_the_others_and_never_twice",
        3,
        &[],
    ) else {
        return;
    };
    let ids = populate(&fleet, 6);
    let moved: Vec<String> = fleet
        .owners()
        .into_iter()
        .filter(|(_, o)| o == "n2")
        .map(|(id, _)| id)
        .collect();
    assert!(!moved.is_empty());
    fleet.node_mut(2).kill9();
    fleet.nodes[2] = None;
    let took = wait_until(20, "every session online on a surviving node", || {
        let listed = fleet.sessions(0);
        ids.iter().all(|id| {
            let (state, node) = &listed[id];
            state == "online" && node != "n2"
        })
    });
    eprintln!(
        "failover after kill -9: {} ms (lease {TTL})",
        took.as_millis()
    );
    assert_eq!(fleet.peer.live(PHONE), 6);
    let stats = fleet.peer.stats();
    assert!(stats.overlaps.is_empty(), "{:?}", stats.overlaps);
    // The moved sessions went to the two survivors, a new fence each.
    let owners = fleet.owners();
    for id in &moved {
        assert!(["n0", "n1"].contains(&owners[id].as_str()), "{owners:?}");
    }
    let fences = fleet.rows("SELECT user_id, fence FROM bv_sessions");
    for row in fences {
        let (id, fence) = (row[0].clone().unwrap(), row[1].clone().unwrap());
        let want = if moved.contains(&id) { "2" } else { "1" };
        assert_eq!(fence, want, "{id}");
    }
    // The killed node comes back: it owns nothing now, and takes nothing from the others.
    fleet.launch(2);
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(fleet.owners(), owners);
    assert_eq!(fleet.peer.live(PHONE), 6);
    assert!(fleet.peer.stats().overlaps.is_empty());
}

#[test]
fn a_paused_node_fences_itself_on_waking_and_none_of_its_writes_land() {
    let Some(mut fleet) = Fleet::start(
        "a_paused_node_fences_itself_on_waking_and_none_of_its_writes_land",
        3,
        &[],
    ) else {
        return;
    };
    let ids = populate(&fleet, 6);
    let paused: Vec<String> = fleet
        .owners()
        .into_iter()
        .filter(|(_, o)| o == "n1")
        .map(|(id, _)| id)
        .collect();
    let pid = fleet.node(1).child.id() as i32;
    unsafe {
        libc::kill(pid, libc::SIGSTOP);
    }
    wait_until(20, "the paused node's sessions online elsewhere", || {
        let listed = fleet.sessions(0);
        paused.iter().all(|id| {
            let (state, node) = &listed[id];
            state == "online" && node != "n1"
        })
    });
    // WhatsApp kicks the stalled socket of each moved device when its new owner logs in
    // (the paused process cannot close it): the peer counts those, and only those.
    let kicked = fleet.peer.stats().overlaps.len();
    assert!(kicked <= paused.len(), "{:?}", fleet.peer.stats().overlaps);
    std::thread::sleep(Duration::from_secs(2));
    unsafe {
        libc::kill(pid, libc::SIGCONT);
    }
    // On waking it fences itself at once (its lease's deadline passed while it slept),
    // registers again, and takes nothing back.
    wait_until(10, "the woken node registered again", || {
        let nodes = fleet.node(0).get("/api/nodes").json();
        nodes["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == "n1" && n["epoch"] == 2 && n["state"] == "live")
    });
    std::thread::sleep(Duration::from_secs(3));
    let log = std::fs::read_to_string(&fleet.node(1).log).unwrap();
    assert!(log.contains("node fenced"), "{log}");
    // Its sessions saw their sockets replaced while it slept; had a write of the stale
    // owner landed, their rows would read stopped (a replaced session is not restarted).
    let listed = fleet.sessions(2);
    for id in &ids {
        let (state, node) = &listed[id];
        assert_eq!(state, "online", "{id}: {listed:?}");
        assert_ne!(node, "n1", "{id}");
    }
    let desired = fleet.rows("SELECT count(*) FROM bv_sessions WHERE desired = 'running'");
    assert_eq!(desired[0][0].as_deref(), Some("6"));
    assert_eq!(fleet.peer.live(PHONE), 6);
    assert_eq!(
        fleet.peer.stats().overlaps.len(),
        kicked,
        "no new overlap after waking"
    );
    // It answers for the fleet again, forwarding to the owners.
    let v = fleet.node(1).session(&paused[0]);
    assert_eq!(v["state"], "online", "{v}");
    let _ = fleet.node_mut(1);
}

#[test]
fn a_drained_node_hands_its_sessions_over_and_a_handoff_restart_loses_none() {
    let Some(mut fleet) = Fleet::start(
        "a_drained_node_hands_its_sessions_over_and_a_handoff_restart_loses_none",
        3,
        &["--handoff"],
    ) else {
        return;
    };
    let ids = populate(&fleet, 6);
    // Drain n0 through n1 (forwarded to n0).
    let r = fleet.node(1).post("/api/nodes/n0/drain", None);
    assert_eq!(r.status, 202, "{}", r.body);
    let took = wait_until(20, "n0 holds nothing, every session online", || {
        let listed = fleet.sessions(1);
        ids.iter().all(|id| {
            let (state, node) = &listed[id];
            state == "online" && node != "n0"
        })
    });
    eprintln!("drain of 2 sessions: {} ms", took.as_millis());
    assert!(
        fleet.peer.stats().overlaps.is_empty(),
        "{:?}",
        fleet.peer.stats().overlaps
    );
    // A draining node takes no new session: a create through it lands elsewhere.
    let r = fleet.node(0).create("f_new", PHONE);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_ne!(r.json()["node"], "n0", "{}", r.body);
    // SIGTERM with --handoff: n1's sessions go to n2 (n0 is draining) before it exits.
    assert_eq!(fleet.node_mut(1).terminate(), Some(0));
    fleet.nodes[1] = None;
    wait_until(20, "every session online on n2", || {
        let listed = fleet.sessions(2);
        ids.iter()
            .all(|id| listed[id] == ("online".into(), "n2".into()))
    });
    assert!(
        fleet.peer.stats().overlaps.is_empty(),
        "{:?}",
        fleet.peer.stats().overlaps
    );
    assert_eq!(fleet.peer.live(PHONE), 6);
    let nodes = fleet.node(2).get("/api/nodes").json();
    let n1 = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == "n1")
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(n1["state"], "stopped", "{nodes}");
    assert_eq!(n1["sessions"], 0, "{nodes}");
    // The drain endpoint refuses nodes that are not there or not live.
    assert_eq!(fleet.node(2).post("/api/nodes/n9/drain", None).status, 404);
    assert_eq!(fleet.node(2).post("/api/nodes/n1/drain", None).status, 409);
    assert_eq!(fleet.node(2).post("/api/nodes/n.1/drain", None).status, 400);
}
