//! `pixtract review`: the values a person should check, boxed on their pages, as one static HTML file.

use std::path::PathBuf;

use anyhow::Context;

use pixtract::report::review;

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
    super::report::write_page(&rt, &args.out, page)?;
    let refused = rows.iter().filter(|r| r.refused.is_some()).count();
    println!(
        "{} rows to review ({} more not shown, {refused} without their pages): {}",
        rows.len(),
        more,
        args.out.display()
    );
    Ok(())
}
