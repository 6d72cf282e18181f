//! The workspace's crates have no import cycles: every source file imports only files
//! below it (see the layer list at the top of each crate's lib.rs). A file is a module
//! (`a/mod.rs` and `a.rs` are module `a`); a use of `crate::a::b::C` is an edge to the
//! deepest module file it names. A cycle fails the test with the files and the names that
//! tie them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use syn::visit::Visit;

/// Module path (e.g. ["engine", "open"]) -> source file.
type Modules = BTreeMap<Vec<String>, PathBuf>;

fn module_path(src: &Path, file: &Path) -> Option<Vec<String>> {
    let rel = file.strip_prefix(src).ok()?;
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop()?;
    match last.as_str() {
        "lib.rs" | "main.rs" if parts.is_empty() => {}
        "mod.rs" => {}
        name => parts.push(name.strip_suffix(".rs")?.to_owned()),
    }
    Some(parts)
}

fn collect(src: &Path, dir: &Path, out: &mut Modules) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            // Binaries are crates of their own, above the library.
            if path.file_name().is_some_and(|n| n == "bin") && dir == src {
                continue;
            }
            collect(src, &path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            if let Some(m) = module_path(src, &path) {
                out.insert(m, path);
            }
        }
    }
}

/// Collects the module files a file's paths point into.
struct Uses<'a> {
    modules: &'a Modules,
    /// The module the visitor is in (the file's, plus inline `mod x { }` it is inside).
    current: Vec<String>,
    /// Target module -> names used from it.
    found: BTreeMap<Vec<String>, BTreeSet<String>>,
}

impl Uses<'_> {
    /// Resolves a path's leading segments to an absolute module path, if it is one of ours.
    fn resolve(&self, segments: &[String]) -> Option<Vec<String>> {
        let first = segments.first()?;
        let mut abs: Vec<String> = match first.as_str() {
            "crate" => Vec::new(),
            "self" => self.current.clone(),
            "super" => {
                let mut m = self.current.clone();
                m.pop()?;
                m
            }
            // A child module named without `self::` (`use child::Item;`, `child::f()`).
            child => {
                let mut m = self.current.clone();
                m.push(child.to_owned());
                if !self.modules.contains_key(&m) {
                    return None;
                }
                return self.deepest(&m, &segments[1..]);
            }
        };
        let mut rest = &segments[1..];
        while rest.first().is_some_and(|s| s == "super") {
            abs.pop()?;
            rest = &rest[1..];
        }
        self.deepest(&abs, rest)
    }

    /// The deepest module file named by `base` followed by `rest`.
    fn deepest(&self, base: &[String], rest: &[String]) -> Option<Vec<String>> {
        let mut best = self.modules.contains_key(base).then(|| base.to_vec());
        let mut m = base.to_vec();
        for seg in rest {
            m.push(seg.clone());
            if self.modules.contains_key(&m) {
                best = Some(m.clone());
            }
        }
        best
    }

    fn note(&mut self, segments: Vec<String>) {
        if let Some(target) = self.resolve(&segments) {
            let name = segments.last().cloned().unwrap_or_default();
            self.found.entry(target).or_default().insert(name);
        }
    }
}

fn use_paths(tree: &syn::UseTree, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match tree {
        syn::UseTree::Path(p) => {
            prefix.push(p.ident.to_string());
            use_paths(&p.tree, prefix, out);
            prefix.pop();
        }
        syn::UseTree::Name(n) => {
            let mut v = prefix.clone();
            if n.ident != "self" {
                v.push(n.ident.to_string());
            }
            out.push(v);
        }
        syn::UseTree::Rename(r) => {
            let mut v = prefix.clone();
            v.push(r.ident.to_string());
            out.push(v);
        }
        syn::UseTree::Glob(_) => out.push(prefix.clone()),
        syn::UseTree::Group(g) => {
            for t in &g.items {
                use_paths(t, prefix, out);
            }
        }
    }
}

