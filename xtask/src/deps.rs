//! The workspace dependency rules and their checker (`cargo xtask check-deps`).
//!
//! The rules are data: [`FORBIDDEN`] lists which crates must never depend on
//! which others, and [`REQUIRED`] / [`REQUIRED_EXEMPT`] say which crate every
//! library member must depend on. ARCHITECTURE.md explains why; this file is
//! what enforces it.
//!
//! Only *normal* dependencies (not `[dev-dependencies]`, not
//! `[build-dependencies]`) between workspace members count, and they count
//! transitively: `a -> b -> c` means `a` depends on `c`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// A set of workspace crates named by a rule.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Crates {
    /// Every workspace member (a crate is never said to depend on itself).
    Any,
    /// Exactly the named crates.
    Only(&'static [&'static str]),
}

impl Crates {
    fn contains(self, name: &str) -> bool {
        match self {
            Crates::Any => true,
            Crates::Only(names) => names.contains(&name),
        }
    }

    fn names(self) -> &'static [&'static str] {
        match self {
            Crates::Any => &[],
            Crates::Only(names) => names,
        }
    }
}

/// One row of the rule table: no crate in `crates` may depend, directly or
/// transitively, on any crate in `forbidden`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Rule {
    /// The crates the rule constrains.
    pub(crate) crates: Crates,
    /// The crates they must not depend on.
    pub(crate) forbidden: Crates,
}

/// Which crates must not depend on which (normal dependencies, transitively).
pub(crate) const FORBIDDEN: &[Rule] = &[
    // The core is the bottom of the graph: it depends on no other member.
    Rule {
        crates: Crates::Only(&["pgbus-core"]),
        forbidden: Crates::Any,
    },
    // Execution and streams are backend-agnostic: they see only the core.
    Rule {
        crates: Crates::Only(&["pgbus-exec", "pgbus-stream"]),
        forbidden: Crates::Only(&["pgbus-pg", "pgbus-cli"]),
    },
    // The PostgreSQL backend knows nothing of what runs on top of it.
    Rule {
        crates: Crates::Only(&["pgbus-pg"]),
        forbidden: Crates::Only(&["pgbus-exec", "pgbus-stream", "pgbus-cli"]),
    },
    // Binaries, test and benchmark harnesses, and tooling are leaves.
    Rule {
        crates: Crates::Any,
        forbidden: Crates::Only(&["pgbus-cli", "pgbus-tests", "pgbus-benches", "xtask"]),
    },
];

/// Every library member must depend on this crate ...
pub(crate) const REQUIRED: &str = "pgbus-core";

/// ... except these.
pub(crate) const REQUIRED_EXEMPT: &[&str] = &["pgbus-core", "xtask"];

/// One workspace member, as far as the rules care.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Member {
    /// Whether the package has a library target.
    pub(crate) is_lib: bool,
    /// Its normal dependencies that are workspace members, by package name.
    pub(crate) deps: BTreeSet<String>,
}

/// The workspace-internal dependency graph: member name -> member.
pub(crate) type Graph = BTreeMap<String, Member>;

/// A broken rule; its `Display` is the one-line report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Violation {
    /// `path` leads from `path[0]` to a crate it must not depend on.
    Forbidden {
        /// The dependency chain, first the depending crate, last the forbidden one.
        path: Vec<String>,
    },
    /// A library member does not depend on [`REQUIRED`].
    MissingRequired {
        /// The library member.
        krate: String,
    },
    /// The rule table names a crate that is not a workspace member (stale table).
    UnknownCrate {
        /// The name in the table.
        name: &'static str,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Forbidden { path } => write!(
                f,
                "{} depends on {} (via {}): forbidden, see ARCHITECTURE.md",
                path.first().map_or("?", String::as_str),
                path.last().map_or("?", String::as_str),
                path.join(" -> "),
            ),
            Violation::MissingRequired { krate } => write!(
                f,
                "{krate} does not depend on {REQUIRED}: every library crate must, see ARCHITECTURE.md"
            ),
            Violation::UnknownCrate { name } => write!(
                f,
                "the dependency rules name {name}, which is not a workspace member: \
                 update the rules in xtask/src/deps.rs and ARCHITECTURE.md"
            ),
        }
    }
}

