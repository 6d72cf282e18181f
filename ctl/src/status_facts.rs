//! `nvmirrorctl status --shell`: the facts a script acts on, worked out from the daemon's
//! status so the script needs no JSON parser and reads only typed fields (never the `link`
//! text, which is for people).
//!
//! The range counts are over a selection: the ranges the config gives one node
//! (`--ranges-of NODE`, one Pacemaker resource), or every range of the daemon.

use crate::config_show::RangesOf;
use crate::shell::ShellVars;
use nvmirror::control::DaemonStatus;

#[derive(Debug, PartialEq, Eq)]
pub struct StatusFacts {
    pub pid: u32,
    /// The daemon's node name.
    pub node: String,
    /// The `--ranges-of` node; empty: every range is selected.
    pub ranges_of: String,
    /// Ranges selected.
    pub ranges: usize,
    /// Selected ranges this node serves now (owner here, state "local").
    pub owned: usize,
    /// Selected ranges this node is taking over (owner here, state "taking-over").
    pub taking: usize,
    /// Other nodes that own selected ranges, sorted, each once.
    pub holders: Vec<String>,
    /// The partner link carries mirror traffic.
    pub link_up: bool,
    /// engine.mirror.link_state: "up", "connecting", "down", "closed", "none".
    pub link_state: String,
    /// engine.mirror.state: "mirroring", "degraded", "standalone".
    pub mirror: String,
    /// "PARTITION: why" of every failed partition, "; "-separated; empty when none failed.
    pub failed: String,
    pub medium_errors: u64,
    pub last_medium_error: String,
    /// Phase of the running or last takeover ("" when none since the daemon started).
    pub takeover_phase: String,
    pub takeover_records: u64,
}

impl StatusFacts {
    pub fn new(s: &DaemonStatus, ranges_of: Option<&RangesOf>) -> StatusFacts {
        let e = &s.engine;
        let selected: Vec<_> = e
            .ranges
            .iter()
            .filter(|r| ranges_of.is_none_or(|of| of.contains(r.lun, r.range)))
            .collect();
        let here = |state: &str| {
            selected
                .iter()
                .filter(|r| r.owner == e.node && r.state == state)
                .count()
        };
        let mut holders: Vec<String> = selected
            .iter()
            .filter(|r| r.owner != e.node)
            .map(|r| r.owner.clone())
            .collect();
        holders.sort();
        holders.dedup();
        let m = &e.mirror;
        StatusFacts {
            pid: s.pid,
            node: e.node.clone(),
            ranges_of: ranges_of.map(|of| of.node.clone()).unwrap_or_default(),
            // The config decides what the resource stands for, even for ranges the daemon
            // does not list (yet): they then count as not served here.
            ranges: ranges_of.map_or(selected.len(), |of| of.ranges.len()),
            owned: here("local"),
            taking: here("taking-over"),
            holders,
            // Either says the partner is connected: `state` comes from the link and the
            // second store, `link_state` from the link alone, read a moment apart (and a
            // daemon older than `link_state` sends it empty).
            link_up: m.state == "mirroring" || m.link_state == "up",
            link_state: m.link_state.clone(),
            mirror: m.state.clone(),
            failed: e
                .partitions
                .iter()
                .filter_map(|p| p.failed.as_ref().map(|f| format!("{}: {f}", p.partition)))
                .collect::<Vec<_>>()
                .join("; "),
            medium_errors: e.medium_errors,
            last_medium_error: e.last_medium_error.clone().unwrap_or_default(),
            takeover_phase: e
                .takeover
                .as_ref()
                .map(|t| t.phase.clone())
                .unwrap_or_default(),
            takeover_records: e.takeover.as_ref().map_or(0, |t| t.records_done),
        }
    }

