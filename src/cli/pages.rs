//! `pixtract pages`: every page of every document under a URI, written as PNG exactly as the model sees it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use futures::StreamExt;
use image::DynamicImage;

use pixtract::document::FetchError;
use pixtract::error::chain;
use pixtract::imaging;
use pixtract::raster::{PdfMode, RasterError, RasterOptions, Rasterizer};
use pixtract::source::{ListOptions, Source};

/// Arguments of `pixtract pages`.
#[derive(Debug, Clone, clap::Args)]
pub struct PagesArgs {
    /// Where the documents are: a file or folder, file://..., s3://bucket/prefix (credentials, region and
    /// endpoint from the AWS_* environment variables; AWS_ENDPOINT_URL for S3-compatible stores),
    /// gs://bucket/prefix (GOOGLE_* variables) or az://container/prefix, abfss://container@account.dfs.core.
    /// windows.net/prefix (AZURE_* variables).
    #[arg(value_name = "URI")]
    uri: String,
    /// Folder for the PNGs (created if missing): <path below URI, '/' as '__'>.pNNNN.png
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// Long side of the model's view in pixels (Pixtral: 1024, Mistral 3: 1540). PDFs are rendered at this size
    /// directly.
    /// With --model: the model's.
    #[arg(long, default_value_t = 1024)]
    max_side: u32,
    /// Patch size the model view is rounded up to (Pixtral: 16). With --model: the model's (Mistral 3: 14, merged
    /// 2x2, so views are rounded up to 28).
    #[arg(long, default_value_t = 16)]
    patch: usize,
    /// A model folder: its manifest gives the view (long side, patch size, patches merged per token), and each
    /// page's line says how many prompt tokens it costs that model.
    #[arg(long, value_name = "DIR")]
    model: Option<PathBuf>,
    /// Cap on the PDF render resolution in DPI (small pages are not enlarged past it).
    #[arg(long)]
    max_dpi: Option<f32>,
    /// Only documents matching one of these globs (repeatable); a glob without '/' matches the file name.
    #[arg(long = "include", value_name = "GLOB")]
    include: Vec<String>,
    /// Skip documents matching these globs (repeatable).
    #[arg(long = "exclude", value_name = "GLOB")]
    exclude: Vec<String>,
    /// Password for encrypted PDFs.
    #[arg(long, env = "PIXTRACT_PDF_PASSWORD", hide_env_values = true)]
    password: Option<String>,
    /// PDF renderer processes (each renders one document at a time).
    #[arg(long, default_value_t = default_workers())]
    workers: usize,
    /// Seconds a renderer process may spend on one document before it is stopped and replaced.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// Fetches in flight at once.
    #[arg(long, default_value_t = 8)]
    fetch_concurrency: usize,
    /// Largest document accepted, in bytes.
    #[arg(long, default_value_t = RasterOptions::default().max_bytes)]
    max_bytes: u64,
    /// Most pages accepted per document.
    #[arg(long, default_value_t = RasterOptions::default().max_pages)]
    max_pages: usize,
    /// Most pixels accepted per image (decompression bombs).
    #[arg(long, default_value_t = RasterOptions::default().max_pixels)]
    max_pixels: u64,
}

fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Runs `pixtract pages`. Exit code: 0 every document rendered, 2 some failed (each said why), 1 nothing could
/// be done (bad URI, no renderer).
pub fn pages(args: PagesArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run_pages(args))
}

