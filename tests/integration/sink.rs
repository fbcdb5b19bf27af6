//! Parquet sink: local directory and S3 on a real moto server (127.0.0.1), read back by DuckDB from the virtualenv;
//! atomic files (an interrupted writer leaves nothing visible), manifest and _SUCCESS last.

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use chrono::NaiveDate;
use object_store::ObjectStoreExt;
use pixtract::extract::{ErrorKind, ExtractionRecord, ExtractionSchema, to_record_batch};
use pixtract::sink::{ParquetSink, S3Config, SinkConfig, SinkTarget};
use serde_json::{Value, json};

use crate::extract::{record_from_answer, run_context, schema_path, source};
use crate::util::{python_json, repo_root};

/// Six receipts from three merchants on two days, plus one failed document.
fn receipt_records(schema: &ExtractionSchema) -> Vec<ExtractionRecord> {
    let receipts = [
        ("Café Lumière", "2024-03-07", 12.5, 2),
        ("Café Lumière", "2024-03-07", 7.25, 1),
        ("Café Lumière", "2024-03-08", 3.0, 1),
        ("Bäckerei Müller", "2024-03-07", 4.8, 3),
        ("東京ストア", "2024-03-08", 1200.0, 2),
        ("東京ストア", "2024-03-08", 800.0, 1),
    ];
    let mut out: Vec<ExtractionRecord> = receipts
        .iter()
        .enumerate()
        .map(|(i, (merchant, day, total, n_items))| {
            let items: Vec<Value> = (0..*n_items)
                .map(|k| json!({"description": format!("item {k}"), "quantity": 1, "unit_price": total / *n_items as f64, "total_price": total / *n_items as f64}))
                .collect();
            let answer = json!({
                "merchant_name": merchant, "merchant_address": null, "merchant_phone": null,
                "transaction_date": day, "transaction_time": "12:30", "currency": "EUR",
                "subtotal": null, "total_tax": null, "tip": null, "total": total,
                "payment_method": "card", "items": items
            });
            record_from_answer(schema, &format!("s3://in/receipt-{i}.jpg"), &answer.to_string(), |_| 0.75)
        })
        .collect();
    out.push(ExtractionRecord::failed(
        source("s3://in/broken.pdf"),
        ErrorKind::Unreadable,
        "cannot open PDF: FormatError",
    ));
    out
}

fn sink_config() -> SinkConfig {
    SinkConfig {
        partition_date: NaiveDate::from_ymd_opt(2024, 3, 9).unwrap(),
        // Small files and row groups so the test sees several of each.
        max_rows_per_file: 4,
        row_group_size: 2,
        ..Default::default()
    }
}

const DUCKDB_READ: &str = r#"
import duckdb, json, sys
root = sys.argv[1]
con = duckdb.connect()
con.execute(f"CREATE VIEW r AS SELECT * FROM read_parquet('{root}/**/*.parquet', hive_partitioning = true)")
describe = [(row[0], row[1]) for row in con.execute("DESCRIBE r").fetchall()]
count = con.execute("SELECT count(*), count(*) FILTER (WHERE status = 'ok'), count(DISTINCT dt) FROM r").fetchone()
per_day = con.execute("""
  SELECT merchant_name, transaction_date, sum(total) AS total_amount, count(*) AS receipts
  FROM r WHERE status = 'ok' GROUP BY ALL ORDER BY transaction_date, merchant_name""").fetchall()
items = con.execute("SELECT count(*), sum(i.total_price) FROM (SELECT unnest(items) AS i FROM r)").fetchone()
conf = con.execute("SELECT min(struct_extract(struct_extract(_confidence, 'total'), 'min')), max(struct_extract(struct_extract(_confidence, 'merchant_name'), 'mean')) FROM r").fetchone()
dts = [str(r[0]) for r in con.execute("SELECT DISTINCT dt FROM r").fetchall()]
types = con.execute("SELECT typeof(transaction_date), typeof(total), typeof(items), typeof(processed_at), typeof(dt) FROM r LIMIT 1").fetchone()
err = con.execute("SELECT source_uri, error FROM r WHERE status = 'error'").fetchall()
print(json.dumps({"describe": describe, "count": list(count), "per_day": [[m, str(d), t, n] for m, d, t, n in per_day],
  "items": list(items), "conf": list(conf), "dts": dts, "types": list(types), "errors": [list(e) for e in err]},
  default=str))
"#;

