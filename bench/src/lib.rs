//! Shared pieces of Pronto's end-to-end benchmarks: the machine they ran
//! on and summary statistics. Each benchmark is a binary in `src/bin/`.

pub mod chart;
pub mod stack;

use std::time::Duration;

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
