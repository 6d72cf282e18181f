//! `nvmirrorctl config show`: a node's config as the daemon resolves it, for people (a
//! summary), programs (`--json`, versioned by `"schema"`) and shell scripts (`--shell`).
//!
//! "Resolved" means the defaults filled in and every LUN range's configured owner worked out
//! by the library's one owners rule (`LunSection::range_owners`), so nothing outside the
//! library repeats it. `--ranges-of NODE` adds the ranges the config gives one node: the
//! unit the Pacemaker agent manages as one resource (`status --shell --ranges-of` counts
//! what the daemon does with the same ranges).

use crate::shell::ShellVars;
use nvmirror::config::{ByteSize, LunSection, NodeConfig, ShippingRole, ShippingSection};
use serde::Serialize;
use std::fmt;
use std::path::Path;

/// Version of the `--json` layout; raised when a field changes meaning or disappears
/// (adding a field keeps it).
pub const SCHEMA: u32 = 1;

/// One LUN range. Printed as `LUN:RANGE`, the spelling of `nvmirrorctl takeover --range`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RangeRef {
    pub lun: String,
    /// Position of the LUN in the config; the daemon's status names LUNs by it.
    pub lun_index: u32,
    pub range: u32,
}

impl fmt::Display for RangeRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.lun, self.range)
    }
}

/// Why `--ranges-of NODE` has no answer. Each is a config problem (exit 2; the agent maps
/// it to OCF_ERR_CONFIGURED). The agent's parameter is `ranges_of`, hence the spelling.
#[derive(Debug, thiserror::Error)]
pub enum RangesOfError {
    #[error(
        "{config} has no [cluster] section: ranges_of names a node of a two-node nvmirror \
         pair (the Pacemaker agent manages pairs); add [cluster] with its two [[cluster.node]]"
    )]
    NoCluster { config: String },
    #[error(
        "ranges_of='{}' is not a node of the cluster in {config} (its [[cluster.node]] \
         names: {}); use one of those",
        .node.escape_default(),
        names_or_none(.nodes)
    )]
    NotANode {
        node: String,
        config: String,
        nodes: Vec<String>,
    },
    #[error(
        "the config {config} gives node {node} no LUN range ([[lun]] owners); name it in a \
         [[lun]] owners list, or leave owners out to give the nodes ranges in turn"
    )]
    NoRanges { node: String, config: String },
}

fn names_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

/// The ranges the config gives one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RangesOf {
    pub node: String,
    pub ranges: Vec<RangeRef>,
}

impl RangesOf {
    /// `config` names the file in errors.
    pub fn resolve(cfg: &NodeConfig, config: &str, node: &str) -> Result<RangesOf, RangesOfError> {
        let cluster = cfg
            .cluster
            .as_ref()
            .ok_or_else(|| RangesOfError::NoCluster {
                config: config.to_owned(),
            })?;
        if !cluster.nodes.iter().any(|n| n.name == node) {
            return Err(RangesOfError::NotANode {
                node: node.to_owned(),
                config: config.to_owned(),
                nodes: cluster.nodes.iter().map(|n| n.name.clone()).collect(),
            });
        }
        let ranges: Vec<RangeRef> = cfg
            .luns
            .iter()
            .enumerate()
            .flat_map(|(i, lun)| {
                configured_owners(cfg, lun)
                    .into_iter()
                    .enumerate()
                    .filter(|(_, owner)| owner == node)
                    .map(move |(r, _)| RangeRef {
                        lun: lun.name.clone(),
                        lun_index: i as u32,
                        range: r as u32,
                    })
            })
            .collect();
        if ranges.is_empty() {
            return Err(RangesOfError::NoRanges {
                node: node.to_owned(),
                config: config.to_owned(),
            });
        }
        Ok(RangesOf {
            node: node.to_owned(),
            ranges,
        })
    }

