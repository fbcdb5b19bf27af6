//! Issue 17: odd inputs and failures get one outcome each and never end the job early (or silently).

use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use futures::StreamExt;
use pixtract::source::{ListOptions, Source, SourceError};

use crate::pipeline::{duckdb, write_spec};
use crate::util::{PdfPage, invoice_content, make_pdf, pixtract, repo_root, text, tiny_model};

/// Whether a `_SUCCESS` marker exists anywhere under the output (it sits in the run's partition folder).
fn has_success(output: &Path) -> bool {
    let Ok(entries) = std::fs::read_dir(output) else {
        return false;
    };
    entries.flatten().any(|e| {
        let p = e.path();
        p.file_name().is_some_and(|n| n == "_SUCCESS") || (p.is_dir() && has_success(&p))
    })
}

fn png(dir: &Path, name: &std::ffi::OsStr) {
    let src = tiny_model().join("reference/tiny_image/image0.png");
    std::fs::copy(src, dir.join(name)).unwrap();
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo");
}

/// A folder with every kind of odd entry the local listing used to stop at (or double, or hang on).
/// Returns the names that must come out as documents.
fn odd_folder(root: &Path, outside: &Path) -> Vec<String> {
    use std::os::unix::fs::symlink;
    std::fs::create_dir_all(root.join("sub")).unwrap();
    let ok = [
        "a_plain.png",
        "tab\tname.png",
        "new\nline.png",
        "scan.png#123",
        "sub/inner.png",
    ];
    for n in ok {
        png(root, std::ffi::OsStr::new(n));
    }
    // Not UTF-8.
    png(root, std::ffi::OsStr::from_bytes(b"bad\xff\xfename.png"));
    symlink("loop1", root.join("loop2")).unwrap();
    symlink("loop2", root.join("loop1")).unwrap();
    symlink(".", root.join("self")).unwrap();
    symlink("sub", root.join("linked_sub")).unwrap();
    symlink("a_plain.png", root.join("alias.png")).unwrap();
    symlink("missing.png", root.join("broken.png")).unwrap();
    png(outside, std::ffi::OsStr::new("secret.png"));
    symlink(outside.join("secret.png"), root.join("outside.png")).unwrap();
    mkfifo(&root.join("pipe.png"));
    ok.iter().map(|n| n.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_local_listing_gives_every_odd_entry_its_own_outcome() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("in");
    let outside = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&outside).unwrap();
    let expect_ok = odd_folder(&root, &outside);
    let root = root.canonicalize().unwrap();
    let source = Source::open(&root.display().to_string()).unwrap();
    let items: Vec<_> = source
        .list(&ListOptions::default())
        .unwrap()
        .collect()
        .await;
    let base = format!("{}/", root.display());
    let mut outcomes: BTreeMap<String, Result<(), String>> = BTreeMap::new();
    for item in &items {
        let (uri, outcome) = match item {
            Ok(d) => (d.uri.clone(), Ok(())),
            Err(SourceError::Entry { uri, reason }) => (uri.clone(), Err(reason.clone())),
            Err(e) => panic!("only per-entry errors expected: {e:?}"),
        };
        let name = uri.strip_prefix(&base).unwrap().to_string();
        assert!(
            outcomes.insert(name.clone(), outcome).is_none(),
            "{name} listed twice"
        );
    }
    let oks: Vec<&String> = outcomes
        .iter()
        .filter(|(_, o)| o.is_ok())
        .map(|(n, _)| n)
        .collect();
    let mut want: Vec<&String> = expect_ok.iter().collect();
    want.sort();
    assert_eq!(oks, want, "{outcomes:#?}");
    let reason = |name: &str| {
        outcomes
            .get(name)
            .unwrap_or_else(|| panic!("{name} has no outcome: {outcomes:#?}"))
            .clone()
            .unwrap_err()
    };
    assert!(reason("bad\\xff\\xfename.png").contains("not valid UTF-8"));
    assert!(reason("loop1").contains("symbolic link loop"));
    assert!(reason("loop2").contains("symbolic link loop"));
    assert!(reason("self").contains("not followed"));
    assert!(reason("linked_sub").contains("folder sub inside the source folder"));
    assert!(reason("alias.png").contains("file a_plain.png inside"));
    assert!(reason("broken.png").contains("broken symbolic link"));
    assert!(reason("outside.png").contains("leading outside the source folder"));
    assert!(reason("pipe.png").contains("FIFO"));
    assert_eq!(outcomes.len(), expect_ok.len() + 9, "{outcomes:#?}");

    // Every listed document is fetched with its own bytes, odd names included.
    let fetched: Vec<_> = source
        .fetch_all(&ListOptions::default(), 2)
        .unwrap()
        .collect()
        .await;
    let ok_fetches = fetched.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok_fetches, expect_ok.len());

    // A FIFO named directly is reported, not opened (opening it would block).
    let fifo = Source::open(&root.join("pipe.png").display().to_string()).unwrap();
    let items: Vec<_> = fifo.list(&ListOptions::default()).unwrap().collect().await;
    assert!(
        matches!(&items[..], [Err(SourceError::Entry { .. })]),
        "{items:?}"
    );
    // A root that disappears cannot be listed: the listing's own failure, not an entry's.
    let gone = tmp.path().join("gone");
    std::fs::create_dir(&gone).unwrap();
    let source = Source::open(&gone.display().to_string()).unwrap();
    std::fs::remove_dir(&gone).unwrap();
    let items: Vec<_> = source
        .list(&ListOptions::default())
        .unwrap()
        .collect()
        .await;
    match &items[..] {
        [Err(e)] => assert!(e.is_fatal(), "{e:?}"),
        other => panic!("{other:?}"),
    }
}

