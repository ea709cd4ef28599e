//! File-level import circles inside a crate (part of `cargo xtask check-deps`).
//!
//! Crates may not depend on each other in a circle (cargo refuses), but the files of
//! one crate can: `a.rs` uses `crate::b::X` while `b.rs` uses `crate::a::Y`. Such
//! files can only be read, changed and tested together; this check finds them.
//!
//! The graph has one node per source file and an edge `a.rs -> b.rs` when `a.rs`
//! names an item that `b.rs` defines: through `use` (paths from `crate`, `super`,
//! `self`, a child module or a name the file imported) or through a path in the code
//! (`crate::x::f()`, `super::Y`, `child::Z`). Paths are followed through re-exports
//! (`pub use`, globs) to the file that defines the item. A `pub use` in a crate root or
//! a `mod.rs` is a re-export, not an edge of that file (a facade); declaring `mod child`
//! is not an edge either, but using a child's items is. Comments and string literals
//! are skipped. Each strongly connected component of more than one file (Tarjan) is a
//! circle, reported with one example path per edge.
//!
//! The reader is a lexer plus a `use`-tree parser, not a Rust parser: macros'
//! expansions and `#[path]` attributes are not seen. That is enough for the habits of
//! this workspace, and the test below pins the cases it must get right.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Crates whose files must not import each other in a circle (a circle fails
/// `check-deps`).
pub(crate) const ENFORCED: &[&str] = &["pgbus-cli", "pgbus-pg", "pgbus-stream", "pgbus-exec"];

/// Crates whose circles are reported but do not fail `check-deps` (yet).
pub(crate) const REPORTED: &[&str] = &["pgbus-core"];

/// A module path from the crate root (`[]` is the root).
type ModPath = Vec<String>;

/// One import circle: files (relative to the crate's `src/`) and an example per edge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Circle {
    /// The crate (package name).
    pub(crate) krate: String,
    /// The files of the strongly connected component, sorted.
    pub(crate) files: Vec<String>,
    /// Each edge inside the component: `(from, to, example path)`, sorted.
    pub(crate) edges: Vec<(String, String, String)>,
}

impl fmt::Display for Circle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: files import each other in a circle: {}",
            self.krate,
            self.files.join(", ")
        )?;
        for (from, to, example) in &self.edges {
            write!(f, "\n    {from} -> {to} ({example})")?;
        }
        Ok(())
    }
}

/// The import circles among the files under `src` (a crate's `src/` directory).
pub(crate) fn circles_in(krate: &str, src: &Path) -> Result<Vec<Circle>> {
    let mut files = BTreeMap::new();
    collect_files(src, src, &mut files)?;
    Ok(circles(krate, &files))
}

/// Reads every `.rs` file below `dir` into `files`, keyed by its path relative to `src`
/// with `/` separators. `src/bin/` holds other crate roots and is skipped.
fn collect_files(src: &Path, dir: &Path, files: &mut BTreeMap<String, String>) -> Result<()> {
    let mut entries = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<std::io::Result<Vec<PathBuf>>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    entries.sort();
    for path in entries {
        let relative = path
            .strip_prefix(src)
            .with_context(|| format!("{} is outside {}", path.display(), src.display()))?
            .components()
            .map(|part| part.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/");
        if path.is_dir() {
            if relative != "bin" {
                collect_files(src, &path, files)?;
            }
        } else if relative.ends_with(".rs") {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            files.insert(relative, text);
        }
    }
    Ok(())
}

/// The module a file defines, by its path: `lib.rs`/`main.rs` the root, `a/mod.rs` and
/// `a.rs` module `a`, `a/b.rs` module `a::b`.
fn module_of(file: &str) -> ModPath {
    let mut parts: Vec<String> = file.split('/').map(str::to_owned).collect();
    let last = parts.pop().unwrap_or_default();
    let stem = last.trim_end_matches(".rs");
    let is_root = parts.is_empty() && matches!(stem, "lib" | "main");
    if stem != "mod" && !is_root {
        parts.push(stem.to_owned());
    }
    parts
}

/// Whether a file is a facade: a crate root or a `mod.rs`, whose `pub use` re-exports.
fn is_facade(file: &str) -> bool {
    matches!(file, "lib.rs" | "main.rs") || file == "mod.rs" || file.ends_with("/mod.rs")
}

/// A token of Rust source, as far as paths care.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    /// An identifier, keyword or number.
    Ident(String),
    /// `::`.
    PathSep,
    /// Any other punctuation character.
    Punct(char),
}

