//! `pixtract bench raster`: PDF pages/s of pixtract against poppler's `pdftoppm` at the same output size, same
//! run, same files, as a ratio; and JPEG scans (decode + Pixtral resize to model size) per second.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use futures::StreamExt;
use image::DynamicImage;

use pixtract::imaging;
use pixtract::raster::{DocumentInfo, PdfMode, RasterOptions, Rasterizer, rasterize_blocking};
use pixtract::testkit;

/// What `pixtract bench raster` measures (the command line's flags, documented there).
#[derive(Debug, Clone)]
pub struct RasterBench {
    pub pdfs: Vec<PathBuf>,
    pub jpegs: Vec<PathBuf>,
    pub max_side: u32,
    pub workers: usize,
    pub repeat: usize,
}

fn collect(paths: &[PathBuf], ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|f| f.extension().is_some_and(|e| e.eq_ignore_ascii_case(ext)))
                .collect();
            found.sort();
            out.extend(found);
        } else if p.is_file() {
            out.push(p.clone());
        }
    }
    out
}

/// pdftoppm over every file, `parallel` processes at a time, long side `max_side`, PPM into a temp folder.
fn pdftoppm(
    files: &[PathBuf],
    max_side: u32,
    parallel: usize,
    out: &Path,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    for chunk in files.chunks(parallel.max(1)) {
        let children: Vec<_> = chunk
            .iter()
            .enumerate()
            .map(|(i, f)| {
                Command::new("pdftoppm")
                    .args(["-scale-to", &max_side.to_string()])
                    .arg(f)
                    .arg(out.join(format!("p{i}")))
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("cannot run pdftoppm (apt-get install poppler-utils)")
            })
            .collect::<Result<_, _>>()?;
        for mut c in children {
            c.wait()?;
        }
    }
    Ok(started.elapsed())
}

