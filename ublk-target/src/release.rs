//! What this build speaks on the wire and writes to the NVRAM: the versions two nodes'
//! releases must share to mirror to each other (the link's protocol), and that an NVRAM must
//! have to be replayed by this build (its log format). `--version` prints them, so that an
//! operator can tell before an upgrade whether the old and the new release can run side by
//! side (docs/upgrade.md).

use std::sync::OnceLock;

/// `nvmirrord --version` and `nvmirrorctl --version`: the package version and the formats.
pub fn long_version() -> &'static str {
    static TEXT: OnceLock<String> = OnceLock::new();
    TEXT.get_or_init(|| {
        format!(
            "{} (mirror-link protocol {}, NVRAM log format {}, NVRAM record version {})",
            env!("CARGO_PKG_VERSION"),
            rdma_link::proto::PROTOCOL_VERSION,
            crate::nvram::layout::FORMAT_VERSION,
            crate::nvram::record::RECORD_VERSION,
        )
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_long_version_names_the_protocol_and_the_nvram_format() {
        let v = super::long_version();
        assert!(v.starts_with(env!("CARGO_PKG_VERSION")), "{v}");
        assert!(
            v.contains(&format!(
                "mirror-link protocol {}",
                rdma_link::proto::PROTOCOL_VERSION
            )) && v.contains("NVRAM log format 1"),
            "{v}"
        );
    }
}
