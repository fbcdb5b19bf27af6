use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use pixtract::model::OrtRuntime;
use pixtract::native::{NativeLibrary, SearchPaths};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The tiny model made by `scripts/setup.sh`. Missing is a failure with the fix, not a skip.
pub fn tiny_model() -> PathBuf {
    setup_model("tiny")
}

/// The tiny model exported with `--attention gqa` (GroupQueryAttention decoder, KV cache written in place), made by
/// `scripts/setup.sh` from the same seed as `tiny_model()`.
pub fn tiny_gqa_model() -> PathBuf {
    setup_model("tiny-gqa")
}

/// The tiny seeded Mistral 3 (14-px patches merged 2x2, Ministral 3's YaRN and query scale, a v13 Tekken) with its
/// reference fixtures, made by `scripts/setup.sh`.
pub fn tiny_mistral3_model() -> PathBuf {
    setup_model("tiny-mistral3")
}

/// The CI-sized model with Pixtral 12B's head geometry (text head_dim 128, 16 query heads on 4 KV heads; vision
/// head_dim 64) whose embed_tokens and decoder keep their weights in external data files, exported by
/// `scripts/setup.sh` from the seeded random checkpoint `models/ci-checkpoint`, with its own reference fixtures.
pub fn ci_model() -> PathBuf {
    setup_model("ci")
}

/// The seeded random checkpoint (mistral-community/pixtral-12b layout) `ci_model()` was exported from.
pub fn ci_checkpoint() -> PathBuf {
    let dir = repo_root().join("models").join("ci-checkpoint");
    assert!(
        dir.join("config.json").is_file(),
        "{} has no checkpoint: run `scripts/setup.sh` (or `make test`, which runs it)",
        dir.display()
    );
    dir
}

/// `models/<name>`, exported by `scripts/setup.sh`; missing is a failure that says how to make it.
fn setup_model(name: &str) -> PathBuf {
    let dir = repo_root().join("models").join(name);
    assert!(
        dir.join("pixtract-model.json").is_file(),
        "{} has no exported model: run `scripts/setup.sh` (or `make test`, which runs it)",
        dir.display()
    );
    dir
}

/// Runs the Python exporter (`onnx-export/export.py ARGS`) with the project's virtualenv.
pub fn export_tool<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(python())
        .arg(repo_root().join("onnx-export/export.py"))
        .args(args)
        .output()
        .expect("run onnx-export")
}

pub fn python() -> PathBuf {
    let py = repo_root().join(".venv/bin/python");
    assert!(
        py.is_file(),
        "{} missing: run `scripts/setup.sh`",
        py.display()
    );
    py
}

