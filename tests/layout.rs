//! Keeps the `//! # Layout` of `src/lib.rs` true: it names every module the crate
//! declares, and the imports between modules point one way (down the layers below).
//! A change that adds a module or an import that climbs back up fails here first; fix the
//! code, or move the module in `LAYERS` and the doc together.

use std::collections::BTreeSet;
use std::path::Path;

/// Layers, top first: a module may import modules of a later layer only.
const LAYERS: &[&[&str]] = &[
    &["migrate"],
    &["config"],
    &["http"],
    &["nodes"],
    &["link"],
    &["keys"],
    &["store"],
    &["webhooks"],
    &["events", "metrics", "qr", "logging"],
    &["db"],
    &["limits", "paths", "timefmt", "tls", "session_heap"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn src() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src"))
}

/// Every `.rs` file of a module (`src/m.rs` or everything under `src/m/`).
fn files_of(module: &str) -> Vec<std::path::PathBuf> {
    let file = src().join(format!("{module}.rs"));
    if file.exists() {
        return vec![file];
    }
    let mut out = Vec::new();
    let mut dirs = vec![src().join(module)];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    out
}

/// The crate's modules a file names: `crate::m` anywhere, and `use crate::{m, ...}`.
fn imports(text: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let end = group.find('}').unwrap_or(group.len());
            for part in group[..end].split(',') {
                let name = ident(part.trim());
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found
}

fn declared_modules() -> Vec<String> {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    lib.lines()
        .filter_map(|l| l.strip_prefix("pub mod "))
        .map(|l| l.trim_end_matches(';').to_string())
        .collect()
}

#[test]
fn the_layout_doc_names_every_module() {
    let lib = std::fs::read_to_string(src().join("lib.rs")).unwrap();
    let doc: String = lib
        .lines()
        .skip_while(|l| !l.starts_with("//! # Layout"))
        .take_while(|l| l.starts_with("//!"))
        .collect::<Vec<_>>()
        .join("\n");
    for module in declared_modules() {
        assert!(
            doc.contains(&format!("[`{module}`]")),
            "the # Layout doc of src/lib.rs does not name `{module}`"
        );
        assert!(
            layer_of(&module).is_some(),
            "tests/layout.rs has no layer for `{module}`"
        );
    }
}

#[test]
fn imports_point_down_the_layers() {
    let modules = declared_modules();
    let mut climbs = Vec::new();
    for module in &modules {
        let own = layer_of(module).unwrap();
        for file in files_of(module) {
            let text = std::fs::read_to_string(&file).unwrap();
            for used in imports(&text) {
                if &used == module || !modules.contains(&used) {
                    continue;
                }
                let theirs = layer_of(&used).unwrap();
                if theirs <= own {
                    climbs.push(format!(
                        "{} imports `{used}` (layer {theirs}), but `{module}` is layer {own}",
                        file.strip_prefix(src()).unwrap().display()
                    ));
                }
            }
        }
    }
    assert!(
        climbs.is_empty(),
        "imports that climb:\n{}",
        climbs.join("\n")
    );
}

#[test]
fn the_import_scan_sees_grouped_and_plain_paths() {
    let found = imports("use crate::{db, paths::x};\nlet a = crate::store::Store::open();");
    assert_eq!(
        found.into_iter().collect::<Vec<_>>(),
        ["db", "paths", "store"]
    );
}
