//! `--shell` output: `NAME=value` lines that a POSIX shell can `eval`, like `drbdadm sh-*`.
//!
//! The Pacemaker agent (scripts/ocf/nvmirror) gets every fact it acts on this way, so it
//! needs neither Python nor jq and never re-implements a rule of the config. Every value is
//! quoted here, whatever it holds (node names, file paths, error messages with spaces,
//! quotes or newlines), so an `eval` assigns it verbatim and runs nothing.

use std::fmt::Display;

/// Quotes `value` for a POSIX shell, as Python's `shlex.quote` does: left bare when it is
/// made only of characters no shell treats specially, else in single quotes (inside which
/// nothing is special), each `'` written as `'\''`. A shell variable cannot hold a NUL
/// byte, so NULs are dropped rather than letting the shell cut the value short.
pub fn quote(value: &str) -> String {
    let bare = |b: u8| b.is_ascii_alphanumeric() || b"@%+=:,./-_".contains(&b);
    if !value.is_empty() && value.bytes().all(bare) {
        return value.to_owned();
    }
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        match c {
            '\'' => out.push_str(r"'\''"),
            '\0' => {}
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// An ordered set of shell assignments. Every command prints all of its variables every
/// time (empty when there is nothing to say), so a script that evals the output again
/// never keeps a stale value from an earlier call.
#[derive(Debug, Default)]
pub struct ShellVars(Vec<(&'static str, String)>);

impl ShellVars {
    pub fn set(&mut self, name: &'static str, value: impl Display) -> &mut Self {
        debug_assert!(
            name.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
                && name.bytes().next().is_some_and(|b| b.is_ascii_uppercase()),
            "{name} is not a portable shell variable name"
        );
        debug_assert!(self.0.iter().all(|(n, _)| *n != name), "{name} set twice");
        self.0.push((name, value.to_string()));
        self
    }

    /// 1 or 0, the spelling shell tests compare against (`[ "$X" = 1 ]`).
    pub fn set_flag(&mut self, name: &'static str, value: bool) -> &mut Self {
        self.set(name, if value { 1 } else { 0 })
    }

    #[cfg(test)]
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// One `NAME=value` line per variable, values quoted.
    pub fn render(&self) -> String {
        self.0
            .iter()
            .map(|(name, value)| format!("{name}={}\n", quote(value)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_values_stay_bare_and_the_rest_is_single_quoted() {
        assert_eq!(quote("node-a"), "node-a");
        assert_eq!(
            quote("/run/nvmirror/node-a.sock"),
            "/run/nvmirror/node-a.sock"
        );
        assert_eq!(quote("lun0:1"), "lun0:1");
        assert_eq!(quote("42"), "42");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("node-a node-b"), "'node-a node-b'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote("$(reboot)"), "'$(reboot)'");
        assert_eq!(quote("~root"), "'~root'");
        assert_eq!(quote("a\nb"), "'a\nb'");
        assert_eq!(quote("a\0b"), "'ab'");
    }

    #[test]
    fn render_writes_one_assignment_per_line() {
        let mut v = ShellVars::default();
        v.set("ST_NODE", "node-a")
            .set("ST_HOLDERS", "")
            .set_flag("ST_LINK_UP", true)
            .set("ST_OWNED", 2);
        assert_eq!(
            v.render(),
            "ST_NODE=node-a\nST_HOLDERS=''\nST_LINK_UP=1\nST_OWNED=2\n"
        );
        assert_eq!(v.get("ST_OWNED"), Some("2"));
    }

    /// What counts is what a shell makes of it: eval the output in /bin/sh and read every
    /// value back, byte for byte, with nothing executed on the way.
    #[test]
    fn sh_eval_assigns_every_value_verbatim() {
        let nasty = [
            "plain",
            "",
            "two words",
            "it's \"quoted\"",
            "line one\nline two\n",
            "$(touch /tmp/nvmirrorctl-quote-test-pwned) `id` ${HOME} \\ ; & | < > * ? [a] # !",
            "'",
            "''",
            "trailing backslash \\",
            "tab\there",
            "~ and ~/x and a:~",
            "ünïcödé",
        ];
        let mut vars = ShellVars::default();
        const NAMES: [&str; 12] = [
            "V0", "V1", "V2", "V3", "V4", "V5", "V6", "V7", "V8", "V9", "V10", "V11",
        ];
        for (name, value) in NAMES.iter().zip(nasty) {
            vars.set(name, value);
        }
        // Print each value back between markers, NUL-separated (values may hold newlines).
        let mut script = vars.render();
        for name in NAMES {
            script.push_str(&format!("printf '%s\\0' \"${name}\"\n"));
        }
        let out = std::process::Command::new("/bin/sh")
            .arg("-c")
            .arg("eval \"$1\"")
            .arg("sh")
            .arg(&script)
            .output()
            .expect("/bin/sh runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Vec<String> = String::from_utf8(out.stdout)
            .expect("utf-8 back")
            .split('\0')
            .map(String::from)
            .collect();
        assert_eq!(got[..NAMES.len()], nasty.map(String::from)[..]);
        assert!(
            !std::path::Path::new("/tmp/nvmirrorctl-quote-test-pwned").exists(),
            "eval ran a command substitution"
        );
    }
}
