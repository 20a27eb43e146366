//! The node's containerd configuration: what `pronto node install` adds to
//! `/etc/containerd/config.toml` and `pronto node uninstall` takes out.
//!
//! Three settings make containerd use Pronto: the proxy plugin
//! (`[proxy_plugins.NAME]`), CRI's snapshotter, and
//! `disable_snapshot_annotations = false` so that CRI passes each layer's
//! image reference and digest to the snapshotter. Everything else in the
//! file stays as it was, byte for byte: the file is edited as a document
//! (comments, order and formatting kept), and new tables go at its end.

use toml_edit::{DocumentMut, Item, TableLike, Value};

/// Where CRI's image settings live in each configuration version.
const CRI_V2: &[&str] = &["plugins", "io.containerd.grpc.v1.cri", "containerd"];
const CRI_V3: &[&str] = &["plugins", "io.containerd.cri.v1.images"];

/// What Pronto needs in containerd's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProntoPlugin {
    /// The proxy plugin's name, which CRI's `snapshotter` names.
    pub name: String,
    /// `pronto serve`'s socket.
    pub address: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("containerd's configuration is not valid TOML: {0}")]
    Parse(String),
    #[error(
        "containerd's configuration has version {0}; Pronto configures versions 2 (containerd 1.x) and 3 (containerd 2.x): migrate it with `containerd config migrate` first"
    )]
    Version(i64),
    #[error("containerd's configuration has `{key}` as a {found}, where a table is expected")]
    NotATable { key: String, found: &'static str },
}

/// The configuration `original` with Pronto's settings. An empty file (or only comments) becomes a
/// version 2 configuration, which containerd 1.6 to 2.x read.
pub fn merge(original: &str, plugin: &ProntoPlugin) -> Result<String, ConfigError> {
    let mut doc = parse(original)?;
    let version = version(&doc)?;
    if version.is_none() {
        // A file without settings: no version yet.
        doc.insert("version", toml_edit::value(2));
    }
    let proxy = table_at(&mut doc, &["proxy_plugins", &plugin.name])?;
    set(proxy, "type", "snapshot".into());
    set(proxy, "address", plugin.address.as_str().into());
    let cri = table_at(&mut doc, cri_path(version.unwrap_or(2)))?;
    set(cri, "snapshotter", plugin.name.as_str().into());
    set(cri, "disable_snapshot_annotations", false.into());
    // A document prints as it was parsed, and `set` leaves a value that
    // is already right alone: an installed file merges to itself.
    Ok(doc.to_string())
}

/// Whether Pronto's settings are all in `text` already.
pub fn is_configured(text: &str, plugin: &ProntoPlugin) -> Result<bool, ConfigError> {
    Ok(merge(text, plugin)? == text)
}

/// `current` without Pronto's settings: each one set back to its value in
/// `original` (what the file held before `pronto node install`), or
/// removed when `original` did not have it. Tables left empty by that are
/// removed too. Everything else in `current` is kept.
pub fn revert(current: &str, original: &str, plugin: &ProntoPlugin) -> Result<String, ConfigError> {
    let mut doc = parse(current)?;
    let before = parse(original)?;
    let version = version(&doc)?.unwrap_or(2);
    let proxy_path = ["proxy_plugins", plugin.name.as_str()];
    let keys: [(&[&str], &[&str]); 2] = [
        (&proxy_path, &["type", "address"]),
        (
            cri_path(version),
            &["snapshotter", "disable_snapshot_annotations"],
        ),
    ];
    for (path, names) in keys {
        let old = lookup(before.as_item(), path);
        if let Some(table) = lookup_mut(doc.as_item_mut(), path) {
            for name in names {
                match old.and_then(|t| t.get(name)).and_then(Item::as_value) {
                    Some(value) => set(table, name, value.clone()),
                    None => {
                        table.remove(name);
                    }
                }
            }
        }
        prune_empty(&mut doc, path, &before);
    }
    if version_key_added(original, &doc) {
        doc.remove("version");
    }
    Ok(doc.to_string())
}

fn parse(text: &str) -> Result<DocumentMut, ConfigError> {
    text.parse::<DocumentMut>()
        .map_err(|e| ConfigError::Parse(e.to_string().trim().to_owned()))
}

/// The `version` setting; `None` for a file with no settings at all.
fn version(doc: &DocumentMut) -> Result<Option<i64>, ConfigError> {
    match doc.get("version").and_then(Item::as_integer) {
        Some(v @ (2 | 3)) => Ok(Some(v)),
        Some(v) => Err(ConfigError::Version(v)),
        // containerd reads a file without `version` as version 1.
        None if doc.is_empty() => Ok(None),
        None => Err(ConfigError::Version(1)),
    }
}

