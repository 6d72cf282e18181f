//! The node's state as objects with fields, and the events between two states: what
//! `nvmirrorctl events` prints, in the manner of `drbdsetup events2`. The current state first
//! (`exists` lines, then `exists -`), then one `change`, `create` or `destroy` line per object
//! whose fields changed.
//!
//! The daemon pushes a status over the control socket (`Request::Watch`) each time this
//! snapshot of it changes (`same_state`). Every place that changes a state the snapshot
//! follows calls [`crate::transitions::changed`] (a partition failing or its flushing pausing,
//! a range's gate or owner, a medium marked outdated, the mirror link, a takeover's phase,
//! the disk lease, a device), and the stream takes its snapshot at once; the interval is only
//! the fallback for what changes with time or on the other node alone (this node's lease
//! running out, the partner no longer vouching for it, marks the partner makes about this
//! node's medium). So each state shows unless it lasts less than taking one snapshot (a
//! status read: about a millisecond, more with `storage = "own"`, where it reads the
//! arbiter's marks) or the client reads slower than the states change; `status` stays the
//! source of truth.

use crate::control::DaemonStatus;
use serde::Serialize;
use std::collections::BTreeMap;

/// An object's fields, by name (values as text).
pub type Fields = BTreeMap<&'static str, String>;

