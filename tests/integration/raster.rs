//! Document rasterization on real pdfium (from the virtualenv), real image decoders and the real pixtract binary
//! (worker processes). Every document is generated here; the shared corpus is used when present.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use image::{DynamicImage, Rgb, RgbImage, Rgba, RgbaImage};
use pixtract::raster::{
    DocumentInfo, DocumentKind, PageRaster, PdfMode, RasterError, RasterOptions, Rasterizer,
    rasterize_blocking,
};

use crate::util::{self, PdfPage, TiffPage};

fn doc(name: &str, bytes: &[u8]) -> Arc<DocumentInfo> {
    Arc::new(DocumentInfo::named(
        format!("mem://{name}"),
        bytes.len() as u64,
    ))
}

/// In-process rasterization of one document: all pages, or the first error (of the document or of a page).
fn raster(name: &str, bytes: &[u8], opts: &RasterOptions) -> Result<Vec<PageRaster>, RasterError> {
    raster_each(name, bytes, opts)?.into_iter().collect()
}

/// In-process rasterization of one document: each page or its error, or the document's error.
fn raster_each(
    name: &str,
    bytes: &[u8],
    opts: &RasterOptions,
) -> Result<Vec<Result<PageRaster, RasterError>>, RasterError> {
    let mut pages = Vec::new();
    rasterize_blocking(&doc(name, bytes), bytes, opts, &mut |p| {
        pages.push(p);
        true
    })?;
    Ok(pages)
}

/// A page pdfium cannot load is that page's error, and the pages after it still render (in-process and in the
/// worker processes `pixtract run` uses).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_that_fails_costs_only_itself() {
    let pages: Vec<PdfPage> = (1..=3)
        .map(|i| PdfPage::new(612.0, 792.0, util::invoice_content(&format!("P{i}"), 2)))
        .collect();
    let pdf = util::make_pdf_with_broken_page(&pages, Some(1));
    let opts = RasterOptions::default();
    let each = raster_each("broken.pdf", &pdf, &opts).expect("the document opens");
    let seen: Vec<String> = each
        .iter()
        .map(|p| match p {
            Ok(page) => format!("ok {}/{}", page.page_index + 1, page.page_count),
            Err(e) => format!("failed {:?}", e.failed_page()),
        })
        .collect();
    assert_eq!(seen, ["ok 1/3", "failed Some((2, 3))", "ok 3/3"]);
    let error = each[1].as_ref().unwrap_err();
    assert_clean_message(error, "mem://broken.pdf");
    assert!(
        error.to_string().contains("page 2: cannot render"),
        "{error}"
    );

    let mode = PdfMode::Workers {
        exe: PathBuf::from(env!("CARGO_BIN_EXE_pixtract")),
        workers: 1,
        timeout: std::time::Duration::from_secs(60),
    };
    let rasterizer = Rasterizer::new(opts, mode).unwrap();
    let mut doc_pages = rasterizer.document(
        DocumentInfo::named("mem://broken.pdf", pdf.len() as u64),
        bytes::Bytes::from(pdf),
    );
    let mut seen = Vec::new();
    while let Some(item) = doc_pages.pages.recv().await {
        seen.push(match item {
            Ok(page) => format!("ok {}/{}", page.page_index + 1, page.page_count),
            Err(e) => format!("failed {:?}", e.failed_page()),
        });
    }
    assert_eq!(seen, ["ok 1/3", "failed Some((2, 3))", "ok 3/3"], "worker");
}

fn dark(p: &Rgb<u8>) -> bool {
    p.0.iter().map(|&c| c as u32).sum::<u32>() < 150
}

/// Share of dark pixels in a rectangle given as fractions of the image.
fn dark_share(img: &RgbImage, x0: f32, y0: f32, x1: f32, y1: f32) -> f32 {
    let (w, h) = (img.width() as f32, img.height() as f32);
    let (mut n, mut d) = (0u32, 0u32);
    for y in (y0 * h) as u32..(y1 * h) as u32 {
        for x in (x0 * w) as u32..(x1 * w) as u32 {
            n += 1;
            d += dark(img.get_pixel(x, y)) as u32;
        }
    }
    d as f32 / n.max(1) as f32
}

fn assert_clean_message(e: &RasterError, uri: &str) {
    let msg = e.to_string();
    assert!(
        msg.starts_with(uri),
        "message must name the document: {msg}"
    );
    for noise in [
        "PdfiumLibraryInternalError",
        "FormatError",
        "Some(",
        "Os {",
        "kind:",
    ] {
        assert!(!msg.contains(noise), "debug dump in message: {msg}");
    }
}