fn cri_path(version: i64) -> &'static [&'static str] {
    if version >= 3 { CRI_V3 } else { CRI_V2 }
}

/// The table at `path`, made (as implicit tables, so that no empty
/// headers appear) where missing.
fn table_at<'a>(
    doc: &'a mut DocumentMut,
    path: &[&str],
) -> Result<&'a mut dyn TableLike, ConfigError> {
    let mut table: &mut dyn TableLike = doc.as_table_mut();
    for (depth, key) in path.iter().enumerate() {
        if !table.contains_key(key) {
            let mut new = toml_edit::Table::new();
            new.set_implicit(depth + 1 < path.len());
            table.insert(key, Item::Table(new));
        }
        let item = table.get_mut(key).expect("present");
        let found = item.type_name();
        table = item
            .as_table_like_mut()
            .ok_or_else(|| ConfigError::NotATable {
                key: path[..=depth].join("."),
                found,
            })?;
    }
    Ok(table)
}

fn lookup<'a>(item: &'a Item, path: &[&str]) -> Option<&'a dyn TableLike> {
    let mut table = item.as_table_like()?;
    for key in path {
        table = table.get(key)?.as_table_like()?;
    }
    Some(table)
}

fn lookup_mut<'a>(item: &'a mut Item, path: &[&str]) -> Option<&'a mut dyn TableLike> {
    let mut table = item.as_table_like_mut()?;
    for key in path {
        table = table.get_mut(key)?.as_table_like_mut()?;
    }
    Some(table)
}

/// Sets `key` to `value`, keeping the spacing and comments around an
/// existing value, and leaving it alone when it already has that value.
fn set(table: &mut dyn TableLike, key: &str, mut value: Value) {
    if let Some(old) = table.get_mut(key).and_then(Item::as_value_mut) {
        if same(old, &value) {
            return;
        }
        *value.decor_mut() = old.decor().clone();
        *old = value;
        return;
    }
    table.insert(key, Item::Value(value));
}

fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(a), Value::String(b)) => a.value() == b.value(),
        (Value::Boolean(a), Value::Boolean(b)) => a.value() == b.value(),
        (Value::Integer(a), Value::Integer(b)) => a.value() == b.value(),
        _ => false,
    }
}

/// Removes the tables along `path`, deepest first, that are empty now and
/// were not in `before`.
fn prune_empty(doc: &mut DocumentMut, path: &[&str], before: &DocumentMut) {
    for depth in (1..=path.len()).rev() {
        let (parent, key) = (&path[..depth - 1], path[depth - 1]);
        if lookup(before.as_item(), &path[..depth]).is_some() {
            return;
        }
        let Some(table) = lookup_mut(doc.as_item_mut(), parent) else {
            return;
        };
        let empty = table
            .get(key)
            .and_then(Item::as_table_like)
            .is_some_and(|t| t.is_empty());
        if !empty {
            return;
        }
        table.remove(key);
    }
}

