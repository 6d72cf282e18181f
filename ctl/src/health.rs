//! `nvmirrorctl health`: one verdict on a node for monitoring, with the exit codes of a
//! Nagios/Icinga plugin (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN), worked out from the
//! daemon's status. CRITICAL means data is at risk or I/O stopped now; WARNING means the node
//! still serves but runs with less redundancy or is headed there.

use nvmirror::control::DaemonStatus;
use nvmirror::lease::LeaseState;
use serde::Serialize;
use std::fmt::Write as _;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Ok,
    Warning,
    Critical,
}

impl Severity {
    /// The plugin exit code.
    pub fn exit_code(self) -> i32 {
        match self {
            Severity::Ok => 0,
            Severity::Warning => 1,
            Severity::Critical => 2,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Severity::Ok => "OK",
            Severity::Warning => "WARNING",
            Severity::Critical => "CRITICAL",
        }
    }
}

/// Thresholds (the command's options).
#[derive(Clone, Debug)]
pub struct Limits {
    /// Age of a partition's oldest unflushed record, in seconds.
    pub flush_lag_warn: f64,
    pub flush_lag_crit: f64,
    /// A partition's staging log in use, in percent.
    pub nvram_fill_warn: f64,
    pub nvram_fill_crit: f64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            flush_lag_warn: 30.0,
            flush_lag_crit: 300.0,
            nvram_fill_warn: 80.0,
            nvram_fill_crit: 95.0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub severity: Severity,
    pub what: String,
}

#[derive(Clone, Debug, Serialize)]
pub struct Health {
    /// The JSON's layout version.
    pub schema: u32,
    pub node: String,
    /// The worst finding's severity (ok without findings).
    pub severity: Severity,
    /// The node in one line: its mirror state, ranges served, NVRAM fill, flush lag.
    pub summary: String,
    pub findings: Vec<Finding>,
}

impl Health {
    /// The plugin's output: the verdict and summary, then one line per finding.
    pub fn render(&self) -> String {
        let mut out = format!("{}: {}\n", self.severity.word(), self.summary);
        for f in &self.findings {
            let _ = writeln!(out, "  {}: {}", f.severity.word().to_lowercase(), f.what);
        }
        out
    }
}