#[test]
fn raster_detects_type_by_content_not_name() {
    let png = util::encode(
        &DynamicImage::ImageRgb8(RgbImage::new(2, 2)),
        image::ImageFormat::Png,
    );
    let webp = util::encode(
        &DynamicImage::ImageRgb8(RgbImage::new(2, 2)),
        image::ImageFormat::WebP,
    );
    let jpeg = util::jpeg_with_orientation(&RgbImage::new(8, 8), 1);
    let tiff = util::make_tiff(&[TiffPage {
        width: 1,
        height: 1,
        bits: 8,
        samples: 1,
        photometric: 1,
        data: vec![0],
    }]);
    let pdf = util::make_pdf(&[PdfPage::new(100.0, 100.0, "")]);
    let mut junk_then_pdf = b"X-Mailer: scanner\r\n\r\n".to_vec();
    junk_then_pdf.extend_from_slice(&pdf);
    assert_eq!(DocumentKind::detect(&png), Some(DocumentKind::Png));
    assert_eq!(DocumentKind::detect(&webp), Some(DocumentKind::WebP));
    assert_eq!(DocumentKind::detect(&jpeg), Some(DocumentKind::Jpeg));
    assert_eq!(DocumentKind::detect(&tiff), Some(DocumentKind::Tiff));
    assert_eq!(DocumentKind::detect(&pdf), Some(DocumentKind::Pdf));
    assert_eq!(
        DocumentKind::detect(&junk_then_pdf),
        Some(DocumentKind::Pdf)
    );
    assert_eq!(DocumentKind::detect(b"GIF89a......"), None);
    // A PNG named .pdf is a PNG, and renders as one.
    let pages = raster("scan.pdf", &png, &RasterOptions::default()).unwrap();
    assert_eq!((pages.len(), pages[0].kind), (1, DocumentKind::Png));
    // Junk before the header: pdfium still opens it.
    let pages = raster("mail.pdf", &junk_then_pdf, &RasterOptions::default()).unwrap();
    assert_eq!(pages.len(), 1);
}

#[test]
fn raster_multipage_pdf_with_text_and_table_renders_at_model_size() {
    let pages: Vec<PdfPage> = (1..=3)
        .map(|i| {
            PdfPage::new(
                612.0,
                792.0,
                util::invoice_content(&format!("INVOICE {i}"), 4 + i),
            )
        })
        .collect();
    let pdf = util::make_pdf(&pages);
    let out = raster("invoice.pdf", &pdf, &RasterOptions::default()).unwrap();
    assert_eq!(out.len(), 3);
    for (i, p) in out.iter().enumerate() {
        assert_eq!(
            (p.page_index, p.page_count, p.kind),
            (i, 3, DocumentKind::Pdf)
        );
        // Letter portrait at long side 1024: 612/792*1024 = 791.3 -> 791 wide, aspect kept.
        assert_eq!(p.image.dimensions(), (791, 1024), "page {i}");
        // Title text near the top left is ink; the bottom half below the table is paper.
        assert!(
            dark_share(&p.image, 0.1, 0.05, 0.6, 0.12) > 0.02,
            "no title ink on page {i}"
        );
        assert!(
            dark_share(&p.image, 0.0, 0.7, 1.0, 1.0) < 0.001,
            "ink below the table on page {i}"
        );
        // The table's vertical rules: a column of dark pixels at x = 72pt inside the table.
        let x = (72.0 / 612.0 * 791.0) as u32;
        let y = ((792.0 - 670.0) / 792.0 * 1024.0) as u32;
        let ink = |x: u32| {
            p.image
                .get_pixel(x, y)
                .0
                .iter()
                .map(|&c| c as u32)
                .sum::<u32>()
                < 450
        };
        assert!(
            (x.saturating_sub(2)..=x + 2).any(ink),
            "no table rule on page {i}"
        );
        assert!(!ink(x + 20), "paper beside the rule on page {i}");
    }
    // A cap in DPI keeps small renders small: 72 DPI is the page's own point size.
    let opts = RasterOptions {
        max_dpi: Some(72.0),
        ..Default::default()
    };
    let out = raster("invoice.pdf", &pdf, &opts).unwrap();
    assert_eq!(out[0].image.dimensions(), (612, 792));
}

