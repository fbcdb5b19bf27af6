//! `pixtract report`: one run's report as a static HTML file.

use std::path::PathBuf;

use anyhow::Context;

use pixtract::report::{self, EvalFigures};
use pixtract::sink::SinkTarget;

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The run's output: a folder, file://, s3://, gs:// or az:// URI (the `[output] uri` of the pipeline).
    output: String,
    /// Where the HTML file goes.
    #[arg(long, value_name = "FILE.html", default_value = "report.html")]
    out: PathBuf,
    /// The run to report (its id, as in `_manifest-<run id>.json`); default: the latest run in the output.
    #[arg(long, value_name = "RUN_ID")]
    run: Option<String>,
    /// Add accuracy figures from the JSON `pixtract eval --json` printed (saved to a file).
    #[arg(long, value_name = "EVAL.json")]
    eval: Option<PathBuf>,
}

/// Reads the run back, renders the page and writes it whole (temporary file, then rename).
pub fn report(args: ReportArgs) -> anyhow::Result<()> {
    let eval = args.eval.as_deref().map(EvalFigures::load).transpose()?;
    let target = SinkTarget::parse(&args.output)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let run = rt
        .block_on(report::read_run(&target, args.run.as_deref()))
        .with_context(|| format!("reading {}", args.output))?;
    let (run_id, rows) = (run.run_id.clone(), run.rows.len());
    let page = report::RunReport::from_run(run, eval).html()?;
    write_page(&rt, &args.out, page)?;
    println!(
        "report of run {run_id} ({rows} rows): {}",
        args.out.display()
    );
    Ok(())
}

/// Writes an HTML page to `out` whole (a reader never sees half of it), through the sink's local writer.
pub(super) fn write_page(
    rt: &tokio::runtime::Runtime,
    out: &std::path::Path,
    page: String,
) -> anyhow::Result<()> {
    let name = out
        .file_name()
        .with_context(|| format!("--out {}: not a file name", out.display()))?
        .to_string_lossy()
        .into_owned();
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    rt.block_on(SinkTarget::local(dir).put_whole(
        &name,
        page.into_bytes(),
        &std::process::id().to_string(),
    ))
    .with_context(|| format!("writing {}", out.display()))
}
