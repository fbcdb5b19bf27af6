//! Document sources against a real S3 protocol server (moto on 127.0.0.1, started per test) and real folders.

use std::collections::BTreeSet;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStoreExt, PutPayload};
use pixtract::source::{ListOptions, Source, SourceError};

use crate::util::{self, Moto, PdfPage};

async fn put_many(
    store: &std::sync::Arc<dyn object_store::ObjectStore>,
    keys: Vec<(String, Vec<u8>)>,
) {
    futures::stream::iter(keys)
        .map(|(k, v)| {
            let store = store.clone();
            async move {
                store
                    .put(&Path::from(k.as_str()), PutPayload::from(v))
                    .await
            }
        })
        .buffer_unordered(16)
        .try_collect::<Vec<_>>()
        .await
        .expect("upload to moto");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_s3_lists_across_pages_with_globs_and_fetches() {
    let moto = Moto::start();
    moto.create_bucket("mail");
    let store = moto.store("mail");
    // 1,030 small "PDFs" (more than one 1,000-key listing page), plus other files around them.
    let mut keys: Vec<(String, Vec<u8>)> = (0..1030)
        .map(|i| {
            (
                format!("in/{:02}/doc{i:04}.pdf", i % 7),
                format!("%PDF-1.4 doc {i}").into_bytes(),
            )
        })
        .collect();
    keys.push(("in/readme.txt".into(), b"hello".to_vec()));
    keys.push(("in/skip/secret.pdf".into(), b"%PDF-1.4 skip".to_vec()));
    keys.push(("in/big.pdf".into(), vec![b'x'; 5000]));
    keys.push(("other/outside.pdf".into(), b"%PDF".to_vec()));
    put_many(&store, keys).await;

    let source = Source::from_store(store.clone(), "s3://mail", "in").unwrap();
    let opts = ListOptions {
        include: vec!["*.pdf".into()],
        exclude: vec!["skip/**".into()],
        max_bytes: 4096,
    };
    let items: Vec<Result<_, SourceError>> = source.list(&opts).unwrap().collect().await;
    let docs: Vec<_> = items.iter().filter_map(|r| r.as_ref().ok()).collect();
    let errors: Vec<_> = items.iter().filter_map(|r| r.as_ref().err()).collect();
    assert_eq!(
        docs.len(),
        1030,
        "all pdfs under in/ except skip/ and the oversized one"
    );
    let uris: BTreeSet<&str> = docs.iter().map(|d| d.uri.as_str()).collect();
    assert_eq!(uris.len(), 1030);
    assert!(uris.contains("s3://mail/in/03/doc0003.pdf"));
    assert!(
        !uris
            .iter()
            .any(|u| u.contains("skip/") || u.contains("outside") || u.ends_with(".txt"))
    );
    for d in &docs {
        assert!(d.etag.as_deref().is_some_and(|e| !e.is_empty()), "{d:?}");
        assert!(d.last_modified.is_some() && d.size > 8, "{d:?}");
    }
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        matches!(
            errors[0],
            SourceError::TooLarge {
                size: 5000,
                limit: 4096,
                ..
            }
        ),
        "{errors:?}"
    );
    assert!(
        errors[0]
            .to_string()
            .starts_with("s3://mail/in/big.pdf: 5000 bytes is over the limit")
    );

    // A path glob: only one sub-folder.
    let only = ListOptions {
        include: vec!["05/*.pdf".into()],
        ..Default::default()
    };
    let n = source
        .list(&only)
        .unwrap()
        .try_collect::<Vec<_>>()
        .await
        .unwrap()
        .len();
    assert_eq!(n, (0..1030).filter(|i| i % 7 == 5).count());

    // Fetch with bounded concurrency, in listing order, bytes and provenance intact.
    let fetched: Vec<_> = source
        .fetch_all(
            &ListOptions {
                include: vec!["01/*.pdf".into()],
                ..Default::default()
            },
            8,
        )
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(fetched.len(), (0..1030).filter(|i| i % 7 == 1).count());
    for (info, bytes) in &fetched {
        let i: usize = info
            .uri
            .rsplit("doc")
            .next()
            .unwrap()
            .trim_end_matches(".pdf")
            .parse()
            .unwrap();
        assert_eq!(&bytes[..], format!("%PDF-1.4 doc {i}").as_bytes());
        assert_eq!(info.size, bytes.len() as u64);
        assert!(info.etag.is_some());
    }
    let order: Vec<&String> = fetched.iter().map(|(d, _)| &d.uri).collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(
        order, sorted,
        "S3 lists in key order and fetch_all keeps it"
    );

    // A key that is not there.
    let missing = pixtract::source::DocumentInfo::named("s3://mail/in/nope.pdf", 1);
    let e = source.fetch(&missing, 1 << 20).await.unwrap_err();
    assert!(matches!(e, SourceError::Fetch { .. }), "{e:?}");
    assert!(
        e.to_string().contains("s3://mail/in/nope.pdf") && e.to_string().contains("no such object"),
        "{e}"
    );

    // A single object named by its full key is a source of one document (globs do not apply).
    let single = Source::from_store(store.clone(), "s3://mail", "in/readme.txt").unwrap();
    let one: Vec<_> = single.list(&opts).unwrap().try_collect().await.unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].uri, "s3://mail/in/readme.txt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_s3_missing_bucket_is_a_clear_error() {
    let moto = Moto::start();
    let source =
        Source::from_store(moto.store("no-such-bucket"), "s3://no-such-bucket", "x").unwrap();
    let items: Vec<_> = source
        .list(&ListOptions::default())
        .unwrap()
        .collect()
        .await;
    assert_eq!(items.len(), 1, "{items:?}");
    let e = items[0].as_ref().unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("s3://no-such-bucket"), "{msg}");
    assert!(
        msg.contains("NoSuchBucket") || msg.contains("bucket"),
        "{msg}"
    );
}