#[test]
fn raster_pdf_pages_match_pypdfium2_pixel_for_pixel_in_color() {
    // Red, green and blue fills plus black text: channel order mistakes (BGR vs RGB) show at once, and the
    // whole page must equal pypdfium2's rendering of it with the same libpdfium at the same size.
    let content = format!(
        "1 0 0 rg 40 500 150 150 re f 0 0.6 0 rg 220 500 150 150 re f 0 0 1 rg 400 500 150 150 re f\n{}",
        util::invoice_content("COLOR TEST", 3)
    );
    let pdf = util::make_pdf(&[PdfPage::new(612.0, 792.0, content)]);
    let out = raster("colors.pdf", &pdf, &RasterOptions::default()).unwrap();
    let img = &out[0].image;
    let (w, h) = img.dimensions();
    let at = |x_pt: f32, y_pt: f32| {
        let s = w as f32 / 612.0;
        *img.get_pixel((x_pt * s) as u32, h - 1 - (y_pt * s) as u32)
    };
    assert_eq!(at(115.0, 575.0), Rgb([255, 0, 0]), "red square");
    let green = at(295.0, 575.0).0;
    assert!(
        green[0] == 0 && green[1] > 100 && green[2] == 0,
        "green square {green:?}"
    );
    assert_eq!(at(475.0, 575.0), Rgb([0, 0, 255]), "blue square");

    let dir = tempfile::tempdir().unwrap();
    let pdf_path = dir.path().join("colors.pdf");
    let png_path = dir.path().join("reference.png");
    std::fs::write(&pdf_path, &pdf).unwrap();
    let script = format!(
        "import pypdfium2 as p\npage = p.PdfDocument({:?})[0]\n\
         page.render(scale={w}/612.0, fill_color=(255, 255, 255, 255)).to_pil().convert('RGB').save({:?})",
        pdf_path.display().to_string(),
        png_path.display().to_string()
    );
    let status = std::process::Command::new(util::python())
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(status.success());
    let reference = image::open(&png_path).unwrap().to_rgb8();
    assert_eq!(reference.dimensions(), (w, h));
    let differing = img
        .pixels()
        .zip(reference.pixels())
        .filter(|(a, b)| a.0.iter().zip(b.0).any(|(x, y)| x.abs_diff(y) > 2))
        .count();
    assert!(
        differing * 1000 <= (w * h) as usize,
        "{differing} of {} pixels differ from pypdfium2 by more than 2 levels",
        w * h
    );
}

#[test]
fn raster_landscape_and_rotated_pages_keep_orientation_and_aspect() {
    let mut landscape = PdfPage::new(842.0, 595.0, util::top_left_marker(595.0));
    landscape.content += &util::invoice_content("LANDSCAPE", 2);
    let mut rotated = PdfPage::new(612.0, 792.0, util::top_left_marker(792.0));
    rotated.rotate = 90;
    let pdf = util::make_pdf(&[landscape, rotated]);
    let out = raster("mixed.pdf", &pdf, &RasterOptions::default()).unwrap();
    // Landscape stays landscape (no auto-rotation, no stretching): 842x595 -> 1024x724.
    assert_eq!(out[0].image.dimensions(), (1024, 724));
    assert!(
        dark_share(&out[0].image, 0.0, 0.0, 0.1, 0.15) > 0.9,
        "marker not top-left"
    );
    assert!(dark_share(&out[0].image, 0.9, 0.0, 1.0, 0.15) < 0.05);
    // /Rotate 90 (clockwise): shown landscape, 792x612 -> 1024x791, the top-left marker now top-right.
    assert_eq!(out[1].image.dimensions(), (1024, 791));
    assert!(
        dark_share(&out[1].image, 0.92, 0.0, 1.0, 0.1) > 0.9,
        "marker not rotated to top-right"
    );
    assert!(dark_share(&out[1].image, 0.0, 0.0, 0.08, 0.1) < 0.05);
}

#[test]
fn raster_scanned_image_pdf_renders_the_scan() {
    // A "scan": left half black, right half white, embedded as a JPEG over an A4 page.
    let scan = RgbImage::from_fn(400, 566, |x, _| {
        if x < 200 {
            Rgb([0, 0, 0])
        } else {
            Rgb([255, 255, 255])
        }
    });
    let jpeg = util::encode(&DynamicImage::ImageRgb8(scan), image::ImageFormat::Jpeg);
    let mut page = PdfPage::new(595.0, 842.0, "");
    page.scan = Some((jpeg, 400, 566));
    let out = raster(
        "scan.pdf",
        &util::make_pdf(&[page]),
        &RasterOptions::default(),
    )
    .unwrap();
    assert_eq!(out[0].image.dimensions(), (724, 1024));
    assert!(dark_share(&out[0].image, 0.05, 0.1, 0.45, 0.9) > 0.95);
    assert!(dark_share(&out[0].image, 0.55, 0.1, 0.95, 0.9) < 0.01);
}

#[test]
fn raster_encrypted_pdf_opens_only_with_its_password() {
    let pdf = util::make_encrypted_pdf("s3cret");
    let e = raster("locked.pdf", &pdf, &RasterOptions::default()).unwrap_err();
    assert!(matches!(e, RasterError::PasswordRequired { .. }), "{e:?}");
    assert_clean_message(&e, "mem://locked.pdf");
    assert!(e.to_string().contains("needs a password"), "{e}");
    let wrong = RasterOptions {
        password: Some("guess".into()),
        ..Default::default()
    };
    let e = raster("locked.pdf", &pdf, &wrong).unwrap_err();
    assert!(matches!(e, RasterError::WrongPassword { .. }), "{e:?}");
    let right = RasterOptions {
        password: Some("s3cret".into()),
        ..Default::default()
    };
    let out = raster("locked.pdf", &pdf, &right).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].image.dimensions(), (791, 1024));
    // Decrypted content: the marker square top-left and text.
    assert!(dark_share(&out[0].image, 0.0, 0.0, 0.15, 0.1) > 0.9);
}