/// Checks `graph` against [`FORBIDDEN`] and [`REQUIRED`]; returns every
/// violation, in a stable order (empty when the rules hold).
pub(crate) fn check(graph: &Graph) -> Vec<Violation> {
    let mut violations = Vec::new();

    // A rule about a crate that no longer exists silently holds; flag it.
    let named: BTreeSet<&'static str> = FORBIDDEN
        .iter()
        .flat_map(|rule| rule.crates.names().iter().chain(rule.forbidden.names()))
        .chain(std::iter::once(&REQUIRED))
        .chain(REQUIRED_EXEMPT)
        .copied()
        .collect();
    violations.extend(
        named
            .into_iter()
            .filter(|name| !graph.contains_key(*name))
            .map(|name| Violation::UnknownCrate { name }),
    );

    for (name, member) in graph {
        let parents = reachable(graph, name);

        // Each (crate, forbidden crate) pair is reported once, however many
        // rules it breaks.
        let mut forbidden: BTreeSet<&str> = BTreeSet::new();
        for rule in FORBIDDEN.iter().filter(|rule| rule.crates.contains(name)) {
            forbidden.extend(
                parents
                    .keys()
                    .copied()
                    .filter(|dep| graph.contains_key(*dep) && rule.forbidden.contains(dep)),
            );
        }
        violations.extend(forbidden.into_iter().map(|dep| Violation::Forbidden {
            path: path_to(&parents, name, dep),
        }));

        if member.is_lib
            && !REQUIRED_EXEMPT.contains(&name.as_str())
            && !parents.contains_key(REQUIRED)
        {
            violations.push(Violation::MissingRequired {
                krate: name.clone(),
            });
        }
    }
    violations
}

/// Breadth-first search from `start`: every crate reachable from it (not
/// `start` itself, unless on a cycle), mapped to its predecessor on a
/// shortest path.
fn reachable<'g>(graph: &'g Graph, start: &'g str) -> BTreeMap<&'g str, &'g str> {
    let mut parents = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(current) = queue.pop_front() {
        let Some(member) = graph.get(current) else {
            continue;
        };
        for dep in &member.deps {
            if dep != start && !parents.contains_key(dep.as_str()) {
                parents.insert(dep.as_str(), current);
                queue.push_back(dep.as_str());
            }
        }
    }
    parents
}

/// The path `start -> ... -> end` recorded in `parents` by [`reachable`].
fn path_to(parents: &BTreeMap<&str, &str>, start: &str, end: &str) -> Vec<String> {
    let mut path = vec![end.to_owned()];
    let mut current = end;
    while current != start {
        match parents.get(current) {
            Some(parent) => {
                current = parent;
                path.push(current.to_owned());
            }
            None => break,
        }
    }
    path.reverse();
    path
}

/// Builds the workspace-internal graph from `cargo metadata --format-version 1`
/// output (which must include the `resolve` section, i.e. no `--no-deps`).
pub(crate) fn graph_from_metadata(metadata: &Value) -> Result<Graph> {
    let members = metadata["workspace_members"]
        .as_array()
        .context("cargo metadata: no `workspace_members` array")?
        .iter()
        .map(|id| id.as_str().context("cargo metadata: non-string member id"))
        .collect::<Result<BTreeSet<&str>>>()?;

    let mut names: BTreeMap<&str, &str> = BTreeMap::new();
    let mut graph = Graph::new();
    for package in metadata["packages"]
        .as_array()
        .context("cargo metadata: no `packages` array")?
    {
        let id = package["id"]
            .as_str()
            .context("cargo metadata: package without an id")?;
        if !members.contains(id) {
            continue;
        }
        let name = package["name"]
            .as_str()
            .with_context(|| format!("cargo metadata: package {id} without a name"))?;
        let is_lib = package["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|target| target["kind"].as_array())
            .flatten()
            .filter_map(Value::as_str)
            .any(|kind| {
                matches!(
                    kind,
                    "lib" | "rlib" | "dylib" | "cdylib" | "staticlib" | "proc-macro"
                )
            });
        names.insert(id, name);
        graph.insert(
            name.to_owned(),
            Member {
                is_lib,
                deps: BTreeSet::new(),
            },
        );
    }
    if let Some(missing) = members.iter().find(|id| !names.contains_key(*id)) {
        bail!("cargo metadata: workspace member {missing} is not among the packages");
    }

    let nodes = metadata["resolve"]["nodes"]
        .as_array()
        .context("cargo metadata: no `resolve.nodes` (was it run with --no-deps?)")?;
    for node in nodes {
        let Some(name) = node["id"].as_str().and_then(|id| names.get(id)) else {
            continue;
        };
        for dep in node["deps"].as_array().into_iter().flatten() {
            let Some(dep_name) = dep["pkg"].as_str().and_then(|id| names.get(id)) else {
                continue;
            };
            // `kind` is null for normal dependencies, "dev" or "build" otherwise.
            let normal = dep["dep_kinds"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|kind| kind["kind"].is_null());
            if normal {
                if let Some(member) = graph.get_mut(*name) {
                    member.deps.insert((*dep_name).to_owned());
                }
            }
        }
    }
    Ok(graph)
}

/// The workspace root: the parent of this crate's directory. `cargo run` names that
/// directory at run time; the compile-time path is only the fallback, because a target
/// directory shared by several checkouts (CI's clean clone reuses the main one's) can run
/// an xtask binary built in another checkout, whose baked-in path may be gone.
pub(crate) fn workspace_root() -> PathBuf {
    let manifest_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest_dir
        .parent()
        .map_or_else(|| manifest_dir.clone(), Path::to_path_buf)
}

/// The workspace's target directory: `$CARGO_TARGET_DIR` if set, else `target/` in the root.
pub(crate) fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Runs `cargo metadata --format-version 1` in `root` (using `$CARGO` if set)
/// and returns the parsed JSON.
pub(crate) fn cargo_metadata(root: &Path) -> Result<Value> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(&cargo)
        .args(["metadata", "--format-version", "1"])
        .current_dir(root)
        .output()
        .with_context(|| format!("running {} metadata", cargo.to_string_lossy()))?;
    if !output.status.success() {
        bail!(
            "cargo metadata failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim_end()
        );
    }
    serde_json::from_slice(&output.stdout).context("parsing cargo metadata output")
}

