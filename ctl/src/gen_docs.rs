//! `nvmirrorctl gen-docs DIR` (hidden; the package build runs it): man pages in section 8 for
//! `nvmirrorctl`, each of its commands, `nvmirrord` and `nvmirror-tiebreaker`, and shell
//! completions for each, all from their clap definitions, so they never drift from `--help`.

use anyhow::Context;
use clap::CommandFactory;
use clap_complete::Shell;
use std::path::{Path, PathBuf};

/// Writes `DIR/man8/*.8` and `DIR/completions/{bash,zsh,fish}/*`; returns the files.
pub fn generate(ctl: clap::Command, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let man8 = out.join("man8");
    std::fs::create_dir_all(&man8).with_context(|| format!("creating {}", man8.display()))?;
    let mut written = Vec::new();
    for cmd in [
        ctl,
        nvmirror::node::daemon::DaemonArgs::command(),
        nvmirror::node::tiebreaker::TieBreakerArgs::command(),
    ] {
        let name = cmd.get_name().to_string();
        let mut built = cmd.clone().disable_help_subcommand(true);
        built.build();
        pages(built, &man8, &mut written)?;
        for (shell, dir) in [
            (Shell::Bash, "bash"),
            (Shell::Zsh, "zsh"),
            (Shell::Fish, "fish"),
        ] {
            let dir = out.join("completions").join(dir);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let mut cmd = cmd.clone();
            written.push(
                clap_complete::generate_to(shell, &mut cmd, &name, &dir)
                    .with_context(|| format!("writing the {shell} completion of {name}"))?,
            );
        }
    }
    Ok(written)
}

/// A page for `cmd` and one for each of its visible commands, recursively.
fn pages(cmd: clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        pages(sub.clone(), dir, written)?;
    }
    let name = cmd.get_display_name().unwrap_or(cmd.get_name()).to_string();
    let page = clap_mangen::Man::new(cmd)
        .section("8")
        .manual("nvmirror")
        .generate_to(dir)
        .with_context(|| format!("writing the man page of {name}"))?;
    written.push(page);
    Ok(())
}