/// Runs `pixtract run` over the odd folder: one row per entry, `_SUCCESS`; a second run redoes nothing (the
/// skips and permanent failures, ETag or not, are done once).
#[test]
fn run_over_odd_local_names_gives_a_row_per_entry_and_repeats_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("in");
    let outside = tmp.path().join("elsewhere");
    std::fs::create_dir_all(&outside).unwrap();
    let expect_ok = odd_folder(&root, &outside);
    // Bad documents too: empty, not a document, over the size limit.
    std::fs::write(root.join("empty.pdf"), b"").unwrap();
    std::fs::write(root.join("notes.txt"), b"hello").unwrap();
    std::fs::write(root.join("big.pdf"), vec![b'%'; 300_000]).unwrap();
    let output = tmp.path().join("out");
    let spec = write_spec(tmp.path(), &root, &output);
    let mut s = std::fs::read_to_string(&spec).unwrap();
    s = s.replace("workers = 1", "workers = 1\nmax_bytes = 200000");
    s.push_str("[limits]\nmax_failed_share = 1.0\n");
    std::fs::write(&spec, s).unwrap();
    let out = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(has_success(&output), "{t}");
    // Log lines print names escaped: no raw tab or newline inside a name.
    assert!(!t.contains("new\nline"), "{t}");
    let glob = format!("{}/**/*.parquet", output.display());
    let rows = duckdb(&format!(
        "SELECT regexp_replace(source_uri, '^.*/in/', ''), status, count(*) FROM read_parquet('{glob}', hive_partitioning = true) GROUP BY ALL ORDER BY ALL"
    ));
    // Names with a newline make DuckDB's output span lines: count the per-entry groups instead.
    let groups = rows.matches('|').count() / 2;
    assert_eq!(
        groups,
        expect_ok.len() + 9 + 3,
        "one row group per entry: {rows}"
    );
    assert!(!rows.contains("|2"), "an entry with two rows: {rows}");
    for n in [
        "scan.png#123",
        "sub/inner.png",
        "a_plain.png",
        "big.pdf",
        "pipe.png",
    ] {
        assert!(rows.contains(n), "{n}: {rows}");
    }
    assert!(!rows.contains("secret.png"), "{rows}");
    let errors = duckdb(&format!(
        "SELECT error FROM read_parquet('{glob}', hive_partitioning = true) WHERE source_uri LIKE '%big.pdf'"
    ));
    assert!(errors.contains("over the limit"), "{errors}");

    let again = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
    let t2 = text(&again);
    assert_eq!(again.status.code(), Some(0), "{t2}");
    assert!(
        t2.contains(&format!(
            "0 documents (0 failed, {} skipped as already done)",
            expect_ok.len() + 9 + 3
        )),
        "{t2}"
    );
}

