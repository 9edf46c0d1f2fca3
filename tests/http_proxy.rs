//! The HTTP front behind a TLS reverse proxy, configured with the very blocks docs/http.md
//! gives (read from it): nginx and Caddy from Debian in front of a loopback daemon with
//! `allowed_hosts = ["box.example"]`; nginx with a certificate of the test's own, Caddy with
//! its `tls internal`. curl asks through each for the page and for a streamed and a whole
//! answer with the page's `https://` origin; the stream must arrive as events, and the whole
//! answer name Paris.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A proxy, stopped with SIGTERM when dropped (nginx's master then stops its workers; a
/// SIGKILL would leave them running).
struct Stopped(Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.0.wait();
    }
}

fn need(tool: &str, package: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "this test needs {tool}: apt-get install {package} (.ci/run does)"
    );
}

/// A self-signed certificate for box.example in `dir` (cert.pem, key.pem).
fn certificate(dir: &Path) {
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=box.example",
        ])
        .args(["-addext", "subjectAltName=DNS:box.example"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
}

/// curl through the proxy at `port` as a page of `origin` would: returns the status code and
/// the body.
fn curl_from(origin: &str, ca: &Path, port: u16, args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "120", "-w", "\n%{http_code}"])
        .arg("--cacert")
        .arg(ca)
        .args(["--resolve", &format!("box.example:{port}:127.0.0.1")])
        .args(["-H", &format!("Origin: {origin}")])
        .args(args)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (code.parse().unwrap_or(0), body.to_string())
}

/// curl as the page served through the proxy (https://box.example).
fn curl(ca: &Path, port: u16, args: &[&str]) -> (u16, String) {
    curl_from("https://box.example", ca, port, args)
}

fn wait_for(proxy: &mut Stopped, port: u16, what: &str) {
    let until = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            proxy.0.try_wait().unwrap().is_none(),
            "{what} exited before it listened on {port}"
        );
        assert!(Instant::now() < until, "{what} never listened on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The fenced block of `lang` in docs/http.md.
fn documented(lang: &str) -> String {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/http.md")).unwrap();
    let start = doc
        .find(&format!("```{lang}\n"))
        .unwrap_or_else(|| panic!("no {lang} block in docs/http.md"))
        + lang.len()
        + 4;
    let len = doc[start..].find("```").unwrap();
    doc[start..start + len].to_string()
}

/// Replaces `what` (which must be there: the docs and the test must not drift apart).
fn replaced(text: &str, what: &str, with: &str) -> String {
    assert!(text.contains(what), "'{what}' is not in the documented block:\n{text}");
    text.replace(what, with)
}

/// The checks, through one proxy.
fn ask_through(ca: &Path, port: u16, proxy: &str) {
    let url = |path: &str| format!("https://box.example:{port}{path}");
    let (status, page) = curl(ca, port, &[&url("/")]);
    assert_eq!(status, 200, "{proxy}: the page");
    assert!(page.contains("<title>llama-tpu</title>"), "{proxy}");
    let question = r#"{"messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":30"#;
    let json = ["-H", "Content-Type: application/json", "-d"];
    let whole = format!("{question}}}");
    let (status, body) = curl(
        ca,
        port,
        &[&json[..], &[whole.as_str(), &url("/v1/chat/completions")]].concat(),
    );
    assert_eq!(status, 200, "{proxy}: {body}");
    assert!(body.contains("Paris"), "{proxy}: {body}");
    let streamed = format!(r#"{question},"stream":true}}"#);
    let (status, body) = curl(
        ca,
        port,
        &[&json[..], &[streamed.as_str(), &url("/v1/chat/completions")]].concat(),
    );
    assert_eq!(status, 200, "{proxy}: {body}");
    let events = body.matches("data: {").count();
    assert!(events >= 8, "{proxy}: the role, 7 tokens and the end as events: {body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{proxy}: {body}");
    // Another site's page is still refused through the proxy.
    let (status, _) = curl_from("https://evil.example", ca, port, &[&url("/v1/models")]);
    assert_eq!(status, 403, "{proxy}");
}

#[test]
fn behind_nginx_and_caddy_with_tls() {
    need("nginx", "nginx-light");
    need("caddy", "caddy");
    need("openssl", "openssl");
    need("curl", "curl");
    let dir = common::scratch("http-proxy");
    certificate(&dir);
    let d = common::HttpDaemon::start("http-proxy-daemon", &["--allowed-host", "box.example"]);
    let upstream = d.port;

    let nginx_port = common::free_port();
    let dirs = dir.display();
    let server = documented("nginx");
    let server = replaced(
        &server,
        "listen 443 ssl;",
        &format!("listen 127.0.0.1:{nginx_port} ssl;"),
    );
    let server = replaced(&server, "/etc/ssl/certs/box.example.pem", &format!("{dirs}/cert.pem"));
    let server = replaced(&server, "/etc/ssl/private/box.example.key", &format!("{dirs}/key.pem"));
    let server = replaced(&server, "127.0.0.1:8080", &format!("127.0.0.1:{upstream}"));
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\npid {dirs}/nginx.pid;\nerror_log {dirs}/nginx-error.log;\nevents {{}}\nhttp {{\n    access_log off;\n    client_body_temp_path {dirs}; proxy_temp_path {dirs};\n    fastcgi_temp_path {dirs}; uwsgi_temp_path {dirs}; scgi_temp_path {dirs};\n{server}}}\n"
        ),
    )
    .unwrap();
    let mut nginx = Stopped(
        Command::new("nginx")
            .arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&mut nginx, nginx_port, "nginx");
    ask_through(&dir.join("cert.pem"), nginx_port, "nginx");
    drop(nginx);

    // Caddy signs the certificate with its own authority: curl trusts that one.
    let caddy_port = common::free_port();
    let site = documented("caddyfile");
    let site = replaced(
        &site,
        "box.example {",
        &format!("https://box.example:{caddy_port} {{\n    bind 127.0.0.1"),
    );
    let site = replaced(&site, "127.0.0.1:8080", &format!("127.0.0.1:{upstream}"));
    let caddyfile = dir.join("Caddyfile");
    std::fs::write(
        &caddyfile,
        format!("{{\n    admin off\n    auto_https disable_redirects\n    skip_install_trust\n    storage file_system {dirs}/caddy\n}}\n\n{site}"),
    )
    .unwrap();
    let mut caddy = Stopped(
        Command::new("caddy")
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&caddyfile)
            .env("HOME", &dir)
            .env("XDG_DATA_HOME", dir.join("data"))
            .env("XDG_CONFIG_HOME", dir.join("config"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("caddy.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    wait_for(&mut caddy, caddy_port, "caddy");
    ask_through(&dir.join("caddy/pki/authorities/local/root.crt"), caddy_port, "caddy");
    drop(caddy);
}
