//! A real headless browser for the tests: Debian's chromium driven over the Chrome DevTools Protocol through
//! `--remote-debugging-pipe` (JSON messages ending in NUL on file descriptors 3 and 4: no websocket, no port,
//! no extra client library). The page's console errors, uncaught exceptions and network requests are recorded.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::Duration;

use serde_json::{Value, json};

/// How long one DevTools command may take before the test fails (guards a hung browser, not a timing check).
const ANSWER_WITHIN: Duration = Duration::from_secs(120);

/// Debian's chromium (`scripts/setup.sh` installs it). Missing is a failure that says how to get it.
pub fn chromium() -> PathBuf {
    let path = std::env::var_os("PIXTRACT_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.is_file(),
        "{} missing: run `scripts/setup.sh` as root (it installs Debian's chromium) or set PIXTRACT_CHROMIUM",
        path.display()
    );
    path
}

fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

/// What the page did besides rendering.
#[derive(Debug, Default)]
pub struct PageLog {
    /// Console messages of type error/assert, uncaught exceptions, and log entries of level error.
    pub errors: Vec<String>,
    /// Every URL the page requested (the document itself included).
    pub requests: Vec<String>,
}

pub struct Browser {
    child: Child,
    to_browser: std::fs::File,
    from_browser: Receiver<Value>,
    next_id: u64,
    session: String,
    pub log: PageLog,
    /// Events seen while waiting for answers, not yet consumed.
    pending: Vec<Value>,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// Starts headless chromium with a fresh profile and opens one blank tab, with the console, log and network
    /// domains enabled.
    pub fn start() -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let (to_read, to_write) = pipe();
        let (from_read, from_write) = pipe();
        let (child_in, child_out) = (
            std::os::fd::AsRawFd::as_raw_fd(&to_read),
            std::os::fd::AsRawFd::as_raw_fd(&from_write),
        );
        let mut cmd = Command::new(chromium());
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--remote-debugging-pipe",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls (fcntl, dup2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Moved above 10 first, so that dup2 onto 3 and 4 never overwrites the other end.
                let a = libc::fcntl(child_in, libc::F_DUPFD, 10);
                let b = libc::fcntl(child_out, libc::F_DUPFD, 10);
                if a < 0 || b < 0 || libc::dup2(a, 3) < 0 || libc::dup2(b, 4) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().expect("start chromium");
        drop((to_read, from_write));
        let (tx, rx) = channel();
        let mut reader = BufReader::new(std::fs::File::from(from_read));
        std::thread::spawn(move || {
            loop {
                let mut message = Vec::new();
                match reader.read_until(0, &mut message) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        message.pop();
                        match serde_json::from_slice::<Value>(&message) {
                            Ok(v) => {
                                if tx.send(v).is_err() {
                                    return;
                                }
                            }
                            Err(_) => return,
                        }
                    }
                }
            }
        });
        let mut browser = Browser {
            child,
            to_browser: std::fs::File::from(to_write),
            from_browser: rx,
            next_id: 0,
            session: String::new(),
            log: PageLog::default(),
            pending: Vec::new(),
            _profile: profile,
        };
        let target = browser.browser_call("Target.createTarget", json!({"url": "about:blank"}));
        let target_id = target["targetId"].as_str().expect("targetId").to_string();
        let attached = browser.browser_call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
        );
        browser.session = attached["sessionId"]
            .as_str()
            .expect("sessionId")
            .to_string();
        for domain in [
            "Runtime.enable",
            "Log.enable",
            "Network.enable",
            "Page.enable",
        ] {
            browser.call(domain, json!({}));
        }
        browser
    }

    fn send(&mut self, method: &str, params: Value, session: Option<&str>) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            message["sessionId"] = s.into();
        }
        let mut bytes = serde_json::to_vec(&message).unwrap();
        bytes.push(0);
        self.to_browser
            .write_all(&bytes)
            .expect("write to chromium");
        loop {
            let message = self
                .from_browser
                .recv_timeout(ANSWER_WITHIN)
                .unwrap_or_else(|e| panic!("chromium did not answer {method}: {e}"));
            if message["id"].as_u64() == Some(id) {
                if let Some(error) = message.get("error") {
                    panic!("{method} failed: {error}");
                }
                return message["result"].clone();
            }
            self.record(message);
        }
    }

    fn record(&mut self, event: Value) {
        let params = &event["params"];
        match event["method"].as_str().unwrap_or_default() {
            "Runtime.consoleAPICalled"
                if matches!(params["type"].as_str(), Some("error" | "assert")) =>
            {
                self.log.errors.push(format!("console: {}", params["args"]));
            }
            "Runtime.exceptionThrown" => self
                .log
                .errors
                .push(format!("exception: {}", params["exceptionDetails"])),
            "Log.entryAdded" if params["entry"]["level"] == "error" => self
                .log
                .errors
                .push(format!("log: {}", params["entry"]["text"])),
            "Network.requestWillBeSent" => self.log.requests.push(
                params["request"]["url"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            ),
            _ => {}
        }
        self.pending.push(event);
    }

    fn browser_call(&mut self, method: &str, params: Value) -> Value {
        self.send(method, params, None)
    }

    /// A command to the open tab.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let session = self.session.clone();
        self.send(method, params, Some(&session))
    }

    /// Opens a local file and waits for its load event.
    pub fn open(&mut self, file: &Path) -> String {
        let url = format!("file://{}", file.canonicalize().unwrap().display());
        self.pending.clear();
        self.call("Page.navigate", json!({"url": url}));
        while !self
            .pending
            .iter()
            .any(|e| e["method"] == "Page.loadEventFired")
        {
            let message = self
                .from_browser
                .recv_timeout(ANSWER_WITHIN)
                .unwrap_or_else(|e| panic!("{url} did not load: {e}"));
            self.record(message);
        }
        url
    }

    /// Evaluates a JavaScript expression in the page and returns its value (JSON-serialisable results only).
    pub fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// A PNG of the whole page (not only the viewport), `width` CSS pixels wide.
    pub fn screenshot(&mut self, width: u32) -> Vec<u8> {
        use base64::Engine;
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": 800, "deviceScaleFactor": 1, "mobile": false}),
        );
        let height = self
            .eval("document.documentElement.scrollHeight")
            .as_u64()
            .expect("page height");
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        let shot = self.call("Page.captureScreenshot", json!({"format": "png"}));
        base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("screenshot data"))
            .expect("base64 PNG")
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Browser.close gets no answer once the browser is gone: write it and do not wait for one.
        let _ = self
            .to_browser
            .write_all(b"{\"id\":999999,\"method\":\"Browser.close\"}\0");
        for _ in 0..50 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