/// A PUT of a raw key (moto does not check signatures), for keys object_store cannot name.
fn put_raw(moto: &crate::util::Moto, bucket: &str, key: &str, body: &[u8]) {
    use std::io::{Read, Write};
    let port = moto.endpoint().rsplit(':').next().unwrap().to_string();
    let mut s = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
    write!(
        s,
        "PUT /{bucket}/{key} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

/// Puts `good` PNG keys `in/doc00.png`.. plus keys object_store's `Path` refuses; returns those odd keys.
fn bucket_with_odd_keys(moto: &crate::util::Moto, bucket: &str, good: usize) -> Vec<&'static str> {
    moto.create_bucket(bucket);
    let png = std::fs::read(tiny_model().join("reference/tiny_image/image0.png")).unwrap();
    for i in 0..good {
        put_raw(moto, bucket, &format!("in/doc{i:02}.png"), &png);
    }
    // Between good keys in listing order, so the walk has to step past each one.
    let odd = vec!["in/doc03//b.png", "in/m//n.png"];
    for k in &odd {
        put_raw(moto, bucket, k, &png);
    }
    odd
}

/// On S3 a key object_store refuses (`a//b.png`) used to fail its whole listing page (25 good keys + one `//`
/// key -> 0 documents). Now the raw listing narrows the failing page down to the key: it is one skipped entry
/// with its reason, every other key is listed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_listing_steps_past_keys_object_store_refuses() {
    let moto = crate::util::Moto::start();
    let odd = bucket_with_odd_keys(&moto, "oddlist", 25);
    let source = Source::from_store(moto.store("oddlist"), "s3://oddlist", "in")
        .unwrap()
        .with_pager(std::sync::Arc::new(moto.s3("oddlist")));
    let items: Vec<_> = source
        .list(&ListOptions::default())
        .unwrap()
        .collect()
        .await;
    let mut listed = BTreeMap::new();
    for item in &items {
        let (uri, ok) = match item {
            Ok(d) => (d.uri.clone(), true),
            Err(SourceError::Entry { uri, reason }) => {
                assert!(reason.contains("empty path segment"), "{reason}");
                (uri.clone(), false)
            }
            Err(e) => panic!("only per-entry errors expected: {e:?}"),
        };
        assert!(listed.insert(uri.clone(), ok).is_none(), "{uri} twice");
    }
    assert_eq!(listed.values().filter(|ok| **ok).count(), 25, "{listed:#?}");
    for k in odd {
        assert_eq!(
            listed.get(&format!("s3://oddlist/{k}")),
            Some(&false),
            "{listed:#?}"
        );
    }
    assert_eq!(listed.len(), 27);
    // Globs apply to refused keys as to any other (`m/**`: `*` alone stops at the empty segment of `m//n.png`).
    let only_m = ListOptions {
        include: vec!["m/**".into()],
        ..Default::default()
    };
    let items: Vec<_> = source.list(&only_m).unwrap().collect().await;
    assert!(
        matches!(&items[..], [Err(SourceError::Entry { uri, .. })] if uri == "s3://oddlist/in/m//n.png"),
        "{items:?}"
    );
}