pub fn assess(s: &DaemonStatus, limits: &Limits) -> Health {
    let e = &s.engine;
    let mut findings = Vec::new();
    let mut add = |severity, what: String| findings.push(Finding { severity, what });
    use Severity::{Critical, Warning};

    if s.devices.len() < e.luns.len() {
        add(
            Critical,
            format!(
                "{} of {} LUN(s) have a live device",
                s.devices.len(),
                e.luns.len()
            ),
        );
    }
    for p in &e.partitions {
        if let Some(why) = &p.failed {
            add(
                Critical,
                format!("NVRAM partition {} stopped: {why}", p.partition),
            );
        }
    }
    if let Some(lease) = &e.lease {
        let name = lease.place().map_or("disk lease", |p| p.lease());
        match lease.state {
            LeaseState::Expired => add(
                Critical,
                format!("the {name} ran out: this node serves nothing until it holds it again"),
            ),
            LeaseState::Acquiring => add(Warning, format!("acquiring the {name}")),
            LeaseState::Held => {}
        }
    }
    if let Some(w) = s.watchdog.as_ref().filter(|w| !w.petting) {
        add(
            Critical,
            format!(
                "the watchdog {} is no longer petted (a medium write hung): the node is about to reset",
                w.device
            ),
        );
    }
    if let Some(t) = &e.takeover {
        if t.phase.starts_with("failed") {
            add(
                Critical,
                format!("the takeover from {} {}", t.from, t.phase),
            );
        } else if t.phase != "done" {
            add(
                Warning,
                format!(
                    "taking over {} range(s) from {}: {} ({} of {} records replayed)",
                    t.ranges, t.from, t.phase, t.records_done, t.records_total
                ),
            );
        }
    }
    let lun_name = |i: u32| {
        e.luns
            .get(i as usize)
            .map_or_else(|| format!("lun{i}"), |l| l.name.clone())
    };
    for r in &e.ranges {
        if r.owner == e.node && r.state == "local" && !r.serving {
            add(
                Warning,
                format!(
                    "range {}:{} is this node's but not served now",
                    lun_name(r.lun),
                    r.range
                ),
            );
        }
    }
    let m = &e.mirror;
    if m.state == "degraded" {
        let policy = match m.degraded_policy {
            Some(nvmirror::config::DegradedPolicy::Nvram) => {
                "acknowledged from this node's NVRAM alone"
            }
            _ => "acknowledged once on the medium (write-through)",
        };
        add(
            Warning,
            format!(
                "the partner is unreachable (link {}): writes are {policy}; {} write(s) so far without a mirror copy",
                m.link_state, m.degraded_records
            ),
        );
    } else if m.unmirrored {
        add(
            Warning,
            "a staged write lacks its mirror copy (the partner is catching up)".into(),
        );
    }
    if e.io_waiting_for_takeover > 0 {
        add(
            Warning,
            format!(
                "{} I/O(s) to the lost partner's ranges wait for a takeover or its return (at most cluster.forward_wait_s, then EIO)",
                e.io_waiting_for_takeover
            ),
        );
    }
    // A range both media miss writes of has no copy to read or repair from: it serves no
    // reads, its flush batches stay staged, and its partition's writes wait for log space.
    let mut on_every_medium: Option<Vec<(u32, u32)>> = None;
    for ranges in e.outdated_media.values() {
        on_every_medium = Some(match on_every_medium {
            None => ranges.clone(),
            Some(seen) => seen.into_iter().filter(|r| ranges.contains(r)).collect(),
        });
    }
    let on_every_medium = on_every_medium
        .filter(|_| e.outdated_media.len() >= 2)
        .unwrap_or_default();
    if !on_every_medium.is_empty() {
        let list: Vec<String> = on_every_medium
            .iter()
            .map(|(l, r)| format!("{}:{r}", lun_name(*l)))
            .collect();
        add(
            Critical,
            format!(
                "range(s) {} are outdated on every node's medium: unreadable, and their flush batches stay in NVRAM (no repair has a source: stop one node and keep the other's medium with `nvmirrorctl force-current --range LUN:RANGE --lose-missed-writes` there, losing the writes it misses)",
                list.join(", ")
            ),
        );
    }
    if let Some(why) = &e.outdated_media_unread {
        add(Warning, why.clone());
    }
    for (node, ranges) in &e.outdated_media {
        let list: Vec<String> = ranges
            .iter()
            .map(|(l, r)| format!("{}:{r}", lun_name(*l)))
            .collect();
        add(
            Warning,
            format!(
                "node {node}'s medium misses writes of range(s) {} until a resync",
                list.join(", ")
            ),
        );
    }
    if e.medium_errors > 0 {
        add(
            Warning,
            format!(
                "{} medium error(s) since the daemon started; last: {}",
                e.medium_errors,
                e.last_medium_error.as_deref().unwrap_or("?")
            ),
        );
    }
    let mut worst_lag = 0.0f64;
    let mut worst_fill = 0.0f64;
    for p in &e.partitions {
        let lag = p.flush_lag_ms as f64 / 1e3;
        let fill = if p.capacity_bytes == 0 {
            0.0
        } else {
            100.0 * p.used_bytes as f64 / p.capacity_bytes as f64
        };
        worst_lag = worst_lag.max(lag);
        worst_fill = worst_fill.max(fill);
        let over = |v: f64, warn: f64, crit: f64| {
            if v >= crit {
                Some(Critical)
            } else if v >= warn {
                Some(Warning)
            } else {
                None
            }
        };
        if let Some(sev) = over(lag, limits.flush_lag_warn, limits.flush_lag_crit) {
            let paused = if p.flush_paused {
                " (the flusher is paused)"
            } else {
                ""
            };
            add(
                sev,
                format!(
                    "partition {}: the oldest unflushed write is {lag:.0} s old{paused}",
                    p.partition
                ),
            );
        }
        if let Some(sev) = over(fill, limits.nvram_fill_warn, limits.nvram_fill_crit) {
            add(
                sev,
                format!(
                    "partition {}: NVRAM {fill:.0}% full (writes wait for the flusher when it is full)",
                    p.partition
                ),
            );
        }
    }
    if e.partitions.iter().any(|p| p.flush_paused) && worst_lag < limits.flush_lag_warn {
        add(
            Warning,
            "the flusher is paused (nvmirrorctl flush resume)".into(),
        );
    }

    // A single node has no ownership table: it serves every LUN it has a device for.
    let served = if e.ranges.is_empty() {
        format!("{} LUN(s) served", s.devices.len())
    } else {
        let n = e.ranges.iter().filter(|r| r.serving).count();
        format!("{n} range(s) served here")
    };
    let mirror = match (m.state.as_str(), &m.transport) {
        ("mirroring", Some(t)) => format!("mirroring over {t}"),
        (state, _) => state.to_string(),
    };
    let summary = format!(
        "node {} {mirror}; {served}; NVRAM {worst_fill:.0}% full; flush lag {worst_lag:.1} s",
        e.node
    );
    Health {
        schema: 1,
        node: e.node.clone(),
        severity: findings
            .iter()
            .map(|f| f.severity)
            .max()
            .unwrap_or(Severity::Ok),
        summary,
        findings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A healthy node-a of a mirrored pair, as JSON (edited per test).
    fn status() -> serde_json::Value {
        serde_json::json!({
          "version": "0.1.0", "pid": 42, "config": "/etc/nvmirror/node-a.toml",
          "devices": [{"lun": "lun0", "dev_id": 0, "path": "/dev/ublkb0", "attach": "added",
                       "queues": 2, "depth": 64, "pid": 42}],
          "engine": {
            "node": "node-a", "nvram_path": "/dev/dax0.0", "nvram_bytes": 1 << 28,
            "log_id": "fbb1cf34701401c1",
            "partitions": [
              {"partition": 0, "capacity_bytes": 1000, "used_bytes": 30, "records_unflushed": 1,
               "records_in_flight": 0, "next_seq": 9, "durable_through": 8, "acked_through": 8,
               "flushed_through": 7, "flush_lag_ms": 200, "flush_paused": false, "failed": null}
            ],
            "luns": [{"name": "lun0", "size": 1 << 30, "ranges": 2, "medium": "/dev/sdb",
                      "staged_extents": 0, "staged_bytes": 0, "reads": 0, "writes": 0,
                      "bytes_read": 0, "bytes_written": 0}],
            "bytes_flushed": 0, "flush_batches": 0, "medium_errors": 0, "delegated_batches": 0,
            "last_medium_error": null,
            "replay": {"records": 0, "bytes": 0, "discarded_unacknowledged": 0, "millis": 1,
                       "formatted": false, "salvaged_from_corruption": false,
                       "skipped_not_owned": 0, "skipped_already_flushed": 0},
            "mirror": {"attached": true, "state": "mirroring", "link_state": "up",
                       "transport": "rdma", "rtt_us": 30, "link": "Up",
                       "degraded_policy": "write-through", "mirrored_records": 10,
                       "degraded_records": 0, "last_error": null, "second_store": null},
            "ranges": [
              {"lun": 0, "range": 0, "owner": "node-a", "epoch": 1, "state": "local", "serving": true},
              {"lun": 0, "range": 1, "owner": "node-b", "epoch": 1, "state": "remote", "serving": false}
            ],
            "takeover": null
          }
        })
    }

    fn assess_json(v: serde_json::Value) -> Health {
        let s: DaemonStatus = serde_json::from_value(v).expect("a DaemonStatus");
        assess(&s, &Limits::default())
    }

    #[test]
    fn a_mirrored_node_serving_its_range_is_ok() {
        let h = assess_json(status());
        assert_eq!(h.severity, Severity::Ok, "{h:?}");
        assert_eq!(
            h.render(),
            "OK: node node-a mirroring over rdma; 1 range(s) served here; NVRAM 3% full; flush lag 0.2 s\n"
        );
    }

    #[test]
    fn a_node_without_its_partner_warns() {
        let mut v = status();
        v["engine"]["mirror"]["state"] = "degraded".into();
        v["engine"]["mirror"]["link_state"] = "connecting".into();
        v["engine"]["mirror"]["degraded_records"] = 7.into();
        let h = assess_json(v);
        assert_eq!(h.severity, Severity::Warning);
        assert!(h.findings[0].what.contains("unreachable"), "{h:?}");
        assert!(h.findings[0].what.contains("7 write(s)"), "{h:?}");
        assert_eq!(h.severity.exit_code(), 1);
    }

    #[test]
    fn io_waiting_for_a_takeover_warns() {
        let mut v = status();
        v["engine"]["io_waiting_for_takeover"] = 3.into();
        let h = assess_json(v);
        assert_eq!(h.severity, Severity::Warning);
        assert!(
            h.render()
                .contains("warning: 3 I/O(s) to the lost partner's ranges wait for a takeover"),
            "{h:?}"
        );
    }

    #[test]
    fn a_stopped_partition_or_a_missing_device_is_critical() {
        let mut v = status();
        v["engine"]["partitions"][0]["failed"] = "fenced: epoch 3 on the medium".into();
        let h = assess_json(v);
        assert_eq!(h.severity, Severity::Critical);
        assert!(h
            .render()
            .contains("critical: NVRAM partition 0 stopped: fenced"));
        let mut v = status();
        v["devices"] = serde_json::json!([]);
        assert_eq!(assess_json(v).severity, Severity::Critical);
    }

    #[test]
    fn flush_lag_and_nvram_fill_cross_their_thresholds() {
        let mut v = status();
        v["engine"]["partitions"][0]["flush_lag_ms"] = 45_000.into();
        assert_eq!(assess_json(v.clone()).severity, Severity::Warning);
        v["engine"]["partitions"][0]["flush_lag_ms"] = 400_000.into();
        assert_eq!(assess_json(v.clone()).severity, Severity::Critical);
        let mut v = status();
        v["engine"]["partitions"][0]["used_bytes"] = 960.into();
        let h = assess_json(v);
        assert_eq!(h.severity, Severity::Critical);
        assert!(h.findings[0].what.contains("96% full"), "{h:?}");
    }

    #[test]
    fn marks_that_could_not_be_read_warn_instead_of_reading_as_none() {
        let mut v = status();
        v["engine"]["outdated_media_unread"] =
            "the outdated-media marks could not be read (no majority); these are the marks as last read".into();
        let h = assess_json(v);
        assert_eq!(h.severity, Severity::Warning, "{h:?}");
        assert!(h.render().contains("could not be read"), "{h:?}");
    }

    #[test]
    fn a_range_outdated_on_both_media_is_critical_and_one_medium_warns() {
        let mut v = status();
        v["engine"]["outdated_media"] = serde_json::json!({"node-b": [[0, 1]]});
        let h = assess_json(v.clone());
        assert_eq!(h.severity, Severity::Warning, "{h:?}");
        assert!(h
            .render()
            .contains("node node-b's medium misses writes of range(s) lun0:1"));
        v["engine"]["outdated_media"] =
            serde_json::json!({"node-a": [[0, 0], [0, 1]], "node-b": [[0, 1]]});
        let h = assess_json(v);
        assert_eq!(h.severity, Severity::Critical, "{h:?}");
        assert!(
            h.render()
                .contains("critical: range(s) lun0:1 are outdated on every node's medium"),
            "{h:?}"
        );
    }

    #[test]
    fn a_running_takeover_warns_and_a_failed_one_is_critical() {
        let mut v = status();
        v["engine"]["takeover"] = serde_json::json!({
            "from": "node-b", "ranges": 1, "phase": "replaying", "records_total": 10,
            "bytes_total": 40960, "records_done": 4, "bytes_done": 16384,
            "skipped_already_flushed": 0, "elapsed_ms": 900});
        assert_eq!(assess_json(v.clone()).severity, Severity::Warning);
        v["engine"]["takeover"]["phase"] = "failed: the medium refused the claim".into();
        assert_eq!(assess_json(v).severity, Severity::Critical);
    }
}