fn check_duckdb_result(v: &Value) {
    eprintln!("{}", serde_json::to_string_pretty(v).unwrap());
    assert_eq!(
        v["count"],
        json!([7, 6, 1]),
        "7 rows, 6 ok, one dt partition"
    );
    assert_eq!(v["dts"], json!(["2024-03-09"]));
    assert_eq!(
        v["types"],
        json!([
            "DATE",
            "DECIMAL(18,3)",
            "STRUCT(description VARCHAR, quantity DECIMAL(18,4), unit_price DECIMAL(18,4), total_price DECIMAL(18,3), _confidence STRUCT(description STRUCT(min FLOAT, mean FLOAT), quantity STRUCT(min FLOAT, mean FLOAT), unit_price STRUCT(min FLOAT, mean FLOAT), total_price STRUCT(min FLOAT, mean FLOAT)), \
             _location STRUCT(description STRUCT(page INTEGER, x0 FLOAT, y0 FLOAT, x1 FLOAT, y1 FLOAT), quantity STRUCT(page INTEGER, x0 FLOAT, y0 FLOAT, x1 FLOAT, y1 FLOAT), unit_price STRUCT(page INTEGER, x0 FLOAT, y0 FLOAT, x1 FLOAT, y1 FLOAT), total_price STRUCT(page INTEGER, x0 FLOAT, y0 FLOAT, x1 FLOAT, y1 FLOAT)), \
             _grounded STRUCT(description BOOLEAN, quantity BOOLEAN, unit_price BOOLEAN, total_price BOOLEAN))[]",
            "TIMESTAMP WITH TIME ZONE",
            "DATE"
        ])
    );
    // Amounts are DECIMAL: DuckDB's sums are exact (Python's Decimal, written as its text).
    assert_eq!(
        v["per_day"],
        json!([
            ["Bäckerei Müller", "2024-03-07", "4.800", 1],
            ["Café Lumière", "2024-03-07", "19.750", 2],
            ["Café Lumière", "2024-03-08", "3.000", 1],
            ["東京ストア", "2024-03-08", "2000.000", 2]
        ])
    );
    assert_eq!(v["items"][0], json!(10));
    assert_eq!(v["items"][1], json!("2027.550"));
    assert_eq!(v["conf"], json!([0.75, 0.75]));
    assert_eq!(
        v["errors"],
        json!([["s3://in/broken.pdf", "cannot open PDF: FormatError"]])
    );
    let describe = v["describe"].as_array().unwrap();
    let has = |name: &str, ty: &str| describe.iter().any(|c| c[0] == name && c[1] == ty);
    assert!(
        has("source_uri", "VARCHAR") && has("page_start", "INTEGER") && has("status", "VARCHAR")
    );
    assert!(has("dt", "DATE"), "partition column: {describe:?}");
}

fn batch(schema: &ExtractionSchema) -> RecordBatch {
    to_record_batch(Some(schema), &run_context(), &receipt_records(schema)).expect("batch")
}

