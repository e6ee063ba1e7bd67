//! The layering of docs/ARCHITECTURE.md, checked on the source: every
//! `crate::<module>` a module names must be of a lower layer (no upward or
//! sideways edge, hence no cycle), and no production code returns
//! `Result<_, String>`. Test code (`tests.rs`, `#[cfg(test)] mod tests`) is
//! free to reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each top-level module's layer; an edge goes to a strictly lower one.
const LAYERS: &[(&str, u8)] = &[
    // Ground floor: shared vocabulary, no crate imports of note.
    ("model", 0),
    ("environ", 0),
    ("error_chain", 0),
    ("config", 1),
    ("proxy", 1),
    ("metrics", 1),
    ("telemetry", 1),
    ("secrets", 2),
    // Level 2: siblings that never import each other.
    ("acquire", 2),
    ("mcp", 2),
    ("orchestrator", 2),
    ("store", 2),
    ("supervisor", 3),
    ("images", 3),
    ("api", 4),
    ("gateway", 4),
    ("cli", 5),
];

fn layer(module: &str) -> Option<u8> {
    LAYERS.iter().find(|(m, _)| *m == module).map(|(_, l)| *l)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The production part of a file: test-only files and `mod tests` blocks out.
fn production_text(path: &Path) -> Option<String> {
    if path.file_name().is_some_and(|f| f == "tests.rs")
        || path.components().any(|c| c.as_os_str() == "tests")
    {
        return None;
    }
    let text = std::fs::read_to_string(path).unwrap();
    Some(match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => text[..i].to_owned(),
        None => text,
    })
}

/// Every `crate::<module>` named outside comments.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            rest = &rest[i + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// module → modules it names (production code only).
fn edges() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in files {
        let rel = f.strip_prefix(src()).unwrap();
        let first = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy();
        let module = first.trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" {
            continue;
        }
        let Some(text) = production_text(&f) else {
            continue;
        };
        let refs = crate_refs(&text);
        let e = edges.entry(module.clone()).or_default();
        e.extend(refs.into_iter().filter(|r| *r != module));
    }
    edges
}

#[test]
fn every_edge_goes_down_a_layer() {
    let mut wrong = Vec::new();
    for (from, tos) in edges() {
        let Some(lf) = layer(&from) else {
            wrong.push(format!(
                "module `{from}` has no layer in tests/architecture.rs"
            ));
            continue;
        };
        for to in tos {
            match layer(&to) {
                None => wrong.push(format!("`{from}` names `crate::{to}`, which has no layer")),
                Some(lt) if lt >= lf => wrong.push(format!(
                    "`{from}` (layer {lf}) imports `{to}` (layer {lt}): an upward or sideways edge"
                )),
                Some(_) => {}
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));
}

#[test]
fn the_checker_sees_edges() {
    // Guards the checker itself: known edges must be found.
    let e = edges();
    assert!(e["supervisor"].contains("mcp"), "{e:?}");
    assert!(e["supervisor"].contains("orchestrator"));
    assert!(e["api"].contains("supervisor"));
    assert!(
        !e["mcp"].contains("orchestrator"),
        "mcp must not import orchestrator"
    );
    assert!(
        !e["store"].contains("supervisor"),
        "store must not import supervisor"
    );
}

/// The second generic argument of `Result<…>`, given the text after `Result<`.
fn error_type(args: &str) -> Option<&str> {
    let mut depth = 0i32;
    let mut comma = None;
    for (i, c) in args.char_indices() {
        match c {
            '<' | '(' | '[' => depth += 1,
            ')' | ']' => depth -= 1,
            '>' if depth == 0 => return comma.map(|s| &args[s..i]),
            '>' => depth -= 1,
            ',' if depth == 0 && comma.is_none() => comma = Some(i + 1),
            _ => {}
        }
    }
    None
}

#[test]
fn the_error_type_reader_reads_nested_generics() {
    assert_eq!(
        error_type("BTreeMap<String,String>,StartError>{"),
        Some("StartError")
    );
    assert_eq!(error_type("(),String>"), Some("String"));
    assert_eq!(error_type("Vec<(u8,String)>,String>"), Some("String"));
    assert_eq!(error_type("T>"), None);
}

#[test]
fn no_string_errors_in_production_code() {
    let mut files = Vec::new();
    rust_files(&src(), &mut files);
    let mut found = Vec::new();
    for f in files {
        let Some(text) = production_text(&f) else {
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap_or("");
            let compact: String = code.chars().filter(|c| !c.is_whitespace()).collect();
            if compact
                .split("Result<")
                .skip(1)
                .any(|r| error_type(r) == Some("String"))
            {
                found.push(format!("{}:{}: {}", f.display(), n + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "Result<_, String> in production code:\n{}",
        found.join("\n")
    );
}