/// Runs a Python script (the project's virtualenv: duckdb, onnx, ...) with `args`; asserts it succeeded (its
/// stderr is the failure message) and returns what it printed.
pub fn python_stdout<S: AsRef<std::ffi::OsStr>>(script: &str, args: &[S]) -> String {
    let out = Command::new(python())
        .arg("-c")
        .arg(script)
        .args(args)
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "python script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a Python script as `python_stdout` does; the last line it prints is one JSON document.
pub fn python_json(script: &str, args: &[&str]) -> serde_json::Value {
    let stdout = python_stdout(script, args);
    serde_json::from_str(stdout.lines().last().unwrap_or(""))
        .unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

pub fn search_paths() -> SearchPaths {
    SearchPaths {
        virtualenvs: vec![repo_root().join(".venv")],
        ..Default::default()
    }
}

/// One ONNX Runtime environment per process (ort allows no second one).
pub fn runtime() -> &'static OrtRuntime {
    static RT: OnceLock<OrtRuntime> = OnceLock::new();
    RT.get_or_init(|| {
        let lib = search_paths()
            .locate(NativeLibrary::OnnxRuntime)
            .expect("libonnxruntime in .venv: run scripts/setup.sh");
        OrtRuntime::load(lib).expect("ONNX Runtime loads")
    })
}

/// Runs the pixtract binary with a clean library environment (no inherited overrides).
pub fn pixtract(args: &[&str], envs: &[(&str, &str)], cwd: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pixtract"));
    cmd.args(args)
        .current_dir(cwd)
        .env_remove("ORT_DYLIB_PATH")
        .env_remove("PDFIUM_DYLIB_PATH")
        .env("PIXTRACT_VENV", repo_root().join(".venv"));
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run pixtract")
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---- Generated documents (raster and source tests) ----

/// One page of a generated PDF: media box in points, /Rotate, and raw content-stream operators.
pub struct PdfPage {
    pub width: f32,
    pub height: f32,
    pub rotate: i32,
    pub content: String,
    /// A JPEG drawn over the whole page (a "scanned" page), as (bytes, pixel width, pixel height).
    pub scan: Option<(Vec<u8>, u32, u32)>,
}

impl PdfPage {
    pub fn new(width: f32, height: f32, content: impl Into<String>) -> PdfPage {
        PdfPage {
            width,
            height,
            rotate: 0,
            content: content.into(),
            scan: None,
        }
    }
}

/// Text lines with Helvetica and a bordered table: what an invoice page looks like to a renderer.
pub fn invoice_content(title: &str, rows: usize) -> String {
    let mut c = format!("BT /F1 28 Tf 72 720 Td ({title}) Tj ET\n");
    c += "BT /F1 12 Tf 72 690 Td (Item        Qty     Price) Tj ET\n";
    c += "0 0 0 RG 1 w\n";
    for r in 0..=rows {
        let y = 680.0 - r as f32 * 20.0;
        c += &format!("72 {y} m 540 {y} l S\n");
    }
    let bottom = 680.0 - rows as f32 * 20.0;
    for x in [72.0, 300.0, 420.0, 540.0] {
        c += &format!("{x} 680 m {x} {bottom} l S\n");
    }
    for r in 0..rows {
        let y = 665.0 - r as f32 * 20.0;
        c += &format!(
            "BT /F1 11 Tf 80 {y} Td (Widget {r}) Tj 230 0 Td ({}) Tj 120 0 Td (9.99) Tj ET\n",
            r + 1
        );
    }
    c
}

/// A black square in the page's top-left corner (PDF y grows upwards), to check orientation after rendering.
pub fn top_left_marker(page_height: f32) -> String {
    format!("0 0 0 rg 0 {} 100 100 re f\n", page_height - 100.0)
}

/// A minimal, valid PDF (classic xref table) written by hand.
pub fn make_pdf(pages: &[PdfPage]) -> Vec<u8> {
    make_pdf_with_broken_page(pages, None)
}

/// Like [`make_pdf`], with page `broken` (0-based) pointing at an object the file does not have: the page tree
/// still counts it, and pdfium fails to load that page alone ("Failed to load page"), the others render.
pub fn make_pdf_with_broken_page(pages: &[PdfPage], broken: Option<usize>) -> Vec<u8> {
    let mut objects: Vec<Vec<u8>> = Vec::new();
    // 1: catalog, 2: pages, 3: font; then per page: page, content, [image].
    let mut kids = Vec::new();
    let mut next = 4;
    let mut page_objs = Vec::new();
    for p in pages {
        let page_id = next;
        let content_id = next + 1;
        let image_id = p.scan.as_ref().map(|_| next + 2);
        next += if image_id.is_some() { 3 } else { 2 };
        kids.push(if broken == Some(kids.len()) {
            "999 0 R".to_string()
        } else {
            format!("{page_id} 0 R")
        });
        let mut content = p.content.clone();
        let resources = match image_id {
            Some(id) => {
                content = format!("q {} 0 0 {} 0 0 cm /Im1 Do Q\n{content}", p.width, p.height);
                format!("<< /Font << /F1 3 0 R >> /XObject << /Im1 {id} 0 R >> >>")
            }
            None => "<< /Font << /F1 3 0 R >> >>".to_string(),
        };
        page_objs.push((page_id, format!(
            "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {} {}] /Rotate {} /Resources {resources} /Contents {content_id} 0 R >>",
            p.width, p.height, p.rotate
        ).into_bytes()));
        let mut stream = format!("<< /Length {} >>\nstream\n", content.len()).into_bytes();
        stream.extend_from_slice(content.as_bytes());
        stream.extend_from_slice(b"\nendstream");
        page_objs.push((content_id, stream));
        if let (Some(id), Some((jpeg, w, h))) = (image_id, &p.scan) {
            let mut s = format!(
                "<< /Type /XObject /Subtype /Image /Width {w} /Height {h} /ColorSpace /DeviceRGB /BitsPerComponent 8 /Filter /DCTDecode /Length {} >>\nstream\n",
                jpeg.len()
            )
            .into_bytes();
            s.extend_from_slice(jpeg);
            s.extend_from_slice(b"\nendstream");
            page_objs.push((id, s));
        }
    }
    objects.push(b"<< /Type /Catalog /Pages 2 0 R >>".to_vec());
    objects.push(
        format!(
            "<< /Type /Pages /Kids [{}] /Count {} >>",
            kids.join(" "),
            pages.len()
        )
        .into_bytes(),
    );
    objects.push(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>".to_vec());
    page_objs.sort_by_key(|(id, _)| *id);
    objects.extend(page_objs.into_iter().map(|(_, o)| o));
    pixtract::testkit::pdf_from_objects(&objects)
}

/// A one-page PDF encrypted with the standard security handler (RC4, revision 2) and a user password, made
/// by Python from the virtualenv (hashlib's MD5; RC4 is a few lines).
pub fn make_encrypted_pdf(user_password: &str) -> Vec<u8> {
    const SCRIPT: &str = r#"
import hashlib, struct, sys
PAD = bytes.fromhex("28BF4E5E4E758A4164004E56FFFA01082E2E00B6D0683E802F0CA9FE6453697A")
def rc4(key, data):
    s = list(range(256)); j = 0
    for i in range(256):
        j = (j + s[i] + key[i % len(key)]) % 256; s[i], s[j] = s[j], s[i]
    i = j = 0; out = bytearray()
    for b in data:
        i = (i + 1) % 256; j = (j + s[i]) % 256; s[i], s[j] = s[j], s[i]
        out.append(b ^ s[(s[i] + s[j]) % 256])
    return bytes(out)
def pad(p): return (p.encode() + PAD)[:32]
user, owner = sys.argv[1], "owner-secret"
file_id = hashlib.md5(b"pixtract-test").digest()
P = -4
O = rc4(hashlib.md5(pad(owner)).digest()[:5], pad(user))
key = hashlib.md5(pad(user) + O + struct.pack("<i", P) + file_id).digest()[:5]
U = rc4(key, PAD)
def objkey(num): return hashlib.md5(key + struct.pack("<i", num)[:3] + b"\0\0").digest()[:10]
content = b"BT /F1 36 Tf 72 700 Td (Secret invoice) Tj ET\n0 0 0 rg 0 692 100 100 re f\n"
enc = rc4(objkey(4), content)
objs = [
    b"<< /Type /Catalog /Pages 2 0 R >>",
    b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
    b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 5 0 R >> >> /Contents 4 0 R >>",
    b"<< /Length %d >>\nstream\n" % len(enc) + enc + b"\nendstream",
    b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    b"<< /Filter /Standard /V 1 /R 2 /O <" + O.hex().encode() + b"> /U <" + U.hex().encode() + b"> /P -4 >>",
]
out = bytearray(b"%PDF-1.4\n")
offs = []
for i, o in enumerate(objs):
    offs.append(len(out)); out += b"%d 0 obj\n" % (i + 1) + o + b"\nendobj\n"
x = len(out)
out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
for o in offs: out += b"%010d 00000 n \n" % o
idh = file_id.hex().encode()
out += b"trailer\n<< /Size %d /Root 1 0 R /Encrypt 6 0 R /ID [<" % (len(objs) + 1) + idh + b"><" + idh + b">] >>\nstartxref\n%d\n%%%%EOF\n" % x
sys.stdout.buffer.write(bytes(out))
"#;
    let out = Command::new(python())
        .args(["-c", SCRIPT, user_password])
        .output()
        .expect("run python");
    assert!(out.status.success(), "{}", text(&out));
    out.stdout
}

/// A JPEG of `img` with an EXIF block holding only the orientation tag.
pub fn jpeg_with_orientation(img: &image::RgbImage, orientation: u16) -> Vec<u8> {
    use image::ImageEncoder;
    let mut exif = vec![0x49, 0x49, 0x2A, 0x00, 0x08, 0x00, 0x00, 0x00, 0x01, 0x00];
    exif.extend_from_slice(&[0x12, 0x01, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00]);
    exif.extend_from_slice(&orientation.to_le_bytes());
    exif.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut out = Vec::new();
    let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95);
    enc.set_exif_metadata(exif).expect("exif accepted");
    enc.write_image(
        img.as_raw(),
        img.width(),
        img.height(),
        image::ExtendedColorType::Rgb8,
    )
    .expect("encode jpeg");
    out
}

pub fn encode(img: &image::DynamicImage, format: image::ImageFormat) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, format).expect("encode image");
    out.into_inner()
}

