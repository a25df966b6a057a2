//! Each component targets Spin's `spin:up/http-trigger@3.6.0` world, so the
//! same `.wasm` runs under `spin up` and under the host.

use std::path::PathBuf;
use std::process::Command;

use nexus_tests::workspace_root;
use serde_json::Value;

const WORLD: &str = "spin:up/http-trigger@3.6.0";
const SPIN_SDK_VERSION: &str = "5.2.0";
const COMPONENTS: [&str; 3] = ["nexus_auth", "nexus_message", "nexus_presence"];

/// Finds the `wit` folder of spin-sdk 5.2.0: first from `cargo metadata`,
/// then in `$CARGO_HOME/registry/src/*/`.
fn spin_sdk_wit() -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let output = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(workspace_root().join("Cargo.toml"))
        .output();
    if let Ok(output) = output {
        if output.status.success() {
            if let Ok(metadata) = serde_json::from_slice::<Value>(&output.stdout) {
                let found = metadata["packages"].as_array().and_then(|packages| {
                    packages.iter().find(|package| {
                        package["name"] == "spin-sdk" && package["version"] == SPIN_SDK_VERSION
                    })
                });
                if let Some(manifest) = found.and_then(|package| package["manifest_path"].as_str())
                {
                    let wit = PathBuf::from(manifest).with_file_name("wit");
                    if wit.is_dir() {
                        return wit;
                    }
                }
            }
        }
    }

    let cargo_home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .expect("neither CARGO_HOME nor HOME is set");
    let registry = cargo_home.join("registry").join("src");
    let entries = std::fs::read_dir(&registry)
        .unwrap_or_else(|error| panic!("failed to read {}: {error}", registry.display()));
    for entry in entries.flatten() {
        let wit = entry
            .path()
            .join(format!("spin-sdk-{SPIN_SDK_VERSION}"))
            .join("wit");
        if wit.is_dir() {
            return wit;
        }
    }
    panic!(
        "spin-sdk {SPIN_SDK_VERSION} wit folder not found by cargo metadata nor under {}",
        registry.display()
    );
}

#[test]
fn components_target_spin_http_trigger() {
    let wit = spin_sdk_wit();
    let wasm_tools = std::env::var("NEXUS_WASM_TOOLS").unwrap_or_else(|_| "wasm-tools".into());
    let mut failures = Vec::new();
    for component in COMPONENTS {
        let wasm = workspace_root()
            .join("target/wasm32-wasip2/component")
            .join(format!("{component}.wasm"));
        assert!(
            wasm.is_file(),
            "{} not found; build it with `cargo build --target wasm32-wasip2 --profile component -p {}`",
            wasm.display(),
            component.replace('_', "-")
        );
        let output = Command::new(&wasm_tools)
            .args(["component", "targets", "--world", WORLD])
            .arg(&wit)
            .arg(&wasm)
            .output()
            .unwrap_or_else(|error| {
                panic!("failed to run {wasm_tools}: {error}; install it with `cargo install wasm-tools --locked`")
            });
        if !output.status.success() {
            failures.push(format!(
                "{component}: wasm-tools component targets exited with {}:\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "components that do not target {WORLD} ({}):\n{}",
        wit.display(),
        failures.join("\n")
    );
}