/// Splits `text` into tokens, dropping whitespace, comments, string, byte-string, raw
/// string and character literals, and lifetimes.
fn lex(text: &str) -> Vec<Tok> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c.is_whitespace() {
            i += 1;
        } else if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            // Block comments nest.
            let mut depth = 0usize;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth = depth.saturating_sub(1);
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            i = skip_quoted(&chars, i + 1, '"');
        } else if c == '\'' {
            // A character literal ('x', '\n', '\u{1F600}') or a lifetime ('a).
            if next == Some('\\') {
                i = skip_quoted(&chars, i + 1, '\'');
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
            } else {
                i += 1;
                while i < chars.len() && is_ident_char(chars[i]) {
                    i += 1;
                }
            }
        } else if is_ident_char(c) {
            let start = i;
            while i < chars.len() && is_ident_char(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            // String prefixes: b"..", r"..", r#".."#, br#".."#, c"..", b'x'.
            let raw = matches!(word.as_str(), "r" | "br" | "cr");
            if raw && matches!(chars.get(i), Some('"' | '#')) {
                let mut hashes = 0;
                while chars.get(i) == Some(&'#') {
                    hashes += 1;
                    i += 1;
                }
                if chars.get(i) == Some(&'"') {
                    i = skip_raw(&chars, i + 1, hashes);
                    continue;
                }
                // `r#ident`: a raw identifier.
                let start = i;
                while i < chars.len() && is_ident_char(chars[i]) {
                    i += 1;
                }
                tokens.push(Tok::Ident(chars[start..i].iter().collect()));
            } else if matches!(word.as_str(), "b" | "c") && chars.get(i) == Some(&'"') {
                i = skip_quoted(&chars, i + 1, '"');
            } else if word == "b" && chars.get(i) == Some(&'\'') {
                i = skip_quoted(&chars, i + 1, '\'');
            } else {
                tokens.push(Tok::Ident(word));
            }
        } else if c == ':' && next == Some(':') {
            tokens.push(Tok::PathSep);
            i += 2;
        } else {
            tokens.push(Tok::Punct(c));
            i += 1;
        }
    }
    tokens
}