impl<'ast> Visit<'ast> for Uses<'_> {
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let mut paths = Vec::new();
        use_paths(&u.tree, &mut Vec::new(), &mut paths);
        for p in paths {
            self.note(p);
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        let segments: Vec<String> = p.segments.iter().map(|s| s.ident.to_string()).collect();
        self.note(segments);
        syn::visit::visit_path(self, p);
    }

    // `pub(crate)` and `pub(in crate::x)` say who may see an item, not what it uses.
    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {}

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        // An inline module: paths inside are relative to it.
        if m.content.is_some() {
            self.current.push(m.ident.to_string());
            syn::visit::visit_item_mod(self, m);
            self.current.pop();
        }
    }
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<Vec<String>>> {
    struct T<'a> {
        edges: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<Vec<String>, usize>,
        low: BTreeMap<Vec<String>, usize>,
        stack: Vec<Vec<String>>,
        on_stack: BTreeSet<Vec<String>>,
        next: usize,
        out: Vec<Vec<Vec<String>>>,
    }
    impl T<'_> {
        fn visit(&mut self, v: &Vec<String>) {
            self.index.insert(v.clone(), self.next);
            self.low.insert(v.clone(), self.next);
            self.next += 1;
            self.stack.push(v.clone());
            self.on_stack.insert(v.clone());
            for w in self.edges.get(v).into_iter().flatten() {
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low[v];
                    self.low.insert(v.clone(), lv.min(lw));
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low[v];
                    self.low.insert(v.clone(), lv.min(iw));
                }
            }
            if self.low[v] == self.index[v] {
                let mut scc = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(&w);
                    let done = &w == v;
                    scc.push(w);
                    if done {
                        break;
                    }
                }
                if scc.len() > 1 {
                    scc.sort();
                    self.out.push(scc);
                }
            }
        }
    }
    let mut t = T {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !t.index.contains_key(v) {
            t.visit(v);
        }
    }
    t.out
}

fn check_crate(src: &Path) -> Result<usize, String> {
    let mut modules = Modules::new();
    collect(src, src, &mut modules);
    if modules.is_empty() {
        return Err(format!("no source files under {}", src.display()));
    }
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    let mut names: BTreeMap<(Vec<String>, Vec<String>), BTreeSet<String>> = BTreeMap::new();
    for (m, path) in &modules {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let file = syn::parse_file(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut uses = Uses {
            modules: &modules,
            current: m.clone(),
            found: BTreeMap::new(),
        };
        uses.visit_file(&file);
        let out = edges.entry(m.clone()).or_default();
        for (target, used) in uses.found {
            if &target != m {
                out.insert(target.clone());
                names.insert((m.clone(), target), used);
            }
        }
    }
    let found = cycles(&edges);
    if found.is_empty() {
        return Ok(modules.len());
    }
    let show = |m: &Vec<String>| {
        modules[m]
            .strip_prefix(src)
            .unwrap_or(&modules[m])
            .display()
            .to_string()
    };
    let mut report = format!("import cycles in {}:\n", src.display());
    for scc in found {
        let members: BTreeSet<&Vec<String>> = scc.iter().collect();
        report.push_str(&format!(
            "  cycle of {}: {}\n",
            scc.len(),
            scc.iter().map(show).collect::<Vec<_>>().join(", ")
        ));
        for from in &scc {
            for to in edges.get(from).into_iter().flatten() {
                if members.contains(to) {
                    let used = &names[&(from.clone(), to.clone())];
                    report.push_str(&format!(
                        "    {} -> {}: {}\n",
                        show(from),
                        show(to),
                        used.iter().cloned().collect::<Vec<_>>().join(", ")
                    ));
                }
            }
        }
    }
    Err(report)
}

#[test]
fn no_crate_has_an_import_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut failures = Vec::new();
    for krate in ["ublk-target", "rdma-link", "ctl"] {
        match check_crate(&root.join(krate).join("src")) {
            Ok(n) => eprintln!("{krate}: {n} modules, no import cycle"),
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_cycle_is_found_and_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let src = dir.path();
    std::fs::write(src.join("lib.rs"), "mod a;\nmod b;\n").expect("write");
    std::fs::write(src.join("a.rs"), "use crate::b::B;\npub struct A;\n").expect("write");
    std::fs::write(src.join("b.rs"), "pub struct B(crate::a::A);\n").expect("write");
    let e = check_crate(src).expect_err("a <-> b is a cycle");
    assert!(
        e.contains("a.rs -> b.rs: B") && e.contains("b.rs -> a.rs: A"),
        "{e}"
    );
    std::fs::write(src.join("b.rs"), "pub struct B;\n").expect("write");
    assert_eq!(check_crate(src), Ok(3));
}
