//! JSON for programs: every command's `--json` object starts with `"schema"`, the version of
//! its layout. A field added keeps the version; a field renamed, removed or changed in meaning
//! bumps it.

use serde::Serialize;

/// The layout version of `status`, `list`, `verify` and `nvram inspect` JSON.
pub const SCHEMA: u32 = 1;

#[derive(Serialize)]
struct Versioned<'a, T: Serialize> {
    schema: u32,
    #[serde(flatten)]
    body: &'a T,
}

/// `body` (a struct: its fields follow `"schema"`) as pretty JSON.
pub fn versioned<T: Serialize>(body: &T) -> serde_json::Result<String> {
    serde_json::to_string_pretty(&Versioned {
        schema: SCHEMA,
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schema_comes_first_and_the_fields_follow() {
        #[derive(Serialize)]
        struct Body {
            node: &'static str,
            pid: u32,
        }
        let text = versioned(&Body {
            node: "node-a",
            pid: 7,
        })
        .unwrap();
        assert_eq!(
            text,
            "{\n  \"schema\": 1,\n  \"node\": \"node-a\",\n  \"pid\": 7\n}"
        );
    }
}