/// The same through `pixtract run`: a row per key (the odd ones as error rows naming the cause), `_SUCCESS`, and
/// a second run redoes nothing. A listing that really cannot go on (no such bucket) fails the run: exit 1, no
/// `_SUCCESS`.
#[test]
fn run_over_s3_keys_object_store_refuses_gives_each_its_own_row() {
    let moto = crate::util::Moto::start();
    let odd = bucket_with_odd_keys(&moto, "odd", 25);
    let tmp = tempfile::tempdir().unwrap();
    let output = tmp.path().join("out");
    let spec = write_spec(tmp.path(), Path::new("s3://odd/in/"), &output);
    let mut s = std::fs::read_to_string(&spec).unwrap();
    s.push_str("[limits]\nmax_failed_share = 1.0\n");
    std::fs::write(&spec, s).unwrap();
    let env = moto.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = pixtract(&["run", spec.to_str().unwrap()], &env, &repo_root());
    let t = text(&out);
    assert_eq!(out.status.code(), Some(2), "{t}");
    assert!(t.contains("27 documents"), "{t}");
    assert!(has_success(&output), "{t}");
    let glob = format!("{}/**/*.parquet", output.display());
    let rows = duckdb(&format!(
        "SELECT source_uri, count(*), max(coalesce(error, '')) FROM read_parquet('{glob}', hive_partitioning = true) \
         GROUP BY ALL ORDER BY ALL"
    ));
    let lines: Vec<&str> = rows.lines().collect();
    assert_eq!(lines.len(), 27, "one row per key: {rows}");
    assert!(
        lines.iter().all(|l| l.split('|').nth(1) == Some("1")),
        "{rows}"
    );
    for k in odd {
        let line = lines
            .iter()
            .find(|l| l.starts_with(&format!("s3://odd/{k}|")))
            .unwrap_or_else(|| panic!("{k}: {rows}"));
        assert!(line.contains("empty path segment"), "{line}");
    }
    let again = pixtract(&["run", spec.to_str().unwrap()], &env, &repo_root());
    let t2 = text(&again);
    assert_eq!(again.status.code(), Some(0), "{t2}");
    assert!(t2.contains("0 documents (0 failed, 27 skipped"), "{t2}");

    let missing = tmp.path().join("missing");
    std::fs::create_dir(&missing).unwrap();
    let spec = write_spec(
        &missing,
        Path::new("s3://no-such-bucket/in/"),
        &missing.join("out"),
    );
    let out = pixtract(&["run", spec.to_str().unwrap()], &env, &repo_root());
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("no-such-bucket"), "{t}");
    assert!(!has_success(&missing.join("out")), "{t}");
}

/// A renderer crash is transient: the row says `retry` with its attempt, the next run tries again, and after the
/// attempt limit the failure is recorded once as permanent.
#[test]
fn transient_failures_are_retried_then_recorded_once() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    let pdf = make_pdf(&[PdfPage::new(612.0, 792.0, invoice_content("INV", 2))]);
    std::fs::write(inputs.join("x.crash-fault.pdf"), &pdf).unwrap();
    std::fs::write(inputs.join("good.pdf"), &pdf).unwrap();
    let output = tmp.path().join("out");
    let spec = write_spec(tmp.path(), &inputs, &output);
    let mut s = std::fs::read_to_string(&spec).unwrap();
    s.push_str("[limits]\nmax_failed_share = 1.0\n");
    std::fs::write(&spec, s).unwrap();
    let env = [("PIXTRACT_WORKER_FAULTS", "1")];
    let glob = format!("{}/**/*.parquet", output.display());
    let crash_rows = || {
        duckdb(&format!(
            "SELECT status, coalesce(attempt, 0) FROM read_parquet('{glob}', hive_partitioning = true) \
             WHERE source_uri LIKE '%crash-fault.pdf' ORDER BY processed_at"
        ))
    };
    for (run, want) in [
        (1, "retry|1"),
        (2, "retry|1\nretry|2"),
        (3, "retry|1\nretry|2\nerror|0"),
    ] {
        let out = pixtract(&["run", spec.to_str().unwrap()], &env, &repo_root());
        let t = text(&out);
        assert_eq!(out.status.code(), Some(2), "run {run}: {t}");
        assert_eq!(crash_rows().trim(), want, "run {run}: {t}");
    }
    // Recorded for good: the fourth run does nothing.
    let out = pixtract(&["run", spec.to_str().unwrap()], &env, &repo_root());
    let t = text(&out);
    assert_eq!(out.status.code(), Some(0), "{t}");
    assert!(t.contains("0 documents (0 failed, 2 skipped"), "{t}");
}

/// A stray or broken `.parquet` in the output is skipped with a warning, never a failed start-up.
#[test]
fn stray_parquet_files_in_the_output_do_not_stop_a_run() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    png(&inputs, std::ffi::OsStr::new("one.png"));
    let output = tmp.path().join("out");
    std::fs::create_dir(&output).unwrap();
    std::fs::write(output.join("empty.parquet"), b"").unwrap();
    std::fs::write(output.join("garbage.parquet"), b"PAR1 not really").unwrap();
    // Our column names with other types.
    let foreign = output.join("foreign.parquet");
    duckdb(&format!(
        "COPY (SELECT 1::BIGINT AS source_uri, 2 AS source_etag, 3 AS source_version, 4 AS schema_sha256, \
         5 AS model_id, 'a' AS page_start, 'b' AS page_end, 'c' AS doc_page_count) TO '{}' (FORMAT parquet)",
        foreign.display()
    ));
    let spec = write_spec(tmp.path(), &inputs, &output);
    let out = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
    let t = text(&out);
    assert!(matches!(out.status.code(), Some(0 | 2)), "{t}");
    assert!(t.contains("1 documents"), "{t}");
    assert!(has_success(&output));
    // And the state of the real output is still read: the document is not redone.
    let again = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
    let t2 = text(&again);
    assert!(t2.contains("0 documents (0 failed, 1 skipped"), "{t2}");
}

