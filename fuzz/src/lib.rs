//! What the fuzz targets share: keeping the configuration targets off the filesystem.
//!
//! The configuration parsers read the files some keys name (a password, a rule file, TLS material).
//! A fuzz target must not touch the filesystem, so an input that names a file is skipped before the
//! real parser sees it. The check parses the text as TOML first, so a key written with escapes or
//! quotes is still recognised: what the parser would read, this sees.

#[cfg(feature = "apps")]
/// Whether `text` is TOML in which a table at any depth has one of `keys`. Text that is not TOML
/// names no file (the real parser refuses it before reading anything).
pub fn names_a_file(text: &str, keys: &[&str]) -> bool {
    match text.parse::<toml::Table>() {
        Ok(table) => table_names(&table, keys),
        Err(_) => false,
    }
}

#[cfg(feature = "apps")]
fn table_names(table: &toml::Table, keys: &[&str]) -> bool {
    table
        .iter()
        .any(|(k, v)| keys.contains(&k.as_str()) || value_names(v, keys))
}

#[cfg(feature = "apps")]
fn value_names(value: &toml::Value, keys: &[&str]) -> bool {
    match value {
        toml::Value::Table(t) => table_names(t, keys),
        toml::Value::Array(a) => a.iter().any(|v| value_names(v, keys)),
        _ => false,
    }
}

#[cfg(all(test, feature = "apps"))]
mod tests {
    use super::names_a_file;

    #[test]
    fn finds_file_keys_at_any_depth_and_through_quoting() {
        let keys = &["password_file", "rules_file"];
        assert!(names_a_file("[mqtt]\npassword_file = \"/etc/x\"\n", keys));
        assert!(names_a_file(
            "[alerts]\n\"rules\\u005ffile\" = \"/x\"\n",
            keys
        ));
        assert!(names_a_file("a = [{ rules_file = 1 }]\n", keys));
        assert!(!names_a_file("[mqtt]\nbroker = \"mqtt://h\"\n", keys));
        assert!(!names_a_file("not = = toml", keys));
    }
}
