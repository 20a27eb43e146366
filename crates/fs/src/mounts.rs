//! Finding and taking down Pronto's FUSE mounts.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// One line of `/proc/self/mountinfo`, the fields Pronto needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub mount_point: String,
    pub fs_type: String,
    pub source: String,
    /// The mount's device, `major:minor`: a FUSE mount's connection.
    pub device: String,
}

/// The mounts this process sees. Paths are unescaped (`\040` is a space).
pub fn mount_table() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| parse_mountinfo(&info))
        .unwrap_or_default()
}

fn parse_mountinfo(info: &str) -> Vec<MountEntry> {
    info.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            Some(MountEntry {
                mount_point: unescape(fields.get(4)?),
                fs_type: (*fields.get(sep + 1)?).to_owned(),
                source: unescape(fields.get(sep + 2)?),
                device: (*fields.get(2)?).to_owned(),
            })
        })
        .collect()
}

/// Undoes the octal escapes (`\040`, `\011`, `\012`, `\134`) of mountinfo.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && let Some(value) = std::str::from_utf8(&bytes[i + 1..i + 4])
                .ok()
                .and_then(|oct| u8::from_str_radix(oct, 8).ok())
        {
            out.push(value);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// True while `dir` (an absolute, resolved path) is a mount point.
pub fn is_mounted(dir: &Path) -> bool {
    let Some(dir) = dir.to_str() else {
        return false;
    };
    mount_table().iter().any(|m| m.mount_point == dir)
}

/// The device (`major:minor`) of the Pronto FUSE mount at `dir`, if one
/// is there. Read from the mount table: asking the mount itself could wait
/// on a daemon that is not serving it.
pub fn pronto_mount_device(dir: &Path) -> Option<String> {
    let dir = dir.to_str()?;
    mount_table()
        .into_iter()
        .rev()
        .find(|m| m.mount_point == dir)
        .filter(|m| m.fs_type.starts_with("fuse") && m.source.starts_with("pronto:"))
        .map(|m| m.device)
}

/// True when `dir` is a Pronto FUSE mount (source `pronto:…`).
pub fn is_pronto_mount(dir: &Path) -> bool {
    let Some(dir) = dir.to_str() else {
        return false;
    };
    mount_table().iter().any(|m| {
        m.mount_point == dir && m.fs_type.starts_with("fuse") && m.source.starts_with("pronto:")
    })
}

/// Detaches the mount at `dir` and aborts its FUSE connection, so that
/// requests still waiting on a daemon (a read stuck on a stalled registry,
/// or a daemon that is gone) fail at once instead of hanging.
pub fn detach_and_abort(dir: &Path) -> std::io::Result<()> {
    let dev = std::fs::metadata(dir).map(|m| m.dev()).ok();
    nix::mount::umount2(dir, nix::mount::MntFlags::MNT_DETACH)?;
    if let Some(dev) = dev {
        abort_connection(dev);
    }
    Ok(())
}

/// Aborts the FUSE connection of the mount whose device is `dev`. Mounts
/// the fusectl filesystem if needed.
fn abort_connection(dev: u64) {
    let connections = Path::new("/sys/fs/fuse/connections");
    if !is_mounted(connections) && connections.is_dir() {
        let mounted = nix::mount::mount(
            Some("fusectl"),
            connections,
            Some("fusectl"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        );
        if let Err(err) = mounted {
            tracing::warn!("cannot mount fusectl to abort the connection: {err}");
            return;
        }
    }
    // Anonymous devices have major 0, so the connection is named by minor.
    let abort = connections
        .join(nix::sys::stat::minor(dev).to_string())
        .join("abort");
    if let Err(err) = std::fs::write(&abort, "1") {
        // Gone already when nothing held the mount open.
        tracing::debug!("cannot abort FUSE connection {}: {err}", abort.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        let info = "36 35 98:0 / /mnt/with\\040space rw,noatime master:1 - fuse.pronto pronto:reg/a\\040b ro\n\
                    37 35 98:0 / /plain rw - ext4 /dev/sda1 rw\n";
        let table = parse_mountinfo(info);
        assert_eq!(table.len(), 2);
        assert_eq!(table[0].mount_point, "/mnt/with space");
        assert_eq!(table[0].fs_type, "fuse.pronto");
        assert_eq!(table[0].source, "pronto:reg/a b");
        assert_eq!(table[0].device, "98:0");
        assert_eq!(table[1].mount_point, "/plain");
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }
}
