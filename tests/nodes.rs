//! Several botvisor processes on one PostgreSQL (`--node-id`), each a real binary on
//! 127.0.0.1 with the real WhatsApp link against the loopback peer, which counts the live
//! connections of every device and records each overlap (two sockets for one device).
//! Needs `--features test-peer`, and PostgreSQL (skipped without it unless
//! `BOTVISOR_REQUIRE_POSTGRES` is set).
#![cfg(feature = "test-peer")]

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
    /// Each node's `--database-url` (the database's, or a proxy's in front of it).
    urls: Vec<String>,
    /// Before `dirs`: fields drop in order, and a node prints its log (read from its
    /// data dir) when it drops during a failing test.
    nodes: Vec<Option<Server>>,
    dirs: Vec<tempfile::TempDir>,
    extra: Vec<String>,
    /// A PostgreSQL of the test's own (one it stops), else the shared one.
    own_pg: Option<pg::PgServer>,
}

impl Fleet {
    fn start(test: &str, n: usize, extra: &[&str]) -> Option<Fleet> {
        let fleet = Fleet::prepare(test, n, extra, false)?;
        Some(fleet.launched())
    }

    /// The fleet, not started yet; on a PostgreSQL of its own when `own_pg`.
    fn prepare(test: &str, n: usize, extra: &[&str], own_pg: bool) -> Option<Fleet> {
        let shared = pg::server_or_skip(test)?;
        let own_pg = own_pg.then(|| pg::PgServer::start().expect("a PostgreSQL of the test's own"));
        let url = own_pg
            .as_ref()
            .unwrap_or(shared)
            .fresh_database_url("fleet")
            .expect("a test database");
        Some(Fleet {
            peer: Peer::start(),
            urls: vec![url.clone(); n],
            url,
            dirs: (0..n).map(|_| tempfile::tempdir().unwrap()).collect(),
            nodes: (0..n).map(|_| None).collect(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            own_pg,
        })
    }

    fn launched(mut self) -> Fleet {
        for i in 0..self.nodes.len() {
            self.launch(i);
        }
        self
    }

    fn pg(&self) -> &pg::PgServer {
        self.own_pg
            .as_ref()
            .unwrap_or_else(|| pg::shared().unwrap())
    }

    /// Starts node `i` (again).
    fn launch(&mut self, i: usize) {
        let peer_url = self.peer.url();
        let url = self.urls[i].clone();
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
            &url,
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
        self.pg().rows(&self.url, sql).unwrap()
    }

    /// The sessions node `n` owns, from the database.
    fn owned_by(&self, n: &str) -> Vec<String> {
        self.owners()
            .into_iter()
            .filter(|(_, o)| o == n)
            .map(|(id, _)| id)
            .collect()
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
        // (Counted by the database: a state in the view is committed milliseconds later.)
        wait_until(5, "the fleet's counts", || {
            let stats = fleet.node(via).get("/api/stats").json();
            stats["totalUsers"] == 6 && stats["onlineSessions"] == 6 && stats["activeSessions"] == 6
        });
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
    let moved: Vec<String> = fleet.owned_by("n2");
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
        // (Fence 1 is the create's reservation, 2 its row, 3 a claim.)
        let want = if moved.contains(&id) { "3" } else { "2" };
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
    let paused: Vec<String> = fleet.owned_by("n1");
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

/// A TCP proxy in front of PostgreSQL for one node; `cut` makes it a black hole (bytes
/// stop flowing both ways and new connections hang, as in a network partition: nothing
/// is reset), `heal` lets bytes flow again (connections cut meanwhile stay dead).
struct CutProxy {
    port: u16,
    cut: Arc<AtomicBool>,
}

impl CutProxy {
    fn start(upstream: u16) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let flag = flag.clone();
                std::thread::spawn(move || {
                    while flag.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                        return;
                    };
                    // Once cut, a connection stays dead: what was in flight is gone.
                    let dead = Arc::new(AtomicBool::new(false));
                    for (from, to) in [
                        (client.try_clone().unwrap(), server.try_clone().unwrap()),
                        (server, client),
                    ] {
                        let (flag, dead) = (flag.clone(), dead.clone());
                        std::thread::spawn(move || pump(from, to, &flag, &dead));
                    }
                });
            }
        });
        CutProxy { port, cut }
    }

    fn url(&self, database_url: &str) -> String {
        let (head, tail) = database_url.split_once("127.0.0.1:").unwrap();
        let rest = tail.split_once('/').unwrap().1;
        format!("{head}127.0.0.1:{}/{rest}", self.port)
    }

    fn cut(&self) {
        self.cut.store(true, Ordering::Release);
    }

    fn heal(&self) {
        self.cut.store(false, Ordering::Release);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, cut: &AtomicBool, dead: &AtomicBool) {
    from.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let mut buf = [0u8; 16 * 1024];
    loop {
        if cut.load(Ordering::Acquire) {
            dead.store(true, Ordering::Release);
        }
        if dead.load(Ordering::Acquire) {
            // Hold the sockets open and silent until the other side gives up.
            std::thread::sleep(Duration::from_millis(50));
            if !cut.load(Ordering::Acquire) {
                return;
            }
            continue;
        }
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if cut.load(Ordering::Acquire) {
                    dead.store(true, Ordering::Release);
                    continue;
                }
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

#[test]
fn a_node_cut_from_postgres_drops_its_sockets_before_another_node_connects_them() {
    let Some(mut fleet) = Fleet::prepare(
        "a_node_cut_from_postgres_drops_its_sockets_before_another_node_connects_them",
        2,
        &[],
        false,
    ) else {
        return;
    };
    let proxy = CutProxy::start(fleet.pg().port());
    fleet.urls[1] = proxy.url(&fleet.url);
    let mut fleet = fleet.launched();
    let ids = populate(&fleet, 4);
    let cut_off: Vec<String> = fleet.owned_by("n1");
    assert_eq!(cut_off.len(), 2);
    proxy.cut();
    let took = wait_until(30, "the cut node's sessions online on n0", || {
        let listed = fleet.sessions(0);
        ids.iter()
            .all(|id| listed[id] == ("online".into(), "n0".into()))
    });
    eprintln!(
        "sessions of a node cut from PostgreSQL online elsewhere after {} ms",
        took.as_millis()
    );
    // The cut node closed its sockets at its lease's local deadline, before n0 could
    // claim (the database's lease, plus a grace): WhatsApp never saw two.
    let stats = fleet.peer.stats();
    assert!(stats.overlaps.is_empty(), "{:?}", stats.overlaps);
    assert_eq!(fleet.peer.live(PHONE), 4);
    let log = std::fs::read_to_string(&fleet.node(1).log).unwrap();
    assert!(log.contains("node fenced"), "{log}");
    // While cut off it answers 503 for sessions, in the spec's shape.
    let r = fleet.node(1).get(&format!("/api/sessions/{}", cut_off[0]));
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["success"], false);
    assert!(
        r.json()["message"].as_str().unwrap().contains("fenced"),
        "{}",
        r.body
    );
    // Healed, it registers again, takes nothing back, and answers through the owner.
    proxy.heal();
    wait_until(30, "n1 live again", || {
        fleet.node(0).get("/api/nodes").json()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["id"] == "n1" && n["state"] == "live" && n["epoch"] == 2)
    });
    fleet.node(1).wait_state(&cut_off[0], "online");
    assert!(fleet.owners().values().all(|o| o == "n0"));
    assert!(fleet.peer.stats().overlaps.is_empty());
    assert_eq!(fleet.peer.live(PHONE), 4);
    let _ = fleet.node_mut(1);
}