/// The resize's intermediate used to be `src_height x dst_width x 3` floats (a 1 x 100,000,000 PNG: 19.2 GB);
/// now only the rows the vertical taps read are resized horizontally. The values must stay exactly those of a
/// full horizontal-then-vertical pass (the model's tokens depend on them).
#[test]
fn cubic_resize_reads_only_the_rows_it_needs_and_keeps_its_values() {
    use image::RgbImage;
    // The former algorithm, written out: horizontal pass over every source row, then vertical.
    fn full_pass(src: &RgbImage, dw: usize, dh: usize) -> Vec<f32> {
        let taps = |s: usize, d: usize| -> Vec<([usize; 4], [f32; 4])> {
            const A: f64 = -0.75;
            let scale = s as f64 / d as f64;
            (0..d)
                .map(|i| {
                    let c = (i as f64 + 0.5) * scale - 0.5;
                    let f = c.floor();
                    let t = c - f;
                    let f = f as isize;
                    let last = s as isize - 1;
                    let w0 =
                        ((A * (t + 1.0) - 5.0 * A) * (t + 1.0) + 8.0 * A) * (t + 1.0) - 4.0 * A;
                    let w1 = ((A + 2.0) * t - (A + 3.0)) * t * t + 1.0;
                    let u = 1.0 - t;
                    let w2 = ((A + 2.0) * u - (A + 3.0)) * u * u + 1.0;
                    let w3 =
                        ((A * (u + 1.0) - 5.0 * A) * (u + 1.0) + 8.0 * A) * (u + 1.0) - 4.0 * A;
                    (
                        [-1, 0, 1, 2].map(|k| (f + k).clamp(0, last) as usize),
                        [w0 as f32, w1 as f32, w2 as f32, w3 as f32],
                    )
                })
                .collect()
        };
        let (sw, sh) = (src.width() as usize, src.height() as usize);
        let (xt, yt) = (taps(sw, dw), taps(sh, dh));
        let raw = src.as_raw();
        let mut h = vec![0f32; sh * dw * 3];
        for y in 0..sh {
            for (x, (idx, w)) in xt.iter().enumerate() {
                for c in 0..3 {
                    let p = |k: usize| raw[(y * sw + idx[k]) * 3 + c] as f32;
                    h[(y * dw + x) * 3 + c] = w[0] * p(0) + w[1] * p(1) + w[2] * p(2) + w[3] * p(3);
                }
            }
        }
        let mut out = vec![0f32; dh * dw * 3];
        for (y, (idx, w)) in yt.iter().enumerate() {
            for i in 0..dw * 3 {
                let r = |k: usize| h[idx[k] * dw * 3 + i];
                out[y * dw * 3 + i] = w[0] * r(0) + w[1] * r(1) + w[2] * r(2) + w[3] * r(3);
            }
        }
        out
    }
    let noise = crate::util::noise(400 * 3000 * 3, 7);
    for (sw, sh, dw, dh) in [
        (400, 3000, 128, 960),
        (37, 1234, 16, 48),
        (300, 200, 1024, 688),
    ] {
        let img = RgbImage::from_raw(sw, sh, noise[..(sw * sh * 3) as usize].to_vec()).unwrap();
        let got = pixtract::imaging::cubic_resize(&img, dw, dh);
        assert!(got == full_pass(&img, dw, dh), "{sw}x{sh} -> {dw}x{dh}");
    }
    // A 1-pixel-wide strip of 3 million rows to 16 x 16: 64 rows resized, not 3 million.
    let strip = RgbImage::from_pixel(1, 3_000_000, image::Rgb([200, 100, 50]));
    let out = pixtract::imaging::cubic_resize(&strip, 16, 16);
    assert_eq!(out.len(), 16 * 16 * 3);
    assert!(
        out.chunks(3)
            .all(|p| (p[0] - 200.0).abs() < 1e-3 && (p[2] - 50.0).abs() < 1e-3)
    );
}