fn is_ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The index after the closing `quote` of a literal whose body starts at `i`.
fn skip_quoted(chars: &[char], mut i: usize, quote: char) -> usize {
    while i < chars.len() {
        match chars[i] {
            '\\' => i += 2,
            c if c == quote => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// The index after the `"` and `hashes` `#`s closing a raw string whose body starts at `i`.
fn skip_raw(chars: &[char], mut i: usize, hashes: usize) -> usize {
    while i < chars.len() {
        if chars[i] == '"' && (1..=hashes).all(|k| chars.get(i + k) == Some(&'#')) {
            return i + 1 + hashes;
        }
        i += 1;
    }
    i
}

/// A path as written, before resolution.
#[derive(Debug, Clone)]
struct Written {
    /// The module the path appears in.
    module: ModPath,
    /// Its segments (`crate`, `super`, `self` included).
    segments: Vec<String>,
}

/// A name a `use` brings into a module.
#[derive(Debug, Clone)]
struct Binding {
    name: String,
    target: Written,
}

/// What one file says about modules, items and paths.
#[derive(Debug, Default)]
struct FileFacts {
    /// Modules declared (`mod x;` or `mod x { .. }`), by their full path.
    modules: BTreeSet<ModPath>,
    /// Items defined, by their module.
    items: BTreeMap<ModPath, BTreeSet<String>>,
    /// Names brought in by `use`, by module: `(binding, is pub use)`.
    bindings: BTreeMap<ModPath, Vec<(Binding, bool)>>,
    /// Glob imports (`use x::*`), by module: `(target module, is pub use)`.
    globs: BTreeMap<ModPath, Vec<(Written, bool)>>,
    /// Paths the file uses, in `use` or in code, except its re-exports.
    uses: Vec<Written>,
    /// Identifiers in code outside `use` (to see a facade use its own re-exports).
    idents: BTreeSet<String>,
}

const ITEM_KEYWORDS: &[&str] = &[
    "fn", "struct", "enum", "trait", "type", "const", "static", "union",
];

/// Reads the facts of one file, which defines module `base`.
fn facts(base: &ModPath, text: &str, facade: bool) -> FileFacts {
    let tokens = lex(text);
    let mut facts = FileFacts::default();
    // Inline modules open at a brace depth: (depth, name).
    let mut inline: Vec<(usize, String)> = Vec::new();
    let mut depth = 0usize;
    let module_at = |inline: &[(usize, String)]| -> ModPath {
        let mut path = base.clone();
        path.extend(inline.iter().map(|(_, name)| name.clone()));
        path
    };
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Tok::Punct('{') => depth += 1,
            Tok::Punct('}') => {
                depth = depth.saturating_sub(1);
                if inline.last().is_some_and(|(open, _)| *open == depth) {
                    inline.pop();
                }
            }
            Tok::Ident(word) if word == "mod" => {
                if let Some(Tok::Ident(name)) = tokens.get(i + 1) {
                    let mut path = module_at(&inline);
                    path.push(name.clone());
                    facts.modules.insert(path);
                    if tokens.get(i + 2) == Some(&Tok::Punct('{')) {
                        inline.push((depth, name.clone()));
                        depth += 1;
                        i += 3;
                        continue;
                    }
                    // Declaring a module is not using it.
                    i += 2;
                    continue;
                }
            }
            Tok::Ident(word) if ITEM_KEYWORDS.contains(&word.as_str()) => {
                if let Some(Tok::Ident(name)) = tokens.get(i + 1) {
                    facts
                        .items
                        .entry(module_at(&inline))
                        .or_default()
                        .insert(name.clone());
                }
            }
            Tok::Ident(word) if word == "macro_rules" => {
                if let (Some(Tok::Punct('!')), Some(Tok::Ident(name))) =
                    (tokens.get(i + 1), tokens.get(i + 2))
                {
                    facts
                        .items
                        .entry(module_at(&inline))
                        .or_default()
                        .insert(name.clone());
                }
            }
            Tok::Ident(word) if word == "use" && !preceded_by_path_sep(&tokens, i) => {
                let public = is_pub_before(&tokens, i);
                let module = module_at(&inline);
                let mut trees = Vec::new();
                let end = parse_use_tree(&tokens, i + 1, Vec::new(), &mut trees);
                for (segments, leaf) in trees {
                    let written = Written {
                        module: module.clone(),
                        segments,
                    };
                    if !(public && facade) {
                        facts.uses.push(written.clone());
                    }
                    match leaf {
                        Leaf::Glob => facts
                            .globs
                            .entry(module.clone())
                            .or_default()
                            .push((written, public)),
                        Leaf::Name(name) => {
                            facts.bindings.entry(module.clone()).or_default().push((
                                Binding {
                                    name,
                                    target: written,
                                },
                                public,
                            ))
                        }
                    }
                }
                i = end;
                continue;
            }
            Tok::Ident(word) if !preceded_by_path_sep(&tokens, i) => {
                facts.idents.insert(word.clone());
                if tokens.get(i + 1) == Some(&Tok::PathSep) {
                    let mut segments = vec![word.clone()];
                    let mut j = i + 1;
                    while tokens.get(j) == Some(&Tok::PathSep) {
                        match tokens.get(j + 1) {
                            Some(Tok::Ident(next)) => {
                                segments.push(next.clone());
                                j += 2;
                            }
                            _ => break,
                        }
                    }
                    facts.uses.push(Written {
                        module: module_at(&inline),
                        segments,
                    });
                    i = j;
                    continue;
                }
            }
            _ => {}
        }
        i += 1;
    }
    facts
}

/// Whether token `i` follows `::` (so it continues a path rather than starting one).
fn preceded_by_path_sep(tokens: &[Tok], i: usize) -> bool {
    i > 0 && tokens[i - 1] == Tok::PathSep
}

/// Whether the `use` at `i` is `pub` or `pub(..)`.
fn is_pub_before(tokens: &[Tok], i: usize) -> bool {
    match tokens.get(i.wrapping_sub(1)) {
        Some(Tok::Ident(word)) => word == "pub",
        Some(Tok::Punct(')')) => {
            // pub(crate), pub(super), pub(in path): find the `(` and look before it.
            let mut j = i - 1;
            while j > 0 && tokens[j] != Tok::Punct('(') {
                j -= 1;
            }
            j > 0 && tokens[j - 1] == Tok::Ident("pub".to_owned())
        }
        _ => false,
    }
}

/// How a `use` tree ends.
#[derive(Debug, Clone)]
enum Leaf {
    /// `*`.
    Glob,
    /// A name bound in the module (the last segment, `self`'s module, or an `as` alias).
    Name(String),
}

/// Parses the `use` tree starting at `i` under `prefix`, pushing each complete path with
/// its leaf; returns the index after the tree (after `;` for a whole statement).
fn parse_use_tree(
    tokens: &[Tok],
    mut i: usize,
    prefix: Vec<String>,
    out: &mut Vec<(Vec<String>, Leaf)>,
) -> usize {
    let mut segments = prefix;
    if tokens.get(i) == Some(&Tok::PathSep) {
        i += 1; // `use ::std::x`
    }
    loop {
        match tokens.get(i) {
            Some(Tok::Ident(word)) if word == "self" && !segments.is_empty() => {
                // `a::{self}` binds `a`.
                let name = segments.last().cloned().unwrap_or_default();
                i += 1;
                let name = alias(tokens, &mut i).unwrap_or(name);
                out.push((segments, Leaf::Name(name)));
                return finish(tokens, i);
            }
            Some(Tok::Ident(word)) => {
                segments.push(word.clone());
                i += 1;
                if tokens.get(i) == Some(&Tok::PathSep) {
                    i += 1;
                    continue;
                }
                let name = alias(tokens, &mut i).unwrap_or_else(|| word.clone());
                out.push((segments, Leaf::Name(name)));
                return finish(tokens, i);
            }
            Some(Tok::Punct('*')) => {
                out.push((segments, Leaf::Glob));
                return finish(tokens, i + 1);
            }
            Some(Tok::Punct('{')) => {
                i += 1;
                while let Some(tok) = tokens.get(i) {
                    match tok {
                        Tok::Punct('}') => {
                            i += 1;
                            break;
                        }
                        Tok::Punct(',') => i += 1,
                        _ => i = parse_use_tree(tokens, i, segments.clone(), out),
                    }
                }
                return finish(tokens, i);
            }
            _ => return finish(tokens, i),
        }
    }
}

/// Reads `as NAME` at `i`, if there.
fn alias(tokens: &[Tok], i: &mut usize) -> Option<String> {
    if tokens.get(*i) == Some(&Tok::Ident("as".to_owned())) {
        if let Some(Tok::Ident(name)) = tokens.get(*i + 1) {
            *i += 2;
            return Some(name.clone());
        }
    }
    None
}

/// After a tree: skip a closing `;` (inside braces, the caller handles `,` and `}`).
fn finish(tokens: &[Tok], i: usize) -> usize {
    if tokens.get(i) == Some(&Tok::Punct(';')) {
        i + 1
    } else {
        i
    }
}

/// The crate's files and facts, and how paths resolve among them.
struct Crate<'a> {
    /// Module -> the file that holds it (inline modules map to their file).
    module_files: BTreeMap<ModPath, &'a str>,
    facts: BTreeMap<&'a str, FileFacts>,
}

