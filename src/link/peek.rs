//! Reads the rows of one small table straight from a SQLite file, without SQLite: the
//! simulated link's credential read at a boot of 100,000 sessions (a SQLite open, its
//! locks, its schema and a statement cost about 200 µs of CPU each, two thirds of the
//! boot; reading the file's two pages costs a few µs).
//!
//! Only the plain case is read: a rollback-journal database (not WAL) with no journal
//! beside it, UTF-8, the table's rows in one leaf page, no overflow. Anything else is
//! `None`, and the caller asks SQLite. So a `Some` is always what SQLite would answer
//! for a database no one is writing: a write in progress or cut short leaves its
//! `-journal` beside the file, which sends the read to SQLite (which rolls it back).

use std::path::Path;

/// The rows of `table` in the SQLite file at `path`, each as its column values (text
/// and integers as text, anything else as `None`); `None` when the file is not in the
/// plain shape above.
pub fn table_rows(path: &Path, table: &str) -> Option<Vec<Vec<Option<String>>>> {
    // (A WAL database says so in its header, read below: no need to look for a `-wal`.)
    let mut journal = path.as_os_str().to_owned();
    journal.push("-journal");
    if Path::new(&journal).exists() {
        return None;
    }
    let bytes = std::fs::read(path).ok()?;
    rows_in(&bytes, table)
}

/// [`table_rows`] over a file's bytes.
fn rows_in(file: &[u8], table: &str) -> Option<Vec<Vec<Option<String>>>> {
    let header = file.get(..100)?;
    if &header[..16] != b"SQLite format 3\0" {
        return None;
    }
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536,
        n if n >= 512 && n.is_power_of_two() => usize::from(n),
        _ => return None,
    };
    // Rollback journal only (1 legacy, 2 WAL), UTF-8 only.
    if header[18] != 1 || header[19] != 1 || be32(&header[56..60]) != 1 {
        return None;
    }
    let usable = page_size.checked_sub(usize::from(header[20]))?;
    let page = |n: usize| -> Option<&[u8]> {
        let start = n.checked_sub(1)?.checked_mul(page_size)?;
        file.get(start..start.checked_add(page_size)?)
    };
    // The schema: sqlite_master (type, name, tbl_name, rootpage, sql) on page 1.
    let root = leaf_rows(page(1)?, 100, usable)?
        .into_iter()
        .find(|r| {
            r.first().is_some_and(|t| t.as_deref() == Some("table"))
                && r.get(1).is_some_and(|n| n.as_deref() == Some(table))
        })?
        .get(3)?
        .as_deref()?
        .parse::<usize>()
        .ok()?;
    leaf_rows(page(root)?, 0, usable)
}

/// The records of a table b-tree leaf page whose header starts at `at`.
fn leaf_rows(page: &[u8], at: usize, usable: usize) -> Option<Vec<Vec<Option<String>>>> {
    if *page.get(at)? != 0x0D {
        return None; // an interior page: more rows than this reader reads
    }
    let cells = usize::from(u16::from_be_bytes([*page.get(at + 3)?, *page.get(at + 4)?]));
    let max_local = usable.checked_sub(35)?;
    let mut rows = Vec::with_capacity(cells);
    for i in 0..cells {
        let p = at + 8 + 2 * i;
        let mut pos = usize::from(u16::from_be_bytes([*page.get(p)?, *page.get(p + 1)?]));
        let payload = usize::try_from(varint(page, &mut pos)?).ok()?;
        varint(page, &mut pos)?; // the rowid
        if payload > max_local {
            return None; // spills to overflow pages
        }
        rows.push(record(page.get(pos..pos.checked_add(payload)?)?)?);
    }
    Some(rows)
}

/// One record's column values.
fn record(rec: &[u8]) -> Option<Vec<Option<String>>> {
    let mut pos = 0;
    let header_len = usize::try_from(varint(rec, &mut pos)?).ok()?;
    let mut types = Vec::new();
    while pos < header_len {
        types.push(varint(rec, &mut pos)?);
    }
    if pos != header_len {
        return None;
    }
    let mut values = Vec::with_capacity(types.len());
    for t in types {
        let (len, value) = match t {
            0 | 8 | 9 => (0, (t != 0).then(|| (t - 8).to_string())),
            1..=6 => {
                let len = [1, 2, 3, 4, 6, 8][usize::try_from(t).ok()? - 1];
                let raw = rec.get(pos..pos + len)?;
                // Big-endian two's complement, sign-extended from the first byte.
                let mut n: i64 = if raw[0] & 0x80 != 0 { -1 } else { 0 };
                for b in raw {
                    n = (n << 8) | i64::from(*b);
                }
                (len, Some(n.to_string()))
            }
            7 => (8, None),
            10 | 11 => return None,
            t if t % 2 == 0 => (usize::try_from((t - 12) / 2).ok()?, None),
            t => {
                let len = usize::try_from((t - 13) / 2).ok()?;
                let text = std::str::from_utf8(rec.get(pos..pos.checked_add(len)?)?).ok()?;
                (len, Some(text.to_string()))
            }
        };
        pos = pos.checked_add(len)?;
        if pos > rec.len() {
            return None;
        }
        values.push(value);
    }
    Some(values)
}