fn list_files(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(dir: &Path, root: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, root, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    walk(root, root, &mut out);
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_parquet_is_read_back_by_duckdb() {
    let schema = ExtractionSchema::load(&schema_path("receipt")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let b = batch(&schema);
    let mut sink = ParquetSink::new(
        SinkTarget::local(dir.path()),
        sink_config(),
        b.schema(),
        "run-1",
    )
    .unwrap();
    sink.write(&b.slice(0, 3)).await.unwrap();
    sink.write(&b.slice(3, 4)).await.unwrap();
    let manifest = sink
        .finish(json!({"ok": 6, "error": 1}), pixtract::sink::Commit::Whole)
        .await
        .unwrap();
    assert_eq!(manifest.total_rows, 7);
    assert_eq!(manifest.files.len(), 2, "4 rows per file");
    assert_eq!(manifest.files[0].rows, 4);
    assert_eq!(manifest.files[0].row_groups, 2);
    let files = list_files(dir.path());
    assert_eq!(
        files,
        vec![
            // Each committed file's index sidecar (the done keys its rows cover), written right after it.
            "_index/dt=2024-03-09/part-run-1-00000.pxi",
            "_index/dt=2024-03-09/part-run-1-00001.pxi",
            "dt=2024-03-09/_SUCCESS",
            "dt=2024-03-09/_manifest-run-1.json",
            "dt=2024-03-09/part-run-1-00000.parquet",
            "dt=2024-03-09/part-run-1-00001.parquet",
        ]
    );
    let m: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("dt=2024-03-09/_manifest-run-1.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["summary"]["error"], json!(1));
    assert_eq!(m["files"][1]["rows"], json!(3));
    // ZSTD and statistics, as DuckDB's parquet_metadata sees them.
    let meta = python_json(
        r#"
import duckdb, json, sys
rows = duckdb.execute(f"SELECT compression, bool_and(stats_null_count IS NOT NULL), count(stats_min_value), count(*) FROM parquet_metadata('{sys.argv[1]}/**/*.parquet') WHERE path_in_schema = 'total' GROUP BY ALL").fetchall()
print(json.dumps([list(r) for r in rows]))
"#,
        &[dir.path().to_str().unwrap()],
    );
    // 4 row groups of <= 2 rows; the last holds only the failed row (total null), so it has no min.
    assert_eq!(meta, json!([["ZSTD", true, 3, 4]]));
    check_duckdb_result(&python_json(DUCKDB_READ, &[dir.path().to_str().unwrap()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_local_writer_leaves_no_visible_file() {
    let schema = ExtractionSchema::load(&schema_path("receipt")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let b = batch(&schema);
    let config = SinkConfig {
        max_rows_per_file: 1000,
        ..sink_config()
    };
    // Dropped mid-file (a cancelled task, a panic unwinding): rows were written, the file never completed.
    {
        let mut sink = ParquetSink::new(
            SinkTarget::local(dir.path()),
            config.clone(),
            b.schema(),
            "run-1",
        )
        .unwrap();
        sink.write(&b).await.unwrap();
        sink.write(&b).await.unwrap();
        let inprogress = list_files(dir.path());
        assert!(
            inprogress.iter().all(|f| !f.ends_with(".parquet")),
            "{inprogress:?}"
        );
        assert!(
            inprogress.iter().any(|f| f.contains(".inprogress")),
            "written under a temporary name: {inprogress:?}"
        );
    }
    assert!(
        list_files(dir.path()).is_empty(),
        "{:?}",
        list_files(dir.path())
    );
    // Aborted explicitly.
    let mut sink = ParquetSink::new(
        SinkTarget::local(dir.path()),
        config.clone(),
        b.schema(),
        "run-2",
    )
    .unwrap();
    sink.write(&b).await.unwrap();
    sink.abort().await.unwrap();
    assert!(list_files(dir.path()).is_empty());
    // A batch with another schema is refused, and the file in progress stays invisible.
    let mut sink =
        ParquetSink::new(SinkTarget::local(dir.path()), config, b.schema(), "run-3").unwrap();
    sink.write(&b).await.unwrap();
    let other = RecordBatch::try_new(
        Arc::new(Schema::new(vec![Field::new("x", DataType::Utf8, false)])),
        vec![Arc::new(StringArray::from(vec!["a"]))],
    )
    .unwrap();
    assert!(sink.write(&other).await.is_err());
    drop(sink);
    assert!(list_files(dir.path()).is_empty());
}

/// moto's S3 server on a free loopback port, stopped on drop.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Moto {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let bin = repo_root().join(".venv/bin/moto_server");
        assert!(
            bin.is_file(),
            "{} missing: run scripts/setup.sh",
            bin.display()
        );
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto_server");
        let moto = Moto { child, port };
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(30), "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        moto
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn config(&self, bucket: &str) -> S3Config {
        S3Config {
            bucket: bucket.into(),
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".into()),
            access_key_id: Some("test".into()),
            secret_access_key: Some("test".into()),
            allow_http: true,
        }
    }

    /// Runs boto3 against this server: `script` sees `s3` (a client) and `sys.argv[1:]`.
    fn boto(&self, script: &str, args: &[&str]) -> Value {
        let full = format!(
            "import boto3, json, sys\ns3 = boto3.client('s3', endpoint_url='{}', aws_access_key_id='test', aws_secret_access_key='test', region_name='us-east-1')\n{script}",
            self.endpoint()
        );
        python_json(&full, args)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const LIST_KEYS: &str = r#"
keys = sorted(o['Key'] for o in s3.list_objects_v2(Bucket=sys.argv[1]).get('Contents', []))
uploads = [u['Key'] for u in s3.list_multipart_uploads(Bucket=sys.argv[1]).get('Uploads', [])]
print(json.dumps({"keys": keys, "uploads": uploads}))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_parquet_on_moto_is_read_back_by_duckdb() {
    let moto = Moto::start();
    moto.boto("s3.create_bucket(Bucket='lake')\nprint('{}')", &[]);
    let schema = ExtractionSchema::load(&schema_path("receipt")).unwrap();
    let b = batch(&schema);
    let target = SinkTarget::s3("s3://lake/extractions/receipts", &moto.config("lake")).unwrap();
    let mut sink = ParquetSink::new(target, sink_config(), b.schema(), "run-1").unwrap();
    sink.write(&b).await.unwrap();
    let manifest = sink
        .finish(json!({"ok": 6, "error": 1}), pixtract::sink::Commit::Whole)
        .await
        .unwrap();
    assert_eq!(manifest.total_rows, 7);
    let listed = moto.boto(LIST_KEYS, &["lake"]);
    assert_eq!(
        listed["keys"],
        json!([
            "extractions/receipts/_index/dt=2024-03-09/part-run-1-00000.pxi",
            "extractions/receipts/_index/dt=2024-03-09/part-run-1-00001.pxi",
            "extractions/receipts/dt=2024-03-09/_SUCCESS",
            "extractions/receipts/dt=2024-03-09/_manifest-run-1.json",
            "extractions/receipts/dt=2024-03-09/part-run-1-00000.parquet",
            "extractions/receipts/dt=2024-03-09/part-run-1-00001.parquet",
        ])
    );
    // DuckDB has no httpfs offline: copy the objects out with boto3, keys preserved, and read those.
    let dir = tempfile::tempdir().unwrap();
    moto.boto(
        r#"
import os
for o in s3.list_objects_v2(Bucket='lake', Prefix='extractions/receipts/')['Contents']:
    dst = os.path.join(sys.argv[1], o['Key'][len('extractions/receipts/'):])
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    s3.download_file('lake', o['Key'], dst)
print('{}')
"#,
        &[dir.path().to_str().unwrap()],
    );
    check_duckdb_result(&python_json(DUCKDB_READ, &[dir.path().to_str().unwrap()]));
}

/// Rows that do not compress: enough of them go past one multipart part.
fn big_batch(schema: &ExtractionSchema, rows: usize) -> RecordBatch {
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut noise = |n: usize| -> String {
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                char::from(b'a' + (state % 26) as u8)
            })
            .collect()
    };
    let records: Vec<ExtractionRecord> = (0..rows)
        .map(|i| {
            let answer = json!({
                "merchant_name": noise(150), "merchant_address": noise(250), "merchant_phone": null,
                "transaction_date": "2024-03-07", "transaction_time": null, "currency": null,
                "subtotal": null, "total_tax": null, "tip": null, "total": i as f64,
                "payment_method": null, "items": []
            });
            record_from_answer(
                schema,
                &format!("s3://in/{i}.jpg"),
                &answer.to_string(),
                |_| 0.5,
            )
        })
        .collect();
    to_record_batch(Some(schema), &run_context(), &records).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupted_s3_upload_leaves_no_visible_object() {
    let moto = Moto::start();
    moto.boto("s3.create_bucket(Bucket='lake')\nprint('{}')", &[]);
    let schema = ExtractionSchema::load(&schema_path("receipt")).unwrap();
    // ~6 MB of incompressible text: past the 5 MiB part size, so the writer is in a multipart upload.
    let b = big_batch(&schema, 16_000);
    let config = SinkConfig {
        max_rows_per_file: 1_000_000,
        row_group_size: 1000,
        part_size: 5 * 1024 * 1024,
        ..sink_config()
    };
    let target = || SinkTarget::s3("s3://lake/out", &moto.config("lake")).unwrap();
    // Dropped mid-upload.
    {
        let mut sink = ParquetSink::new(target(), config.clone(), b.schema(), "run-1").unwrap();
        sink.write(&b).await.unwrap();
    }
    let listed = moto.boto(LIST_KEYS, &["lake"]);
    assert_eq!(
        listed["keys"],
        json!([]),
        "no object after an interrupted upload"
    );
    eprintln!("uploads left by the dropped writer: {}", listed["uploads"]);
    // Aborted: the upload is cleaned up too.
    let mut sink = ParquetSink::new(target(), config.clone(), b.schema(), "run-2").unwrap();
    sink.write(&b).await.unwrap();
    sink.abort().await.unwrap();
    let listed = moto.boto(LIST_KEYS, &["lake"]);
    assert_eq!(listed["keys"], json!([]));
    assert!(
        !listed["uploads"].to_string().contains("run-2"),
        "run-2's upload was aborted: {}",
        listed["uploads"]
    );
    // Completed: a multipart file appears whole and reads back.
    let mut sink = ParquetSink::new(target(), config, b.schema(), "run-3").unwrap();
    sink.write(&b).await.unwrap();
    let manifest = sink
        .finish(json!({}), pixtract::sink::Commit::Whole)
        .await
        .unwrap();
    assert!(
        manifest.files[0].bytes > 5 * 1024 * 1024,
        "multipart-sized file: {:?}",
        manifest.files
    );
    let SinkTarget::Store { store, .. } = target() else {
        unreachable!()
    };
    let head = store
        .head(&object_store::path::Path::from(
            "out/dt=2024-03-09/part-run-3-00000.parquet",
        ))
        .await
        .unwrap();
    assert_eq!(head.size, manifest.files[0].bytes);
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("f.parquet");
    let bytes = store
        .get(&head.location)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    std::fs::write(&dst, &bytes).unwrap();
    let n = python_json(
        "import duckdb, json, sys\nprint(json.dumps(duckdb.execute(f\"SELECT count(*) FROM '{sys.argv[1]}'\").fetchone()[0]))",
        &[dst.to_str().unwrap()],
    );
    assert_eq!(n, json!(16_000));
}
