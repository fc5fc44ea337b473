//! The gateway driven by a third-party client: Python `websockets`, installed by this test into
//! a virtualenv under target/ (from PyPI) on first run.
mod common;

use std::path::Path;
use std::process::Command;

use common::{Gateway, token, venv_python};

#[test]
fn python_websockets_client_end_to_end() {
    let python = venv_python();
    // Long enough that three API publishes in a row land in one block on a loaded machine.
    let gw = Gateway::start(&["--block-interval-ms", "600"]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/client.py");
    let out = Command::new(python)
        .arg(script)
        .arg(gw.ws.to_string())
        .arg(gw.api.to_string())
        .arg(token("alice"))
        .arg(token("bob"))
        .output()
        .expect("run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python client failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
