//! Overlapping runs on one output: the output lease makes the second run wait for the first and then skip what
//! it did, locally (flock) and on S3 (moto: conditional create / update), so no document is ever written twice.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use pixtract::sink::SinkTarget;
use pixtract::sink::lease::{Attempt, Holder, lease_name};

use crate::pipeline::{rows_by_uri, small_inputs_n, write_spec};
use crate::util::{pixtract, repo_root, text, tiny_model};

fn spawn_run(spec: &Path, extra: &[&str], env: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pixtract"));
    cmd.arg("run")
        .arg(spec)
        .args(extra)
        .current_dir(repo_root())
        .env("PIXTRACT_VENV", repo_root().join(".venv"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn pixtract run")
}

/// Every document exactly once: (rows, distinct documents) from the output's Parquet files.
fn row_counts(output: &Path) -> (usize, usize) {
    let rows = rows_by_uri(output);
    let mut docs: Vec<&str> = rows.iter().map(|(u, _)| u.as_str()).collect();
    docs.dedup();
    (rows.len(), docs.len())
}

/// Of two overlapping runs' outputs, exactly one waited for the output, and that one found all `n` documents done.
fn assert_one_waited_then_skipped(ta: &str, tb: &str, n: usize) {
    let waited: Vec<&str> = [ta, tb]
        .into_iter()
        .filter(|t| t.contains("waiting for the output"))
        .collect();
    assert_eq!(waited.len(), 1, "A: {ta}\nB: {tb}");
    assert!(
        waited[0].contains(&format!(
            "0 documents (0 failed, {n} skipped as already done)"
        )),
        "{}",
        waited[0]
    );
}

/// Two runs started together on one local output: one takes the lease, the other waits for it, then skips
/// everything the first did. Every document exactly once.
#[test]
fn two_overlapping_local_runs_write_each_document_once() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    small_inputs_n(&inputs, 16);
    let output = tmp.path().join("out");
    let spec = write_spec(tmp.path(), &inputs, &output);
    let a = spawn_run(&spec, &[], &[]);
    let b = spawn_run(&spec, &[], &[]);
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let (ta, tb) = (text(&a), text(&b));
    assert!(matches!(a.status.code(), Some(0 | 2)), "{ta}");
    assert!(matches!(b.status.code(), Some(0 | 2)), "{tb}");
    assert_eq!(row_counts(&output), (16, 16), "A: {ta}\nB: {tb}");
    assert_one_waited_then_skipped(&ta, &tb, 16);
}

/// A lease held by someone else (here the test itself, through the library): `--lease-wait 0` gives up at once
/// with exit 4 naming the holder; a run without a bound waits, and goes on as soon as the lease is released.
#[test]
fn a_held_local_lease_makes_a_run_wait_or_exit_4() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = tmp.path().join("in");
    small_inputs_n(&inputs, 2);
    let output = tmp.path().join("out");
    let spec = write_spec(tmp.path(), &inputs, &output);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let target = SinkTarget::local(&output);
    let holder = Holder::this_process("test-holder-run", Duration::from_secs(120));
    let lease = match rt
        .block_on(target.try_lease(
            &lease_name(None),
            &holder,
            &Arc::new(AtomicBool::new(false)),
        ))
        .unwrap()
    {
        Attempt::Held(lease) => lease,
        Attempt::Busy(h) => panic!("a fresh output is busy: {h}"),
    };
    let out = pixtract(
        &["run", spec.to_str().unwrap(), "--lease-wait", "0"],
        &[],
        &repo_root(),
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(4), "{t}");
    assert!(t.contains("another run holds the output"), "{t}");
    assert!(t.contains("test-holder-run"), "{t}");
    assert!(rows_by_uri(&output).is_empty(), "nothing written: {t}");

    let waiting = spawn_run(&spec, &[], &[]);
    std::thread::sleep(Duration::from_secs(3));
    assert!(rows_by_uri(&output).is_empty(), "the waiting run wrote");
    rt.block_on(lease.release()).unwrap();
    let out = waiting.wait_with_output().unwrap();
    let t = text(&out);
    assert!(matches!(out.status.code(), Some(0 | 2)), "{t}");
    assert!(
        t.contains("waiting for the output: run test-holder-run"),
        "{t}"
    );
    assert_eq!(row_counts(&output), (2, 2), "{t}");
}