#[test]
fn source_s3_pages_cli_uses_the_aws_environment() {
    let moto = Moto::start();
    moto.create_bucket("docs");
    let store = moto.store("docs");
    let pdf = util::make_pdf(&[PdfPage::new(612.0, 792.0, util::invoice_content("S3", 2))]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(put_many(
        &store,
        vec![
            ("batch/a.pdf".into(), pdf.clone()),
            ("batch/b/c.pdf".into(), pdf),
            ("batch/z.txt".into(), b"x".to_vec()),
        ],
    ));
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let env: Vec<(&str, String)> = moto.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = util::pixtract(
        &[
            "pages",
            "s3://docs/batch",
            "--include",
            "*.pdf",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        &env,
        dir.path(),
    );
    let text = util::text(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("ok     s3://docs/batch/a.pdf  1 pages"),
        "{text}"
    );
    assert!(
        text.contains("ok     s3://docs/batch/b/c.pdf  1 pages"),
        "{text}"
    );
    assert!(
        out_dir.join("a.pdf.p0001.png").is_file() && out_dir.join("b__c.pdf.p0001.png").is_file()
    );
    // A bucket that does not exist: the listing cannot go on, so the command fails (exit 1) with the reason,
    // not a panic.
    let out = util::pixtract(
        &[
            "pages",
            "s3://nothing-here/x",
            "--out",
            out_dir.to_str().unwrap(),
        ],
        &env,
        dir.path(),
    );
    let text = util::text(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("s3://nothing-here/x: cannot list: NoSuchBucket"),
        "{text}"
    );
}

#[tokio::test]
async fn source_local_folders_files_and_file_urls() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    std::fs::create_dir_all(root.join("a/b")).unwrap();
    for (name, body) in [
        ("top.pdf", "1"),
        ("a/one.PDF", "22"),
        ("a/b/two.pdf", "333"),
        ("a/b/note.txt", "4444"),
    ] {
        std::fs::write(root.join(name), body).unwrap();
    }
    let list = |uri: String, opts: ListOptions| async move {
        let source = Source::open(&uri).unwrap();
        let mut v: Vec<(String, u64)> = source
            .list(&opts)
            .unwrap()
            .map_ok(|d| (d.uri, d.size))
            .try_collect()
            .await
            .unwrap();
        v.sort();
        v
    };
    let all = list(root.display().to_string(), ListOptions::default()).await;
    assert_eq!(all.len(), 4);
    let pdfs = list(
        format!("file://{}", root.display()),
        ListOptions {
            include: vec!["*.pdf".into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(
        pdfs,
        vec![
            (format!("{}/a/b/two.pdf", root.display()), 3),
            (format!("{}/top.pdf", root.display()), 1)
        ],
        "globs are case-sensitive"
    );
    let under_a = list(
        root.display().to_string(),
        ListOptions {
            include: vec!["a/**".into()],
            exclude: vec!["*.txt".into()],
            ..Default::default()
        },
    )
    .await;
    assert_eq!(under_a.len(), 2, "{under_a:?}");
    let single = list(
        root.join("a/b/two.pdf").display().to_string(),
        ListOptions::default(),
    )
    .await;
    assert_eq!(single, vec![(format!("{}/a/b/two.pdf", root.display()), 3)]);
    // Provenance and bytes from a fetch.
    let source = Source::open(&root.display().to_string()).unwrap();
    let fetched: Vec<_> = source
        .fetch_all(
            &ListOptions {
                include: vec!["top.pdf".into()],
                ..Default::default()
            },
            2,
        )
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(fetched.len(), 1);
    assert_eq!(&fetched[0].1[..], b"1");
    assert!(fetched[0].0.last_modified.is_some());

    let e = Source::open(&root.join("missing").display().to_string()).unwrap_err();
    assert!(matches!(e, SourceError::NotFound { .. }), "{e:?}");
    let e = Source::open("https://example.com/x.pdf").unwrap_err();
    assert!(
        e.to_string().contains("https:// sources are not supported"),
        "{e}"
    );
    let e = Source::open("gs:///x").unwrap_err();
    // The cause is kept as the error's source: the chain says it.
    let chain = pixtract::error::chain(&e);
    assert!(chain.contains("no bucket name"), "{chain}");
    let e = Source::open("ftp://host/x").unwrap_err();
    assert!(e.to_string().contains("unknown scheme"), "{e}");
    let e = source
        .list(&ListOptions {
            include: vec!["a[".into()],
            ..Default::default()
        })
        .err()
        .unwrap();
    assert!(matches!(e, SourceError::BadGlob { .. }), "{e:?}");
}

/// gs:// and az:// come from object_store. No GCS or Azure server runs here, so this checks what can be checked:
/// the URIs open the right store, which reads its standard environment, and failures are one clear line naming
/// the URI (exit 2), not a panic or a hang.
#[test]
fn source_gcs_and_azure_uris_use_their_environment_and_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let out_arg = out_dir.to_str().unwrap();
    // Azure: the Azurite emulator settings, pointed at a loopback port where nothing listens.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let azurite = format!("http://127.0.0.1:{port}");
    let out = util::pixtract(
        &["pages", "az://scans/2024/", "--out", out_arg],
        &[
            ("AZURE_STORAGE_USE_EMULATOR", "true"),
            ("AZURITE_BLOB_STORAGE_URL", azurite.as_str()),
        ],
        dir.path(),
    );
    let text = util::text(&out);
    // The listing cannot go on: the command fails (exit 1), naming the URI.
    assert_eq!(out.status.code(), Some(1), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("az://scans/2024/: cannot list:"))
        .unwrap_or_else(|| panic!("no listing error line: {text}"));
    assert!(!line.contains("panicked") && line.len() < 400, "{line}");
    // abfss:// names the account in the host; the container is the user part.
    let out = util::pixtract(
        &[
            "pages",
            "abfss://scans@nosuchaccount.dfs.core.windows.net/2024",
            "--out",
            out_arg,
        ],
        &[("AZURE_STORAGE_USE_EMULATOR", "false")],
        dir.path(),
    );
    let text = util::text(&out);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("abfss://scans@nosuchaccount.dfs.core.windows.net/2024"),
        "{text}"
    );
    // GCS: a service-account file that does not exist is refused before any request.
    let missing = dir.path().join("no-such-key.json");
    let out = util::pixtract(
        &["pages", "gs://receipts/2024", "--out", out_arg],
        &[("GOOGLE_SERVICE_ACCOUNT", missing.to_str().unwrap())],
        dir.path(),
    );
    let text = util::text(&out);
    assert!(!out.status.success(), "{text}");
    let line = text
        .lines()
        .find(|l| l.contains("gs://receipts/2024"))
        .unwrap_or_else(|| panic!("no line names the URI: {text}"));
    assert!(line.contains("no-such-key.json"), "{line}");
}
