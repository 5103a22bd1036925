//! What ships beside the binary: every `conf/*.yaml` passes `-t`, and the
//! systemd unit is valid and does what the README says it does.

mod common;

use std::path::Path;
use std::process::Command;

use common::BIN;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn every_shipped_config_passes_the_check() {
    let mut checked = 0;
    for entry in std::fs::read_dir(repo().join("conf")).unwrap() {
        let path = entry.unwrap().path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        ) {
            continue;
        }
        let out = Command::new(BIN)
            .arg("-t")
            .arg("-c")
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} fails -t:\n{}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "config OK");
        checked += 1;
    }
    assert!(checked >= 1);
}

#[test]
fn the_systemd_unit_forks_checks_first_and_reloads_by_upgrade() {
    let unit = std::fs::read_to_string(repo().join("systemd/gatehouse.service")).unwrap();
    let lines: Vec<&str> = unit.lines().map(str::trim).collect();
    for required in [
        "Type=forking",
        "PIDFile=/run/gatehouse/gatehouse.pid",
        "User=gatehouse",
        "ExecStartPre=/usr/local/bin/gatehouse -t -c /etc/gatehouse/gatehouse.yaml",
        "ExecStart=/usr/local/bin/gatehouse -d -c /etc/gatehouse/gatehouse.yaml",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ] {
        assert!(lines.contains(&required), "missing {required}");
    }
    let reload: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("ExecReload="))
        .collect();
    // Check, then ask the old process to hand over, then take over.
    assert_eq!(
        reload,
        [
            "/usr/local/bin/gatehouse -t -c /etc/gatehouse/gatehouse.yaml",
            "/bin/kill -QUIT $MAINPID",
            "/usr/local/bin/gatehouse -u -d -c /etc/gatehouse/gatehouse.yaml",
        ]
    );
}

#[test]
fn systemd_analyze_accepts_the_unit() {
    let installed = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok();
    assert!(
        installed,
        "systemd-analyze is not installed: run scripts/install-deps.sh (it installs systemd)"
    );
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(repo().join("systemd/gatehouse.service"))
        .unwrap()
        .replace("/usr/local/bin/gatehouse", BIN);
    let path = dir.path().join("gatehouse.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
