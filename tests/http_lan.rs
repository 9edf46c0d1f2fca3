//! The HTTP front on a real non-loopback address, in a network namespace the test makes
//! (`unshare -n`, as root: CI runs as root): the address lives only inside it, on the
//! namespace's own loopback interface. `tests/reference/lan.py` runs in the namespace, starts
//! the daemons and asks as LAN clients, a tunnel and a web page would; this test asserts what
//! it saw.

mod common;

use std::process::Command;

use serde_json::Value;

/// Whether this machine lets the test make a network namespace (root, or unprivileged user
/// namespaces). Where it cannot, the test says so and does not run, except in CI, which must
/// be able to.
fn namespaces_work() -> bool {
    let ok = Command::new("unshare")
        .args(["-n", "ip", "link", "set", "lo", "up"])
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let why = "cannot make a network namespace here (`unshare -n` needs root, and `ip` from iproute2)";
        assert!(std::env::var_os("CI").is_none(), "{why}: CI must be able to");
        eprintln!("SKIPPED: {why}");
    }
    ok
}

#[test]
fn reachable_from_the_lan_with_a_key_or_named_hosts() {
    if !namespaces_work() {
        return;
    }
    let dir = common::scratch("http-lan");
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/reference/lan.py");
    let out = Command::new("unshare")
        .args(["-n", "python3"])
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_llama-tpu"))
        .arg(common::default_model())
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "lan.py failed:\n{stderr}");
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}:\n{stderr}"));
    eprintln!("{seen:#}");
    let status = |v: &Value| v["status"].as_u64().unwrap();
    assert!(seen["addresses"].as_str().unwrap().contains("10.77.0.1/24"));

    assert_eq!(
        seen["bare"]["exit"], 78,
        "a reachable bind with neither a key nor allowed_hosts"
    );
    assert!(seen["bare"]["stderr"].as_str().unwrap().contains("allowed_hosts"));

    let keyed = &seen["keyed"];
    assert_eq!(status(&keyed["lan_with_key"]), 200, "{keyed}");
    let answer: Value = serde_json::from_str(keyed["lan_with_key"]["body"].as_str().unwrap()).unwrap();
    assert!(
        answer["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{answer}"
    );
    assert_eq!(status(&keyed["lan_without_key"]), 401);
    assert_eq!(status(&keyed["name_with_key"]), 200, "a key serves any Host");
    assert_eq!(status(&keyed["preflight"]), 204);
    assert_eq!(
        keyed["preflight"]["headers"]["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(keyed["preflight"]["headers"]["access-control-allow-headers"]
        .as_str()
        .unwrap()
        .contains("Authorization"));
    assert_eq!(status(&keyed["foreign_origin"]), 403);

    let named = &seen["named"];
    assert_eq!(status(&named["allowed_name"]), 200, "{named}");
    assert_eq!(status(&named["other_name"]), 403, "{named}");
    assert_eq!(status(&named["address"]), 200, "an IP address is no rebinding");
    assert_eq!(status(&named["tunnel"]), 200, "{named}");
    assert_eq!(status(&named["tunnel_keyed"]), 200, "{named}");
    assert_eq!(status(&named["page_behind_tls_proxy"]), 200, "{named}");
    assert_eq!(seen["exits"], serde_json::json!([0, 0]), "SIGTERM: both exit 0");
}