/// Runs the benchmark and prints its table.
pub fn run(args: RasterBench) -> anyhow::Result<()> {
    let tmp = tempdir()?;
    let mut pdfs = collect(&args.pdfs, "pdf");
    if pdfs.is_empty() {
        let p = tmp.join("invoice-20p.pdf");
        std::fs::write(&p, testkit::sample_invoice_pdf(20))
            .with_context(|| format!("writing {}", p.display()))?;
        pdfs.push(p);
    }
    let docs: Vec<(PathBuf, Vec<u8>)> = pdfs
        .iter()
        .map(|p| {
            std::fs::read(p)
                .map(|b| (p.clone(), b))
                .with_context(|| format!("reading {}", p.display()))
        })
        .collect::<Result<_, _>>()?;
    let opts = RasterOptions {
        max_side: args.max_side,
        ..Default::default()
    };
    let repeat = args.repeat.max(1);
    // pixtract, one process (in-process pdfium, as one worker does).
    let mut pages = 0usize;
    let started = Instant::now();
    for _ in 0..repeat {
        for (p, bytes) in &docs {
            let doc = Arc::new(DocumentInfo::named(
                p.display().to_string(),
                bytes.len() as u64,
            ));
            let r = rasterize_blocking(&doc, bytes, &opts, &mut |page| {
                pages += usize::from(page.is_ok());
                true
            });
            if let Err(e) = r {
                eprintln!("note: {e}");
            }
        }
    }
    let one = pages as f64 / started.elapsed().as_secs_f64();
    // The same with each page's text layer read too (grounding: what `[extract] grounding` adds per page).
    let with_text = RasterOptions {
        text_layer: true,
        ..opts.clone()
    };
    let (mut text_pages, mut chars) = (0usize, 0usize);
    let started = Instant::now();
    for _ in 0..repeat {
        for (p, bytes) in &docs {
            let doc = Arc::new(DocumentInfo::named(
                p.display().to_string(),
                bytes.len() as u64,
            ));
            let _ = rasterize_blocking(&doc, bytes, &with_text, &mut |page| {
                if let Ok(page) = page {
                    text_pages += 1;
                    chars += page.text.as_ref().map_or(0, |t| t.chars.len());
                }
                true
            });
        }
    }
    let one_text = text_pages as f64 / started.elapsed().as_secs_f64();
    // pixtract, N worker processes.
    let runtime = tokio::runtime::Runtime::new()?;
    let mode = PdfMode::workers(args.workers, Duration::from_secs(120))?;
    let rasterizer = Rasterizer::new(opts.clone(), mode)?;
    let (par_pages, par_s) = runtime.block_on(async {
        // Warm the workers (process start, pdfium load) outside the clock.
        let warm = futures::stream::iter((0..args.workers).map(|_| {
            let (p, b) = &docs[0];
            Ok((
                DocumentInfo::named(p.display().to_string(), 0),
                Bytes::from(b.clone()),
            ))
        }));
        rasterizer
            .pages(warm, args.workers)
            .for_each(|_| async {})
            .await;
        let input = futures::stream::iter((0..repeat).flat_map(|_| docs.iter()).map(|(p, b)| {
            Ok((
                DocumentInfo::named(p.display().to_string(), b.len() as u64),
                Bytes::from(b.clone()),
            ))
        }));
        let started = Instant::now();
        let n = rasterizer
            .pages(input, args.workers.max(1))
            .filter(|r| futures::future::ready(r.is_ok()))
            .count()
            .await;
        (n, started.elapsed().as_secs_f64())
    });
    let par = par_pages as f64 / par_s;
    // pdftoppm, same files, same size, same number of passes.
    let files: Vec<PathBuf> = (0..repeat).flat_map(|_| pdfs.iter().cloned()).collect();
    let t1 = pdftoppm(&files, args.max_side, 1, &tmp)?;
    let tn = pdftoppm(&files, args.max_side, args.workers, &tmp)?;
    let poppler_pages = pages; // same files and passes
    let p1 = poppler_pages as f64 / t1.as_secs_f64();
    let pn = poppler_pages as f64 / tn.as_secs_f64();
    println!(
        "PDF ({} files, {} pages per pass, {repeat} passes, long side {}):",
        pdfs.len(),
        pages / repeat,
        args.max_side
    );
    println!("  pixtract 1 process     {one:8.1} pages/s");
    println!(
        "  + text layer           {one_text:8.1} pages/s ({:.2} ms more per page, {} characters per page)",
        (1.0 / one_text - 1.0 / one) * 1e3,
        chars / text_pages.max(1)
    );
    println!("  pdftoppm 1 process     {p1:8.1} pages/s");
    println!("  ratio                  {:8.2}x", one / p1);
    println!("  pixtract {} workers     {par:8.1} pages/s", args.workers);
    println!("  pdftoppm {} processes   {pn:8.1} pages/s", args.workers);
    println!("  ratio                  {:8.2}x", par / pn);
    // JPEG scans: decode at full resolution + Pixtral resize.
    let mut jpeg_paths = args.jpegs.clone();
    if jpeg_paths.is_empty() {
        let corpus = PathBuf::from("../shared/corpus/receipts-sroie");
        if corpus.is_dir() {
            jpeg_paths.push(corpus);
        }
    }
    let jpegs = collect(&jpeg_paths, "jpg");
    if jpegs.is_empty() {
        println!(
            "JPEG: no scans given (--jpeg) and ../shared/corpus/receipts-sroie absent; skipped"
        );
    } else {
        let blobs: Vec<Vec<u8>> = jpegs.iter().filter_map(|p| std::fs::read(p).ok()).collect();
        let (mut n, mut decode, mut resize) = (0usize, Duration::ZERO, Duration::ZERO);
        for _ in 0..repeat {
            for b in &blobs {
                let doc = Arc::new(DocumentInfo::named("scan", b.len() as u64));
                let _ = rasterize_blocking(&doc, b, &opts, &mut |page| {
                    let Ok(page) = page else { return true };
                    decode += page.render_time;
                    let t = Instant::now();
                    let view = imaging::model_view(
                        &DynamicImage::ImageRgb8(page.image),
                        opts.max_side as usize,
                        16,
                    );
                    resize += t.elapsed();
                    n += usize::from(view.width() > 0);
                    true
                });
            }
        }
        let total = (decode + resize).as_secs_f64();
        println!(
            "JPEG scans ({} files, {repeat} passes): {:.1} scans/s (decode {:.1} ms, Pixtral resize {:.1} ms per scan)",
            blobs.len(),
            n as f64 / total,
            decode.as_secs_f64() * 1e3 / n.max(1) as f64,
            resize.as_secs_f64() * 1e3 / n.max(1) as f64
        );
    }
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

fn tempdir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("pixtract-bench-raster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