/// The dependency graph of the real workspace.
pub(crate) fn workspace_graph() -> Result<Graph> {
    graph_from_metadata(&cargo_metadata(&workspace_root())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A graph that satisfies every rule; the tests break it one way at a time.
    fn good() -> Graph {
        let mut graph = Graph::new();
        for (name, is_lib, deps) in [
            ("pgbus-core", true, &[][..]),
            ("pgbus-pg", true, &["pgbus-core"][..]),
            ("pgbus-exec", true, &["pgbus-core"][..]),
            ("pgbus-stream", true, &["pgbus-core", "pgbus-exec"][..]),
            (
                "pgbus-cli",
                false,
                &["pgbus-core", "pgbus-pg", "pgbus-exec"][..],
            ),
            ("pgbus-tests", true, &["pgbus-core", "pgbus-pg"][..]),
            ("pgbus-benches", true, &["pgbus-core", "pgbus-pg"][..]),
            ("xtask", false, &[][..]),
        ] {
            add(&mut graph, name, is_lib, deps);
        }
        graph
    }

    fn add(graph: &mut Graph, name: &str, is_lib: bool, deps: &[&str]) {
        graph.insert(
            name.to_owned(),
            Member {
                is_lib,
                deps: deps.iter().map(|dep| (*dep).to_owned()).collect(),
            },
        );
    }

    fn add_dep(graph: &mut Graph, from: &str, to: &str) {
        graph
            .get_mut(from)
            .expect("crate in graph")
            .deps
            .insert(to.to_owned());
    }

    fn lines(graph: &Graph) -> Vec<String> {
        check(graph).iter().map(ToString::to_string).collect()
    }

    #[test]
    fn good_graph_has_no_violations() {
        assert_eq!(lines(&good()), Vec::<String>::new());
    }

    #[test]
    fn core_depends_on_no_member() {
        let mut graph = good();
        add(&mut graph, "pgbus-util", true, &[]);
        add_dep(&mut graph, "pgbus-core", "pgbus-util");
        assert_eq!(
            lines(&graph),
            [
                "pgbus-core depends on pgbus-util (via pgbus-core -> pgbus-util): forbidden, see ARCHITECTURE.md",
                "pgbus-util does not depend on pgbus-core: every library crate must, see ARCHITECTURE.md",
            ]
        );
    }

    #[test]
    fn exec_never_reaches_pg_even_transitively() {
        let mut graph = good();
        add(&mut graph, "foo", true, &["pgbus-core", "pgbus-pg"]);
        add_dep(&mut graph, "pgbus-exec", "foo");
        // pgbus-stream depends on pgbus-exec, so it now reaches pgbus-pg too.
        assert_eq!(
            lines(&graph),
            [
                "pgbus-exec depends on pgbus-pg (via pgbus-exec -> foo -> pgbus-pg): forbidden, see ARCHITECTURE.md",
                "pgbus-stream depends on pgbus-pg (via pgbus-stream -> pgbus-exec -> foo -> pgbus-pg): forbidden, see ARCHITECTURE.md",
            ]
        );
    }

    #[test]
    fn stream_never_depends_on_pg_or_cli() {
        let mut graph = good();
        add_dep(&mut graph, "pgbus-stream", "pgbus-pg");
        add_dep(&mut graph, "pgbus-stream", "pgbus-cli");
        assert_eq!(
            lines(&graph),
            [
                "pgbus-stream depends on pgbus-cli (via pgbus-stream -> pgbus-cli): forbidden, see ARCHITECTURE.md",
                "pgbus-stream depends on pgbus-pg (via pgbus-stream -> pgbus-pg): forbidden, see ARCHITECTURE.md",
            ]
        );
    }

    #[test]
    fn pg_never_depends_on_exec_or_stream() {
        let mut graph = good();
        add_dep(&mut graph, "pgbus-pg", "pgbus-stream");
        // pgbus-stream -> pgbus-exec, so pg reaches both.
        assert_eq!(
            lines(&graph),
            [
                "pgbus-pg depends on pgbus-exec (via pgbus-pg -> pgbus-stream -> pgbus-exec): forbidden, see ARCHITECTURE.md",
                "pgbus-pg depends on pgbus-stream (via pgbus-pg -> pgbus-stream): forbidden, see ARCHITECTURE.md",
            ]
        );
    }

    #[test]
    fn libraries_must_depend_on_core() {
        let mut graph = good();
        graph.get_mut("pgbus-exec").expect("exec").deps.clear();
        // A binary-only crate is not held to it; a library reaching the core
        // only transitively is fine.
        add(&mut graph, "pgbus-tool", false, &[]);
        add(&mut graph, "pgbus-extra", true, &["pgbus-pg"]);
        assert_eq!(
            lines(&graph),
            ["pgbus-exec does not depend on pgbus-core: every library crate must, see ARCHITECTURE.md"]
        );
    }

    #[test]
    fn nothing_depends_on_leaves() {
        for leaf in ["pgbus-cli", "pgbus-tests", "pgbus-benches", "xtask"] {
            let mut graph = good();
            add_dep(&mut graph, "pgbus-benches", leaf);
            let expected = if leaf == "pgbus-benches" {
                // A self-dependency is not a dependency.
                vec![]
            } else {
                vec![format!(
                    "pgbus-benches depends on {leaf} (via pgbus-benches -> {leaf}): forbidden, see ARCHITECTURE.md"
                )]
            };
            assert_eq!(lines(&graph), expected, "leaf {leaf}");
        }
    }

    #[test]
    fn one_line_per_pair_even_when_several_rules_break() {
        let mut graph = good();
        graph.get_mut("pgbus-cli").expect("cli").deps = ["pgbus-core".to_owned()].into();
        // Forbidden both by the pgbus-exec row and by the "nothing depends on
        // the cli" row.
        add_dep(&mut graph, "pgbus-exec", "pgbus-cli");
        assert_eq!(
            lines(&graph),
            [
                "pgbus-exec depends on pgbus-cli (via pgbus-exec -> pgbus-cli): forbidden, see ARCHITECTURE.md",
                "pgbus-stream depends on pgbus-cli (via pgbus-stream -> pgbus-exec -> pgbus-cli): forbidden, see ARCHITECTURE.md",
            ]
        );
    }

    #[test]
    fn cycles_terminate_and_report_shortest_paths() {
        let mut graph = good();
        // pgbus-core -> pgbus-cli -> pgbus-core is a cycle, and the core now
        // reaches everything the cli does.
        add_dep(&mut graph, "pgbus-core", "pgbus-cli");
        assert_eq!(
            lines(&graph),
            [
                "pgbus-benches depends on pgbus-cli (via pgbus-benches -> pgbus-core -> pgbus-cli): forbidden, see ARCHITECTURE.md",
                "pgbus-core depends on pgbus-cli (via pgbus-core -> pgbus-cli): forbidden, see ARCHITECTURE.md",
                "pgbus-core depends on pgbus-exec (via pgbus-core -> pgbus-cli -> pgbus-exec): forbidden, see ARCHITECTURE.md",
                "pgbus-core depends on pgbus-pg (via pgbus-core -> pgbus-cli -> pgbus-pg): forbidden, see ARCHITECTURE.md",
                "pgbus-exec depends on pgbus-cli (via pgbus-exec -> pgbus-core -> pgbus-cli): forbidden, see ARCHITECTURE.md",
                "pgbus-exec depends on pgbus-pg (via pgbus-exec -> pgbus-core -> pgbus-cli -> pgbus-pg): forbidden, see ARCHITECTURE.md",
                "pgbus-pg depends on pgbus-cli (via pgbus-pg -> pgbus-core -> pgbus-cli): forbidden, see ARCHITECTURE.md",
                "pgbus-pg depends on pgbus-exec (via pgbus-pg -> pgbus-core -> pgbus-cli -> pgbus-exec): forbidden, see ARCHITECTURE.md",
                "pgbus-stream depends on pgbus-cli (via pgbus-stream -> pgbus-core -> pgbus-cli): forbidden, see ARCHITECTURE.md",
                "pgbus-stream depends on pgbus-pg (via pgbus-stream -> pgbus-core -> pgbus-cli -> pgbus-pg): forbidden, see ARCHITECTURE.md",
                "pgbus-tests depends on pgbus-cli (via pgbus-tests -> pgbus-core -> pgbus-cli): forbidden, see ARCHITECTURE.md",
            ]
        );
    }

    #[test]
    fn rules_naming_missing_crates_are_reported() {
        let mut graph = good();
        graph.remove("pgbus-benches");
        assert_eq!(
            lines(&graph),
            [
                "the dependency rules name pgbus-benches, which is not a workspace member: \
              update the rules in xtask/src/deps.rs and ARCHITECTURE.md"
            ]
        );
    }

    #[test]
    fn metadata_keeps_only_normal_deps_between_members() {
        let metadata = serde_json::json!({
            "workspace_members": ["id-a", "id-b", "id-c"],
            "packages": [
                {"id": "id-a", "name": "a", "targets": [{"kind": ["lib"]}, {"kind": ["test"]}]},
                {"id": "id-b", "name": "b", "targets": [{"kind": ["bin"]}]},
                {"id": "id-c", "name": "c", "targets": [{"kind": ["proc-macro"]}]},
                {"id": "id-serde", "name": "serde", "targets": [{"kind": ["lib"]}]},
            ],
            "resolve": {"nodes": [
                {"id": "id-a", "deps": [
                    {"pkg": "id-serde", "dep_kinds": [{"kind": null, "target": null}]},
                    {"pkg": "id-b", "dep_kinds": [{"kind": "dev", "target": null}]},
                    {"pkg": "id-c", "dep_kinds": [{"kind": "build", "target": null}]},
                ]},
                {"id": "id-b", "deps": [
                    {"pkg": "id-a", "dep_kinds": [
                        {"kind": "dev", "target": null},
                        {"kind": null, "target": "cfg(unix)"},
                    ]},
                ]},
                {"id": "id-c", "deps": []},
                {"id": "id-serde", "deps": []},
            ]},
        });
        let graph = graph_from_metadata(&metadata).expect("valid metadata");
        let expected: Graph = [
            ("a", true, vec![]),
            ("b", false, vec!["a".to_owned()]),
            ("c", true, vec![]),
        ]
        .into_iter()
        .map(|(name, is_lib, deps)| {
            (
                name.to_owned(),
                Member {
                    is_lib,
                    deps: deps.into_iter().collect(),
                },
            )
        })
        .collect();
        assert_eq!(graph, expected);
    }

    #[test]
    fn metadata_without_resolve_is_an_error() {
        let metadata = serde_json::json!({
            "workspace_members": [],
            "packages": [],
            "resolve": null,
        });
        let error = graph_from_metadata(&metadata).expect_err("no resolve graph");
        assert!(error.to_string().contains("--no-deps"), "{error:#}");
    }

    /// The real workspace obeys the rules (this is `cargo xtask check-deps`
    /// run as a test).
    #[test]
    fn workspace_obeys_the_rules() {
        let graph = workspace_graph().expect("cargo metadata on the workspace");
        assert!(graph.contains_key("pgbus-core"), "{graph:?}");
        assert!(graph.contains_key("xtask"), "{graph:?}");
        assert_eq!(lines(&graph), Vec::<String>::new());
    }
}