impl Crate<'_> {
    /// Makes a written path absolute (a module path followed by item names), or `None`
    /// when it names nothing of this crate (another crate, a local, a type's associated item).
    fn absolute(&self, written: &Written) -> Option<Vec<String>> {
        self.absolute_within(written, 8)
    }

    /// [`Self::absolute`], following at most `hops` imported names (a name imported from
    /// a path that starts with itself, as in `use foo::foo;` for an outside `foo`, would
    /// otherwise loop).
    fn absolute_within(&self, written: &Written, hops: usize) -> Option<Vec<String>> {
        let mut segments = written.segments.iter().peekable();
        let mut base: ModPath = written.module.clone();
        match segments.peek().map(|s| s.as_str()) {
            Some("crate") => {
                base.clear();
                segments.next();
            }
            Some("self") => {
                segments.next();
            }
            Some("super") => {
                while segments.peek().map(|s| s.as_str()) == Some("super") {
                    base.pop()?;
                    segments.next();
                }
            }
            Some(first) => {
                let mut child = base.clone();
                child.push(first.to_owned());
                if !self.module_files.contains_key(&child) {
                    // A name imported into this module: continue from its target.
                    let binding = self.binding(&base, first)?;
                    let mut target = self.absolute_within(&binding.target, hops.checked_sub(1)?)?;
                    segments.next();
                    target.extend(segments.cloned());
                    return Some(target);
                }
            }
            None => return None,
        }
        base.extend(segments.cloned());
        Some(base)
    }

    /// The `use` binding `name` in `module`, if any.
    fn binding(&self, module: &ModPath, name: &str) -> Option<&Binding> {
        let file = self.module_files.get(module)?;
        self.facts
            .get(file)?
            .bindings
            .get(module)?
            .iter()
            .map(|(binding, _)| binding)
            .find(|binding| binding.name == name)
    }

    /// The file that defines what an absolute path names, following re-exports
    /// (`hops` bounds the chain, so a re-export circle cannot loop).
    fn defining_file(&self, path: &[String], hops: usize) -> Option<&str> {
        let split = (0..=path.len())
            .rev()
            .find(|&n| self.module_files.contains_key(&path[..n]))?;
        let module = path[..split].to_vec();
        let file = *self.module_files.get(&module)?;
        let Some(name) = path.get(split) else {
            return Some(file);
        };
        let facts = self.facts.get(file)?;
        if facts
            .items
            .get(&module)
            .is_some_and(|items| items.contains(name))
            || hops == 0
        {
            return Some(file);
        }
        if let Some(binding) = self.binding(&module, name) {
            let target = self.absolute(&binding.target)?;
            return self.defining_file(&target, hops - 1).or(Some(file));
        }
        for (glob, _) in facts.globs.get(&module).into_iter().flatten() {
            let Some(mut target) = self.absolute(glob) else {
                continue;
            };
            target.push(name.clone());
            if let Some(found) = self.defining_file(&target, hops - 1) {
                let target_module = &target[..target.len() - 1];
                if self.module_files.get(target_module) != Some(&found) || self.defines(found, name)
                {
                    return Some(found);
                }
            }
        }
        Some(file)
    }

    fn defines(&self, file: &str, name: &str) -> bool {
        self.facts
            .get(file)
            .is_some_and(|facts| facts.items.values().any(|items| items.contains(name)))
    }
}