/// `in/doc0.png` .. `in/doc{n-1}.png` (reference images) in the store; existing ones are written again.
pub fn put_inputs(rt: &tokio::runtime::Runtime, store: &Arc<dyn ObjectStore>, n: usize) {
    let refs = ["rgba", "grayscale", "tiny_image", "system_prompt"];
    rt.block_on(async {
        for i in 0..n {
            let bytes =
                std::fs::read(tiny_model().join(format!("reference/{}/image0.png", refs[i % 4])))
                    .unwrap();
            store
                .put(
                    &object_store::path::Path::from(format!("in/doc{i}.png")),
                    PutPayload::from(bytes),
                )
                .await
                .unwrap();
        }
    });
}

/// Copies every `.parquet` object under `prefix` to `local` (DuckDB has no httpfs offline).
pub fn download_parquet(
    rt: &tokio::runtime::Runtime,
    store: &Arc<dyn ObjectStore>,
    prefix: &str,
    local: &Path,
) -> Vec<String> {
    let objects: Vec<_> = rt.block_on(async {
        store
            .list(Some(&object_store::path::Path::from(prefix)))
            .try_collect::<Vec<_>>()
            .await
            .unwrap()
    });
    for m in objects
        .iter()
        .filter(|m| m.location.as_ref().ends_with(".parquet"))
    {
        let bytes =
            rt.block_on(async { store.get(&m.location).await.unwrap().bytes().await.unwrap() });
        let path = local.join(m.location.as_ref());
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    objects.iter().map(|m| m.location.to_string()).collect()
}

fn finished(out: &Output) -> String {
    let t = text(out);
    assert!(matches!(out.status.code(), Some(0 | 2)), "{t}");
    t
}

/// On S3: two runs started together, one waits; a stale lease (its run died without releasing it) is taken over
/// once its ttl has passed; a fresh foreign lease with `--lease-wait 1` gives exit 4; the lease object is gone after
/// each run.
#[test]
fn overlapping_runs_on_s3_write_each_document_once_and_stale_leases_are_taken_over() {
    let moto = crate::util::Moto::start();
    moto.create_bucket("lake");
    let store = moto.store("lake");
    let rt = tokio::runtime::Runtime::new().unwrap();
    put_inputs(&rt, &store, 12);
    let tmp = tempfile::tempdir().unwrap();
    let spec = write_spec(
        tmp.path(),
        Path::new("s3://lake/in/"),
        Path::new("s3://lake/out/"),
    );
    let env = moto.env();
    let env_refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let a = spawn_run(&spec, &[], &env);
    let b = spawn_run(&spec, &[], &env);
    let (ta, tb) = (
        finished(&a.wait_with_output().unwrap()),
        finished(&b.wait_with_output().unwrap()),
    );
    let local = tmp.path().join("copy");
    let objects = download_parquet(&rt, &store, "out", &local);
    assert_eq!(row_counts(&local), (12, 12), "A: {ta}\nB: {tb}");
    assert_one_waited_then_skipped(&ta, &tb, 12);
    assert!(
        !objects.iter().any(|o| o.contains("_pixtract-lease")),
        "the lease is released: {objects:?}"
    );

    // A lease whose holder died: its object says ttl 2 s and is not renewed.
    let key = object_store::path::Path::from("out/_pixtract-lease.json");
    let stale = Holder {
        ttl_s: 2,
        ..Holder::this_process("dead-run", Duration::from_secs(2))
    };
    rt.block_on(store.put(&key, PutPayload::from(serde_json::to_vec(&stale).unwrap())))
        .unwrap();
    put_inputs(&rt, &store, 14); // two more documents
    std::thread::sleep(Duration::from_secs(3));
    let started = Instant::now();
    let out = pixtract(&["run", spec.to_str().unwrap()], &env_refs, &repo_root());
    let t = finished(&out);
    assert!(t.contains("took over an expired output lease"), "{t}");
    assert!(t.contains("2 documents (0 failed, 12 skipped"), "{t}");
    println!("stale lease taken over; run took {:?}", started.elapsed());

    // A live foreign lease (ttl 10 minutes): the run gives up after its wait bound, exit 4, nothing written.
    let live = Holder::this_process("live-run", Duration::from_secs(600));
    rt.block_on(store.put(&key, PutPayload::from(serde_json::to_vec(&live).unwrap())))
        .unwrap();
    put_inputs(&rt, &store, 15);
    let out = pixtract(
        &["run", spec.to_str().unwrap(), "--lease-wait", "1"],
        &env_refs,
        &repo_root(),
    );
    let t = text(&out);
    assert_eq!(out.status.code(), Some(4), "{t}");
    assert!(
        t.contains("another run holds the output s3://lake/out"),
        "{t}"
    );
    assert!(t.contains("live-run"), "{t}");
    let local = tmp.path().join("copy2");
    download_parquet(&rt, &store, "out", &local);
    assert_eq!(
        row_counts(&local),
        (14, 14),
        "the waiting run wrote nothing"
    );
}
