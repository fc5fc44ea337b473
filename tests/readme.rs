//! The README documents every config key (a knob nobody can find does not exist).
use barrage::config::Config;

#[test]
fn every_config_key_is_in_the_readme() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let value = toml::Value::try_from(Config::default()).unwrap();
    let mut missing = Vec::new();
    for (section, table) in value.as_table().unwrap() {
        if section == "types" || section == "client_types" {
            continue;
        }
        for key in table.as_table().unwrap().keys() {
            let name = format!("`{section}.{key}`");
            if !readme.contains(&name) {
                missing.push(name);
            }
        }
    }
    assert!(missing.is_empty(), "README lacks {missing:?}");
    assert!(readme.contains("`types.NAME`") && readme.contains("`client_types.NAME`"));
}
