//! `pixtract review`: the values a person should check, boxed on their pages, as one static HTML file.

use std::path::PathBuf;

use anyhow::Context;

use pixtract::report::review;
use pixtract::sink::SinkTarget;

#[derive(Debug, clap::Args)]
pub struct ReviewArgs {
    /// The output of one or more runs: a folder or s3://, gs://, az:// prefix (as `[output] uri`).
    output: String,
    /// Where to write the page.
    #[arg(long, value_name = "FILE.html", default_value = "review.html")]
    out: PathBuf,
    /// Most rows on the page (each embeds its pages as JPEG, about 100-200 KB a page); the page says how many
    /// more there are.
    #[arg(long, default_value_t = 100, value_name = "N")]
    max_rows: usize,
}

pub fn review(args: ReviewArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let (rows, more) = rt
        .block_on(review::collect(&args.output, args.max_rows))
        .with_context(|| format!("reading {}", args.output))?;
    let page = review::render(&rows, more, &args.output);
    let name = args
        .out
        .file_name()
        .with_context(|| format!("--out {}: not a file name", args.out.display()))?
        .to_string_lossy()
        .into_owned();
    let dir = match args.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    rt.block_on(SinkTarget::local(dir).put_whole(
        &name,
        page.into_bytes(),
        &std::process::id().to_string(),
    ))
    .with_context(|| format!("writing {}", args.out.display()))?;
    let refused = rows.iter().filter(|r| r.refused.is_some()).count();
    println!(
        "{} rows to review ({} more not shown, {refused} without their pages): {}",
        rows.len(),
        more,
        args.out.display()
    );
    Ok(())
}