/// SQLite's variable-length integer at `*pos` (1-9 bytes, big-endian groups of 7 bits,
/// the ninth byte whole).
fn varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut n: u64 = 0;
    for i in 0..9 {
        let b = *buf.get(*pos)?;
        *pos += 1;
        if i == 8 {
            return Some((n << 8) | u64::from(b));
        }
        n = (n << 7) | u64::from(b & 0x7F);
        if b & 0x80 == 0 {
            return Some(n);
        }
    }
    None
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::Connection;

    /// What SQLite itself answers, in the same shape.
    fn by_sqlite(path: &Path, table: &str) -> Vec<Vec<Option<String>>> {
        let conn = Connection::open(path).unwrap();
        let mut stmt = conn.prepare(&format!("SELECT * FROM {table}")).unwrap();
        let n = stmt.column_count();
        let rows = stmt
            .query_map([], |r| {
                (0..n)
                    .map(|i| {
                        Ok(match r.get_ref(i)? {
                            rusqlite::types::ValueRef::Text(t) => {
                                Some(String::from_utf8(t.to_vec()).unwrap())
                            }
                            rusqlite::types::ValueRef::Integer(v) => Some(v.to_string()),
                            _ => None,
                        })
                    })
                    .collect::<rusqlite::Result<Vec<_>>>()
            })
            .unwrap();
        rows.collect::<rusqlite::Result<Vec<_>>>().unwrap()
    }

    fn table(dir: &Path, name: &str, rows: &[(&str, &str)]) -> std::path::PathBuf {
        let path = dir.join(name);
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE t (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL);
             CREATE TABLE other (a INTEGER, b BLOB, c REAL);
             INSERT INTO other VALUES (-7, x'0102', 1.5), (NULL, NULL, NULL), (0, NULL, 2.5),
                 (1, x'', 3.5), (-129, NULL, NULL), (4294967296, NULL, NULL);",
        )
        .unwrap();
        for (k, v) in rows {
            conn.execute("INSERT OR REPLACE INTO t VALUES (?1, ?2)", [k, v])
                .unwrap();
        }
        path
    }

    #[test]
    fn reads_what_sqlite_reads() {
        let dir = tempfile::tempdir().unwrap();
        let long = "ü".repeat(600);
        let path = table(
            dir.path(),
            "a.db",
            &[
                ("identity", "0123456789abcdef"),
                ("paired", "1764979200000"),
                ("name", "Bot ✓ 🤖"),
                ("name", "Renamed ✓"),
                ("empty", ""),
                ("long", &long),
            ],
        );
        let peeked = table_rows(&path, "t").expect("the plain shape is read");
        assert_eq!(peeked, by_sqlite(&path, "t"));
        assert_eq!(peeked.len(), 5, "a replaced row is gone");
        assert_eq!(
            table_rows(&path, "other").unwrap(),
            vec![
                vec![Some("-7".into()), None, None],
                vec![None, None, None],
                vec![Some("0".into()), None, None],
                vec![Some("1".into()), None, None],
                vec![Some("-129".into()), None, None],
                vec![Some("4294967296".into()), None, None],
            ],
            "integers as text, blobs and reals as None"
        );
        assert_eq!(table_rows(&path, "missing"), None);
    }

    #[test]
    fn anything_but_the_plain_shape_goes_to_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        // A row too long for one page spills to overflow pages.
        let big = "x".repeat(10_000);
        let path = table(dir.path(), "big.db", &[("identity", "1"), ("name", &big)]);
        assert_eq!(table_rows(&path, "t"), None);
        // More rows than one page holds: an interior root page.
        let many: Vec<(String, String)> = (0..400)
            .map(|i| (format!("k{i}"), "v".repeat(40)))
            .collect();
        let refs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let path = table(dir.path(), "many.db", &refs);
        assert_eq!(table_rows(&path, "t"), None);
        // WAL mode.
        let path = table(dir.path(), "wal.db", &[("identity", "1")]);
        Connection::open(&path)
            .unwrap()
            .execute_batch("PRAGMA journal_mode = WAL;")
            .unwrap();
        assert_eq!(table_rows(&path, "t"), None);
        // A journal beside the file: a write in progress or cut short.
        let path = table(dir.path(), "hot.db", &[("identity", "1")]);
        assert!(table_rows(&path, "t").is_some());
        std::fs::write(dir.path().join("hot.db-journal"), b"x").unwrap();
        assert_eq!(table_rows(&path, "t"), None);
        // Not a database, empty, cut short, missing.
        let bytes = std::fs::read(dir.path().join("big.db")).unwrap();
        for (name, content) in [
            ("junk.db", b"not a database at all".to_vec()),
            ("empty.db", Vec::new()),
            ("cut.db", bytes[..150].to_vec()),
        ] {
            std::fs::write(dir.path().join(name), content).unwrap();
            assert_eq!(table_rows(&dir.path().join(name), "t"), None, "{name}");
        }
        assert_eq!(table_rows(&dir.path().join("none.db"), "t"), None);
    }

    #[test]
    fn flipped_bytes_never_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = table(dir.path(), "a.db", &[("identity", "1"), ("name", "Bot")]);
        let good = std::fs::read(&path).unwrap();
        let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
        for _ in 0..20_000 {
            let mut bytes = good.clone();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = (seed as usize) % bytes.len();
                bytes[at] = (seed >> 32) as u8;
            }
            let _ = rows_in(&bytes, "t");
        }
    }
}