/// Whether `version` is in `doc` only because `merge` added it to a file
/// that had no settings.
fn version_key_added(original: &str, doc: &DocumentMut) -> bool {
    parse(original).is_ok_and(|o| o.is_empty()) && doc.iter().all(|(key, _)| key == "version")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin() -> ProntoPlugin {
        ProntoPlugin {
            name: "pronto".into(),
            address: "/run/pronto/pronto.sock".into(),
        }
    }

    const V2: &str = r#"# Written by the node's provisioning.
version = 2
root = "/var/lib/containerd"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.9"  # pinned
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".registry]
      config_path = "/etc/containerd/certs.d"

[proxy_plugins]
  [proxy_plugins.stargz]
    type = "snapshot"
    address = "/run/containerd-stargz-grpc/containerd-stargz-grpc.sock"
"#;

    #[test]
    fn version_2_gets_the_plugin_and_keeps_everything_else() {
        let merged = merge(V2, &plugin()).unwrap();
        // Every original line is still there, in order, except the one
        // value changed.
        let expected_kept: Vec<&str> = V2
            .lines()
            .filter(|l| !l.contains("snapshotter = \"overlayfs\""))
            .collect();
        let mut lines = merged.lines();
        for line in expected_kept {
            assert!(lines.any(|l| l == line), "lost {line:?} in\n{merged}");
        }
        assert!(
            merged.contains("      snapshotter = \"pronto\"\n"),
            "{merged}"
        );
        let value: toml::Table = toml::from_str(&merged).unwrap();
        let cri = &value["plugins"]["io.containerd.grpc.v1.cri"]["containerd"];
        assert_eq!(cri["snapshotter"].as_str(), Some("pronto"));
        assert_eq!(cri["disable_snapshot_annotations"].as_bool(), Some(false));
        assert_eq!(cri["default_runtime_name"].as_str(), Some("runc"));
        let proxy = &value["proxy_plugins"]["pronto"];
        assert_eq!(proxy["type"].as_str(), Some("snapshot"));
        assert_eq!(proxy["address"].as_str(), Some("/run/pronto/pronto.sock"));
        assert!(value["proxy_plugins"].get("stargz").is_some());
    }

    #[test]
    fn merging_twice_changes_nothing_the_second_time() {
        let once = merge(V2, &plugin()).unwrap();
        assert_eq!(merge(&once, &plugin()).unwrap(), once);
        assert!(is_configured(&once, &plugin()).unwrap());
        assert!(!is_configured(V2, &plugin()).unwrap());
    }

    #[test]
    fn version_3_uses_the_cri_images_plugin() {
        let original = "version = 3\n\n[plugins.'io.containerd.cri.v1.images']\n  snapshotter = 'overlayfs'\n  disable_snapshot_annotations = true\n\n[plugins.'io.containerd.cri.v1.runtime']\n  enable_selinux = false\n";
        let merged = merge(original, &plugin()).unwrap();
        let value: toml::Table = toml::from_str(&merged).unwrap();
        let images = &value["plugins"]["io.containerd.cri.v1.images"];
        assert_eq!(images["snapshotter"].as_str(), Some("pronto"));
        assert_eq!(
            images["disable_snapshot_annotations"].as_bool(),
            Some(false)
        );
        assert!(value["plugins"].get("io.containerd.grpc.v1.cri").is_none());
        assert!(merged.starts_with("version = 3\n\n[plugins.'io.containerd.cri.v1.images']\n"));
        assert!(
            merged.contains("[plugins.'io.containerd.cri.v1.runtime']\n  enable_selinux = false\n")
        );
    }

    #[test]
    fn an_empty_file_becomes_version_2() {
        for original in ["", "# nothing yet\n"] {
            let merged = merge(original, &plugin()).unwrap();
            let value: toml::Table = toml::from_str(&merged).unwrap();
            assert_eq!(value["version"].as_integer(), Some(2), "{merged}");
            assert_eq!(
                value["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["snapshotter"].as_str(),
                Some("pronto")
            );
            assert!(!merged.contains("[plugins]\n"), "empty header in\n{merged}");
            assert_eq!(revert(&merged, original, &plugin()).unwrap(), original);
        }
    }

    #[test]
    fn version_1_and_broken_files_are_refused() {
        assert_eq!(
            merge("root = \"/var/lib/containerd\"\n", &plugin()),
            Err(ConfigError::Version(1))
        );
        assert_eq!(
            merge("version = 4\n", &plugin()),
            Err(ConfigError::Version(4))
        );
        assert!(matches!(
            merge("version = 2\n[plugins\n", &plugin()),
            Err(ConfigError::Parse(_))
        ));
        assert!(matches!(
            merge("version = 2\nproxy_plugins = 3\n", &plugin()),
            Err(ConfigError::NotATable { .. })
        ));
    }

    #[test]
    fn revert_restores_the_original_values_and_keeps_later_edits() {
        let merged = merge(V2, &plugin()).unwrap();
        assert_eq!(revert(&merged, V2, &plugin()).unwrap(), V2);
        // An operator's later edit survives the uninstall.
        let edited = merged.replace(
            "default_runtime_name = \"runc\"",
            "default_runtime_name = \"crun\"",
        );
        let reverted = revert(&edited, V2, &plugin()).unwrap();
        assert_eq!(reverted, V2.replace("\"runc\"", "\"crun\""));
    }

    #[test]
    fn dotted_keys_are_edited_in_place() {
        let original = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\"]\ncontainerd.snapshotter = \"overlayfs\"\n";
        let merged = merge(original, &plugin()).unwrap();
        let value: toml::Table = toml::from_str(&merged).unwrap();
        assert_eq!(
            value["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["snapshotter"].as_str(),
            Some("pronto"),
            "{merged}"
        );
        assert_eq!(revert(&merged, original, &plugin()).unwrap(), original);
    }
}