#[test]
fn after_postgres_stops_for_longer_than_the_lease_every_node_fences_and_the_fleet_comes_back_whole()
{
    let Some(fleet) = Fleet::prepare(
        "after_postgres_stops_for_longer_than_the_lease_every_node_fences_and_the_fleet_comes_back_whole",
        3,
        &[],
        true,
    ) else {
        return;
    };
    let fleet = fleet.launched();
    let ids = populate(&fleet, 6);
    // Sends confirmed before the outage.
    let mut confirmed = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        let text = format!("before the outage {i}");
        let r = fleet.node(i % 3).post(
            &format!("/api/sessions/{id}/messages"),
            Some(&format!(r#"{{"to":"15550001111","text":"{text}"}}"#)),
        );
        assert_eq!(r.status, 201, "{}", r.body);
        confirmed.push(text);
    }
    fleet.pg().stop_immediate().unwrap();
    // Every node passes its lease's deadline and fences: no socket stays up.
    wait_until(30, "every node fenced", || {
        (0..3).all(|i| {
            std::fs::read_to_string(&fleet.node(i).log)
                .unwrap()
                .contains("node fenced")
        })
    });
    wait_until(10, "no device connected", || fleet.peer.live(PHONE) == 0);
    fleet.pg().start_again().unwrap();
    let took = wait_until(60, "every session online again, once", || {
        let listed = fleet.sessions(0);
        ids.iter().all(|id| listed[id].0 == "online") && fleet.peer.live(PHONE) == 6
    });
    eprintln!(
        "fleet whole again {} ms after PostgreSQL came back",
        took.as_millis()
    );
    assert_eq!(fleet.peer.live(PHONE), 6);
    let stats = fleet.peer.stats();
    assert!(stats.overlaps.is_empty(), "{:?}", stats.overlaps);
    for text in &confirmed {
        assert!(
            stats
                .decrypted
                .iter()
                .any(|d| d.text.as_deref() == Some(text)),
            "{text} was confirmed and must have reached WhatsApp"
        );
    }
    // Every node registered again (epoch 2), and every session has one owner among them.
    let nodes = fleet.node(1).get("/api/nodes").json();
    for n in nodes["nodes"].as_array().unwrap() {
        assert_eq!(n["state"], "live", "{nodes}");
        assert_eq!(n["epoch"], 2, "{nodes}");
    }
    let owners = fleet.owners();
    assert!(
        owners
            .values()
            .all(|o| ["n0", "n1", "n2"].contains(&o.as_str())),
        "{owners:?}"
    );
}

/// `POST path` with a JSON body to `addr`; the status, or `None` when the node did not
/// answer (down, restarting).
fn post_to(addr: std::net::SocketAddr, path: &str, body: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).ok()?;
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let head = String::from_utf8_lossy(&buf);
    head.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn a_rolling_restart_with_handoff_under_load_keeps_every_confirmed_send() {
    let Some(mut fleet) = Fleet::start(
        "a_rolling_restart_with_handoff_under_load_keeps_every_confirmed_send",
        3,
        &["--handoff", "--send-rate", "6000"],
    ) else {
        return;
    };
    let ids = populate(&fleet, 6);
    let addrs = Arc::new(std::sync::Mutex::new(
        (0..3).map(|i| fleet.node(i).addr).collect::<Vec<_>>(),
    ));
    let stop = Arc::new(AtomicBool::new(false));
    // A steady load: each session sent to every ~100 ms, through the nodes in turn.
    let sender = {
        let (addrs, stop, ids) = (addrs.clone(), stop.clone(), ids.clone());
        std::thread::spawn(move || {
            let mut confirmed: Vec<(String, String, Instant)> = Vec::new();
            let mut n = 0usize;
            while !stop.load(Ordering::Acquire) {
                for id in &ids {
                    n += 1;
                    let addr = {
                        let a = addrs.lock().unwrap();
                        a[n % a.len()]
                    };
                    let text = format!("load {n}");
                    let body = format!(r#"{{"to":"15550001111","text":"{text}"}}"#);
                    if post_to(addr, &format!("/api/sessions/{id}/messages"), &body) == Some(201) {
                        confirmed.push((id.clone(), text, Instant::now()));
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            confirmed
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    for i in 0..3 {
        assert_eq!(fleet.node_mut(i).terminate(), Some(0));
        fleet.launch(i);
        addrs.lock().unwrap()[i] = fleet.node(i).addr;
        std::thread::sleep(Duration::from_secs(2));
    }
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Release);
    let confirmed = sender.join().unwrap();
    // Every session is online once, on a live node.
    wait_until(20, "every session online", || {
        let listed = fleet.sessions(0);
        ids.iter().all(|id| listed[id].0 == "online")
    });
    assert_eq!(fleet.peer.live(PHONE), 6);
    let stats = fleet.peer.stats();
    assert!(stats.overlaps.is_empty(), "{:?}", stats.overlaps);
    // Nothing confirmed by a 201 was lost.
    let delivered: std::collections::HashSet<&str> = stats
        .decrypted
        .iter()
        .filter_map(|d| d.text.as_deref())
        .collect();
    let lost: Vec<&str> = confirmed
        .iter()
        .map(|(_, t, _)| t.as_str())
        .filter(|t| !delivered.contains(t))
        .collect();
    assert!(lost.is_empty(), "confirmed but never delivered: {lost:?}");
    // Each session's downtime: the longest gap between two of its confirmed sends.
    let mut gaps: Vec<(u128, &str)> = ids
        .iter()
        .map(|id| {
            let times: Vec<Instant> = confirmed
                .iter()
                .filter(|(s, _, _)| s == id)
                .map(|(_, _, at)| *at)
                .collect();
            let gap = times
                .windows(2)
                .map(|w| w[1] - w[0])
                .max()
                .unwrap_or_default();
            (gap.as_millis(), id.as_str())
        })
        .collect();
    gaps.sort();
    eprintln!(
        "rolling restart with --handoff, 3 nodes, 6 sessions: {} sends confirmed; per-session \
         downtime (longest gap between confirmed sends) p50 {} ms, max {} ms",
        confirmed.len(),
        gaps[gaps.len() / 2].0,
        gaps[gaps.len() - 1].0
    );
    assert!(
        gaps.iter().all(|(gap, _)| *gap < 10_000),
        "a session was down for 10 s or more: {gaps:?}"
    );
}

/// Two simulated-link nodes with the admin key and signed webhooks, on one database.
fn sim_pair(test: &str) -> Option<(Server, Server)> {
    let pg = pg::server_or_skip(test)?;
    let url = pg.fresh_database_url("fleet_config").unwrap();
    let node = |id: &str| {
        Server::start(&[
            "--api-key",
            ADMIN,
            "--webhook-secret",
            "a-webhook-secret-of-enough-length",
            "--database-url",
            &url,
            "--node-id",
            id,
            "--lease-ttl",
            TTL,
        ])
    };
    Some((node("a"), node("b")))
}

const ADMIN: &str = "admin-key-0123456789abcdef0123456789";

fn with_key(key: &str) -> [(&str, &str); 1] {
    [("X-API-Key", key)]
}

#[test]
fn keys_proxies_and_receivers_set_on_one_node_hold_on_every_node() {
    let Some((a, b)) = sim_pair("keys_proxies_and_receivers_set_on_one_node_hold_on_every_node")
    else {
        return;
    };
    // A key made through a works through b, at once.
    let made = a.req(
        "POST",
        "/api/keys",
        Some(r#"{"scopes":["read","control","send","webhooks"],"sessions":["shop_*"]}"#),
        &with_key(ADMIN),
    );
    assert_eq!(made.status, 201, "{}", made.body);
    let key = made.json()["key"].as_str().unwrap().to_string();
    let key_id = made.json()["id"].as_str().unwrap().to_string();
    let took = wait_until(5, "b accepts the new key", || {
        let r = b.req(
            "POST",
            "/api/sessions",
            Some(r#"{"userId":"shop_1","phoneNumber":"15550001111"}"#),
            &with_key(&key),
        );
        assert!([201, 401].contains(&r.status), "{}", r.body);
        r.status == 201
    });
    eprintln!("a key made on a works on b after {} ms", took.as_millis());
    b.wait_state("shop_1", "online");
    // Its own receiver and proxy, set through the node that does not own it.
    let (hook, got) = common::json_receiver();
    let owner = a.session("shop_1")["node"].as_str().unwrap().to_string();
    let (via, other) = if owner == "a" { (&b, &a) } else { (&a, &b) };
    let r = via.req(
        "PUT",
        "/api/sessions/shop_1/webhook",
        Some(&format!(
            r#"{{"url":"{hook}","events":["message.received"]}}"#
        )),
        &with_key(&key),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = via.req(
        "PUT",
        "/api/sessions/shop_1/proxy",
        Some(r#"{"proxy":"socks5://user:pw@127.0.0.1:1"}"#),
        &with_key(ADMIN),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // The session moves: its owner drains.
    let r = other.req(
        "POST",
        &format!("/api/nodes/{owner}/drain"),
        None,
        &with_key(ADMIN),
    );
    assert_eq!(r.status, 202, "{}", r.body);
    let new_owner = if owner == "a" { "b" } else { "a" };
    wait_until(20, "shop_1 moved", || {
        let v = a.session("shop_1");
        v["node"] == new_owner
    });
    // Its new owner knows its proxy (it connects through it, and fails on a dead one)...
    let p = a
        .req("GET", "/api/sessions/shop_1/proxy", None, &with_key(ADMIN))
        .json();
    assert_eq!(p["proxy"], "socks5://user:***@127.0.0.1:1", "{p}");
    // ... and its receiver: a message to it reaches the hook, from the new owner.
    let v = b.session("shop_1");
    assert_eq!(v["node"], new_owner, "{v}");
    // (The dead proxy keeps the session from connecting: clear it and restart.)
    let r = b.req(
        "PUT",
        "/api/sessions/shop_1/proxy",
        Some(r#"{"proxy":null}"#),
        &with_key(ADMIN),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    for step in ["stop", "start"] {
        let r = a.req(
            "POST",
            &format!("/api/sessions/shop_1/{step}"),
            None,
            &with_key(ADMIN),
        );
        assert_eq!(r.status, 200, "{step}: {}", r.body);
    }
    a.wait_state("shop_1", "online");
    let r = b.req(
        "POST",
        "/api/sim/shop_1/inbound",
        Some(r#"{"from":"15557654321","text":"hi from a customer"}"#),
        &with_key(ADMIN),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    wait_until(
        10,
        "the receiver set through one node hears the other",
        || {
            got.lock().unwrap().iter().any(|v| {
                v["event"] == "message.received" && v["data"]["text"] == "hi from a customer"
            })
        },
    );
    // Each delivery names the node the session ran on.
    let delivered = got.lock().unwrap().clone();
    let received = delivered
        .iter()
        .find(|v| v["data"]["text"] == "hi from a customer")
        .unwrap();
    assert_eq!(received["node"], new_owner, "{received}");
    // Revoked through b: refused by a from the next request on (once a heard of it).
    let r = b.req(
        "DELETE",
        &format!("/api/keys/{key_id}"),
        None,
        &with_key(ADMIN),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let took = wait_until(5, "a refuses the revoked key", || {
        a.req("POST", "/api/sessions/shop_1/stop", None, &with_key(&key))
            .status
            == 401
    });
    eprintln!(
        "a key revoked on b is refused by a after {} ms",
        took.as_millis()
    );
    // Two keys made at once through the two nodes: both kept (no node undoes the other).
    let body = r#"{"scopes":["read"],"sessions":["*"]}"#;
    let (x, y) = std::thread::scope(|s| {
        let x = s.spawn(|| a.req("POST", "/api/keys", Some(body), &with_key(ADMIN)));
        let y = s.spawn(|| b.req("POST", "/api/keys", Some(body), &with_key(ADMIN)));
        (x.join().unwrap(), y.join().unwrap())
    });
    assert_eq!((x.status, y.status), (201, 201));
    let listed = |n: &Server| n.req("GET", "/api/keys", None, &with_key(ADMIN)).json();
    let made = [x.json()["id"].clone(), y.json()["id"].clone()];
    let both = |v: &Value| {
        let ids: Vec<&Value> = v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| &k["id"])
            .collect();
        ids.len() == 2 && made.iter().all(|m| ids.contains(&m))
    };
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(5, "both nodes list both new keys", || {
            both(&listed(&a)) && both(&listed(&b))
        })
    }))
    .is_err()
    {
        panic!("a lists {}, b lists {}", listed(&a), listed(&b));
    }
}

/// A seeded loop of the faults above on one fleet: each round hits a node picked by the
/// seed with kill -9, SIGSTOP past the lease, SIGTERM (with or without handing its
/// sessions over first), then brings it back; after each round every session is online
/// exactly once, on a live node. `BOTVISOR_CHAOS_SEED` picks the seed (printed),
/// `BOTVISOR_CHAOS_ROUNDS` the rounds (3 by default: CI's bound).
#[test]
fn a_seeded_chaos_loop_keeps_every_session_online_once() {
    let Some(mut fleet) = Fleet::start(
        "a_seeded_chaos_loop_keeps_every_session_online_once",
        3,
        &[],
    ) else {
        return;
    };
    let seed: u64 = std::env::var("BOTVISOR_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    let rounds: usize = std::env::var("BOTVISOR_CHAOS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    eprintln!("chaos: seed {seed}, {rounds} rounds (BOTVISOR_CHAOS_SEED={seed} replays it)");
    let mut state = seed | 1;
    let mut next = move |n: u64| {
        // xorshift64*
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33) % n
    };
    let ids = populate(&fleet, 6);
    let mut allowed_overlaps = 0;
    for round in 0..rounds {
        let victim = next(3) as usize;
        let fault = next(4);
        let held = fleet
            .owners()
            .values()
            .filter(|o| **o == format!("n{victim}"))
            .count();
        let what = [
            "kill -9",
            "SIGSTOP past the lease",
            "SIGTERM",
            "SIGTERM after a handoff",
        ][fault as usize];
        eprintln!("chaos round {round}: {what} of n{victim} ({held} sessions)");
        let pid = fleet.node(victim).child.id() as i32;
        match fault {
            0 => fleet.node_mut(victim).kill9(),
            1 => {
                unsafe { libc::kill(pid, libc::SIGSTOP) };
                std::thread::sleep(Duration::from_secs(5));
                unsafe { libc::kill(pid, libc::SIGCONT) };
                // Its frozen sockets may have been kicked by their new owners' logins.
                allowed_overlaps += held;
            }
            2 => {
                fleet.node_mut(victim).terminate();
            }
            _ => {
                let via = (victim + 1) % 3;
                let r = fleet
                    .node(via)
                    .post(&format!("/api/nodes/n{victim}/drain"), None);
                assert_eq!(r.status, 202, "{}", r.body);
                wait_until(20, "the drained node holds nothing", || {
                    !fleet.owners().values().any(|o| *o == format!("n{victim}"))
                });
                fleet.node_mut(victim).terminate();
            }
        }
        if fault != 1 {
            fleet.nodes[victim] = None;
            fleet.launch(victim);
        }
        let live = (victim + 1) % 3;
        wait_until(30, "every session online once, on a live node", || {
            let listed = fleet.sessions(live);
            ids.iter().all(|id| listed[id].0 == "online") && fleet.peer.live(PHONE) == 6
        });
        // The fleet is whole again before the next fault: a paused node has fenced itself
        // and registered anew, a restarted one holds its lease (a drain is refused with
        // 409 while its node's lease is out).
        wait_until(30, "every node live again", || {
            let nodes = fleet.node(live).get("/api/nodes").json();
            nodes["nodes"]
                .as_array()
                .is_some_and(|n| n.len() == 3 && n.iter().all(|n| n["state"] == "live"))
        });
        let overlaps = fleet.peer.stats().overlaps;
        assert!(
            overlaps.len() <= allowed_overlaps,
            "round {round} ({what} of n{victim}, seed {seed}): {overlaps:?}"
        );
    }
}

#[test]
fn one_id_created_on_two_nodes_at_once_is_created_once() {
    let Some((a, b)) = sim_pair("one_id_created_on_two_nodes_at_once_is_created_once") else {
        return;
    };
    for round in 0..10 {
        let id = format!("twin_{round}");
        let body = format!(r#"{{"userId":"{id}","phoneNumber":"15550001111"}}"#);
        let (x, y) = std::thread::scope(|s| {
            let x = s.spawn(|| a.req("POST", "/api/sessions", Some(&body), &with_key(ADMIN)));
            let y = s.spawn(|| b.req("POST", "/api/sessions", Some(&body), &with_key(ADMIN)));
            (x.join().unwrap(), y.join().unwrap())
        });
        let mut statuses = [x.status, y.status];
        statuses.sort();
        assert_eq!(statuses, [201, 409], "{}\n{}", x.body, y.body);
        let loser = if x.status == 409 { &x } else { &y };
        assert!(
            loser.json()["message"]
                .as_str()
                .unwrap()
                .starts_with("Session already exists for this user."),
            "{}",
            loser.body
        );
        let v = a.wait_state(&id, "online");
        assert_eq!(b.session(&id)["node"], v["node"]);
    }
    assert_eq!(a.get("/api/sessions").json()["count"], 10);
    // Nothing half-made: every listed session is online, on one node.
    for s in a.get("/api/sessions").json()["sessions"]
        .as_array()
        .unwrap()
    {
        assert_eq!(s["state"], "online", "{s}");
    }
}

/// The `data:` JSON of every `event` event in a stream.
fn events_of(stream: &common::EventStream, event: &str) -> Vec<Value> {
    stream
        .events()
        .into_iter()
        .filter(|(_, kind, _)| kind == event)
        .map(|(_, _, data)| serde_json::from_str(&data).unwrap())
        .collect()
}

/// The value of one sample line of `/metrics` (`name{labels}`), if there is one.
fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
}

#[test]
fn every_node_streams_and_counts_the_whole_fleet() {
    let Some(fleet) = Fleet::start("every_node_streams_and_counts_the_whole_fleet", 2, &[]) else {
        return;
    };
    let mut streams = [
        common::EventStream::open(fleet.node(0), &[]),
        common::EventStream::open(fleet.node(1), &[]),
    ];
    let ids = populate(&fleet, 4);
    let owners = fleet.owners();
    for n in ["n0", "n1"] {
        assert_eq!(owners.values().filter(|o| *o == n).count(), 2, "{owners:?}");
    }
    for (i, stream) in streams.iter_mut().enumerate() {
        let all_online = |buf: &str| {
            ids.iter()
                .all(|id| buf.contains(&format!(r#""userId":"{id}","state":"online""#)))
        };
        assert!(stream.until(15, all_online), "n{i}: {}", stream.buf);
        // Each node numbers the fleet's events its own way, in order, once each.
        let numbers: Vec<u64> = stream.events().iter().map(|(n, _, _)| *n).collect();
        assert!(numbers.windows(2).all(|w| w[0] < w[1]), "{numbers:?}");
        let states = events_of(stream, "session.state");
        for id in &ids {
            let online: Vec<&Value> = states
                .iter()
                .filter(|e| e["userId"] == id.as_str() && e["state"] == "online")
                .collect();
            assert_eq!(online.len(), 1, "n{i} saw {id} online once: {states:?}");
            assert_eq!(online[0]["node"], owners[id].as_str(), "{:?}", online[0]);
            // A pairing code stays on its node: the other node's stream has the event
            // without the code.
            let codes: Vec<Value> = events_of(stream, "session.pairing_code")
                .into_iter()
                .filter(|e| e["userId"] == id.as_str())
                .collect();
            assert!(!codes.is_empty(), "n{i}: no code event for {id}");
            let here = owners[id] == format!("n{i}");
            for code in codes {
                assert_eq!(code["pairingCode"].is_string(), here, "n{i}: {code}");
            }
        }
    }
    // A change made through one node shows in the other's stream.
    let moved = ids.iter().find(|id| owners[*id] == "n0").unwrap();
    let r = fleet
        .node(1)
        .post(&format!("/api/sessions/{moved}/stop"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    for stream in &mut streams {
        let stopped = format!(r#""userId":"{moved}","state":"stopped""#);
        assert!(stream.until(10, |b| b.contains(&stopped)), "{}", stream.buf);
    }
    // /metrics: the node's own sessions, and the fleet's counted by the database.
    for via in 0..2 {
        wait_until(10, "the fleet's gauges", || {
            let text = fleet.node(via).get("/metrics").body;
            metric(&text, r#"botvisor_fleet_sessions{state="online"}"#) == Some(3.0)
                && metric(&text, r#"botvisor_fleet_sessions{state="stopped"}"#) == Some(1.0)
                && metric(&text, r#"botvisor_fleet_nodes{state="live"}"#) == Some(2.0)
                && metric(&text, r#"botvisor_sessions{state="online"}"#)
                    == Some(if via == 0 { 1.0 } else { 2.0 })
        });
    }
}
