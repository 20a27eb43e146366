//! PNG bar charts of benchmark results (plotters, bitmap backend).

use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;

/// Debian's `fonts-dejavu-core`, the font the charts are drawn with.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Grouped bars: one group per `groups` entry, one bar per `series` entry,
/// each `value(group, series)` = (median, min, max) seconds, drawn with a
/// min–max whisker. Missing cells are left out.
pub fn bars(
    path: &Path,
    title: &str,
    groups: &[&str],
    series: &[&str],
    value: impl Fn(&str, &str) -> Option<(f64, f64, f64)>,
) -> Result<()> {
    let font = std::fs::read(FONT)
        .with_context(|| format!("read {FONT} (apt-get install fonts-dejavu-core)"))?;
    // plotters keeps registered fonts for the life of the process.
    plotters::style::register_font(
        "sans-serif",
        FontStyle::Normal,
        Box::leak(font.into_boxed_slice()),
    )
    .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let top = groups
        .iter()
        .flat_map(|g| series.iter().filter_map(|s| value(g, s)))
        .map(|(_, _, max)| max)
        .fold(1.0_f64, f64::max)
        * 1.15;
    let root = BitMapBackend::new(path, (1000, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    // Each bar is two units wide so that its whisker sits on an integer
    // centre; a gap of one bar separates groups.
    let slots = (series.len() + 1) * 2;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0..(groups.len() * slots) as i32, 0.0..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() * slots)
        .x_label_formatter(&|x| {
            let (group, slot) = (*x as usize / slots, *x as usize % slots);
            if slot == series.len() {
                groups.get(group).map(|g| g.to_string()).unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc("seconds")
        .label_style(("sans-serif", 16))
        .draw()?;
    for (s, name) in series.iter().enumerate() {
        let color = Palette99::pick(s).to_rgba();
        let cells: Vec<(i32, (f64, f64, f64))> = groups
            .iter()
            .enumerate()
            .filter_map(|(g, group)| value(group, name).map(|v| ((g * slots + s * 2) as i32, v)))
            .collect();
        chart
            .draw_series(cells.iter().map(|(x, (median, _, _))| {
                Rectangle::new([(*x, 0.0), (*x + 2, *median)], color.filled())
            }))?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], color.filled()));
        chart.draw_series(cells.iter().map(|(x, (_, min, max))| {
            PathElement::new(vec![(*x + 1, *min), (*x + 1, *max)], BLACK.stroke_width(2))
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .label_font(("sans-serif", 16))
        .draw()?;
    root.present()
        .with_context(|| format!("write {}", path.display()))?;
    Ok(())
}
