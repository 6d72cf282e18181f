//! Printing `nvmirrorctl verify`'s answer: one line per range, then a summary; an error
//! (exit 1) when the media differ or a range could not be compared.

use anyhow::bail;
use nvmirror::engine::{Verdict, VerifyReport};

pub fn print(report: &VerifyReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", crate::json_out::versioned(report)?);
    } else {
        for r in &report.ranges {
            println!("{} range {}: {}", r.lun, r.range, describe(&r.verdict));
        }
    }
    let compared: u64 = report.ranges.iter().map(|r| r.bytes).sum();
    let bad = report.ranges.iter().filter(|r| r.verdict.is_bad()).count();
    let repaired = report
        .ranges
        .iter()
        .filter(|r| matches!(r.verdict, Verdict::Repaired { .. }))
        .count();
    let summary = format!(
        "{compared} bytes compared with node {}'s medium; {bad} range(s) differ or failed, {repaired} repaired",
        report.partner
    );
    if bad > 0 {
        bail!("{summary} (nvmirrorctl verify --repair copies differences from this node)");
    }
    if !json {
        println!("{summary}");
    }
    Ok(())
}

fn describe(v: &Verdict) -> String {
    match v {
        Verdict::Identical => "identical".into(),
        Verdict::Differ { extents } => format!("DIFFER at {}", extents_text(extents)),
        Verdict::Repaired { extents } => format!("repaired at {}", extents_text(extents)),
        Verdict::ServedElsewhere { node } => format!("served by {node}: verify it there"),
        Verdict::Outdated => "partner's medium is outdated for it: the resync copies it".into(),
        Verdict::OutdatedHere => {
            "this node's medium is marked outdated for it: not compared".into()
        }
        Verdict::Failed { error } => format!("NOT COMPARED: {error}"),
    }
}

fn extents_text(extents: &[(u64, u64)]) -> String {
    let bytes: u64 = extents.iter().map(|e| e.1).sum();
    let shown: Vec<String> = extents
        .iter()
        .take(8)
        .map(|(at, len)| format!("{at}+{len}"))
        .collect();
    let more = extents.len().saturating_sub(shown.len());
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!("{} ({bytes} bytes){more}", shown.join(", "))
}