#[test]
fn raster_broken_inputs_give_clear_errors() {
    let opts = RasterOptions::default();
    let e = raster("empty.pdf", b"", &opts).unwrap_err();
    assert!(matches!(e, RasterError::Empty { .. }), "{e:?}");
    assert_clean_message(&e, "mem://empty.pdf");

    let e = raster("random.pdf", &util::noise(50_000, 7), &opts).unwrap_err();
    assert!(matches!(e, RasterError::UnknownFormat { .. }), "{e:?}");
    assert_clean_message(&e, "mem://random.pdf");
    assert!(e.to_string().contains("supported: PDF, JPEG"), "{e}");

    // Header of a PDF, then noise: pdfium refuses it, in words.
    let mut fake = b"%PDF-1.7\n".to_vec();
    fake.extend_from_slice(&util::noise(20_000, 9));
    let e = raster("fake.pdf", &fake, &opts).unwrap_err();
    assert!(matches!(e, RasterError::PdfUnreadable { .. }), "{e:?}");
    assert_clean_message(&e, "mem://fake.pdf");

    // Truncated in the middle of page 2's content: pdfium repairs what it can (xref rebuilt from the objects
    // it finds) or refuses it; either way no crash, and what renders is at model size.
    let pages: Vec<PdfPage> = (1..=3)
        .map(|i| PdfPage::new(612.0, 792.0, util::invoice_content(&format!("P{i}"), 8)))
        .collect();
    let pdf = util::make_pdf(&pages);
    let cut = &pdf[..pdf.len() / 2];
    match raster("truncated.pdf", cut, &opts) {
        Ok(out) => {
            assert!(!out.is_empty() && out.len() <= 3);
            assert!(
                out.iter()
                    .all(|p| p.image.width().max(p.image.height()) == 1024)
            );
        }
        Err(e) => {
            assert!(
                matches!(
                    e,
                    RasterError::PdfUnreadable { .. } | RasterError::PdfPage { .. }
                ),
                "{e:?}"
            );
            assert_clean_message(&e, "mem://truncated.pdf");
        }
    }
    // Truncated image: a clear decode error.
    let png = util::encode(
        &DynamicImage::ImageRgb8(RgbImage::from_pixel(300, 300, Rgb([10, 200, 30]))),
        image::ImageFormat::Png,
    );
    let png: Vec<u8> = png[..png.len() / 2].to_vec();
    let e = raster("cut.png", &png, &opts).unwrap_err();
    assert!(
        matches!(
            e,
            RasterError::Decode {
                kind: DocumentKind::Png,
                ..
            }
        ),
        "{e:?}"
    );
    assert_clean_message(&e, "mem://cut.png");
    // Truncated JPEG: the decoder alone would fill the missing part with grey and call it a page.
    let jpeg = util::encode(
        &DynamicImage::ImageRgb8(RgbImage::from_fn(300, 300, |x, y| {
            Rgb([(x % 256) as u8, (y % 256) as u8, 90])
        })),
        image::ImageFormat::Jpeg,
    );
    let cut: Vec<u8> = jpeg[..jpeg.len() * 2 / 3].to_vec();
    let e = raster("cut.jpg", &cut, &opts).unwrap_err();
    assert!(
        matches!(
            e,
            RasterError::Decode {
                kind: DocumentKind::Jpeg,
                ..
            }
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("truncated"), "{e}");
    assert_clean_message(&e, "mem://cut.jpg");
    // Whole, and whole with bytes appended after its end (a camera trailer): pages.
    assert_eq!(raster("whole.jpg", &jpeg, &opts).unwrap().len(), 1);
    let mut trailer = jpeg.clone();
    trailer.extend_from_slice(&[0x42; 1024]);
    assert_eq!(raster("trailer.jpg", &trailer, &opts).unwrap().len(), 1);
}

#[test]
fn raster_png_alpha_is_composited_on_white() {
    let img = RgbaImage::from_fn(40, 20, |x, _| {
        if x < 20 {
            Rgba([255, 0, 0, 128])
        } else {
            Rgba([0, 0, 255, 0])
        }
    });
    let png = util::encode(&DynamicImage::ImageRgba8(img), image::ImageFormat::Png);
    let out = raster("alpha.png", &png, &RasterOptions::default()).unwrap();
    let page = &out[0];
    assert_eq!(
        page.image.dimensions(),
        (40, 20),
        "scans are handed on at full resolution"
    );
    // PIL's paste: (c*a + 255*(255-a)) / 255 rounded: red at alpha 128 -> (255, 127, 127); alpha 0 -> white.
    assert_eq!(page.image.get_pixel(5, 5), &Rgb([255, 127, 127]));
    assert_eq!(page.image.get_pixel(30, 5), &Rgb([255, 255, 255]));
}

#[test]
fn raster_exif_rotated_jpeg_comes_out_upright() {
    // Stored 64x32 with the left half black; EXIF 6 says "rotate 90 clockwise to view".
    let stored = RgbImage::from_fn(64, 32, |x, _| {
        if x < 32 {
            Rgb([0, 0, 0])
        } else {
            Rgb([255, 255, 255])
        }
    });
    let jpeg = util::jpeg_with_orientation(&stored, 6);
    let out = raster("phone.jpg", &jpeg, &RasterOptions::default()).unwrap();
    let img = &out[0].image;
    assert_eq!(img.dimensions(), (32, 64));
    // Rotated clockwise, the left half of the stored image becomes the top half.
    assert!(dark_share(img, 0.0, 0.0, 1.0, 0.4) > 0.95);
    assert!(dark_share(img, 0.0, 0.6, 1.0, 1.0) < 0.05);
    // Without the EXIF tag it stays as stored.
    let plain = raster(
        "flat.jpg",
        &util::jpeg_with_orientation(&stored, 1),
        &RasterOptions::default(),
    )
    .unwrap();
    assert_eq!(plain[0].image.dimensions(), (64, 32));
}

#[test]
fn raster_multipage_tiff_with_a_1bit_fax_page() {
    let rgb: Vec<u8> = (0..40 * 30)
        .flat_map(|i| [(i % 40 * 6) as u8, 100, 200])
        .collect();
    // 1-bit WhiteIsZero (fax convention): bit 1 = black. 20 px wide -> 3 bytes per row; left 10 px black.
    let fax: Vec<u8> = (0..16).flat_map(|_| [0xFF, 0xC0, 0x00]).collect();
    let gray16: Vec<u8> = (0..8u16 * 8)
        .flat_map(|i| (i * 1000).to_le_bytes())
        .collect();
    let tiff = util::make_tiff(&[
        TiffPage {
            width: 40,
            height: 30,
            bits: 8,
            samples: 3,
            photometric: 2,
            data: rgb,
        },
        TiffPage {
            width: 20,
            height: 16,
            bits: 1,
            samples: 1,
            photometric: 0,
            data: fax,
        },
        TiffPage {
            width: 8,
            height: 8,
            bits: 16,
            samples: 1,
            photometric: 1,
            data: gray16,
        },
    ]);
    let out = raster("fax.tiff", &tiff, &RasterOptions::default()).unwrap();
    assert_eq!(out.len(), 3, "every TIFF page");
    assert!(
        out.iter()
            .all(|p| p.page_count == 3 && p.kind == DocumentKind::Tiff)
    );
    assert_eq!(out[0].image.dimensions(), (40, 30));
    assert_eq!(out[0].image.get_pixel(10, 3), &Rgb([60, 100, 200]));
    assert_eq!(out[1].image.dimensions(), (20, 16));
    for y in 0..16 {
        for x in 0..20 {
            let expect = if x < 10 { 0 } else { 255 };
            assert_eq!(
                out[1].image.get_pixel(x, y),
                &Rgb([expect; 3]),
                "fax pixel {x},{y}"
            );
        }
    }
    // 16-bit grey scaled to 8 bits: 63000/65535*255 = 245.
    assert_eq!(out[2].image.get_pixel(7, 7).0[0], 245);
}

#[test]
fn raster_limits_refuse_bombs_and_oversized_documents() {
    // 3000x3000 grey compresses to a few KB: the header alone is checked against the limit.
    let big = util::encode(
        &DynamicImage::ImageLuma8(image::GrayImage::new(3000, 3000)),
        image::ImageFormat::Png,
    );
    assert!(big.len() < 100_000);
    let opts = RasterOptions {
        max_pixels: 4_000_000,
        ..Default::default()
    };
    let e = raster("bomb.png", &big, &opts).unwrap_err();
    assert!(
        matches!(
            e,
            RasterError::TooManyPixels {
                width: 3000,
                height: 3000,
                ..
            }
        ),
        "{e:?}"
    );
    assert_clean_message(&e, "mem://bomb.png");
    assert!(e.to_string().contains("decompression bomb"), "{e}");

    let tiff = util::make_tiff(&[TiffPage {
        width: 3000,
        height: 2000,
        bits: 1,
        samples: 1,
        photometric: 0,
        data: vec![0; 375 * 2000],
    }]);
    let e = raster("bomb.tif", &tiff, &opts).unwrap_err();
    assert!(matches!(e, RasterError::TooManyPixels { .. }), "{e:?}");

    let pdf = util::make_pdf(
        &(0..5)
            .map(|_| PdfPage::new(200.0, 200.0, ""))
            .collect::<Vec<_>>(),
    );
    let e = raster(
        "long.pdf",
        &pdf,
        &RasterOptions {
            max_pages: 4,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            RasterError::TooManyPages {
                pages: 5,
                limit: 4,
                ..
            }
        ),
        "{e:?}"
    );

    let e = raster(
        "huge.pdf",
        &pdf,
        &RasterOptions {
            max_bytes: 100,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(e, RasterError::TooLarge { limit: 100, .. }),
        "{e:?}"
    );
}

fn worker_mode(workers: usize, timeout: Duration) -> PdfMode {
    PdfMode::Workers {
        exe: PathBuf::from(env!("CARGO_BIN_EXE_pixtract")),
        workers,
        timeout,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raster_worker_processes_stream_pages_in_document_order() {
    let rasterizer = Rasterizer::new(
        RasterOptions::default(),
        worker_mode(2, Duration::from_secs(60)),
    )
    .unwrap();
    let mut docs: Vec<(String, Vec<u8>)> = (1..=6)
        .map(|i| {
            let pages: Vec<PdfPage> = (0..i)
                .map(|p| {
                    PdfPage::new(
                        612.0,
                        792.0,
                        util::invoice_content(&format!("D{i} P{p}"), 3),
                    )
                })
                .collect();
            (format!("doc{i}.pdf"), util::make_pdf(&pages))
        })
        .collect();
    docs.insert(3, ("bad.pdf".into(), b"%PDF-1.4\n garbage".to_vec()));
    docs.insert(
        5,
        (
            "photo.png".into(),
            util::encode(
                &DynamicImage::ImageRgb8(RgbImage::new(30, 20)),
                image::ImageFormat::Png,
            ),
        ),
    );
    let input = futures::stream::iter(docs.clone().into_iter().map(|(name, bytes)| {
        Ok((
            DocumentInfo::named(format!("mem://{name}"), bytes.len() as u64),
            Bytes::from(bytes),
        ))
    }));
    let items: Vec<_> = rasterizer.pages(input, 3).collect().await;
    let mut seen: Vec<(String, usize)> = Vec::new();
    let mut errors = Vec::new();
    for item in &items {
        match item {
            Ok(p) => {
                seen.push((p.doc.uri.clone(), p.page_index));
                if p.kind == DocumentKind::Pdf {
                    assert_eq!(p.image.dimensions(), (791, 1024));
                }
            }
            Err(e) => errors.push(e.clone()),
        }
    }
    let expected: Vec<(String, usize)> = docs
        .iter()
        .filter(|(n, _)| n != "bad.pdf")
        .flat_map(|(n, _)| {
            let count = n
                .strip_prefix("doc")
                .and_then(|r| r[..1].parse().ok())
                .unwrap_or(1usize);
            (0..count).map(move |p| (format!("mem://{n}"), p))
        })
        .collect();
    assert_eq!(
        seen, expected,
        "pages in document order, each document's pages in order"
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        matches!(&errors[0], RasterError::PdfUnreadable { uri, .. } if uri == "mem://bad.pdf"),
        "{errors:?}"
    );
}

/// A folder the `pages` command renders: good PDFs around ones that crash and hang their worker.
#[test]
fn raster_cli_survives_crashing_and_hanging_workers() {
    let dir = tempfile::tempdir().unwrap();
    let good = util::make_pdf(&[PdfPage::new(612.0, 792.0, util::invoice_content("OK", 3))]);
    for name in [
        "a-good.pdf",
        "b.crash-fault.pdf",
        "c-good.pdf",
        "d.hang-fault.pdf",
        "e-good.pdf",
    ] {
        std::fs::write(dir.path().join(name), &good).unwrap();
    }
    let out_dir = dir.path().join("out");
    let started = Instant::now();
    for name in [
        "a-good.pdf",
        "b.crash-fault.pdf",
        "c-good.pdf",
        "d.hang-fault.pdf",
        "e-good.pdf",
    ] {
        // One document at a time through ONE worker: each later document proves the worker was replaced.
        let out = util::pixtract(
            &[
                "pages",
                dir.path().join(name).to_str().unwrap(),
                "--out",
                out_dir.to_str().unwrap(),
                "--workers",
                "1",
                "--timeout",
                "3",
            ],
            &[("PIXTRACT_WORKER_FAULTS", "1")],
            dir.path(),
        );
        let text = util::text(&out);
        if name.contains("crash") {
            assert_eq!(out.status.code(), Some(2), "{text}");
            assert!(
                text.contains("renderer process died") && text.contains("SIGABRT"),
                "{text}"
            );
        } else if name.contains("hang") {
            assert_eq!(out.status.code(), Some(2), "{text}");
            assert!(text.contains("longer than 3 s"), "{text}");
        } else {
            assert!(out.status.success(), "{text}");
            assert!(
                text.contains(&format!(
                    "ok     {}  1 pages",
                    dir.path().join(name).canonicalize().unwrap().display()
                )),
                "{text}"
            );
        }
    }
    // Now all five in one run, one worker: the crash and the hang cost their own documents only.
    let out = util::pixtract(
        &[
            "pages",
            dir.path().to_str().unwrap(),
            "--include",
            "*.pdf",
            "--out",
            out_dir.to_str().unwrap(),
            "--workers",
            "1",
            "--timeout",
            "3",
        ],
        &[("PIXTRACT_WORKER_FAULTS", "1")],
        dir.path(),
    );
    let text = util::text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.starts_with("ok ")).count(),
        3,
        "{text}"
    );
    assert_eq!(
        text.lines().filter(|l| l.starts_with("error ")).count(),
        2,
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(300));
}

#[test]
fn raster_pages_cli_writes_the_model_view() {
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("docs");
    std::fs::create_dir_all(docs.join("sub")).unwrap();
    std::fs::write(
        docs.join("sub/inv.pdf"),
        util::make_pdf(&[
            PdfPage::new(612.0, 792.0, util::invoice_content("A", 3)),
            PdfPage::new(842.0, 595.0, ""),
        ]),
    )
    .unwrap();
    let scan = RgbImage::from_fn(2480, 1200, |x, y| {
        Rgb([(x % 256) as u8, (y % 256) as u8, 128])
    });
    std::fs::write(docs.join("scan.jpg"), util::jpeg_with_orientation(&scan, 1)).unwrap();
    std::fs::write(docs.join("empty.pdf"), b"").unwrap();
    std::fs::write(docs.join("notes.txt"), b"not a document").unwrap();
    let out_dir = dir.path().join("out");
    let out = util::pixtract(
        &[
            "pages",
            docs.to_str().unwrap(),
            "--exclude",
            "*.txt",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        &[],
        dir.path(),
    );
    let text = util::text(&out);
    assert_eq!(out.status.code(), Some(2), "one document is empty: {text}");
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("ok ") || l.starts_with("error "))
        .collect();
    assert_eq!(lines.len(), 3, "one line per document: {text}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ok") && l.contains("sub/inv.pdf  2 pages")),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("ok") && l.contains("scan.jpg  1 pages")),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("error") && l.contains("empty.pdf: empty file")),
        "{text}"
    );
    let size = |name: &str| image::image_dimensions(out_dir.join(name)).unwrap();
    // Letter 791x1024 -> patch grid 50x64 -> 800x1024; A4 landscape 1024x724 -> 1024x736.
    assert_eq!(size("sub__inv.pdf.p0001.png"), (800, 1024));
    assert_eq!(size("sub__inv.pdf.p0002.png"), (1024, 736));
    // Scan 2480x1200 -> Pixtral's resize: 1024 x round(495.48)=495 -> 1024x496.
    assert_eq!(size("scan.jpg.p0001.png"), (1024, 496));
    // The PNG is exactly imaging::model_view of the decoded scan.
    let decoded = image::load_from_memory(&std::fs::read(docs.join("scan.jpg")).unwrap()).unwrap();
    let expect = pixtract::imaging::model_view(&decoded, 1024, 16);
    let written = image::open(out_dir.join("scan.jpg.p0001.png"))
        .unwrap()
        .to_rgb8();
    assert!(
        written == expect,
        "written PNG differs from imaging::model_view"
    );
}