    pub fn contains(&self, lun_index: u32, range: u32) -> bool {
        self.ranges
            .iter()
            .any(|r| r.lun_index == lun_index && r.range == range)
    }
}

/// The configured owner of each range of `lun`, by node name. Without a cluster the node
/// owns every range of its LUNs.
pub fn configured_owners(cfg: &NodeConfig, lun: &LunSection) -> Vec<String> {
    let partitions = cfg.nvram.partitions;
    match &cfg.cluster {
        Some(c) => lun
            .range_owners(partitions, &c.nodes)
            .into_iter()
            .map(|i| {
                c.nodes
                    .get(i as usize)
                    .map(|n| n.name.clone())
                    .unwrap_or_else(|| format!("node#{i}"))
            })
            .collect(),
        None => vec![cfg.node.name.clone(); lun.ranges(partitions) as usize],
    }
}

/// Enum values as the config and the JSON spell them ("tcp", "write-through").
fn spelled(value: impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

#[derive(Debug, Serialize)]
pub struct ConfigView {
    pub schema: u32,
    /// The file, as an absolute path when it can be resolved.
    pub config: String,
    pub node: NodeView,
    pub nvram: NvramView,
    pub flusher: FlusherView,
    /// Absent for a single node.
    pub cluster: Option<ClusterView>,
    /// Log shipping (claim set C): the section as configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shipping: Option<ShippingSection>,
    pub luns: Vec<LunView>,
    /// Only with `--ranges-of`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ranges_of: Option<RangesOf>,
}

#[derive(Debug, Serialize)]
pub struct NodeView {
    pub name: String,
    pub control_socket: String,
}

#[derive(Debug, Serialize)]
pub struct NvramView {
    pub path: String,
    /// Bytes; null: the whole file or device.
    pub size: Option<u64>,
    pub partitions: u32,
}

#[derive(Debug, Serialize)]
pub struct FlusherView {
    pub batch_bytes: u64,
    pub linger_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct ClusterView {
    pub id: u64,
    pub transport: String,
    pub takeover: String,
    pub degraded: String,
    pub heartbeat_interval_ms: u64,
    pub heartbeat_timeout_ms: u64,
    pub busy_poll_us: u64,
    pub frame_mac: bool,
    pub secret_file: String,
    /// In config order: the first listens, the second connects.
    pub nodes: Vec<ClusterNodeView>,
    /// The other node.
    pub partner: Option<String>,
    /// With `[cluster.voters]` (the quorum arbiter): this node's voter files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub voters: Option<VotersView>,
}

#[derive(Debug, Serialize)]
pub struct VotersView {
    /// This node's voter state (`init-voter` creates it on the node's first start).
    pub state: String,
    /// This node's ballot file (created with the state).
    pub ballot: String,
    pub tiebreaker_id: u32,
}

#[derive(Debug, Serialize)]
pub struct ClusterNodeView {
    pub name: String,
    pub address: String,
}

#[derive(Debug, Serialize)]
pub struct LunView {
    pub name: String,
    pub medium: String,
    /// Bytes; null: the size of the medium.
    pub size: Option<u64>,
    pub device_id: Option<u32>,
    /// /dev/ublkbN when device_id is set; else the kernel picks the number.
    pub device: Option<String>,
    pub queues: u16,
    pub queue_depth: u16,
    pub ranges: u32,
    /// `owners` as written in the config (null: the nodes in turn).
    pub owners: Option<Vec<String>>,
    /// The configured owner of each range: element i is range i's.
    pub range_owners: Vec<String>,
}

impl ConfigView {
    pub fn new(cfg: &NodeConfig, path: &Path, ranges_of: Option<RangesOf>) -> ConfigView {
        let partitions = cfg.nvram.partitions;
        ConfigView {
            schema: SCHEMA,
            config: std::fs::canonicalize(path)
                .unwrap_or_else(|_| path.to_owned())
                .display()
                .to_string(),
            node: NodeView {
                name: cfg.node.name.clone(),
                control_socket: cfg.control_socket().display().to_string(),
            },
            shipping: cfg.shipping.clone(),
            nvram: NvramView {
                path: cfg.nvram.path.display().to_string(),
                size: cfg.nvram.size.map(|s| s.0),
                partitions,
            },
            flusher: FlusherView {
                batch_bytes: cfg.flusher.batch_bytes.0,
                linger_ms: cfg.flusher.linger_ms,
            },
            cluster: cfg.cluster.as_ref().map(|c| ClusterView {
                id: c.id,
                transport: spelled(c.transport),
                takeover: spelled(c.takeover),
                degraded: spelled(c.degraded),
                heartbeat_interval_ms: c.heartbeat_interval_ms,
                heartbeat_timeout_ms: c.heartbeat_timeout_ms,
                busy_poll_us: c.busy_poll_us,
                frame_mac: c.frame_mac,
                secret_file: c.secret_file.display().to_string(),
                nodes: c
                    .nodes
                    .iter()
                    .map(|n| ClusterNodeView {
                        name: n.name.clone(),
                        address: n.address.clone(),
                    })
                    .collect(),
                partner: c
                    .nodes
                    .iter()
                    .find(|n| n.name != cfg.node.name)
                    .map(|n| n.name.clone()),
                voters: c.voters.as_ref().map(|v| VotersView {
                    state: v.state_file().display().to_string(),
                    ballot: v.ballot_file().display().to_string(),
                    tiebreaker_id: v.tiebreaker_id,
                }),
            }),
            luns: cfg
                .luns
                .iter()
                .map(|l| LunView {
                    name: l.name.clone(),
                    medium: l.medium.display().to_string(),
                    size: l.size.map(|s| s.0),
                    device_id: l.device_id,
                    device: l.device_id.map(|id| format!("/dev/ublkb{id}")),
                    queues: l.queues,
                    queue_depth: l.queue_depth,
                    ranges: l.ranges(partitions),
                    owners: l.owners.clone(),
                    range_owners: configured_owners(cfg, l),
                })
                .collect(),
            ranges_of,
        }
    }

    /// The facts as shell assignments; see `config show --help` for each variable.
    /// CF_RANGES_OF, CF_NRANGES and CF_RANGES describe the ranges of `--ranges-of`, or every
    /// range without it.
    pub fn shell_vars(&self) -> ShellVars {
        let mut v = ShellVars::default();
        let cluster = self.cluster.as_ref();
        let voters = cluster.and_then(|c| c.voters.as_ref());
        let all: Vec<String> = self
            .luns
            .iter()
            .flat_map(|l| (0..l.ranges).map(move |r| format!("{}:{r}", l.name)))
            .collect();
        let selected: Vec<String> = match &self.ranges_of {
            Some(of) => of.ranges.iter().map(|r| r.to_string()).collect(),
            None => all,
        };
        v.set("CF_CONFIG", &self.config)
            .set("CF_ME", &self.node.name)
            .set("CF_SOCKET", &self.node.control_socket)
            .set(
                "CF_NODES",
                cluster
                    .map(|c| c.nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>())
                    .unwrap_or_default()
                    .join(" "),
            )
            .set(
                "CF_PARTNER",
                cluster.and_then(|c| c.partner.as_deref()).unwrap_or(""),
            )
            .set("CF_TRANSPORT", cluster.map_or("", |c| c.transport.as_str()))
            .set("CF_TAKEOVER", cluster.map_or("", |c| c.takeover.as_str()))
            .set("CF_DEGRADED", cluster.map_or("", |c| c.degraded.as_str()))
            .set("CF_VOTER_STATE", voters.map_or("", |v| v.state.as_str()))
            .set("CF_VOTER_BALLOT", voters.map_or("", |v| v.ballot.as_str()))
            .set(
                "CF_LUNS",
                self.luns
                    .iter()
                    .map(|l| l.name.as_str())
                    .collect::<Vec<_>>()
                    .join(" "),
            )
            .set(
                "CF_RANGES_OF",
                self.ranges_of.as_ref().map_or("", |o| o.node.as_str()),
            )
            .set("CF_NRANGES", selected.len())
            .set("CF_RANGES", selected.join(" "));
        v
    }

    /// The summary a person reads.
    pub fn human(&self) -> String {
        use std::fmt::Write;
        let mut o = String::new();
        let _ = writeln!(o, "config  {}", self.config);
        let _ = writeln!(
            o,
            "node    {} (control socket {})",
            self.node.name, self.node.control_socket
        );
        let _ = writeln!(
            o,
            "nvram   {}, {}, {} partition(s)",
            self.nvram.path,
            self.nvram
                .size
                .map_or("whole file or device".to_owned(), |s| ByteSize(s)
                    .to_string()),
            self.nvram.partitions
        );
        let _ = writeln!(
            o,
            "flusher batches up to {}, linger {} ms",
            ByteSize(self.flusher.batch_bytes),
            self.flusher.linger_ms
        );
        match (&self.cluster, &self.shipping) {
            (None, Some(s)) if s.role == ShippingRole::Source => {
                let dest = s.destination.as_ref();
                let _ = writeln!(
                    o,
                    "shipping source (group {}, {}): every record also goes to destination {} at {}",
                    s.id,
                    format!("{:?}", s.transport).to_lowercase(),
                    dest.map_or("?", |d| d.name.as_str()),
                    dest.map_or("?", |d| d.address.as_str())
                );
            }
            (None, Some(s)) => {
                let _ = writeln!(
                    o,
                    "shipping destination (group {}, {}) of {} source(s):",
                    s.id,
                    format!("{:?}", s.transport).to_lowercase(),
                    s.sources.len()
                );
                for src in &s.sources {
                    let _ = writeln!(
                        o,
                        "  {} on {}, NVRAM area {}",
                        src.name, src.listen, src.nvram_size
                    );
                }
            }
            (None, None) => {
                let _ = writeln!(o, "cluster none (single node: it owns every range)");
            }
            (Some(c), _) => {
                let nodes: Vec<String> = c
                    .nodes
                    .iter()
                    .map(|n| {
                        let role = if n.name == self.node.name {
                            " (this node)"
                        } else {
                            " (partner)"
                        };
                        format!("{} {}{role}", n.name, n.address)
                    })
                    .collect();
                let _ = writeln!(
                    o,
                    "cluster {} over {}: {}",
                    c.id,
                    c.transport,
                    nodes.join(", ")
                );
                let _ = writeln!(
                    o,
                    "        takeover {}, degraded {}, heartbeat every {} ms, partner lost after {} ms, secret {}",
                    c.takeover,
                    c.degraded,
                    c.heartbeat_interval_ms,
                    c.heartbeat_timeout_ms,
                    c.secret_file
                );
            }
        }
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "{:<10} {:<13} {:>11} {:>7}  MEDIUM",
            "LUN", "DEVICE", "SIZE", "QUEUES"
        );
        for l in &self.luns {
            let _ = writeln!(
                o,
                "{:<10} {:<13} {:>11} {:>7}  {}",
                l.name,
                l.device.as_deref().unwrap_or("(any)"),
                l.size
                    .map_or("(medium)".to_owned(), |s| ByteSize(s).to_string()),
                format!("{}x{}", l.queues, l.queue_depth),
                l.medium
            );
            let _ = writeln!(
                o,
                "{:<10} {} range(s), configured owners: {}",
                "",
                l.ranges,
                owners_summary(&l.range_owners)
            );
        }
        if let Some(of) = &self.ranges_of {
            let _ = writeln!(o);
            let _ = writeln!(
                o,
                "ranges of {}: {} ({} range(s))",
                of.node,
                of.ranges
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
                of.ranges.len()
            );
        }
        o
    }
}

/// "node-a 0, 2-3; node-b 1": each owner with its ranges, contiguous runs joined.
fn owners_summary(owners: &[String]) -> String {
    let mut names: Vec<&String> = Vec::new();
    for o in owners {
        if !names.contains(&o) {
            names.push(o);
        }
    }
    names
        .iter()
        .map(|name| {
            let ranges: Vec<u32> = owners
                .iter()
                .enumerate()
                .filter(|(_, o)| o == name)
                .map(|(r, _)| r as u32)
                .collect();
            format!("{name} {}", runs(&ranges))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Ascending numbers as runs ("0-3, 6, 8"); past a dozen runs the rest is counted, not
/// listed (4096 alternating ranges would fill a screen).
fn runs(sorted: &[u32]) -> String {
    const SHOWN: usize = 12;
    let mut parts: Vec<(u32, u32)> = Vec::new();
    for &n in sorted {
        match parts.last_mut() {
            Some((_, end)) if *end + 1 == n => *end = n,
            _ => parts.push((n, n)),
        }
    }
    let mut text: Vec<String> = parts
        .iter()
        .take(SHOWN)
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect();
    if parts.len() > SHOWN {
        text.push(format!("... ({} in all)", sorted.len()));
    }
    text.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[node]
name = "node-a"

[nvram]
path = "/tmp/nvram-a.img"
size = "64MiB"
partitions = 4
"#;

    const CLUSTER: &str = r#"
[cluster]
id = 42
secret_file = "/etc/nvmirror/secret"
transport = "tcp"
takeover = "manual"

[[cluster.node]]
name = "node-a"
address = "10.0.0.1:7800"

[[cluster.node]]
name = "node-b"
address = "10.0.0.2:7800"
"#;

    fn parse(text: &str) -> NodeConfig {
        match NodeConfig::parse(text) {
            Ok(c) => c,
            Err(e) => panic!("test config does not parse: {e}\n{text}"),
        }
    }

    fn refs(of: &RangesOf) -> Vec<String> {
        of.ranges.iter().map(|r| r.to_string()).collect()
    }

    /// With owners: lun0 gives node-a every range; lun1 cycles [a, b, b].
    fn with_owners() -> NodeConfig {
        parse(&format!(
            "{BASE}{CLUSTER}
[[lun]]
name = \"lun0\"
medium = \"/dev/sdb\"
device_id = 0
ranges = 2
owners = [\"node-a\"]

[[lun]]
name = \"lun1\"
medium = \"/dev/sdc\"
ranges = 5
owners = [\"node-a\", \"node-b\", \"node-b\"]
"
        ))
    }

    #[test]
    fn ranges_of_follows_the_owners_lists() {
        let cfg = with_owners();
        let a = RangesOf::resolve(&cfg, "x.toml", "node-a").expect("node-a has ranges");
        assert_eq!(refs(&a), ["lun0:0", "lun0:1", "lun1:0", "lun1:3"]);
        assert!(a.contains(1, 3) && !a.contains(1, 1));
        let b = RangesOf::resolve(&cfg, "x.toml", "node-b").expect("node-b has ranges");
        assert_eq!(refs(&b), ["lun1:1", "lun1:2", "lun1:4"]);
        assert_eq!(b.ranges[0].lun_index, 1);
    }

    #[test]
    fn without_owners_the_nodes_take_ranges_in_turn() {
        // ranges defaults to nvram.partitions (4).
        let cfg = parse(&format!(
            "{BASE}{CLUSTER}\n[[lun]]\nname = \"lun0\"\nmedium = \"/dev/sdb\"\n"
        ));
        let a = RangesOf::resolve(&cfg, "x.toml", "node-a").expect("node-a");
        let b = RangesOf::resolve(&cfg, "x.toml", "node-b").expect("node-b");
        assert_eq!(refs(&a), ["lun0:0", "lun0:2"]);
        assert_eq!(refs(&b), ["lun0:1", "lun0:3"]);
        let view = ConfigView::new(&cfg, Path::new("x.toml"), None);
        assert_eq!(
            view.luns[0].range_owners,
            ["node-a", "node-b", "node-a", "node-b"]
        );
        assert_eq!(view.luns[0].owners, None);
    }

    #[test]
    fn ranges_of_errors_name_the_problem_and_the_fix() {
        let cfg = with_owners();
        let e = RangesOf::resolve(&cfg, "/etc/n.toml", "node-x").expect_err("not a node");
        assert!(matches!(e, RangesOfError::NotANode { .. }));
        // The agent's test and its users grep for this wording.
        assert_eq!(
            e.to_string(),
            "ranges_of='node-x' is not a node of the cluster in /etc/n.toml (its \
             [[cluster.node]] names: node-a, node-b); use one of those"
        );
        let e = RangesOf::resolve(&cfg, "/etc/n.toml", "it's\nodd").expect_err("not a node");
        assert!(
            e.to_string().starts_with(r"ranges_of='it\'s\nodd' is not"),
            "{e}"
        );

        let only_a = parse(&format!(
            "{BASE}{CLUSTER}\n[[lun]]\nname = \"l\"\nmedium = \"/m\"\nowners = [\"node-a\"]\n"
        ));
        let e = RangesOf::resolve(&only_a, "/etc/n.toml", "node-b").expect_err("no ranges");
        assert!(matches!(e, RangesOfError::NoRanges { .. }));
        assert!(
            e.to_string().contains("gives node node-b no LUN range"),
            "{e}"
        );

        let single = parse(&format!("{BASE}\n[[lun]]\nname = \"l\"\nmedium = \"/m\"\n"));
        let e = RangesOf::resolve(&single, "/etc/n.toml", "node-a").expect_err("no cluster");
        assert!(matches!(e, RangesOfError::NoCluster { .. }));
        assert!(e.to_string().contains("no [cluster] section"), "{e}");
    }

    #[test]
    fn json_has_the_schema_and_the_resolved_owners() {
        let cfg = with_owners();
        let of = RangesOf::resolve(&cfg, "x.toml", "node-b").expect("node-b");
        let view = ConfigView::new(&cfg, Path::new("/nonexistent/node-a.toml"), Some(of));
        let j = serde_json::to_value(&view).expect("serialises");
        assert_eq!(j["schema"], 1);
        assert_eq!(j["config"], "/nonexistent/node-a.toml");
        assert_eq!(j["node"]["name"], "node-a");
        assert_eq!(j["cluster"]["transport"], "tcp");
        assert_eq!(j["cluster"]["takeover"], "manual");
        assert_eq!(j["cluster"]["degraded"], "write-through");
        assert_eq!(j["cluster"]["partner"], "node-b");
        assert_eq!(j["luns"][0]["device"], "/dev/ublkb0");
        assert_eq!(
            j["luns"][0]["range_owners"],
            serde_json::json!(["node-a", "node-a"])
        );
        assert_eq!(
            j["luns"][1]["range_owners"],
            serde_json::json!(["node-a", "node-b", "node-b", "node-a", "node-b"])
        );
        assert_eq!(j["ranges_of"]["node"], "node-b");
        assert_eq!(
            j["ranges_of"]["ranges"][0],
            serde_json::json!({"lun": "lun1", "lun_index": 1, "range": 1})
        );
        let without =
            serde_json::to_value(ConfigView::new(&cfg, Path::new("x"), None)).expect("serialises");
        assert!(without.get("ranges_of").is_none());
    }

    #[test]
    fn shell_vars_carry_what_the_agent_reads() {
        let cfg = with_owners();
        let of = RangesOf::resolve(&cfg, "x.toml", "node-b").expect("node-b");
        let v = ConfigView::new(&cfg, Path::new("/nonexistent/a.toml"), Some(of)).shell_vars();
        assert_eq!(v.get("CF_ME"), Some("node-a"));
        assert_eq!(v.get("CF_NODES"), Some("node-a node-b"));
        assert_eq!(v.get("CF_PARTNER"), Some("node-b"));
        assert_eq!(v.get("CF_TAKEOVER"), Some("manual"));
        assert_eq!(v.get("CF_RANGES_OF"), Some("node-b"));
        assert_eq!(v.get("CF_NRANGES"), Some("3"));
        assert_eq!(v.get("CF_RANGES"), Some("lun1:1 lun1:2 lun1:4"));
        assert!(v.render().contains("CF_NODES='node-a node-b'\n"));

        // Without --ranges-of: every range; a single node has no partner.
        let single = parse(&format!(
            "{BASE}\n[[lun]]\nname = \"l\"\nmedium = \"/m\"\nranges = 2\n"
        ));
        let v = ConfigView::new(&single, Path::new("x"), None).shell_vars();
        assert_eq!(v.get("CF_NODES"), Some(""));
        assert_eq!(v.get("CF_PARTNER"), Some(""));
        assert_eq!(v.get("CF_RANGES_OF"), Some(""));
        assert_eq!(v.get("CF_NRANGES"), Some("2"));
        assert_eq!(v.get("CF_RANGES"), Some("l:0 l:1"));
        assert_eq!(v.get("CF_VOTER_STATE"), Some(""));
        assert_eq!(v.get("CF_VOTER_BALLOT"), Some(""));
    }

    #[test]
    fn with_voters_the_agent_learns_where_the_voter_files_are() {
        let cluster = CLUSTER.replace(
            "takeover = \"manual\"\n",
            "takeover = \"manual\"\nstorage = \"own\"\n",
        );
        let cfg = parse(&format!(
            "{BASE}{cluster}
[cluster.voters]
port = 7810
tiebreaker_id = 3
tiebreaker = [\"10.0.0.3:7811\", \"10.0.0.3:7812\"]
state_dir = \"/var/lib/nvmirror\"

[[lun]]
name = \"lun0\"
medium = \"/dev/sdb\"
size = \"16MiB\"
ranges = 2
"
        ));
        let view = ConfigView::new(&cfg, Path::new("x"), None);
        let v = view.shell_vars();
        assert_eq!(
            v.get("CF_VOTER_STATE"),
            Some("/var/lib/nvmirror/voter.state")
        );
        assert_eq!(
            v.get("CF_VOTER_BALLOT"),
            Some("/var/lib/nvmirror/voter.ballot")
        );
        let j = serde_json::to_value(&view).expect("serialises");
        assert_eq!(j["cluster"]["voters"]["tiebreaker_id"], 3);
        let without = serde_json::to_value(ConfigView::new(&with_owners(), Path::new("x"), None))
            .expect("serialises");
        assert!(without["cluster"].get("voters").is_none());
    }

    #[test]
    fn human_summary_groups_ranges_by_owner() {
        let cfg = with_owners();
        let of = RangesOf::resolve(&cfg, "x.toml", "node-a").expect("node-a");
        let text = ConfigView::new(&cfg, Path::new("x"), Some(of)).human();
        assert!(text.contains("cluster 42 over tcp: node-a 10.0.0.1:7800 (this node), node-b 10.0.0.2:7800 (partner)"), "{text}");
        assert!(
            text.contains("configured owners: node-a 0, 3; node-b 1-2, 4"),
            "{text}"
        );
        assert!(
            text.contains("ranges of node-a: lun0:0 lun0:1 lun1:0 lun1:3 (4 range(s))"),
            "{text}"
        );
        assert_eq!(
            runs(&(0..100).step_by(2).collect::<Vec<_>>()),
            "0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, ... (50 in all)"
        );
    }
}
