//! The workspace's MSRV (`rust-version` in the root Cargo.toml) is honest: every crate of the
//! workspace inherits it, and no dependency in Cargo.lock declares a newer one. (Whether our
//! own code compiles with it is checked by `NVM_MSRV_CHECK=1 scripts/test.sh`, which builds
//! with that toolchain.)

use std::process::Command;

fn version(v: &str) -> Vec<u64> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

#[test]
fn every_crate_inherits_the_msrv_and_no_dependency_needs_a_newer_rust() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // This platform's dependencies only: the others' sources need not be downloaded (cargo
    // may fetch what the build did not, so no --offline).
    let platform = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .args(["--filter-platform", &platform])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .output()
        .expect("running cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("its JSON");
    let members: Vec<&str> = meta["workspace_members"]
        .as_array()
        .expect("workspace_members")
        .iter()
        .filter_map(|m| m.as_str())
        .collect();
    let packages = meta["packages"].as_array().expect("packages");
    let msrv = packages
        .iter()
        .find(|p| p["name"] == "ublk-target")
        .and_then(|p| p["rust_version"].as_str())
        .expect("ublk-target declares rust-version");
    let mut problems = Vec::new();
    for p in packages {
        let name = p["name"].as_str().unwrap_or("?");
        let declared = p["rust_version"].as_str();
        let member = members.contains(&p["id"].as_str().unwrap_or(""));
        match declared {
            None if member => problems.push(format!("{name} declares no rust-version")),
            Some(v) if member && v != msrv => {
                problems.push(format!("{name} declares rust-version {v}, not {msrv}"))
            }
            Some(v) if version(v) > version(msrv) => problems.push(format!(
                "{name} {} needs Rust {v}, newer than our rust-version {msrv}",
                p["version"].as_str().unwrap_or("?")
            )),
            _ => {}
        }
    }
    assert!(
        problems.is_empty(),
        "raise rust-version in the root Cargo.toml or pin the dependency:\n{}",
        problems.join("\n")
    );
}