/// The import circles among `files` (path relative to `src/` -> text).
fn circles(krate: &str, files: &BTreeMap<String, String>) -> Vec<Circle> {
    let mut module_files: BTreeMap<ModPath, &str> = BTreeMap::new();
    let mut all_facts = BTreeMap::new();
    for (file, text) in files {
        let module = module_of(file);
        let facts = facts(&module, text, is_facade(file));
        module_files.insert(module, file.as_str());
        all_facts.insert(file.as_str(), facts);
    }
    // Inline modules belong to their file.
    let inline: Vec<(ModPath, &str)> = all_facts
        .iter()
        .flat_map(|(file, facts)| {
            facts
                .modules
                .iter()
                .map(move |module| (module.clone(), *file))
        })
        .collect();
    for (module, file) in inline {
        module_files.entry(module).or_insert(file);
    }
    let krate_files = Crate {
        module_files,
        facts: all_facts,
    };

    // Edges, with the first path seen for each.
    let mut edges: BTreeMap<(&str, &str), String> = BTreeMap::new();
    for (file, facts) in &krate_files.facts {
        let mut targets: Vec<(&str, String)> = Vec::new();
        for written in &facts.uses {
            let Some(path) = krate_files.absolute(written) else {
                continue;
            };
            if let Some(target) = krate_files.defining_file(&path, 8) {
                targets.push((target, written.segments.join("::")));
            }
        }
        // A facade that uses its own re-exports depends on where they are defined.
        if is_facade(file) {
            for (module, bindings) in &facts.bindings {
                for (binding, public) in bindings {
                    if !public || !facts.idents.contains(&binding.name) {
                        continue;
                    }
                    let Some(path) = krate_files.absolute(&binding.target) else {
                        continue;
                    };
                    if krate_files.module_files.get(module) == Some(file) {
                        if let Some(target) = krate_files.defining_file(&path, 8) {
                            targets.push((target, binding.target.segments.join("::")));
                        }
                    }
                }
            }
        }
        for (target, example) in targets {
            if target != *file {
                edges.entry((*file, target)).or_insert(example);
            }
        }
    }

    let nodes: Vec<&str> = files.keys().map(String::as_str).collect();
    strongly_connected(&nodes, &edges)
        .into_iter()
        .filter(|component| component.len() > 1)
        .map(|component| {
            let members: BTreeSet<&str> = component.iter().copied().collect();
            let mut files: Vec<String> = component.iter().map(|file| (*file).to_owned()).collect();
            files.sort();
            let edges = edges
                .iter()
                .filter(|((from, to), _)| members.contains(from) && members.contains(to))
                .map(|((from, to), example)| {
                    ((*from).to_owned(), (*to).to_owned(), example.clone())
                })
                .collect();
            Circle {
                krate: krate.to_owned(),
                files,
                edges,
            }
        })
        .collect()
}