/// Every object of the node: (kind, name) -> fields.
pub type Snapshot = BTreeMap<(&'static str, String), Fields>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum What {
    Exists,
    Create,
    Change,
    Destroy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Event {
    pub what: What,
    /// "node", "device", "partition", "range", "takeover" or "job".
    pub object: &'static str,
    pub name: String,
    /// `exists` and `create`: every field; `change`: the changed ones (new values);
    /// `destroy`: none.
    pub fields: Fields,
}

fn yes(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

/// The objects the stream follows, from one status.
pub fn snapshot(s: &DaemonStatus) -> Snapshot {
    let e = &s.engine;
    let mut out = Snapshot::new();
    let mut node = Fields::new();
    node.insert("pid", s.pid.to_string());
    node.insert("mirror", e.mirror.state.clone());
    node.insert("link", e.mirror.link_state.clone());
    node.insert("may-serve", yes(e.may_serve));
    if let Some(l) = &e.lease {
        node.insert("lease", format!("{:?}", l.state).to_lowercase());
    }
    if !e.outdated_media.is_empty() {
        let outdated: Vec<String> = e
            .outdated_media
            .iter()
            .map(|(n, r)| format!("{n}:{}", r.len()))
            .collect();
        node.insert("outdated-media", outdated.join(","));
    }
    out.insert(("node", e.node.clone()), node);
    for d in &s.devices {
        let mut f = Fields::new();
        f.insert("path", d.path.clone());
        f.insert("attach", d.attach.clone());
        out.insert(("device", d.lun.clone()), f);
    }
    for p in &e.partitions {
        let mut f = Fields::new();
        f.insert("failed", p.failed.clone().unwrap_or_else(|| "no".into()));
        f.insert("flush-paused", yes(p.flush_paused));
        out.insert(("partition", p.partition.to_string()), f);
    }
    for r in &e.ranges {
        let lun = e
            .luns
            .get(r.lun as usize)
            .map_or_else(|| format!("lun{}", r.lun), |l| l.name.clone());
        let mut f = Fields::new();
        f.insert("owner", r.owner.clone());
        f.insert("epoch", r.epoch.to_string());
        f.insert("state", r.state.clone());
        f.insert("serving", yes(r.serving));
        out.insert(("range", format!("{lun}:{}", r.range)), f);
    }
    if let Some(t) = &e.takeover {
        let mut f = Fields::new();
        f.insert("phase", t.phase.clone());
        f.insert("ranges", t.ranges.to_string());
        out.insert(("takeover", t.from.clone()), f);
    }
    if let Some(j) = &e.range_job {
        out.insert(
            ("job", format!("{} {}:{}", j.job, j.lun, j.range)),
            Fields::new(),
        );
    }
    out
}

/// Whether nothing `snapshot` covers differs (the daemon's test for pushing a status).
pub fn same_state(a: &DaemonStatus, b: &DaemonStatus) -> bool {
    snapshot(a) == snapshot(b)
}

/// What changed from `old` to `new`.
pub fn diff(old: &Snapshot, new: &Snapshot) -> Vec<Event> {
    let mut events = Vec::new();
    for ((kind, name), fields) in new {
        match old.get(&(*kind, name.clone())) {
            None => events.push(Event {
                what: What::Create,
                object: kind,
                name: name.clone(),
                fields: fields.clone(),
            }),
            Some(before) if before != fields => {
                let changed: Fields = fields
                    .iter()
                    .filter(|(k, v)| before.get(*k) != Some(v))
                    .map(|(k, v)| (*k, v.clone()))
                    .collect();
                events.push(Event {
                    what: What::Change,
                    object: kind,
                    name: name.clone(),
                    fields: changed,
                });
            }
            Some(_) => {}
        }
    }
    for (kind, name) in old.keys() {
        if !new.contains_key(&(*kind, name.clone())) {
            events.push(Event {
                what: What::Destroy,
                object: kind,
                name: name.clone(),
                fields: Fields::new(),
            });
        }
    }
    events
}

/// The `exists` lines of a first snapshot.
pub fn existing(s: &Snapshot) -> Vec<Event> {
    s.iter()
        .map(|((kind, name), fields)| Event {
            what: What::Exists,
            object: kind,
            name: name.clone(),
            fields: fields.clone(),
        })
        .collect()
}

impl Event {
    /// `WHAT OBJECT NAME key:value ...`; a value with a space is quoted.
    pub fn render(&self) -> String {
        let what = match self.what {
            What::Exists => "exists",
            What::Create => "create",
            What::Change => "change",
            What::Destroy => "destroy",
        };
        let mut line = format!("{what} {} {}", self.object, self.name);
        for (k, v) in &self.fields {
            if v.contains(char::is_whitespace) || v.is_empty() {
                line.push_str(&format!(" {k}:{v:?}"));
            } else {
                line.push_str(&format!(" {k}:{v}"));
            }
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(kv: &[(&'static str, &str)]) -> Fields {
        kv.iter().map(|(k, v)| (*k, v.to_string())).collect()
    }

    #[test]
    fn a_moved_range_and_a_lost_link_are_changes_a_gone_device_a_destroy() {
        let mut old = Snapshot::new();
        old.insert(
            ("node", "node-b".into()),
            fields(&[("link", "up"), ("mirror", "mirroring")]),
        );
        old.insert(
            ("range", "lun0:0".into()),
            fields(&[("owner", "node-a"), ("epoch", "1"), ("serving", "no")]),
        );
        old.insert(
            ("device", "lun0".into()),
            fields(&[("path", "/dev/ublkb1")]),
        );
        let mut new = old.clone();
        new.insert(
            ("node", "node-b".into()),
            fields(&[("link", "connecting"), ("mirror", "degraded")]),
        );
        new.insert(
            ("range", "lun0:0".into()),
            fields(&[("owner", "node-b"), ("epoch", "4"), ("serving", "yes")]),
        );
        new.remove(&("device", "lun0".into()));
        new.insert(("takeover", "node-a".into()), fields(&[("phase", "done")]));
        let lines: Vec<String> = diff(&old, &new).iter().map(Event::render).collect();
        assert_eq!(
            lines,
            [
                "change node node-b link:connecting mirror:degraded",
                "change range lun0:0 epoch:4 owner:node-b serving:yes",
                "create takeover node-a phase:done",
                "destroy device lun0",
            ]
        );
        assert!(diff(&new, &new).is_empty());
    }

    #[test]
    fn values_with_spaces_are_quoted() {
        let e = Event {
            what: What::Change,
            object: "partition",
            name: "1".into(),
            fields: fields(&[("failed", "fenced: epoch 3")]),
        };
        assert_eq!(e.render(), r#"change partition 1 failed:"fenced: epoch 3""#);
    }
}