    /// See `status --help` for each variable.
    pub fn shell_vars(&self) -> ShellVars {
        let mut v = ShellVars::default();
        v.set("ST_PID", self.pid)
            .set("ST_NODE", &self.node)
            .set("ST_RANGES_OF", &self.ranges_of)
            .set("ST_NRANGES", self.ranges)
            .set("ST_OWNED", self.owned)
            .set("ST_TAKING", self.taking)
            .set("ST_HOLDERS", self.holders.join(" "))
            .set_flag("ST_LINK_UP", self.link_up)
            .set("ST_LINK_STATE", &self.link_state)
            .set("ST_MIRROR", &self.mirror)
            .set("ST_FAILED", &self.failed)
            .set("ST_MEDIUM_ERRORS", self.medium_errors)
            .set("ST_LAST_MEDIUM_ERROR", &self.last_medium_error)
            .set("ST_TAKEOVER_PHASE", &self.takeover_phase)
            .set("ST_TAKEOVER_RECORDS", self.takeover_records);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvmirror::config::NodeConfig;

    /// node-b's view after taking over part of node-a's ranges: lun0 range 0 is node-a's
    /// configured range now served here, range 1 is node-b's own, range 2 (node-a's) is
    /// being taken over, range 3 (node-a's) is still node-a's.
    /// A node-b mid-takeover, with a failed partition (shared with the library's tests).
    const STATUS: &str = include_str!("../../ublk-target/tests/data/status-node-b.json");

    fn status() -> DaemonStatus {
        match serde_json::from_str(STATUS) {
            Ok(s) => s,
            Err(e) => panic!("fixture does not match DaemonStatus: {e}"),
        }
    }

    fn config() -> NodeConfig {
        let text = r#"
[node]
name = "node-b"
[nvram]
path = "/dev/dax0.0"
partitions = 4
[cluster]
id = 1
secret_file = "/etc/nvmirror/secret"
[[cluster.node]]
name = "node-a"
address = "10.0.0.1:7800"
[[cluster.node]]
name = "node-b"
address = "10.0.0.2:7800"
[[lun]]
name = "lun0"
medium = "/dev/vda"
owners = ["node-a", "node-b", "node-a", "node-b"]
"#;
        match NodeConfig::parse(text) {
            Ok(c) => c,
            Err(e) => panic!("test config: {e}"),
        }
    }

    fn ranges_of(node: &str) -> RangesOf {
        match RangesOf::resolve(&config(), "node-b.toml", node) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn counts_local_taking_over_and_remote_ranges_of_one_node() {
        // node-a's configured ranges: 0 (served here), 2 (taking over).
        let a = StatusFacts::new(&status(), Some(&ranges_of("node-a")));
        assert_eq!((a.ranges, a.owned, a.taking), (2, 1, 1));
        assert!(a.holders.is_empty());
        // node-b's: 1 (served here), 3 (node-a holds it).
        let b = StatusFacts::new(&status(), Some(&ranges_of("node-b")));
        assert_eq!((b.ranges, b.owned, b.taking), (2, 1, 0));
        assert_eq!(b.holders, ["node-a"]);
        assert_eq!(b.ranges_of, "node-b");
        // Every range.
        let all = StatusFacts::new(&status(), None);
        assert_eq!((all.ranges, all.owned, all.taking), (4, 2, 1));
        assert_eq!(all.ranges_of, "");
    }

    #[test]
    fn the_rest_comes_from_typed_fields() {
        let f = StatusFacts::new(&status(), None);
        assert_eq!(f.pid, 4242);
        assert_eq!(f.node, "node-b");
        assert_eq!(f.mirror, "degraded");
        assert_eq!(f.link_state, "connecting");
        assert!(!f.link_up);
        assert_eq!(
            f.failed,
            "1: fenced: epoch 3 on the medium is newer than ours (2)"
        );
        assert_eq!(f.medium_errors, 3);
        assert_eq!(
            f.last_medium_error,
            "write at 4096: Input/output error (os error 5)"
        );
        assert_eq!(f.takeover_phase, "replaying");
        assert_eq!(f.takeover_records, 17);
    }

    #[test]
    fn link_is_up_only_for_mirroring_or_an_up_link() {
        for (state, link_state, up) in [
            ("mirroring", "up", true),
            ("degraded", "up", true),
            ("mirroring", "", true), // a daemon from before link_state
            ("degraded", "connecting", false),
            ("degraded", "down", false),
            ("degraded", "closed", false),
            ("standalone", "none", false),
            ("degraded", "", false),
        ] {
            let mut s = status();
            s.engine.mirror.state = state.into();
            s.engine.mirror.link_state = link_state.into();
            // The text for people must not matter, whatever it says.
            s.engine.mirror.link = Some(if up { "Down" } else { "Up (tcp)" }.into());
            let f = StatusFacts::new(&s, None);
            assert_eq!(f.link_up, up, "state {state}, link_state {link_state:?}");
            assert_eq!(f.link_state, link_state);
        }
    }

    #[test]
    fn no_takeover_and_no_failures_give_empty_values() {
        let mut s = status();
        s.engine.takeover = None;
        s.engine.last_medium_error = None;
        for p in &mut s.engine.partitions {
            p.failed = None;
        }
        let v = StatusFacts::new(&s, Some(&ranges_of("node-a"))).shell_vars();
        for (name, want) in [
            ("ST_FAILED", ""),
            ("ST_LAST_MEDIUM_ERROR", ""),
            ("ST_TAKEOVER_PHASE", ""),
            ("ST_TAKEOVER_RECORDS", "0"),
            ("ST_HOLDERS", ""),
            ("ST_LINK_UP", "0"),
            ("ST_PID", "4242"),
            ("ST_NRANGES", "2"),
        ] {
            assert_eq!(v.get(name), Some(want), "{name}");
        }
        assert!(v.render().contains("ST_FAILED=''\n"));
    }

    #[test]
    fn shell_output_quotes_messages() {
        let v = StatusFacts::new(&status(), Some(&ranges_of("node-b"))).shell_vars();
        let text = v.render();
        assert!(
            text.contains("ST_FAILED='1: fenced: epoch 3 on the medium is newer than ours (2)'\n"),
            "{text}"
        );
        assert!(text.contains("ST_HOLDERS=node-a\n"), "{text}");
        assert!(text.contains("ST_MIRROR=degraded\n"), "{text}");
        assert!(text.contains("ST_LINK_STATE=connecting\n"), "{text}");
    }
}