/// Tarjan's strongly connected components of the graph `nodes`/`edges`.
fn strongly_connected<'a>(
    nodes: &[&'a str],
    edges: &BTreeMap<(&'a str, &'a str), String>,
) -> Vec<Vec<&'a str>> {
    struct State<'a> {
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        components: Vec<Vec<&'a str>>,
        successors: BTreeMap<&'a str, Vec<&'a str>>,
    }
    fn visit<'a>(state: &mut State<'a>, node: &'a str) {
        let number = state.index.len();
        state.index.insert(node, number);
        state.low.insert(node, number);
        state.stack.push(node);
        state.on_stack.insert(node);
        let successors = state.successors.get(node).cloned().unwrap_or_default();
        for next in successors {
            if !state.index.contains_key(next) {
                visit(state, next);
                let low = state.low[next].min(state.low[node]);
                state.low.insert(node, low);
            } else if state.on_stack.contains(next) {
                let low = state.index[next].min(state.low[node]);
                state.low.insert(node, low);
            }
        }
        if state.low[node] == state.index[node] {
            let mut component = Vec::new();
            while let Some(top) = state.stack.pop() {
                state.on_stack.remove(top);
                component.push(top);
                if top == node {
                    break;
                }
            }
            state.components.push(component);
        }
    }
    let mut successors: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        successors.entry(from).or_default().push(to);
    }
    let mut state = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        components: Vec::new(),
        successors,
    };
    for node in nodes {
        if !state.index.contains_key(node) {
            visit(&mut state, node);
        }
    }
    state.components
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(files: &[(&str, &str)]) -> Vec<String> {
        let files = files
            .iter()
            .map(|(path, text)| ((*path).to_owned(), (*text).to_owned()))
            .collect();
        circles("demo", &files)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn finds_a_circle_through_use_and_code_paths() {
        let found = check(&[
            ("main.rs", "mod a; mod b; fn main() { a::run() }"),
            ("a.rs", "use crate::b::Helper; pub fn run() {}"),
            ("b.rs", "pub struct Helper; fn f() { crate::a::run() }"),
        ]);
        assert_eq!(
            found,
            [
                "demo: files import each other in a circle: a.rs, b.rs\n    \
              a.rs -> b.rs (crate::b::Helper)\n    b.rs -> a.rs (crate::a::run)"
            ]
        );
    }

    #[test]
    fn ignores_comments_strings_and_declarations() {
        let found = check(&[
            ("lib.rs", "mod a; mod b; pub use a::A; pub use b::B;"),
            (
                "a.rs",
                "use crate::b::B; pub struct A; // crate::b::x\n const S: &str = \"crate::b::y\";",
            ),
            (
                "b.rs",
                "pub struct B; /* use crate::a::A; */ const R: &str = r#\"crate::a::A\"#; \
                 fn f<'a>(x: &'a str) -> char { 'c' }",
            ),
        ]);
        assert_eq!(found, Vec::<String>::new());
    }

    #[test]
    fn follows_re_exports_to_the_defining_file() {
        // `b` uses `crate::Thing`, re-exported by the root from `a`; `a` uses `b`.
        let found = check(&[
            ("lib.rs", "mod a; mod b; pub use a::Thing;"),
            ("a.rs", "pub struct Thing; fn f() { crate::b::g() }"),
            ("b.rs", "use crate::Thing; pub fn g() {}"),
        ]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].contains("b.rs -> a.rs (crate::Thing)"),
            "{found:?}"
        );
    }

    #[test]
    fn child_using_parent_items_is_an_edge_but_declaring_it_is_not() {
        let declared_only = check(&[
            (
                "serve/mod.rs",
                "mod api; pub struct App; pub use api::routes;",
            ),
            ("serve/api.rs", "use super::App; pub fn routes() {}"),
        ]);
        assert_eq!(declared_only, Vec::<String>::new());
        let both_ways = check(&[
            (
                "serve/mod.rs",
                "mod api; pub struct App; fn go() { api::routes() }",
            ),
            ("serve/api.rs", "use super::App; pub fn routes() {}"),
        ]);
        assert_eq!(
            both_ways,
            [
                "demo: files import each other in a circle: serve/api.rs, serve/mod.rs\n    \
              serve/api.rs -> serve/mod.rs (super::App)\n    \
              serve/mod.rs -> serve/api.rs (api::routes)"
            ]
        );
    }

    #[test]
    fn inline_test_modules_and_use_groups_resolve() {
        let found = check(&[
            ("lib.rs", "mod a; mod b;"),
            (
                "a.rs",
                "pub fn f() {} #[cfg(test)] mod tests { use super::*; use crate::b::{self, G as H}; }",
            ),
            ("b.rs", "pub struct G; fn g() { super::a::f() }"),
        ]);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("a.rs -> b.rs (crate::b)"), "{found:?}");
        assert!(found[0].contains("b.rs -> a.rs (super::a::f)"), "{found:?}");
    }

    #[test]
    fn facade_declaring_and_re_exporting_a_child_is_no_edge() {
        let found = check(&[
            (
                "cluster/mod.rs",
                "mod local; pub use local::local; pub struct Runner;",
            ),
            ("cluster/local.rs", "use super::Runner; pub fn local() {}"),
        ]);
        assert_eq!(found, Vec::<String>::new());
    }

    #[test]
    fn facade_using_its_re_export_is_an_edge() {
        let found = check(&[
            (
                "cluster/mod.rs",
                "mod local; pub use local::Local; pub struct Runner; fn f() { Local::new(); }",
            ),
            ("cluster/local.rs", "use super::Runner; pub struct Local;"),
        ]);
        assert_eq!(found.len(), 1, "{found:?}");
    }

    /// The real workspace: no circles in the enforced crates (this is the circle part of
    /// `cargo xtask check-deps` run as a test).
    #[test]
    fn enforced_crates_have_no_import_circles() {
        let root = crate::deps::workspace_root();
        for krate in ENFORCED {
            let circles =
                circles_in(krate, &root.join(krate).join("src")).expect("readable sources");
            let lines: Vec<String> = circles.iter().map(ToString::to_string).collect();
            assert_eq!(lines, Vec::<String>::new(), "{krate}");
        }
    }
}