/// The shared corpus beside the checkout. Its absence FAILS the test (a test that returns early when its data is
/// missing passes without checking anything): set PIXTRACT_CORPUS to its parent, or run
/// `cargo nextest run -E 'not test(corpus)'` where there is no corpus.
fn corpus(name: &str) -> PathBuf {
    let dir = std::env::var_os("PIXTRACT_CORPUS")
        .map(PathBuf::from)
        .unwrap_or_else(|| util::repo_root().join("../shared/corpus"))
        .join(name);
    assert!(
        dir.is_dir(),
        "corpus folder {} is absent (set PIXTRACT_CORPUS to its parent)",
        dir.display()
    );
    dir
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raster_corpus_pdf_edge_cases_render_or_fail_cleanly() {
    let dir = corpus("pdf-edge-cases");
    let paths = files(&dir, "pdf");
    assert!(
        paths.len() > 100,
        "{} holds only {} PDFs",
        dir.display(),
        paths.len()
    );
    let rasterizer = Rasterizer::new(
        RasterOptions::default(),
        worker_mode(2, Duration::from_secs(60)),
    )
    .unwrap();
    let input = futures::stream::iter(paths.iter().map(|p| {
        let bytes = std::fs::read(p).unwrap();
        Ok((
            DocumentInfo::named(p.display().to_string(), bytes.len() as u64),
            Bytes::from(bytes),
        ))
    }));
    let started = Instant::now();
    let mut docs = std::pin::pin!(rasterizer.documents(input, 2));
    let (mut rendered, mut pages, mut password, mut clean, mut crashed, mut hung) =
        (0, 0, 0, 0, 0, 0);
    let mut failures = Vec::new();
    while let Some(mut d) = docs.next().await {
        let (mut n, mut count, mut err) = (0usize, 0usize, None);
        while let Some(item) = d.pages.recv().await {
            match item {
                Ok(p) => {
                    assert_eq!(p.page_index, n, "{}", d.doc.uri);
                    assert!(
                        p.image.width().max(p.image.height()) <= 1024,
                        "{}",
                        d.doc.uri
                    );
                    n += 1;
                    count = p.page_count;
                }
                Err(e) => err = Some(e),
            }
        }
        pages += n;
        match err {
            None => {
                assert_eq!(n, count, "{}: pages silently dropped", d.doc.uri);
                rendered += 1;
            }
            Some(e) => {
                assert_clean_message(&e, &d.doc.uri);
                match e {
                    RasterError::WorkerCrashed { .. } => crashed += 1,
                    RasterError::Timeout { .. } => hung += 1,
                    RasterError::PasswordRequired { .. } => password += 1,
                    _ => clean += 1,
                }
                failures.push(e.to_string());
            }
        }
    }
    let total = paths.len();
    let unlocked = total - password;
    eprintln!(
        "pdf-edge-cases: {total} files, {rendered} rendered ({pages} pages), {password} need a password, {clean} other clean errors, \
         {crashed} crashes, {hung} hangs, {:.1} s; rendered {:.1}% of all, {:.1}% of those without a password",
        started.elapsed().as_secs_f64(),
        100.0 * rendered as f64 / total as f64,
        100.0 * rendered as f64 / unlocked as f64,
    );
    for f in &failures {
        eprintln!("  {f}");
    }
    assert_eq!((crashed, hung), (0, 0), "{failures:#?}");
    assert!(
        rendered as f64 >= 0.98 * unlocked as f64,
        "only {rendered} of {unlocked} rendered: {failures:#?}"
    );
}

#[test]
fn raster_corpus_receipts_decode_and_fit_the_model() {
    let dir = corpus("receipts-sroie");
    let paths = files(&dir, "jpg");
    assert_eq!(paths.len(), 40, "{}", dir.display());
    for p in paths {
        let bytes = std::fs::read(&p).unwrap();
        let out = raster(&p.display().to_string(), &bytes, &RasterOptions::default())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out.len(), 1);
        let img = &out[0].image;
        let decoded = image::load_from_memory(&bytes).unwrap();
        assert!(
            img.width() * img.height() == decoded.width() * decoded.height(),
            "{}: scan was resampled",
            p.display()
        );
        let view = pixtract::imaging::model_view(&DynamicImage::ImageRgb8(img.clone()), 1024, 16);
        assert!(view.width().max(view.height()) <= 1024, "{}", p.display());
        assert!(view.width().is_multiple_of(16) && view.height().is_multiple_of(16));
    }
}