/// One uncompressed TIFF page: (width, height, bits per sample, samples per pixel, photometric, strip data).
pub struct TiffPage {
    pub width: u32,
    pub height: u32,
    pub bits: u16,
    pub samples: u16,
    pub photometric: u16,
    pub data: Vec<u8>,
}

/// A little-endian multi-page TIFF, one strip per page, written by hand (the tiff crate writes no 1-bit pages).
pub fn make_tiff(pages: &[TiffPage]) -> Vec<u8> {
    let mut out = b"II*\0\0\0\0\0".to_vec();
    let mut prev_next_ptr = 4usize;
    for p in pages {
        let data_off = out.len() as u32;
        out.extend_from_slice(&p.data);
        if out.len() % 2 == 1 {
            out.push(0);
        }
        let bps_off = out.len() as u32;
        for _ in 0..p.samples {
            out.extend_from_slice(&p.bits.to_le_bytes());
        }
        if out.len() % 2 == 1 {
            out.push(0);
        }
        let ifd_off = out.len() as u32;
        out[prev_next_ptr..prev_next_ptr + 4].copy_from_slice(&ifd_off.to_le_bytes());
        // (tag, type, count, value): type 3 SHORT, 4 LONG.
        let bps_value = if p.samples == 1 {
            p.bits as u32
        } else {
            bps_off
        };
        let entries: [(u16, u16, u32, u32); 9] = [
            (256, 4, 1, p.width),
            (257, 4, 1, p.height),
            (258, 3, p.samples as u32, bps_value),
            (259, 3, 1, 1),
            (262, 3, 1, p.photometric as u32),
            (273, 4, 1, data_off),
            (277, 3, 1, p.samples as u32),
            (278, 4, 1, p.height),
            (279, 4, 1, p.data.len() as u32),
        ];
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        for (tag, ty, count, value) in entries {
            out.extend_from_slice(&tag.to_le_bytes());
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
            if ty == 3 && count == 1 {
                out.extend_from_slice(&(value as u16).to_le_bytes());
                out.extend_from_slice(&[0, 0]);
            } else {
                out.extend_from_slice(&value.to_le_bytes());
            }
        }
        prev_next_ptr = out.len();
        out.extend_from_slice(&[0, 0, 0, 0]);
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift), never starting with a known magic number.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.max(1);
    let mut out: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    if let Some(b) = out.first_mut() {
        *b = b'Z';
    }
    out
}

