//! `pixtract bench raster`: PDF pages/s of pixtract against poppler's `pdftoppm` at the same output size, same
//! run, same files, as a ratio; and JPEG scans (decode + Pixtral resize to model size) per second.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use image::DynamicImage;

use super::{DocumentInfo, PdfMode, RasterOptions, Rasterizer, rasterize_blocking};
use crate::imaging;

#[derive(Debug, Clone, clap::Args)]
pub struct RasterBenchArgs {
    /// PDFs to render (files or folders). Default: a generated 20-page invoice (text and tables).
    #[arg(long = "pdf", value_name = "PATH")]
    pub pdfs: Vec<PathBuf>,
    /// JPEG scans to decode and resize (files or folders). Default: ../shared/corpus/receipts-sroie if present.
    #[arg(long = "jpeg", value_name = "PATH")]
    pub jpegs: Vec<PathBuf>,
    /// Long side in pixels for both renderers.
    #[arg(long, default_value_t = 1024)]
    pub max_side: u32,
    /// Worker processes for the parallel run (pdftoppm gets as many concurrent processes).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Passes over the inputs per measurement.
    #[arg(long, default_value_t = 3)]
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

/// A 20-page invoice-like PDF: Helvetica text and ruled tables.
pub fn sample_invoice_pdf(pages: usize) -> Vec<u8> {
    let mut objects: Vec<Vec<u8>> = vec![
        b"<< /Type /Catalog /Pages 2 0 R >>".to_vec(),
        Vec::new(),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_vec(),
    ];
    let mut kids = Vec::new();
    for p in 0..pages {
        let page_id = objects.len() + 1;
        kids.push(format!("{page_id} 0 R"));
        let mut c = format!("BT /F1 24 Tf 72 740 Td (INVOICE 2024-{p:04}) Tj ET\n0 0 0 RG 0.8 w\n");
        for r in 0..30 {
            let y = 700 - r * 20;
            c += &format!("72 {y} m 540 {y} l S\n");
            c += &format!(
                "BT /F1 10 Tf 78 {} Td (Item {r} description of goods) Tj 300 0 Td ({}) Tj 100 0 Td ({}.{:02}) Tj ET\n",
                y - 14,
                r % 7 + 1,
                r * 3 + 1,
                r * 7 % 100
            );
        }
        for x in [72, 370, 470, 540] {
            c += &format!("{x} 700 m {x} 100 l S\n");
        }
        objects.push(
            format!(
                "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> /Contents {} 0 R >>",
                page_id + 1
            )
            .into_bytes(),
        );
        let mut s = format!("<< /Length {} >>\nstream\n", c.len()).into_bytes();
        s.extend_from_slice(c.as_bytes());
        s.extend_from_slice(b"\nendstream");
        objects.push(s);
    }
    objects[1] = format!(
        "<< /Type /Pages /Kids [{}] /Count {pages} >>",
        kids.join(" ")
    )
    .into_bytes();
    pdf_from_objects(&objects)
}

/// A PDF file from its objects (numbered 1.. in order, object 1 the catalog), with a classic xref table.
/// Generated test and bench documents share it.
pub fn pdf_from_objects(objects: &[Vec<u8>]) -> Vec<u8> {
    // The binary comment marks the file as binary for tools that sniff the second line.
    let mut out = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n".to_vec();
    let mut offsets = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        offsets.push(out.len());
        out.extend_from_slice(format!("{} 0 obj\n", i + 1).as_bytes());
        out.extend_from_slice(o);
        out.extend_from_slice(b"\nendobj\n");
    }
    let xref = out.len();
    out.extend_from_slice(
        format!("xref\n0 {}\n0000000000 65535 f \n", objects.len() + 1).as_bytes(),
    );
    for off in offsets {
        out.extend_from_slice(format!("{off:010} 00000 n \n").as_bytes());
    }
    out.extend_from_slice(
        format!(
            "trailer\n<< /Size {} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n",
            objects.len() + 1
        )
        .as_bytes(),
    );
    out
}

/// pdftoppm over every file, `parallel` processes at a time, long side `max_side`, PPM into a temp folder.
fn pdftoppm(
    files: &[PathBuf],
    max_side: u32,
    parallel: usize,
    out: &Path,
) -> Result<Duration, String> {
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
                    .map_err(|e| {
                        format!("cannot run pdftoppm (apt-get install poppler-utils): {e}")
                    })
            })
            .collect::<Result<_, _>>()?;
        for mut c in children {
            c.wait().map_err(|e| e.to_string())?;
        }
    }
    Ok(started.elapsed())
}

pub fn run(args: RasterBenchArgs) -> ExitCode {
    match run_inner(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run_inner(args: RasterBenchArgs) -> Result<(), String> {
    let tmp = tempdir()?;
    let mut pdfs = collect(&args.pdfs, "pdf");
    if pdfs.is_empty() {
        let p = tmp.join("invoice-20p.pdf");
        std::fs::write(&p, sample_invoice_pdf(20)).map_err(|e| e.to_string())?;
        pdfs.push(p);
    }
    let docs: Vec<(PathBuf, Vec<u8>)> = pdfs
        .iter()
        .map(|p| {
            std::fs::read(p)
                .map(|b| (p.clone(), b))
                .map_err(|e| format!("{}: {e}", p.display()))
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
            let r = rasterize_blocking(&doc, bytes, &opts, &mut |_| {
                pages += 1;
                true
            });
            if let Err(e) = r {
                eprintln!("note: {e}");
            }
        }
    }
    let one = pages as f64 / started.elapsed().as_secs_f64();
    // pixtract, N worker processes.
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let mode =
        PdfMode::workers(args.workers, Duration::from_secs(120)).map_err(|e| e.to_string())?;
    let rasterizer = Rasterizer::new(opts.clone(), mode).map_err(|e| e.to_string())?;
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

fn tempdir() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("pixtract-bench-raster-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}