/// Scans with an absurd shape are refused from their header with a row naming the document and the cause.
#[test]
fn scans_of_absurd_shape_are_refused_by_name() {
    use pixtract::raster::{DocumentInfo, RasterError, RasterOptions, rasterize_blocking};
    use std::sync::Arc;
    let opts = RasterOptions::default();
    let try_png = |name: &str, w: u32, h: u32| {
        let img = image::DynamicImage::ImageLuma8(image::GrayImage::new(w, h));
        let bytes = crate::util::encode(&img, image::ImageFormat::Png);
        let doc = Arc::new(DocumentInfo::named(name, bytes.len() as u64));
        let mut pages = 0;
        let r = rasterize_blocking(&doc, &bytes, &opts, &mut |_| {
            pages += 1;
            true
        });
        (r, pages)
    };
    let (r, pages) = try_png("strip.png", 1, 5_000);
    assert_eq!(pages, 0);
    match r {
        Err(e @ RasterError::BadShape { .. }) => {
            let m = e.to_string();
            assert!(
                m.starts_with("strip.png: page 1") && m.contains("aspect ratio"),
                "{m}"
            );
        }
        other => panic!("{other:?}"),
    }
    let (r, _) = try_png("long.png", 800, 61_000);
    assert!(
        matches!(&r, Err(RasterError::BadShape { reason, .. }) if reason.contains("long side")),
        "{r:?}"
    );
    // A long receipt is fine.
    let (r, pages) = try_png("receipt.png", 300, 6_000);
    assert!(r.is_ok() && pages == 1, "{r:?}");
}

/// One value that does not fit its column (9223372036854775808 = i64::MAX + 1, a valid JSON integer) is one error row, not a failed batch.
#[test]
fn a_value_that_does_not_convert_is_one_error_row() {
    use arrow::array::{Array, Int64Array, StringArray};
    use pixtract::extract::{ExtractionSchema, to_record_batch, to_record_batch_per_row};
    let schema = ExtractionSchema::from_value(
        "n",
        serde_json::json!({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}),
    )
    .unwrap();
    let ctx = crate::extract::run_context();
    let good = crate::extract::record_from_answer(&schema, "good.png", r#"{"n": 42}"#, |_| 0.9);
    let huge = crate::extract::record_from_answer(
        &schema,
        "huge.png",
        r#"{"n": 9223372036854775808}"#,
        |_| 0.9,
    );
    let records = vec![good, huge];
    assert!(to_record_batch(Some(&schema), &ctx, &records).is_err());
    let (batch, replaced) = to_record_batch_per_row(Some(&schema), &ctx, &records).unwrap();
    assert_eq!((batch.num_rows(), replaced), (2, 1));
    let col = |name: &str| batch.column_by_name(name).unwrap().clone();
    let n = col("n");
    let n = n.as_any().downcast_ref::<Int64Array>().unwrap();
    assert_eq!((n.value(0), n.is_null(1)), (42, true));
    let status = col("status");
    let status = status.as_any().downcast_ref::<StringArray>().unwrap();
    assert_eq!((status.value(0), status.value(1)), ("ok", "error"));
    let error = col("error");
    let error = error.as_any().downcast_ref::<StringArray>().unwrap();
    assert!(
        error.value(1).contains("does not fit"),
        "{}",
        error.value(1)
    );
    let raw = col("raw_output");
    let raw = raw.as_any().downcast_ref::<StringArray>().unwrap();
    assert!(raw.value(1).contains("9223372036854775808"));
}

/// An output that cannot be written fails the run at once (exit 1), before the model starts or any document is
/// read, naming the path.
#[test]
fn an_unwritable_output_fails_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    std::fs::create_dir(&inputs).unwrap();
    png(&inputs, std::ffi::OsStr::new("one.png"));
    // A regular file where the output folder's parent should be: nothing can be created below it.
    let blocker = tmp.path().join("blocker");
    std::fs::write(&blocker, b"x").unwrap();
    let output = blocker.join("out");
    let spec = write_spec(tmp.path(), &inputs, &output);
    let out = pixtract(&["run", spec.to_str().unwrap()], &[], &repo_root());
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("blocker"), "{t}");
    assert!(!t.contains("documents ("), "no document was processed: {t}");
}