// ---- moto: a real S3 protocol server on 127.0.0.1 ----

/// `moto_server` from the virtualenv on a free loopback port; stopped when dropped.
pub struct Moto {
    pub port: u16,
    child: std::process::Child,
}

impl Moto {
    pub fn start() -> Moto {
        let exe = repo_root().join(".venv/bin/moto_server");
        assert!(
            exe.is_file(),
            "{} missing: run `scripts/setup.sh`",
            exe.display()
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(exe)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start moto_server");
        let moto = Moto { port, child };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "moto_server did not start on port {port}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        moto
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Creates a bucket with a plain PUT (moto does not check signatures).
    pub fn create_bucket(&self, bucket: &str) {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect moto");
        write!(
            s,
            "PUT /{bucket} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )
        .expect("send");
        let mut reply = String::new();
        s.read_to_string(&mut reply).expect("read");
        assert!(
            reply.starts_with("HTTP/1.1 200") || reply.starts_with("HTTP/1.0 200"),
            "{reply}"
        );
    }

    pub fn store(&self, bucket: &str) -> std::sync::Arc<dyn object_store::ObjectStore> {
        std::sync::Arc::new(self.s3(bucket))
    }

    /// The concrete S3 client (it also lists page by page: `PaginatedListStore`).
    pub fn s3(&self, bucket: &str) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .with_region("us-east-1")
            .with_bucket_name(bucket)
            .with_virtual_hosted_style_request(false)
            .build()
            .expect("s3 store")
    }

    /// Environment for a pixtract process talking to this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// Turns on object versioning for a bucket: GETs then answer `x-amz-version-id`, listings carry none.
    pub fn enable_versioning(&self, bucket: &str) {
        let body = r#"<VersioningConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Status>Enabled</Status></VersioningConfiguration>"#;
        let (status, reply) = http(
            self.port,
            "PUT",
            &format!("/{bucket}?versioning"),
            &[],
            body.as_bytes(),
        );
        assert_eq!(status, 200, "{reply}");
    }
}

// ---- Azurite and fake-gcs-server: emulators installed by `scripts/setup.sh` under `.emulators` ----

/// A free loopback port (bound and released; the emulator binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// `.emulators/NAME` made by `scripts/setup.sh`; missing is a failure that says how to make it.
fn emulator(name: &str) -> PathBuf {
    let exe = repo_root().join(".emulators").join(name);
    assert!(
        exe.is_file(),
        "{} missing: run `scripts/setup.sh --emulators`",
        exe.display()
    );
    exe
}

/// `DIR/emulator.log`, where an emulator's stderr goes.
fn log_file(dir: &Path) -> std::fs::File {
    std::fs::File::create(dir.join("emulator.log")).expect("emulator log")
}

/// Waits until the child listens on `port`; a child that exits first fails the test with its log.
fn wait_listening(child: &mut std::process::Child, port: u16, what: &str, dir: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            let log = std::fs::read_to_string(dir.join("emulator.log")).unwrap_or_default();
            panic!("{what} exited before listening on port {port}: {status}\n{log}");
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what} did not start on port {port}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// One HTTP/1.1 request to 127.0.0.1:`port` (no client library needed for the emulators' set-up calls):
/// (status, whole reply).
pub fn http(
    port: u16,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut head = format!(
        "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("send");
    s.write_all(body).expect("send body");
    let mut reply = Vec::new();
    s.read_to_end(&mut reply).expect("read");
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, reply)
}

/// Azurite's blob service (in memory) on a free loopback port; stopped when dropped.
pub struct Azurite {
    pub port: u16,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

/// The emulator's well-known account and key (public, the same in every Azurite).
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

impl Azurite {
    pub fn start() -> Azurite {
        let exe = emulator("azurite-blob");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let mut child = Command::new(exe)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            // In memory, no telemetry (no network here), and it accepts object_store's API version.
            .args([
                "--inMemoryPersistence",
                "--disableTelemetry",
                "--loose",
                "--skipApiVersionCheck",
                "--silent",
            ])
            // Its working folder (in-memory storage rules out `--location`), and its log for a failure message.
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(log_file(dir.path()))
            .spawn()
            .expect("start azurite-blob");
        wait_listening(&mut child, port, "azurite-blob", dir.path());
        Azurite {
            port,
            child,
            _dir: dir,
        }
    }

    /// Creates a container. Azurite wants a signed request for that (object_store has no container call): a
    /// SharedKey signature from Python's standard library.
    pub fn create_container(&self, container: &str) {
        let script = r#"
import base64, email.utils, hashlib, hmac, sys, urllib.request
port, container, account, key = sys.argv[1:5]
date, version = email.utils.formatdate(usegmt=True), "2021-08-06"
# PUT, the 11 standard headers (empty but Content-Type: a zero Content-Length is empty, and urllib would otherwise
# send a form Content-Type of its own), then the x-ms-* headers and the resource.
ctype = "application/octet-stream"
to_sign = "PUT\n" + "\n" * 4 + ctype + "\n" * 7 + f"x-ms-date:{date}\nx-ms-version:{version}\n/{account}/{account}/{container}\nrestype:container"
sig = base64.b64encode(hmac.new(base64.b64decode(key), to_sign.encode(), hashlib.sha256).digest()).decode()
req = urllib.request.Request(f"http://127.0.0.1:{port}/{account}/{container}?restype=container", data=b"", method="PUT",
    headers={"Content-Type": ctype, "x-ms-date": date, "x-ms-version": version, "Authorization": f"SharedKey {account}:{sig}"})
print(urllib.request.urlopen(req).status)
"#;
        let out = python_stdout(
            script,
            &[
                &self.port.to_string(),
                container,
                AZURITE_ACCOUNT,
                AZURITE_KEY,
            ],
        );
        assert_eq!(out.trim(), "201", "{out}");
    }

    /// A client for one container, the way `pixtract` reaches the emulator (path-style account URL, well-known
    /// key), but without process-wide environment variables.
    pub fn store(&self, container: &str) -> std::sync::Arc<dyn object_store::ObjectStore> {
        let store = object_store::azure::MicrosoftAzureBuilder::new()
            .with_endpoint(format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.port))
            .with_allow_http(true)
            .with_account(AZURITE_ACCOUNT)
            .with_access_key(AZURITE_KEY)
            .with_container_name(container)
            .build()
            .expect("azure store");
        std::sync::Arc::new(store)
    }

    /// Environment for a pixtract process talking to this emulator (object_store's emulator mode).
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
            (
                "AZURITE_BLOB_STORAGE_URL",
                format!("http://127.0.0.1:{}", self.port),
            ),
        ]
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// fake-gcs-server (in memory) on a free loopback port; stopped when dropped.
pub struct FakeGcs {
    pub port: u16,
    child: std::process::Child,
    dir: tempfile::TempDir,
}

impl FakeGcs {
    pub fn start() -> FakeGcs {
        let exe = emulator("fake-gcs-server");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let host = format!("127.0.0.1:{port}");
        let mut child = Command::new(exe)
            .args(["-host", "127.0.0.1", "-port", &port.to_string()])
            .args([
                "-scheme",
                "http",
                "-backend",
                "memory",
                "-log-level",
                "error",
            ])
            // Without it, the XML API's paths (object_store lists and reads through them) answer 404.
            .args(["-public-host", &host])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(log_file(dir.path()))
            .spawn()
            .expect("start fake-gcs-server");
        wait_listening(&mut child, port, "fake-gcs-server", dir.path());
        // object_store's service-account file, pointed at the emulator, without OAuth.
        let sa = serde_json::json!({
            "private_key": "", "private_key_id": "", "client_email": "",
            "gcs_base_url": format!("http://{host}"), "disable_oauth": true,
        });
        std::fs::write(dir.path().join("sa.json"), sa.to_string()).expect("write sa.json");
        FakeGcs { port, child, dir }
    }

    fn service_account(&self) -> PathBuf {
        self.dir.path().join("sa.json")
    }

    pub fn create_bucket(&self, bucket: &str) {
        let body = serde_json::json!({ "name": bucket }).to_string();
        let (status, reply) = http(
            self.port,
            "POST",
            "/storage/v1/b",
            &[("Content-Type", "application/json")],
            body.as_bytes(),
        );
        assert_eq!(status, 200, "{reply}");
    }

    /// Writes an object through the JSON API's media upload (a new generation each time). object_store's puts
    /// go through the XML API, which this emulator does not serve for uploads (see tests/integration/stores.rs).
    pub fn upload(&self, bucket: &str, name: &str, bytes: &[u8]) {
        let encoded: String = name
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (status, reply) = http(
            self.port,
            "POST",
            &format!("/upload/storage/v1/b/{bucket}/o?uploadType=media&name={encoded}"),
            &[("Content-Type", "application/octet-stream")],
            bytes,
        );
        assert_eq!(status, 200, "{reply}");
    }

    /// A client for one bucket (lists and reads as pixtract does).
    pub fn store(&self, bucket: &str) -> std::sync::Arc<dyn object_store::ObjectStore> {
        let store = object_store::gcp::GoogleCloudStorageBuilder::new()
            .with_bucket_name(bucket)
            .with_service_account_path(self.service_account().to_string_lossy())
            .build()
            .expect("gcs store");
        std::sync::Arc::new(store)
    }

    /// Environment for a pixtract process talking to this emulator.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![(
            "GOOGLE_SERVICE_ACCOUNT",
            self.service_account().to_string_lossy().into_owned(),
        )]
    }
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