/// `pixtract pages --model DIR` takes the model's view from its manifest and says what each document costs in
/// prompt tokens: a US-letter page rendered at 1024 px is 791 x 1024, 50 x 64 patches of 16 px, 64 rows of 50
/// `[IMG]` and a break (3,264 tokens); a 1024 x 1024 scan 64 x 65 = 4,160.
#[test]
fn pages_cli_says_the_image_tokens_each_page_costs_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let docs = dir.path().join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    let pages: Vec<PdfPage> = (0..2)
        .map(|_| PdfPage::new(612.0, 792.0, util::invoice_content("TOKENS", 2)))
        .collect();
    std::fs::write(docs.join("letter.pdf"), util::make_pdf(&pages)).unwrap();
    RgbImage::from_pixel(1024, 1024, Rgb([255, 255, 255]))
        .save(docs.join("square.png"))
        .unwrap();
    let out = util::pixtract(
        &[
            "pages",
            docs.to_str().unwrap(),
            "--out",
            dir.path().join("out").to_str().unwrap(),
            "--model",
            util::tiny_model().to_str().unwrap(),
        ],
        &[],
        dir.path(),
    );
    let text = util::text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("letter.pdf  2 pages  6528 image tokens (3264 a page)"),
        "{text}"
    );
    assert!(
        text.contains("square.png  1 pages  4160 image tokens (4160 a page)"),
        "{text}"
    );
    // `pixtract generate` counts the same tokens for the same image, and its prompt holds them.
    let out = util::pixtract(
        &[
            "generate",
            "--model",
            util::tiny_model().to_str().unwrap(),
            "--image",
            docs.join("square.png").to_str().unwrap(),
            "--prompt",
            "Total?",
            "--max-new-tokens",
            "1",
        ],
        &[],
        dir.path(),
    );
    let text = util::text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("64x64 patches, 4160 image tokens"), "{text}");
}