async fn run_pages(mut args: PagesArgs) -> ExitCode {
    let started = Instant::now();
    let fatal = |msg: String| {
        eprintln!("error: {msg}");
        ExitCode::FAILURE
    };
    let mut merge = 1;
    if let Some(dir) = &args.model {
        match pixtract::model::ModelDir::open(dir) {
            Ok(model) => {
                let m = &model.manifest;
                args.max_side = m.image.max_image_size as u32;
                args.patch = m.image.patch_size;
                merge = m.image_layout().spatial_merge;
            }
            Err(e) => return fatal(chain(&e)),
        }
    }
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        return fatal(format!("cannot create {}: {e}", args.out.display()));
    }
    let source = match Source::open(&args.uri) {
        Ok(s) => s,
        Err(e) => return fatal(chain(&e)),
    };
    let opts = RasterOptions {
        max_side: args.max_side,
        max_dpi: args.max_dpi,
        password: args.password.clone(),
        max_bytes: args.max_bytes,
        max_pages: args.max_pages,
        max_pixels: args.max_pixels,
        text_layer: false,
    };
    let mode = match PdfMode::workers(args.workers, Duration::from_secs(args.timeout.max(1))) {
        Ok(m) => m,
        Err(e) => return fatal(chain(&e)),
    };
    let rasterizer = match Rasterizer::new(opts, mode) {
        Ok(r) => r,
        Err(e) => return fatal(chain(&e)),
    };
    let list_opts = ListOptions {
        include: args.include.clone(),
        exclude: args.exclude.clone(),
        max_bytes: args.max_bytes,
    };
    let (fetched, listing_failed) = match source.fetch_all(&list_opts, args.fetch_concurrency) {
        Ok(s) => {
            let (s, slot) = pixtract::source::stop_at_fatal(s);
            (
                s.map(|r| r.map_err(|e| RasterError::from(FetchError::from(e)))),
                slot,
            )
        }
        Err(e) => return fatal(chain(&e)),
    };
    let (mut docs, mut pages_total, mut failed) = (0usize, 0usize, 0usize);
    let mut stream = std::pin::pin!(rasterizer.documents(fetched, args.workers.max(1)));
    while let Some(mut doc) = stream.next().await {
        docs += 1;
        let name = source.relative_name(&doc.doc).replace('/', "__");
        let (mut n, mut render, mut tokens) = (0usize, Duration::ZERO, 0usize);
        let mut error: Option<String> = None;
        let mut page_errors: Vec<String> = Vec::new();
        while let Some(item) = doc.pages.recv().await {
            match item {
                Ok(page) => {
                    render += page.render_time;
                    let path = args
                        .out
                        .join(format!("{name}.p{:04}.png", page.page_index + 1));
                    let (max_side, patch) = (args.max_side as usize, args.patch);
                    // Covered by whole merged squares (patch x merge pixels), as the model's preprocessing does.
                    let grid = imaging::PatchGrid::for_image_merged(
                        page.image.width(),
                        page.image.height(),
                        max_side,
                        patch,
                        merge,
                    );
                    tokens += grid.num_tokens();
                    let written = tokio::task::spawn_blocking(move || {
                        let view = imaging::model_view(
                            &DynamicImage::ImageRgb8(page.image),
                            max_side,
                            patch * merge,
                        );
                        view.save(&path)
                            .map_err(|e| format!("cannot write {}: {e}", path.display()))
                    })
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r);
                    match written {
                        Ok(()) => n += 1,
                        Err(e) => {
                            error = Some(e);
                            break;
                        }
                    }
                }
                // One page failed: said, and the document's next pages still come.
                Err(e) if e.failed_page().is_some() => {
                    page_errors.push(chain(&e));
                }
                Err(e) => {
                    error = Some(chain(&e));
                    break;
                }
            }
        }
        pages_total += n;
        for e in &page_errors {
            println!("error  {}", e.escape_debug());
        }
        if error.is_none() && !page_errors.is_empty() {
            failed += 1;
        }
        match error {
            None => println!(
                "ok     {}  {n} pages  {tokens} image tokens ({} a page)  {:.3} s",
                doc.doc.uri.escape_debug(),
                tokens / n.max(1),
                render.as_secs_f64()
            ),
            Some(e) => {
                failed += 1;
                let done = if n > 0 {
                    format!(" (after {n} pages)")
                } else {
                    String::new()
                };
                println!("error  {}{done}", e.escape_debug());
            }
        }
    }
    eprintln!(
        "{docs} documents, {pages_total} pages written to {}, {failed} failed, {:.2} s",
        args.out.display(),
        started.elapsed().as_secs_f64()
    );
    if let Some(e) = listing_failed.lock().ok().and_then(|mut f| f.take()) {
        return fatal(format!("the listing stopped: {}", chain(&e)));
    }
    if docs == 0 {
        eprintln!("note: no documents found under {}", args.uri);
    }
    if failed > 0 {
        ExitCode::from(2)
    } else {
        ExitCode::SUCCESS
    }
}
