//! Shared pieces of Pronto's end-to-end benchmarks: the machine they ran
//! on and summary statistics. Each benchmark is a binary in `src/bin/`.

pub mod chart;
pub mod stack;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// One line naming the machine: CPU model, cores, memory, kernel.
pub fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|l| l.trim().trim_end_matches(" kB").parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {mem_gib:.0} GiB RAM, Linux {}",
        kernel.trim()
    )
}

/// Median, minimum and maximum of `samples` (which must not be empty).
pub fn summary(samples: &[Duration]) -> (Duration, Duration, Duration) {
    let mut sorted = samples.to_vec();
    sorted.sort();
    let median = if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        (sorted[sorted.len() / 2 - 1] + sorted[sorted.len() / 2]) / 2
    };
    (median, sorted[0], sorted[sorted.len() - 1])
}

/// Replaces the text between the markers of `section` in the markdown file
/// `path`: `<!-- SECTION results: written by bench/run -->` and
/// `<!-- end of SECTION results -->`.
pub fn write_markdown(path: &std::path::Path, section: &str, table: &str) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let begin_marker = format!("<!-- {section} results: written by bench/run -->");
    let end_marker = format!("<!-- end of {section} results -->");
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let (Some(begin), Some(end)) = (text.find(&begin_marker), text.find(&end_marker)) else {
        anyhow::bail!("{} has no {section} markers", path.display());
    };
    let updated = format!("{}{begin_marker}\n{table}{}", &text[..begin], &text[end..]);
    std::fs::write(path, updated).with_context(|| format!("write {}", path.display()))
}

/// Writes dirty pages and drops the page cache, dentries and inodes.
pub fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

/// `stat` of every path below `dir`, as `find -exec stat` does: the time
/// taken and the number of paths.
pub fn walk(dir: &Path) -> Result<(Duration, usize)> {
    let started = Instant::now();
    let mut count = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("read {}", d.display()))? {
            let path = entry?.path();
            let meta = std::fs::symlink_metadata(&path)?;
            count += 1;
            if meta.is_dir() {
                stack.push(path);
            }
        }
    }
    Ok((started.elapsed(), count))
}

/// Threads and resident memory (KiB) of a process, from
/// `/proc/<pid>/status`.
pub fn footprint(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("Threads:")?, field("VmRSS:")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        let s = |ms: &[u64]| {
            ms.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        let ms = |m| Duration::from_millis(m);
        assert_eq!(summary(&s(&[3, 1, 2])), (ms(2), ms(1), ms(3)));
        assert_eq!(
            summary(&s(&[4, 1, 2, 3])),
            (Duration::from_micros(2500), ms(1), ms(4))
        );
    }
}
